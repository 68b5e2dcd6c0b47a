"""The embedded discovery loop end to end on the tiny protocol: a real run, a killed-and-resumed run, and
hostile candidates. Every candidate here is really verified, trained and evaluated in the sandbox."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.cli import main
from app.runner import RunError, run
from archive.sqlite_store import SQLiteStore
from archive.status import run_status
from implementer.core import OfflineCoder
from poise.contracts import NodeStatus, RunConfig
from poise.scoring import replicate_seed
from poise.timing import PhaseClock
from proposer.baseline import description_key

pytestmark = pytest.mark.slow
ROOT = "n000"


def tiny_config(run_id: str, **changes) -> RunConfig:
    settings = {"budget": 6, "parallel": 2, "protocol": "tiny", "root_seeds": 2, "replicate_seeds": 2, "seed": 5}
    return RunConfig(run_id=run_id, **{**settings, **changes})


def assert_lineage_is_valid(nodes):
    by_id = {n.node_id: n for n in nodes}
    assert len(by_id) == len(nodes), "duplicate node ids"
    for node in nodes:
        g = node.genealogy
        if node.node_id == ROOT:
            assert g.depth == 0 and g.parent_ids == []
            continue
        assert g.parent_ids == node.proposal.parent_ids and len(g.parent_ids) == 1
        parent = by_id[g.parent_ids[0]]
        assert parent.evaluation is not None, f"{node.node_id} was bred from an unevaluated parent"
        assert g.depth == parent.genealogy.depth + 1
        assert g.ancestors == [*parent.genealogy.ancestors, parent.node_id]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = run(tiny_config("e2e"), run_dir)
    with SQLiteStore.in_run_dir(run_dir) as store:
        nodes = store.nodes("e2e")
    return run_dir, summary, nodes


def test_a_tiny_run_grows_six_fully_documented_candidates(finished_run):
    run_dir, summary, nodes = finished_run
    children = [n for n in nodes if n.node_id != ROOT and n.status == NodeStatus.REFLECTED]
    assert len(children) >= 6 and summary.status.budget.evaluated == 6
    for node in [n for n in nodes if n.status == NodeStatus.REFLECTED]:
        z, rho, tau, y, r = node.proposal, node.implementation, node.trajectory, node.evaluation, node.reflection
        assert z.rationale and z.mechanisms
        assert rho.verified and rho.attempts[-1].passed and any(c.name == "smoke_run" for c in rho.attempts[-1].checks)
        assert len(tau.steps) == 3 and Path(tau.checkpoint_uri).is_dir()
        assert len(y.suites) == 6 and 0.0 <= y.overall <= 1.0 and y.overall_ci is not None
        assert r.text and r.generator == "offline"
    assert_lineage_is_valid(nodes)
    assert len({description_key(n.proposal) for n in nodes}) == len(nodes), "a description was proposed twice"
    assert summary.stop_reason == "budget reached"


def test_the_root_is_trained_with_several_seeds_and_the_best_is_confirmed(finished_run):
    run_dir, summary, nodes = finished_run
    root = next(n for n in nodes if n.node_id == ROOT)
    assert [r.seed for r in root.replicates] == [replicate_seed(5, 1)]
    best = summary.status.best
    assert best is not None and best.seeds >= 2 and len(best.interval) == 2
    confirmed = [n for n in nodes if n.node_id != ROOT and n.replicates]
    assert 1 <= len(confirmed) <= 2
    assert all(sorted(r.seed for r in n.replicates) == [1005, 2005] for n in confirmed)
    assert "GRPO" in best.verdict


def test_status_show_and_report_read_the_run(finished_run, capsys):
    run_dir, summary, nodes = finished_run
    assert main(["status", "--run-dir", str(run_dir), "--json"]) == 0
    import json

    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["reflected"] == len([n for n in nodes if n.status == NodeStatus.REFLECTED])
    assert status["budget"]["total"] == 6 and status["best"]["node_id"] and status["best"]["interval"]
    assert main(["show", "n001", "--run-dir", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    for section in ("def compute_advantages", "smoke_run", "Overall", nodes[1].proposal.name):
        assert section in shown
    assert main(["show", "n999", "--run-dir", str(run_dir)]) == 2
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    assert html.count("<svg") == 4 and "n001" in html


def test_resuming_a_finished_run_does_nothing_and_a_changed_protocol_is_refused(finished_run):
    run_dir, _, nodes = finished_run
    again = run(tiny_config("e2e"), run_dir)
    with SQLiteStore.in_run_dir(run_dir) as store:
        assert [n.model_dump_json() for n in store.nodes("e2e")] == [n.model_dump_json() for n in nodes]
    assert again.stop_reason == "budget reached"
    with pytest.raises(RunError, match="protocol='tiny' \\(asked 'default'\\)"):
        run(tiny_config("e2e", protocol="default"), run_dir)


def test_a_run_records_its_protocol_and_refuses_to_resume_after_the_protocol_changed(tmp_path, monkeypatch):
    from app.runner import open_run
    from poise.testbed.protocol import PROTOCOLS, protocol_sha256

    store, config = open_run(tmp_path, tiny_config("drift"))
    store.close()
    assert config.protocol_sha256 == protocol_sha256("tiny")
    store, resumed = open_run(tmp_path, tiny_config("drift", budget=8))  # same protocol: resumes, budget grows
    store.close()
    assert (resumed.budget, resumed.protocol_sha256) == (8, config.protocol_sha256)
    monkeypatch.setitem(PROTOCOLS, "tiny", PROTOCOLS["tiny"].replace(steps=4))
    with pytest.raises(RunError, match="settings of protocol 'tiny' changed since the run started"):
        open_run(tmp_path, tiny_config("drift"))
    with pytest.raises(RunError, match="unknown protocol 'nope'"):
        open_run(tmp_path / "other", tiny_config("other", protocol="nope"))


def node_rows(run_dir: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{run_dir / 'archive.db'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT node_id, status FROM nodes").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def test_a_run_killed_with_sigkill_resumes_with_no_node_lost_or_duplicated(tmp_path):
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "app.cli", "run", "--protocol", "tiny", "--budget", "1", "--parallel", "2",
               "--root-seeds", "1", "--replicate-seeds", "1", "--seed", "3", "--run-dir", str(run_dir)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    before: dict[str, str] = {}
    # Kill it while a child candidate is in the pipeline (proposed, implemented or trained, not yet done).
    while time.monotonic() < deadline and child.poll() is None:
        before = node_rows(run_dir) if (run_dir / "archive.db").exists() else {}
        if any(nid != ROOT and status in ("implemented", "trained") for nid, status in before.items()):
            break
        time.sleep(0.2)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stdout.read().decode()[-2000:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    before = node_rows(run_dir)
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming run" in resumed.stdout
    with SQLiteStore.in_run_dir(run_dir) as store:
        (run_id,) = store.run_ids()
        nodes = store.nodes(run_id)
        status = run_status(store, run_id)
    after = {n.node_id: n for n in nodes}
    assert set(before) <= set(after), "a node was lost"
    assert_lineage_is_valid(nodes)
    assert len({description_key(n.proposal) for n in nodes}) == len(nodes)
    children = [n for n in nodes if n.node_id != ROOT]
    assert status.budget.evaluated == 1 and len(children) == 1, [n.status for n in children]
    assert all(n.status == NodeStatus.REFLECTED for n in nodes)


def test_parallel_work_runs_side_by_side_and_every_node_ends_complete_or_failed_with_a_reason(tmp_path, monkeypatch):
    phases: list[tuple[str, str, float, float]] = []  # (worker thread, phase, start, end)

    class RecordingClock(PhaseClock):
        @contextmanager
        def phase(self, name):
            started = time.monotonic()
            with super().phase(name):
                yield
            phases.append((threading.current_thread().name, name, started, time.monotonic()))

    monkeypatch.setattr("app.runner.PhaseClock", RecordingClock)
    summary = run(tiny_config("side", budget=2, parallel=2, root_seeds=1, replicate_seeds=1), tmp_path)
    assert summary.stop_reason == "budget reached" and summary.status.budget.evaluated == 2
    # worker threads are named "<subject> <node id>": two nodes' phases overlapped in time
    side_by_side = [(a, b) for a in phases for b in phases
                    if a[0].split()[-1] < b[0].split()[-1] and a[2] < b[3] and b[2] < a[3]]
    assert side_by_side, phases
    with SQLiteStore.in_run_dir(tmp_path) as store:
        nodes = store.nodes("side")
    assert_lineage_is_valid(nodes)
    for node in nodes:
        assert node.status == NodeStatus.REFLECTED or (node.status == NodeStatus.FAILED and node.failure.reason)


# ------------------------------------------------------------------------------------- hostile candidates

SECRET = "sk-poise-fake-secret-4f1c9a"
HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "huge_allocation": "blob = bytearray(64 << 30)\n",
    "secret": "import os\nraise RuntimeError('got: ' + os.environ.get('POISE_FAKE_SECRET', 'nothing'))\n",
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
    "escape": "open({escape!r}, 'w').write('escaped')\n",
}


class HostileCoder(OfflineCoder):
    """Writes each hostile snippet in front of a real candidate for the first children, then behaves."""

    def __init__(self, snippets):
        super().__init__(name="hostile")
        self.snippets = list(snippets)

    def write(self, proposal):
        source = super().write(proposal)
        if proposal.parent_ids and self.snippets:
            return self.snippets.pop(0) + source
        return source


def test_hostile_candidates_are_stopped_recorded_and_the_loop_goes_on(tmp_path, monkeypatch):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    escape = tmp_path / "outside" / "escaped.txt"
    escape.parent.mkdir()
    snippets = [HOSTILE[k].format(port=listener.getsockname()[1], escape=str(escape)) for k in HOSTILE]
    monkeypatch.setenv("POISE_FAKE_SECRET", SECRET)
    run_dir = tmp_path / "hostile"
    log = []

    class Stream:
        def write(self, text):
            log.append(text)

        def flush(self):
            pass

    config = tiny_config("hostile", budget=1, parallel=1, root_seeds=1, replicate_seeds=1)
    summary = run(config, run_dir, stream=Stream(), verify_wall_s=60, coder=HostileCoder(snippets))
    listener.close()
    with SQLiteStore.in_run_dir(run_dir) as store:
        nodes = store.nodes("hostile")
    failed = [n for n in nodes if n.status == NodeStatus.FAILED]
    reasons = {n.node_id: n.failure.reason for n in failed}
    assert len(failed) == len(HOSTILE), reasons
    kinds = dict(zip(HOSTILE, [reasons[n] for n in sorted(reasons)], strict=True))
    assert "wall-clock deadline" in kinds["infinite_loop"]
    assert "MemoryError" in kinds["huge_allocation"]
    assert "got: nothing" in kinds["secret"]
    # blocked and named by the audit hook (poise/sandbox_audit.py) before the namespaces and mounts refuse them
    assert "attempted to connect to `127.0.0.1:" in kinds["socket"] and "blocked" in kinds["socket"]
    assert "attempted to write `" in kinds["escape"]
    assert not escape.exists()
    assert all(n.failure.phase == "implement" for n in failed)
    assert summary.status.budget.evaluated == 1  # the loop went on to a real candidate
    everything = [(run_dir / "archive.db").read_bytes(), (run_dir / "run.log").read_bytes(), "".join(log).encode()]
    everything += [p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".db-wal", ".log")]
    assert not any(SECRET.encode() in blob for blob in everything)


def test_phase_one_selection_runs_the_loop_with_screened_proposals(tmp_path):
    """parent_selection "poise": parents by acquisition, each child the winner of a screened population whose
    rejections are recorded on the proposal; the loop completes like the baseline's."""
    run_dir = tmp_path / "poise"
    summary = run(tiny_config("phase1", budget=1, parallel=1, root_seeds=1, replicate_seeds=1,
                              parent_selection="poise"), run_dir)
    with SQLiteStore.in_run_dir(run_dir) as store:
        nodes = store.nodes("phase1")
    assert summary.stop_reason == "budget reached" and summary.status.budget.evaluated == 1
    assert_lineage_is_valid(nodes)
    children = [n for n in nodes if n.node_id != ROOT]
    assert all(n.status == NodeStatus.REFLECTED for n in children)
    assert all(n.proposal.screening and n.proposal.screening.summary().startswith(
        f"parent {n.genealogy.parent_ids[0]}") for n in children)
    assert all(n.proposal.screening.parent_id == n.genealogy.parent_ids[0] for n in children)
    assert len({description_key(n.proposal) for n in nodes}) == len(nodes)
    assert any((run_dir / "fingerprints").iterdir()), "fingerprints are cached with the run"
