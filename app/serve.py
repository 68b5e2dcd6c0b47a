"""`poise serve SERVICE` (or `python -m app.serve SERVICE`): one service of the distributed mode.

One process per container (docs/operations.md, "A service process"): it reads its settings from `POISE_*` variables
(poise/settings.py), connects to NATS JetStream (`NatsBus`), builds its service and serves HTTP on
POISE_HTTP_PORT, else on the service's own port (`SERVICE_PORTS`), with one uvicorn worker in a thread:

- `GET /healthz`: 200 when the bus is connected (and, for the archive, the store answers); otherwise 503
  with a JSON body naming each problem. It is also 503 while the service shuts down.
- `GET /metrics`: Prometheus text of `poise.metrics.REGISTRY`.
- archive only: the read API under `/api/` (archive/api.py) and `POST /api/runs` to start or resume a run,
  which needs the write token (POISE_ARCHIVE_TOKEN_FILE; without one every write is refused), and the web UI at
  `/`; reads need the read token where POISE_ARCHIVE_READ_TOKEN_FILE is set (archive/auth.py).

Credentials (docs/operations.md, "Authentication"): the service connects to NATS as its own user
(poise-<service>, POISE_NATS_PASSWORD_FILE), allowed only its phase's subjects (poise/nats_auth.py); the workers
that read the archive send its read token.

Workers: proposer and reflector read the archive over HTTP (`ArchiveClient` on POISE_ARCHIVE_URL). The
implementer and trainer keep one service per run (node ids repeat across runs), with node directories
under `POISE_WORK_DIR/runs/<run_id>/nodes`, a volume the trainer and evaluator share.

The archive owns runs: at start-up it resumes every run in its store and starts the one POISE_RUN_ID
describes; POST /api/runs starts more. Its store is MongoDB (POISE_MONGO_URL) or, without it, SQLite at
POISE_WORK_DIR/archive.db.

An address it cannot reach is reported with the setting that holds it. NATS (POISE_NATS_URL) is retried until
it answers, since it may start after the service (compose and k8s start everything at once): every failed try
is logged with the pause before the next. A store the archive cannot open (POISE_MONGO_URL, or POISE_WORK_DIR
for SQLite) and a work directory a worker cannot write (POISE_WORK_DIR) stop the service at start-up with exit
status 2 (an orchestrator restarts it). The archive's API (POISE_ARCHIVE_URL) is tried once at start-up by
the services that read it; a problem is logged, not fatal, as the archive may come later. A store or a NATS
stream that answers but holds what contracts of a major version this POISE cannot read wrote (docs/architecture.md,
"Contract versions and rolling upgrades") stops the service at start-up the same way, naming both versions.

SIGTERM / SIGINT: the service stops fetching, lets the current handler finish for up to
POISE_SHUTDOWN_GRACE_S, closes the bus and the store, and exits 0. A handler still running after the grace
period has its message handed back (a nak without delay: redelivered at once, to another replica or to this
one restarted), and its sandboxed children are killed; the closed bus publishes nothing the handler reports
after that, so the interrupted work is redone, never recorded as a failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from archive.api import archive_router, store_unavailable
from archive.auth import ApiAuth, tokens_of
from archive.host import ArchiveHost
from archive.runs import RunRefused
from poise.bus import IncompatibleStream
from poise.contracts import MESSAGE_TYPES, Message
from poise.metrics import METRICS, REGISTRY
from poise.nats_bus import NatsAuthError
from poise.sandbox import boundary_problem, make_undumpable, stop_children
from poise.settings import SERVICE_PORTS, SERVICES, ServiceSettings, SettingsError, load_settings
from poise.store import ArchiveError, ArchiveStore, IncompatibleArchive

log = logging.getLogger("app.serve")

EVENT_SUBJECTS = tuple(subject for subject in MESSAGE_TYPES if subject.startswith("evt."))
LOOP_TICK_S = 1.0
NATS_RETRY_S = (1.0, 15.0)  # the first and the longest pause between tries to connect to NATS
NATS_HINT = ("set POISE_NATS_URL to the server's address, e.g. POISE_NATS_URL=nats://127.0.0.1:4222 when NATS "
             "runs on this machine")
WORK_DIR_HINT = ("set POISE_WORK_DIR to a directory this user can write (the same one for the implementer, trainer "
                 "and evaluator), e.g. POISE_WORK_DIR=$HOME/poise")
ARCHIVE_HINT = (f"e.g. POISE_ARCHIVE_URL=http://127.0.0.1:{SERVICE_PORTS['archive']} when `poise serve archive` "
                "runs on this machine")  # after a client error, which names POISE_ARCHIVE_URL
Check = Callable[[], str | None]  # a health check: None when fine, else what is wrong


class ServeError(Exception):
    """The service cannot start as configured; the message says what to change."""


# ----------------------------------------------------------------------------------------------- HTTP


def build_app(service: str, checks: Mapping[str, Check], stopping: threading.Event | None = None,
              router: APIRouter | None = None, before_scrape: Callable[[], None] | None = None,
              ui: APIRouter | None = None) -> FastAPI:
    """The service's HTTP app: /healthz, /metrics and, for the archive, the /api router and the web UI at /
    (included last: its catch-all page for unknown paths must not shadow the others)."""
    app = FastAPI(title=f"POISE {service}", docs_url="/api/docs" if router else None, redoc_url=None,
                  openapi_url="/api/openapi.json" if router else None)
    app.add_exception_handler(ArchiveError, store_unavailable)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        results = {name: _run_check(check) for name, check in checks.items()}
        if stopping is not None and stopping.is_set():
            results["service"] = "shutting down"
        problems = {name: problem for name, problem in results.items() if problem}
        body = {"status": "unhealthy" if problems else "ok", "service": service,
                "checks": {name: problem or "ok" for name, problem in results.items()}}
        return JSONResponse(body, status_code=503 if problems else 200)

    def metrics() -> Response:
        if before_scrape is not None:
            before_scrape()
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # Both spellings: a mounted ASGI app would answer /metrics with a redirect (docs/operations.md,
    # "HTTP: health, metrics, API").
    app.get("/metrics")(metrics)
    app.get("/metrics/", include_in_schema=False)(metrics)
    if router is not None:
        app.include_router(router)
    if ui is not None:
        app.include_router(ui)
    return app


def naming(check: Check, setting: str) -> Check:
    """`check`, whose problems end with the setting that holds the address it checks."""
    def named() -> str | None:
        problem = check()
        return None if problem is None else f"{problem} ({setting})"

    return named


def _run_check(check: Check) -> str | None:
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - a failing check is an unhealthy answer, not a 500
        return f"{type(err).__name__}: {err}"


class HttpServer:
    """uvicorn serving `app` from a daemon thread (one worker: metrics live in this process)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as err:
            self.socket.close()
            raise ServeError(f"cannot serve HTTP on {host}:{port}: {err}; set POISE_HTTP_PORT to a free port (0 picks "
                             "one)") from err
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", workers=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="http",
                                       daemon=True)

    def start(self, timeout_s: float = 10.0) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the HTTP server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.socket.close()


