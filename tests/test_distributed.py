"""Distributed mode end to end: nats-server and each service as its own OS process (`python -m app.serve`).

The services share a work directory (node directories, checkpoints) and the archive's SQLite store, and talk
only over JetStream and the archive's HTTP API, as in docker compose, with authentication on as there: each
service connects to NATS as its own user, allowed only its phase's subjects (poise/nats_auth.py), and the
archive's API needs its tokens (app/cluster.py Credentials). A tiny-protocol run must come out like
an embedded one; killed workers must lose and duplicate nothing (JetStream redelivers their work); an archive
killed between a store write and its publish must resume the run; a message that always fails must end in the
DLQ with its node failed for that reason. Kills land at fault points (poise/faults.py): the cluster's services
start with them, released, and a test arms the ones it needs.
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
from test_nats_bus import NatsServer, dead_letter_of, free_port, jetstream

from app.cluster import Credentials
from app.runner import run
from archive.sqlite_store import SQLiteStore
from poise.contracts import Node, NodeStatus, Phase, RunConfig
from poise.faults import Reach, arm, reached, release
from poise.nats_bus import REASON_HEADER, WORK_STREAM
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

    def start(self, names: tuple[str, ...], **settings: str) -> None:
        for name in names:
            env = {k: v for k, v in os.environ.items() if not k.startswith("POISE_")}
            port = self.archive_port if name == "archive" else free_port()
            env.update(self.settings, POISE_HTTP_PORT=str(port), **self.credentials.settings_of(name), **settings)
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
        response = httpx.post(f"{self['archive'].url}/api/runs", json=config, timeout=10,
                              headers=self.credentials.api_headers())
        assert response.status_code == 202, response.text

    def nodes(self, run_id: str) -> list[Node]:
        response = httpx.get(f"{self['archive'].url}/api/runs/{run_id}/nodes", params={"nonfinite": "constants"},
                             timeout=10, headers=self.credentials.api_headers())
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


FAULT_POINTS = ("implementer.verify", "trainer.train", "archive.publish")  # what the kill tests arm


def fault_settings(fault_dir: Path) -> dict[str, str]:
    """The settings that give a cluster's services the kill tests' fault points (each service hits its own)."""
    return {"POISE_TESTING": "1", "POISE_FAULT_DIR": str(fault_dir),
            "POISE_FAULT_POINTS": ",".join(f"{point}=block" for point in FAULT_POINTS)}


def wait_reached(cluster: Cluster, service: str, point: str, timeout_s: float = RUN_TIMEOUT_S) -> Reach:
    """Until `service` is blocked at `point` (its one announcement, by that process)."""
    deadline = time.monotonic() + timeout_s
    while not (reaches := reached(cluster.root / "faults", point)):
        for name, other in cluster.services.items():
            assert other.process.poll() is None, f"{name} died:\n{other.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{service} never reached {point}:\n{cluster.diagnose()}"
        time.sleep(0.05)
    (reach,) = reaches
    assert reach.pid == cluster[service].process.pid, reach
    return reach


def child_pid(reach: Reach) -> int:
    """The sandboxed child a point inside the work names (`child=<pid>`)."""
    return int(reach.detail.removeprefix("child="))


def process_gone(pid: int, timeout_s: float = 20.0) -> bool:
    """True once `pid` has exited (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def pending_messages(url: str, subject: str) -> int:
    """Messages of `subject` waiting in the work queue."""
    async def count(js):
        info = await js.stream_info(WORK_STREAM, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    return jetstream(url, count)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    for point in FAULT_POINTS:  # released: a test arms the ones it needs
        release(root / "faults", point)
    cluster = Cluster(root, **fault_settings(root / "faults"))
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
    assert not cluster.nats.violations(), "a service was refused a subject its phase needs (poise/nats_auth.py)"


def test_killed_workers_lose_and_duplicate_nothing_and_their_work_is_redelivered(cluster: Cluster):
    run_id = "faults"
    faults = cluster.root / "faults"
    arm(faults, "implementer.verify")
    arm(faults, "trainer.train")
    cluster.post_run(run_settings(run_id, budget=1, seed=4))

    def kill_at(point: str, service: str, status: NodeStatus) -> dict[str, str]:
        """SIGKILL `service` while it is blocked at `point` inside its handler of the root's job (its sandboxed
        child running), then restart it with the point released."""
        reach = wait_reached(cluster, service, point)
        before = {n.node_id: n.status.value for n in cluster.nodes(run_id)}
        assert before[ROOT] == status, f"the root is {before[ROOT]} while {service} is blocked at {point}"
        cluster[service].kill()
        assert process_gone(child_pid(reach)), f"{service}'s sandboxed child outlived it"
        release(faults, point)
        cluster.restart(service)
        return before

    before = kill_at("implementer.verify", "implementer", NodeStatus.PROPOSED)
    before |= kill_at("trainer.train", "trainer", NodeStatus.IMPLEMENTED)
    cluster.wait_finished(run_id)
    nodes = cluster.nodes(run_id)
    assert set(before) <= {n.node_id for n in nodes}, "a node was lost"
    assert_fully_documented(nodes, budget=1)
    root = next(n for n in nodes if n.node_id == ROOT)
    assert len(root.implementation.attempts) == 1  # the killed verification left no trace of its own
    # The restarted workers got the killed jobs again from JetStream, after the ack wait.
    assert cluster["implementer"].metric("poise_bus_redeliveries_total", subject="work.implement") >= 1
    assert cluster["trainer"].metric("poise_bus_redeliveries_total", subject="work.train") >= 1


def test_an_archive_killed_between_a_store_write_and_its_publish_resumes_the_run(cluster: Cluster):
    """The archive writes the root's training, then dies before publishing its evaluation: restarted, it
    publishes the work the stored node waits for, and the run ends with nothing lost or done twice."""
    run_id = "archive-kill"
    faults = cluster.root / "faults"
    evaluations_before = cluster["evaluator"].metric("poise_phase_outcomes_total", phase="evaluate", outcome="ok")
    arm(faults, "trainer.train")  # hold the root's training, so the archive's next write is its evt.trained
    cluster.post_run(run_settings(run_id, budget=1, seed=5))
    wait_reached(cluster, "trainer", "trainer.train")
    arm(faults, "archive.publish")
    release(faults, "trainer.train")
    written = wait_reached(cluster, "archive", "archive.publish")
    assert written.detail == f"evt.trained {run_id}/{ROOT}", written
    cluster["archive"].kill()
    with SQLiteStore(cluster.work_dir / "archive.db", read_only=True) as store:
        assert store.get_node(run_id, ROOT).status == NodeStatus.TRAINED  # written
    assert pending_messages(cluster.nats.admin_url, "work.evaluate") == 0       # not published
    release(faults, "archive.publish")
    cluster.restart("archive")
    cluster.wait_finished(run_id)
    nodes = cluster.nodes(run_id)
    assert len({n.node_id for n in nodes}) == len(nodes) >= 2, [n.node_id for n in nodes]
    for node in nodes:  # every node complete, or failed with a reason
        assert node.status == NodeStatus.REFLECTED or (node.status == NodeStatus.FAILED and node.failure.reason), \
            (node.node_id, node.status, node.failure)
    assert_lineage_is_valid(nodes)
    root = next(n for n in nodes if n.node_id == ROOT)
    assert root.status == NodeStatus.REFLECTED and root.evaluation is not None
    # Each evaluation was done once: the redelivered evt.trained republished the same work.evaluate, which
    # JetStream dropped as a duplicate.
    stored = sum((n.evaluation is not None) + len(n.replicates) for n in nodes)
    evaluated = cluster["evaluator"].metric("poise_phase_outcomes_total", phase="evaluate", outcome="ok")
    assert evaluated - evaluations_before == stored


# ------------------------------------------------------------------------------------------- poison


def test_a_message_that_always_fails_ends_in_the_dlq_and_fails_its_node_with_the_reason(tmp_path: Path):
    """A trainer that fails every work.train it gets (a fault point armed to raise: a broken work dir is now
    refused when the service starts, app/serve.py)."""
    cluster = Cluster(tmp_path / "poison", POISE_MAX_DELIVER="2", POISE_NAK_DELAY_S="0.5")
    try:
        cluster.start(("archive", "implementer"), POISE_RUN_ID="poison", POISE_PROTOCOL="tiny", POISE_BUDGET="1",
                      POISE_ROOT_SEEDS="1", POISE_REPLICATE_SEEDS="1")
        cluster.start(("trainer",), POISE_TESTING="1", POISE_FAULT_DIR=str(tmp_path / "faults"),
                      POISE_FAULT_POINTS="trainer.received=raise")
        cluster.wait_finished("poison")
        (root,) = cluster.nodes("poison")
        assert root.status == NodeStatus.FAILED and root.failure.phase == Phase.TRAIN
        assert "FaultInjected" in root.failure.reason, root.failure
        letter = dead_letter_of(cluster.nats.admin_url, "work.train")
        assert "FaultInjected" in letter.headers[REASON_HEADER] and letter.headers["Poise-Deliveries"] == "2"
        trainer = cluster["trainer"]
        assert trainer.metric("poise_dead_letters_total", subject="work.train") == 1
        assert trainer.metric("poise_bus_redeliveries_total", subject="work.train") == 1
        assert not cluster.nats.violations(), "dead-lettering needs only the trainer's own permissions"
    finally:
        cluster.stop()
