"""Distributed mode end to end: nats-server and each service as its own OS process (`python -m app.serve`).

The services share a work directory (node directories, checkpoints) and the archive's SQLite store, and talk
only over JetStream and the archive's HTTP API, as in docker compose. A tiny-protocol run must come out like
an embedded one; killed workers must lose and duplicate nothing (JetStream redelivers their work); a
message that always fails must end in the DLQ with its node failed for that reason.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_loop import ROOT, assert_lineage_is_valid
from test_nats_bus import NatsServer, dead_letter_of, free_port

from app.runner import run
from archive.sqlite_store import SQLiteStore
from poise.contracts import Node, NodeStatus, Phase, RunConfig
from poise.nats_bus import REASON_HEADER
from proposer.baseline import description_key

pytestmark = [pytest.mark.nats, pytest.mark.slow]

WORKERS = ("proposer", "implementer", "trainer", "evaluator", "reflector")
START_TIMEOUT_S = 900.0  # a service imports torch and the testbed: minutes on a starved machine
RUN_TIMEOUT_S = 1500.0
ACK_WAIT_S = 10.0        # short, so a killed worker's job comes back quickly; heartbeats every ~3 s
VERIFY_WALL_S = 1200.0   # generous: a verification starved of CPU must not fail the node
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
PHASE_WORK = ("implement", "train", "evaluate")  # what the embedded runner's PhaseClock times


@dataclass
class Service:
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

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.name} not healthy:\n{self.log_text()[-3000:]}"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no nak; whatever it was handling stays unacknowledged."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
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
        self.nats = NatsServer(root / "jetstream", root / "nats-server.log").start()
        self.archive_port = free_port()
        self.settings = {
            "POISE_NATS_URL": self.nats.url, "POISE_WORK_DIR": str(self.work_dir), "POISE_HTTP_HOST": "127.0.0.1",
            "POISE_ARCHIVE_URL": f"http://127.0.0.1:{self.archive_port}", "POISE_ACK_WAIT_S": str(ACK_WAIT_S),
            "POISE_NAK_DELAY_S": "1", "POISE_MAX_DELIVER": "3", "POISE_SHUTDOWN_GRACE_S": "5",
            "POISE_LOG_LEVEL": "INFO", "POISE_VERIFY_WALL_S": str(VERIFY_WALL_S), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", **settings}
        self.services: dict[str, Service] = {}

    def start(self, names: tuple[str, ...], **settings: str) -> None:
        for name in names:
            env = {k: v for k, v in os.environ.items() if not k.startswith("POISE_")}
            port = self.archive_port if name == "archive" else free_port()
            env.update(self.settings, POISE_HTTP_PORT=str(port), **settings)
            self.services[name] = Service(name, port, self.root / f"{name}.log", env).start()
        for name in names:
            self.services[name].wait_healthy()

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def restart(self, name: str) -> None:
        self[name].start().wait_healthy()

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()
        self.nats.stop()

    def post_run(self, config: dict) -> None:
        response = httpx.post(f"{self['archive'].url}/api/runs", json=config, timeout=10)
        assert response.status_code == 202, response.text

    def nodes(self, run_id: str) -> list[Node]:
        response = httpx.get(f"{self['archive'].url}/api/runs/{run_id}/nodes", params={"nonfinite": "constants"},
                             timeout=10)
        return [Node.model_validate(n) for n in response.json()] if response.status_code == 200 else []

    def status(self, run_id: str) -> dict:
        return httpx.get(f"{self['archive'].url}/api/runs/{run_id}", timeout=10).json()["status"]

    def logged_at(self, service: str, pattern: str) -> datetime | None:
        """When `service` first logged a line matching `pattern` (its log's own clock), or None."""
        for line in self[service].log_text().splitlines():
            if re.search(pattern, line) and (stamp := LOG_TIME.match(line)):
                return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        return None

    def wait_finished(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> tuple[datetime, datetime]:
        """Until the archive says the run finished; returns (started, finished) from the archive's log.

        The API has no `finished` flag (a run's stop is the archive's in-memory decision), so the archive's
        log line is the signal; the API must then agree that nothing is left in the pipeline."""
        deadline = time.monotonic() + timeout_s
        while (finished := self.logged_at("archive", rf"run {run_id} finished")) is None:
            for service in self.services.values():
                assert service.process.poll() is None, f"{service.name} died:\n{service.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"run {run_id} did not finish:\n{self.diagnose()}"
            time.sleep(0.5)
        counts = self.status(run_id)["counts"]
        assert counts["proposed"] == counts["implemented"] == counts["trained"] == counts["evaluated"] == 0, counts
        started = self.logged_at("archive", rf"run {run_id} (started|resumed)")
        return started, finished

    def diagnose(self) -> str:
        return "\n".join(f"--- {name}\n{service.log_text()[-1500:]}" for name, service in self.services.items())

    def phase_seconds(self) -> float:
        """Seconds spent inside implement, train and evaluate handlers, over the services' /metrics."""
        return sum(self[name].metric("poise_phase_duration_seconds_sum", phase=phase)
                   for name, phase in (("implementer", "implement"), ("trainer", "train"), ("evaluator", "evaluate")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start(("archive", *WORKERS))
        yield cluster
    finally:
        cluster.stop()


def run_settings(run_id: str, **changes) -> dict:
    settings = {"run_id": run_id, "protocol": "tiny", "budget": 1, "parallel": 1, "root_seeds": 1,
                "replicate_seeds": 1, "seed": 3}
    return {**settings, **changes}


def assert_fully_documented(nodes: list[Node], budget: int) -> None:
    """Every node reflected with its whole e = (z, ρ, τ, y, r), ids unique, lineage consistent."""
    assert [n.status for n in nodes] == [NodeStatus.REFLECTED] * len(nodes), [(n.node_id, n.status) for n in nodes]
    assert len([n for n in nodes if n.node_id != ROOT]) == budget
    for node in nodes:
        z, rho, tau, y, r = node.proposal, node.implementation, node.trajectory, node.evaluation, node.reflection
        assert z.rationale and z.mechanisms
        assert rho.verified and rho.attempts[-1].passed
        assert len(tau.steps) == 3 and Path(tau.checkpoint_uri).is_dir()  # on the shared volume
        assert 0.0 <= y.overall <= 1.0 and y.suites
        assert r.text and r.generator == "offline"
    assert_lineage_is_valid(nodes)
    assert len({description_key(n.proposal) for n in nodes}) == len(nodes), "a description was proposed twice"


# -------------------------------------------------------------------------------------------- the run


def test_a_distributed_run_documents_every_node_like_the_embedded_run(cluster: Cluster, tmp_path: Path,
                                                                      record_property):
    run_id = "dist"
    phase_before = cluster.phase_seconds()
    cluster.post_run(run_settings(run_id))
    started, finished = cluster.wait_finished(run_id)
    wall = (finished - started).total_seconds()
    work = cluster.phase_seconds() - phase_before
    nodes = cluster.nodes(run_id)
    assert_fully_documented(nodes, budget=1)
    status = cluster.status(run_id)
    assert status["budget"]["evaluated"] == 1 and status["best"] is not None

    # The same run embedded (one process, in-process bus), for the overhead and the proposals.
    embedded = run(RunConfig(**run_settings("embedded")), tmp_path / "embedded")
    overhead = max(0.0, wall - work) / wall
    print(f"\noverhead (non-phase wall time / wall time), tiny protocol, budget 1, parallel 1, seed 3:\n"
          f"  distributed: wall {wall:.1f} s, implement+train+evaluate {work:.1f} s, overhead {overhead:.1%}\n"
          f"  embedded:    wall {embedded.wall_s:.1f} s, implement+train+evaluate {embedded.work_s:.1f} s, "
          f"overhead {embedded.overhead_fraction:.1%}")
    record_property("distributed_overhead", round(overhead, 4))
    record_property("embedded_overhead", round(embedded.overhead_fraction, 4))
    assert wall > 0 and work > 0
    # The same seed proposes the same candidates from the same parents. Outcomes may differ: on a busy
    # machine a candidate can hit its training deadline in one run and not the other (the run then
    # proposes one more), so only the distributed run's proposals must be among the embedded run's.
    with SQLiteStore.in_run_dir(tmp_path / "embedded") as store:
        embedded_proposals = {n.node_id: (n.proposal.name, n.genealogy.parent_ids) for n in store.nodes("embedded")}
    assert {n.node_id: (n.proposal.name, n.genealogy.parent_ids) for n in nodes}.items() <= embedded_proposals.items()


def test_killed_workers_lose_and_duplicate_nothing_and_their_work_is_redelivered(cluster: Cluster):
    run_id = "faults"
    cluster.post_run(run_settings(run_id, budget=1, seed=4))

    def kill_while(status: NodeStatus, service: str, working: Path) -> dict[str, str]:
        """SIGKILL `service` inside its handler of the root's job, then restart it. The moment is not a guess:
        the handler's sandboxed child creates `working` when it starts, and the job (a verification with a
        smoke RL run, or a training run) lasts seconds after that, so a kill within the 20 ms poll lands in it."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not working.exists():
            assert time.monotonic() < deadline, f"{service} never started on the root:\n{cluster.diagnose()}"
            time.sleep(0.02)
        cluster[service].kill()
        before = {n.node_id: n.status.value for n in cluster.nodes(run_id)}
        assert before[ROOT] == status, f"the root moved on before {service} could be killed mid-job"
        cluster.restart(service)
        return before

    root_dir = cluster.work_dir / "runs" / run_id / "nodes" / ROOT
    before = kill_while(NodeStatus.PROPOSED, "implementer", root_dir / "verify-1")
    before |= kill_while(NodeStatus.IMPLEMENTED, "trainer", root_dir / "train")
    cluster.wait_finished(run_id)
    nodes = cluster.nodes(run_id)
    assert set(before) <= {n.node_id for n in nodes}, "a node was lost"
    assert_fully_documented(nodes, budget=1)
    root = next(n for n in nodes if n.node_id == ROOT)
    assert len(root.implementation.attempts) == 1  # the killed verification left no trace of its own
    # The restarted workers got the killed jobs again from JetStream, after the ack wait.
    assert cluster["implementer"].metric("poise_bus_redeliveries_total", subject="work.implement") >= 1
    assert cluster["trainer"].metric("poise_bus_redeliveries_total", subject="work.train") >= 1


# ------------------------------------------------------------------------------------------- poison


def test_a_message_that_always_fails_ends_in_the_dlq_and_fails_its_node_with_the_reason(tmp_path: Path):
    """A trainer whose volume is broken (its work dir is a file) fails every work.train it gets."""
    broken = tmp_path / "not-a-directory"
    broken.write_text("the trainer's volume is not mounted\n")
    cluster = Cluster(tmp_path / "poison", POISE_MAX_DELIVER="2", POISE_NAK_DELAY_S="0.5")
    try:
        cluster.start(("archive", "implementer"), POISE_RUN_ID="poison", POISE_PROTOCOL="tiny", POISE_BUDGET="1",
                      POISE_ROOT_SEEDS="1", POISE_REPLICATE_SEEDS="1")
        cluster.start(("trainer",), POISE_WORK_DIR=str(broken))
        cluster.wait_finished("poison")
        (root,) = cluster.nodes("poison")
        assert root.status == NodeStatus.FAILED and root.failure.phase == Phase.TRAIN
        assert "NotADirectoryError" in root.failure.reason, root.failure
        letter = dead_letter_of(cluster.nats.url, "work.train")
        assert "NotADirectoryError" in letter.headers[REASON_HEADER] and letter.headers["Poise-Deliveries"] == "2"
        trainer = cluster["trainer"]
        assert trainer.metric("poise_dead_letters_total", subject="work.train") == 1
        assert trainer.metric("poise_bus_redeliveries_total", subject="work.train") == 1
    finally:
        cluster.stop()