# ------------------------------------------------------------------------------------------ the archive


def open_store(settings: ServiceSettings) -> ArchiveStore:
    """MongoDB when POISE_MONGO_URL is set, else SQLite at POISE_WORK_DIR/archive.db; ServeError naming the
    setting to change when it cannot be opened (MongoStore tries the server at once)."""
    try:
        if settings.mongo_url:
            from archive.mongo_store import MongoStore

            return MongoStore(settings.mongo_url)
        from archive.sqlite_store import SQLiteStore

        return SQLiteStore(settings.work_dir / "archive.db")
    except IncompatibleArchive as err:  # it answers, but with documents of contracts this POISE cannot read
        raise ServeError(f"the archive's store ({store_setting(settings)}): {err}") from err
    except ArchiveError as err:
        hint = ("set POISE_MONGO_URL to a MongoDB that answers, or leave it unset for SQLite under POISE_WORK_DIR"
                if settings.mongo_url else f"{WORK_DIR_HINT}; or POISE_MONGO_URL for MongoDB")
        raise ServeError(f"the archive's store ({store_setting(settings)}): {err}; {hint}") from err


def store_setting(settings: ServiceSettings) -> str:
    """The setting that says where the archive's store is."""
    return "POISE_MONGO_URL" if settings.mongo_url else "POISE_WORK_DIR"


def store_check(store: ArchiveStore) -> Check:
    def check() -> str | None:
        ping = getattr(store, "ping", None)
        if ping is not None:
            return None if ping() else "the archive store does not answer ping"
        store.run_ids()  # SQLite: a read that fails if the file is unusable
        return None

    return check


# ------------------------------------------------------------------------------------------- workers


class PerRun:
    """One service per run, made on the run's first message: node ids repeat across runs, and the
    implementer verifies under the run's protocol."""

    def __init__(self, make: Callable[[str], Any]) -> None:
        self.make = make
        self.services: dict[str, Any] = {}

    def handle(self, message: Message) -> None:
        service = self.services.get(message.run_id)
        if service is None:
            service = self.services[message.run_id] = self.make(message.run_id)
        service.handle(message)


def nodes_dir(settings: ServiceSettings, run_id: str) -> Path:
    return settings.work_dir / "runs" / run_id / "nodes"


def work_dir_ready(settings: ServiceSettings) -> None:
    """Make POISE_WORK_DIR if need be: a worker that cannot write there says so now, not in its first handler."""
    work_dir = settings.work_dir
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(work_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"{work_dir} is not writable by this user")
    except OSError as err:
        raise ServeError(f"cannot use POISE_WORK_DIR={work_dir} ({err}); {WORK_DIR_HINT}") from err


def archive_reachable(settings: ServiceSettings) -> Check:
    """One quick read of the archive's API: None if it answers, else what is wrong and which setting to change."""
    from archive.client import ArchiveClient

    def check() -> str | None:
        probe = ArchiveClient(settings.archive_url, timeout_s=3.0, retries=0, token=read_token(settings))
        try:
            probe.run_ids()
        except ArchiveError as err:
            return f"{err}; {ARCHIVE_HINT}"
        finally:
            probe.close()
        return None

    return check


def forward_dead_letter(bus: Any) -> Callable[[Message, str], None]:
    """A worker's dead letters: the node fails in that phase (the archive applies the evt.failed)."""
    from archive.service import dead_letter_failure

    def dead_letter(message: Message, reason: str) -> None:
        METRICS.dead_letters.labels(subject=message.subject).inc()
        failed = dead_letter_failure(message, reason)
        if failed is None:
            log.error("%s for %s/%s given up: %s", message.subject, message.run_id, message.node_id, reason)
            return
        bus.publish(failed)

    return dead_letter


# --------------------------------------------------------------------------------------- the service


@dataclass
class Runtime:
    """What `serve` runs for one service."""

    subscriptions: dict[str, Callable[[Message], Any]]
    dead_letter: Callable[[Message, str], None]
    checks: dict[str, Check] = field(default_factory=dict)
    router: APIRouter | None = None
    ui: APIRouter | None = None   # the web UI (archive): mounted at / after everything else
    between: Callable[[], None] | None = None  # run on the loop thread between fetches (archive)
    closers: list[Callable[[], None]] = field(default_factory=list)
    counter_label: str = ""
    # tried once at start-up; a problem is logged, not fatal (the other side may come later)
    probes: dict[str, Check] = field(default_factory=dict)


def api_auth(settings: ServiceSettings) -> ApiAuth:
    """The archive API's tokens from the settings (each may hold several, one per line: archive/auth.py)."""
    return ApiAuth(tokens_of(_secret(settings.archive_token)), tokens_of(_secret(settings.archive_read_token)))


def read_token(settings: ServiceSettings) -> str | None:
    """What a worker sends to read the archive: its (first) read token, if reads need one."""
    return next(iter(tokens_of(_secret(settings.archive_read_token))), None)


def _secret(value: Any) -> str | None:
    return None if value is None else value.get_secret_value()


def archive_runtime(bus: Any, settings: ServiceSettings) -> Runtime:
    from archive.ui.app import ui_router

    auth = api_auth(settings)
    log.log(logging.INFO if auth.writes else logging.WARNING, "%s", auth.describe())
    store = open_store(settings)
    try:
        host = ArchiveHost(bus, store, settings.backends())
        host.resume_all(settings.run_id, settings.run_settings())
    except (RunRefused, ArchiveError) as err:
        store.close()
        raise ServeError(str(err)) from err
    return Runtime(subscriptions={subject: host.handle for subject in EVENT_SUBJECTS},
                   dead_letter=host.dead_letter, checks={"store": naming(store_check(store), store_setting(settings))},
                   router=archive_router(store, start_run=host.request, auth=auth),
                   ui=protected(ui_router(store), auth),
                   between=host.run_pending,
                   closers=[store.close], counter_label="evt.*")


def protected(ui: APIRouter, auth: ApiAuth) -> APIRouter:
    """The UI's routes behind the archive's read token (a browser asks for it: archive/auth.py)."""
    router = APIRouter(dependencies=[Depends(auth.read_page)])
    router.include_router(ui)
    return router


def proposer_runtime(bus: Any, settings: ServiceSettings) -> Runtime:
    from archive.client import ArchiveClient
    from proposer.service import ProposerService

    client = ArchiveClient(settings.archive_url, token=read_token(settings))
    worker = ProposerService(bus, client, fingerprint_dir=Path(settings.work_dir) / "fingerprints")
    return Runtime({worker.subject: worker.handle}, forward_dead_letter(bus), closers=[client.close],
                   counter_label=worker.subject, probes={"archive": archive_reachable(settings)})


def reflector_runtime(bus: Any, settings: ServiceSettings) -> Runtime:
    from archive.client import ArchiveClient
    from reflector.service import ReflectorService

    client = ArchiveClient(settings.archive_url, token=read_token(settings))
    worker = ReflectorService(bus, client)
    return Runtime({worker.subject: worker.handle}, forward_dead_letter(bus), closers=[client.close],
                   counter_label=worker.subject, probes={"archive": archive_reachable(settings)})


def implementer_runtime(bus: Any, settings: ServiceSettings) -> Runtime:
    from archive.client import ArchiveClient
    from implementer.service import ImplementerService

    work_dir_ready(settings)
    client = ArchiveClient(settings.archive_url, token=read_token(settings))

    def implementer(run_id: str) -> ImplementerService:
        config = client.get_run(run_id)
        if config is None:
            raise ArchiveError(f"run {run_id} is not in the archive at {settings.archive_url}")
        return ImplementerService(bus, nodes_dir(settings, run_id), config.protocol,
                                  config.max_correction_attempts, verify_wall_s=settings.verify_wall_s,
                                  config=config, archive=client)

    return Runtime({"work.implement": PerRun(implementer).handle}, forward_dead_letter(bus),
                   closers=[client.close], counter_label="work.implement",
                   probes={"archive": archive_reachable(settings)})


def trainer_runtime(bus: Any, settings: ServiceSettings) -> Runtime:
    if settings.trainer_backend == "verl":
        return verl_trainer_runtime(bus, settings)
    from trainer.service import TrainerService

    work_dir_ready(settings)
    trainers = PerRun(lambda run_id: TrainerService(bus, nodes_dir(settings, run_id), wall_s=settings.train_wall_s))
    return Runtime({"work.train": trainers.handle}, forward_dead_letter(bus), counter_label="work.train")


def verl_trainer_runtime(bus: Any, settings: ServiceSettings) -> Runtime:
    """The VERL trainer (docs/verl.md): the GPU protocol is loaded and checked now; a machine without the GPUs,
    the model or the data still starts (and says so in its log), and fails each node with that reason."""
    from trainer.service import VerlSetupError, VerlTrainerService, VerlTrainerSetup

    work_dir_ready(settings)
    try:
        setup = VerlTrainerSetup.from_settings(settings)
    except VerlSetupError as err:
        raise ServeError(str(err)) from err

    def trainer(run_id: str) -> VerlTrainerService:
        return setup.service(bus, nodes_dir(settings, run_id))

    def configured() -> str | None:  # the protocol loaded at start-up; GPUs, model and data are checked per node
        return None

    log.info("trainer backend verl: %s", setup.describe())
    problem = setup.problem()
    if problem is not None:
        log.warning("the VERL trainer cannot train here yet: %s; until that changes, each node it is sent fails "
                    "with this reason", problem)
    trainers = PerRun(trainer)
    return Runtime({"work.train": trainers.handle}, forward_dead_letter(bus), checks={"verl": configured},
                   counter_label="work.train")


def evaluator_runtime(bus: Any, settings: ServiceSettings) -> Runtime:
    from evaluator.backends import preflight
    from evaluator.service import EvaluatorService
    from evaluator.vllm_server import ServerError

    work_dir_ready(settings)
    backend = evaluator_backend(settings)
    try:
        preflight(backend)
    except ServerError as err:
        backend.close()
        raise ServeError(f"POISE_EVALUATOR_BACKEND={settings.evaluator_backend}: {err}") from err
    evaluator = EvaluatorService(bus, backend=backend)
    checks: dict[str, Check] = {}
    probes: dict[str, Check] = {}
    if backend.name != "testbed":
        checks[backend.name] = backend.check  # idle until the first checkpoint starts its own server
        if settings.vllm_url:  # a server someone else runs: it should answer from the start
            checks[backend.name] = probes[backend.name] = naming(backend.check, "POISE_VLLM_URL")
    return Runtime({evaluator.subject: evaluator.handle}, forward_dead_letter(bus), checks=checks,
                   closers=[backend.close], counter_label=evaluator.subject, probes=probes)


def evaluator_backend(settings: ServiceSettings):
    """The evaluator backend the settings describe (evaluator/backends.py); nothing is started yet."""
    from evaluator.backends import build_evaluator

    return build_evaluator(settings.evaluator_backend, Path(settings.work_dir), vllm_url=settings.vllm_url,
                           vllm_command=settings.vllm_command, vllm_python=settings.vllm_python,
                           startup_timeout_s=settings.vllm_startup_timeout_s, concurrency=settings.vllm_concurrency,
                           request_timeout_s=settings.vllm_request_timeout_s, bench_data=settings.bench_data)


# One builder per service of poise/settings.py SERVICES: adding a service is a builder and a line here
# (docs/extending.md). Services are imported inside their builder, so a container loads only its own.
RUNTIMES: dict[str, Callable[[Any, ServiceSettings], Runtime]] = {
    "archive": archive_runtime,
    "proposer": proposer_runtime,
    "implementer": implementer_runtime,
    "trainer": trainer_runtime,
    "evaluator": evaluator_runtime,
    "reflector": reflector_runtime,
}


CANDIDATE_RUNNERS = ("proposer", "implementer", "trainer")  # services that run candidate code in the sandbox


def sandbox_ready(service: str) -> None:
    """A service that runs candidate code refuses to start where the sandbox has no boundary (docs/sandbox.md)."""
    if service in CANDIDATE_RUNNERS:
        problem = boundary_problem()
        if problem is not None:
            raise ServeError(f"{service} will not run candidate code here: {problem}")


def build_runtime(service: str, bus: Any, settings: ServiceSettings) -> Runtime:
    """The service `service` on `bus`, with its health checks, HTTP routes and what to close at the end."""
    builder = RUNTIMES.get(service)
    if builder is None:
        raise ServeError(f"unknown service {service!r}; one of: {', '.join(SERVICES)}")
    return builder(bus, settings)


class BusCounters:
    """Copies the bus's redelivery count into `poise_bus_redeliveries_total` at each scrape.

    A per-subject mapping is copied per subject; a plain number is labelled with the subject this service
    consumes (a worker consumes one subject; the archive's events are labelled `evt.*`)."""

    def __init__(self, bus: Any, label: str) -> None:
        self.bus = bus
        self.label = label
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def sync(self) -> None:
        value = getattr(self.bus, "redelivered", None)
        if isinstance(value, Mapping):
            totals = {str(subject): int(n) for subject, n in value.items()}
        elif isinstance(value, int | float):
            totals = {self.label: int(value)}
        else:
            return
        with self._lock:
            for subject, total in totals.items():
                delta = total - self._seen.get(subject, 0)
                if delta > 0:
                    METRICS.bus_redeliveries.labels(subject=subject).inc(delta)
                self._seen[subject] = max(total, self._seen.get(subject, 0))


def bus_check(bus: Any, url: str) -> Check:
    def check() -> str | None:
        return None if bus.healthy() else f"not connected to NATS JetStream at {url} (POISE_NATS_URL)"

    return check


def make_bus(service: str, settings: ServiceSettings, dead_letter: Callable[[Message, str], None]) -> Any:
    from poise.nats_bus import NatsBus

    user, password = settings.nats_credentials(service)
    if user is None:
        log.warning("POISE_NATS_PASSWORD_FILE is unset: connecting to NATS without credentials, where any client may "
                    "publish any subject (docs/operations.md, \"Authentication\")")
    return NatsBus(settings.nats_url, ack_wait_s=settings.ack_wait_s, max_deliver=settings.max_deliver,
                   nak_delay_s=settings.nak_delay_s, dead_letter=dead_letter, name=f"poise-{service}", user=user,
                   password=password)


def connect(bus: Any, stop: threading.Event, url: str) -> bool:
    """Connect, retrying with backoff until it works (True) or `stop` is set (False). There is no limit: NATS may
    start after the service, and a service that waits costs nothing; each failed try names the setting."""
    delay, longest = NATS_RETRY_S
    while not stop.is_set():
        try:
            bus.connect()
            return True
        except IncompatibleStream as err:  # NATS answers, with streams this service cannot use: waiting won't help
            raise ServeError(f"cannot use NATS at {url}: {err}") from err
        except Exception as err:  # noqa: BLE001 - NATS not up yet, or at another address; keep trying
            log.warning("%s; retrying in %.0f s, until NATS answers or the service is stopped", nats_problem(url, err),
                        delay)
            stop.wait(delay)
            delay = min(delay * 2, longest)
    return False


def nats_problem(url: str, err: Exception) -> str:
    """What went wrong connecting to NATS at `url`, and what to change."""
    if isinstance(err, OSError):  # ConnectionError, TimeoutError: nothing answered at that address
        return f"cannot connect to NATS ({err}); {NATS_HINT}"
    if isinstance(err, NatsAuthError):
        return (f"{err}; set POISE_NATS_PASSWORD_FILE to this service's password file (`poise secrets` writes "
                "nats-<service>.password) and POISE_NATS_USER if its user is not poise-<service>")
    return f"cannot use NATS at {url} ({type(err).__name__}: {err})"


def bus_loop(bus: Any, stop: threading.Event, between: Callable[[], None] | None) -> None:
    """Fetch and handle messages until `stop`; `between` runs on this thread between fetches."""
    if between is None:
        bus.run_forever(stop)
        return
    while not stop.is_set():
        between()
        bus.drain_once(timeout_s=LOOP_TICK_S)


def serve(service: str, settings: ServiceSettings, stop: threading.Event | None = None,
          bus_factory: Callable[..., Any] = make_bus, on_ready: Callable[[HttpServer], None] | None = None) -> int:
    """Run `service` until `stop` is set (SIGTERM/SIGINT set it when called from the main thread)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
    runtime: Runtime | None = None
    make_undumpable()  # keys in this process's environment stay out of reach of same-uid processes
    sandbox_ready(service)

    def dead_letter(message: Message, reason: str) -> None:  # the bus exists before the service it feeds
        if runtime is None:
            log.error("%s for %s/%s dead-lettered before the service started: %s", message.subject,
                      message.run_id, message.node_id, reason)
            return
        runtime.dead_letter(message, reason)

    bus = bus_factory(service, settings, dead_letter)
    http: HttpServer | None = None
    status = 0
    try:
        runtime = build_runtime(service, bus, settings)
        counters = BusCounters(bus, runtime.counter_label)
        checks = {"bus": bus_check(bus, settings.nats_url), **runtime.checks}
        # while `stop` is set, /healthz says so
        app = build_app(service, checks, stop, runtime.router, counters.sync, ui=runtime.ui)
        http = HttpServer(app, settings.http_host, settings.port_of(service)).start()
        log.info("%s serving /healthz and /metrics on port %d", service, http.port)
        if on_ready is not None:
            on_ready(http)
        for name, probe in runtime.probes.items():
            problem = _run_check(probe)
            if problem is not None:
                log.warning("%s: %s (not fatal: messages that need it fail and are retried until it answers)", name,
                            problem)
        if connect(bus, stop, settings.nats_url):
            for subject, handler in runtime.subscriptions.items():
                bus.subscribe(subject, handler)
            status = _run_until_stopped(bus, stop, runtime.between, settings.shutdown_grace_s)
    finally:
        stop.set()
        bus.close()  # hands back a message whose handler outlived the grace period
        stopped = stop_children()  # after close: what the cut-short handler reports is not published
        if service == "trainer":
            from trainer.verl.launch import stop_runs

            stopped += stop_runs()  # VERL process groups (a Kubernetes Job is found again on redelivery)
        if stopped:
            log.warning("killed %d sandboxed child(ren) of the unfinished handler", stopped)
        for close in runtime.closers if runtime is not None else ():
            close()
        if http is not None:
            http.stop()
    log.info("%s stopped", service)
    return status


def _run_until_stopped(bus: Any, stop: threading.Event, between: Callable[[], None] | None, grace_s: float) -> int:
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            bus_loop(bus, stop, between)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread, which exits 1
            failure.append(err)
            log.exception("the bus loop stopped on an error")
        finally:
            stop.set()

    thread = threading.Thread(target=loop, name="bus", daemon=True)
    thread.start()
    stop.wait()
    bus.stop_fetching()
    log.info("stopping: no new messages; waiting up to %.0f s for the current handler", grace_s)
    thread.join(grace_s)
    if thread.is_alive():
        log.warning("the current handler did not finish within %.0f s; its message is handed back to JetStream "
                    "(redelivered at once) and any sandboxed child of it is killed", grace_s)
    return 1 if failure else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poise serve", description="run one POISE service (distributed mode)")
    parser.add_argument("service", choices=SERVICES)
    args = parser.parse_args(argv)
    return run_service(args.service)


def run_service(service: str) -> int:
    """The `poise serve` entry point: settings from the environment, clear errors, exit status."""
    try:
        settings = load_settings()
    except SettingsError as err:
        print(err, file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()
    try:
        return serve(service, settings)
    except ServeError as err:
        print(f"poise serve {service}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
