"""The chaos harness (app/bench_chaos.py): its schedule and its verdict on an archive, quickly; then real trials,
each a tiny distributed run (nats-server and six service processes) with one fault at a drawn moment, that must
end with no node lost, none duplicated, every node finished and every document valid.

The trials' seeds are fixed, so a trial that once broke an invariant stays here as a regression test (see
bench/results/chaos/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench_archive import SyntheticRun
from app.bench_chaos import (
    FAULT_KINDS,
    TINY_RUN,
    archive_verdict,
    digest_differences,
    draw_fault,
    draw_kill_moments,
    final_progress,
    kind_table,
    parse_kind,
    progress,
    resumable_trials,
    run_trial,
)
from archive.service import ArchiveService
from archive.sqlite_store import SQLiteStore
from poise.bus import InProcBus
from poise.contracts import (
    ROOT_ID,
    EvtEvaluated,
    EvtImplemented,
    EvtTrained,
    Implementation,
    Node,
    NodeStatus,
    RunConfig,
    TrainingStep,
    TrainingTrajectory,
)
from poise.scoring import replicate_seed
from poise.settings import SERVICES
from proposer.service import ProposerService
from reflector.service import ReflectorService

# ------------------------------------------------------------------------------------------ the schedule


def test_a_fault_is_drawn_from_its_seed_alone_and_lands_inside_the_run():
    run = TINY_RUN
    for seed in range(40):
        for kind in FAULT_KINDS:
            fault = draw_fault(seed, kind, run, ack_wait_s=10.0)
            assert fault == draw_fault(seed, kind, run, ack_wait_s=10.0)
            assert 1 <= fault.after_progress < final_progress(run) - 1
            assert fault.target == "nats" if kind == "nats" else fault.target in SERVICES
            if kind == "stop":
                assert fault.down_s > 10.0  # past the ack wait: JetStream redelivers what the process held
    assert draw_fault(3, "kill", run, target="archive").target == "archive"
    targets = {draw_fault(seed, "kill", run).target for seed in range(60)}
    assert targets == set(SERVICES)  # the archive included


def test_fault_kinds_are_parsed_with_an_optional_service():
    assert parse_kind("kill") == ("kill", None)
    assert parse_kind("stop:archive") == ("stop", "archive")
    for bad in ("nats:archive", "kill:nobody", "explode"):
        with pytest.raises(ValueError):
            parse_kind(bad)


def test_embedded_kill_moments_come_in_the_order_the_run_reaches_them():
    moments = draw_kill_moments(7, 20, {"budget": 2, "root_seeds": 2, "replicate_seeds": 2})
    assert moments == sorted(moments) and len(moments) == 20
    assert moments == draw_kill_moments(7, 20, {"budget": 2, "root_seeds": 2, "replicate_seeds": 2})


# ------------------------------------------------------------------------------------------- the verdict

RUN = {"budget": 2, "root_seeds": 3, "replicate_seeds": 1}  # what SyntheticRun(3) holds: a root with 2 replicates


def synthetic_nodes() -> list[Node]:
    """A finished run: the root with 3 seeds, two reflected children, the first confirmed with a fresh seed."""
    synthetic = SyntheticRun(3, live=0)
    nodes = [n.model_copy(update={"proposal": n.proposal.model_copy(update={"parent_ids": n.genealogy.parent_ids})})
             for n in synthetic.nodes()]
    confirmed = nodes[1].evaluation.model_copy(update={"seed": 99})
    nodes[1] = nodes[1].model_copy(update={"replicates": [confirmed]})
    return nodes


def write_store(tmp_path: Path, nodes: list[Node]) -> Path:
    synthetic = SyntheticRun(3, live=0)
    with SQLiteStore.in_run_dir(tmp_path) as store:
        store.put_run(synthetic.config)
        store.insert_nodes(nodes)
    return tmp_path / "archive.db"


def test_progress_counts_pipeline_steps_and_fresh_seeds():
    nodes = synthetic_nodes()
    assert progress(nodes) == 3 * 5 + 2 + 1 == final_progress({"budget": 2, "root_seeds": 3, "replicate_seeds": 1})
    trained = nodes[2].model_copy(update={"status": NodeStatus.TRAINED})
    assert progress([nodes[0], nodes[1], trained]) == progress(nodes) - 2


def test_a_sound_archive_passes_the_verdict(tmp_path: Path):
    nodes = synthetic_nodes()
    verdict = archive_verdict(write_store(tmp_path, nodes), nodes[0].run_id, RUN, {n.node_id for n in nodes}, nodes)
    assert verdict.ok, verdict
    assert (verdict.nodes, verdict.failed) == (3, 0)


def test_the_verdict_names_lost_duplicated_and_unfinished_nodes(tmp_path: Path):
    root, first, second = synthetic_nodes()
    twin = second.model_copy(update={"proposal": first.proposal.model_copy(update={"parent_ids": [ROOT_ID]})})
    stuck = Node(**{**dict(twin), "status": NodeStatus.TRAINED, "evaluation": None, "reflection": None})
    path = write_store(tmp_path, [root, first, stuck])
    verdict = archive_verdict(path, root.run_id, RUN, {ROOT_ID, "n001", "n002", "n003"})
    assert verdict.lost == ["n003"]
    assert verdict.duplicated == ["n002 proposes the algorithm of n001"]
    assert verdict.incomplete == ["n002 is trained"]
    assert "1 children evaluated for a budget of 2" in verdict.problems
    assert not verdict.ok


def test_the_verdict_finds_a_skipped_node_number_and_a_seed_stored_twice(tmp_path: Path):
    root, first, second = synthetic_nodes()
    twice = first.model_copy(update={"replicates": [first.evaluation]})
    renumbered = Node(**{**dict(second), "genealogy": second.genealogy.model_copy(update={"node_id": "n003"})})
    path = write_store(tmp_path, [root, twice, renumbered])
    verdict = archive_verdict(path, root.run_id, RUN, set())
    assert verdict.lost == ["n002 (never stored)"]
    assert verdict.duplicated == [f"n001 holds seeds {[first.evaluation.seed] * 2}"]


def test_a_document_that_breaks_its_contract_is_a_problem(tmp_path: Path):
    nodes = synthetic_nodes()
    path = write_store(tmp_path, nodes)
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE nodes SET doc = json_set(doc, '$.status', 'exploded') WHERE node_id = 'n001'")
    verdict = archive_verdict(path, nodes[0].run_id, RUN, set())
    assert verdict.problems and "cannot be read against the contracts" in verdict.problems[0]


def test_archive_digests_are_compared_node_by_node():
    expected = {"n000": {"status": "reflected", "parents": []}, "n001": {"status": "reflected", "parents": ["n000"]}}
    actual = {"n000": {"status": "reflected", "parents": []}, "n002": {"status": "failed", "parents": ["n000"]}}
    assert digest_differences(expected, expected) == []
    assert digest_differences(expected, actual) == ["n001 missing", "n002 is extra (failed)"]


def trial(kind: str, recover_s: float | None, lost: list[str] = (), completed: bool = True) -> dict:
    verdict = {"lost": list(lost), "duplicated": [], "incomplete": [], "problems": [], "failed": 0, "nodes": 3}
    return {"kind": kind, "injected": True, "after_finish": False, "completed": completed, "wall_s": 60.0,
            "recover_s": recover_s, "verdict": verdict, "ok": completed and not lost}


def test_the_table_sums_each_fault_kind_and_a_report_resumes_only_its_own_schedule(tmp_path: Path):
    rows = kind_table([trial("kill", 4.0), trial("nats", 2.0), trial("kill", 10.0, lost=["n002"]),
                       trial("kill", None, completed=False)])
    kill, nats = rows
    assert (kill["kind"], kill["trials"], kill["completed"], kill["lost"]) == ("kill", 3, 2, 1)
    assert (kill["recover_median_s"], kill["recover_max_s"], nats["trials"]) == (7.0, 10.0, 1)
    report = tmp_path / "chaos.json"
    report.write_text(json.dumps({"seed": 0, "kinds_in_turn": ["kill", "nats"], "trials": [trial("kill", 4.0)]}))
    assert len(resumable_trials(report, 0, ("kill", "nats"))) == 1
    with pytest.raises(ValueError, match="not of seed 1"):
        resumable_trials(report, 1, ("kill", "nats"))


# ------------------------------------------------------------------------------------ what trials found


def test_a_run_does_not_finish_while_a_node_waits_for_its_reflection(tmp_path: Path):
    """Trial (stop, 16) SIGSTOPped the reflector near the end: the archive declared the run finished with a node
    still evaluated, because a node waiting for its reflection is not in flight. It finishes with the reflection."""
    from test_services import SOURCE, evaluation

    config = RunConfig(run_id="late", protocol="tiny", budget=1, parallel=1, root_seeds=1, replicate_seeds=1)
    store = SQLiteStore(tmp_path / "archive.db")
    store.put_run(config)
    bus = InProcBus()
    archive = ArchiveService(bus, store, config)
    for subject in ("evt.proposed", "evt.implemented", "evt.trained", "evt.evaluated", "evt.reflected", "evt.failed"):
        bus.subscribe(subject, archive.handle)
    bus.subscribe("work.propose", ProposerService(bus, store).handle)  # no reflector yet: it is stopped

    def settle() -> None:
        while bus.step():
            pass

    def through_evaluation(node_id: str, replicate: int = 0) -> None:
        ids = {"run_id": "late", "node_id": node_id, "replicate": replicate}
        seed = replicate_seed(config.seed, replicate) if replicate else config.seed
        if not replicate:
            bus.publish(EvtImplemented(run_id="late", node_id=node_id,
                                       implementation=Implementation.from_source(SOURCE, verified=True)))
            settle()
        trajectory = TrainingTrajectory(protocol="tiny", seed=seed, checkpoint_uri=f"/ckpt/{node_id}-{replicate}",
                                        steps=[TrainingStep(step=0, reward_mean=0.3, kl=0.0, step_time_s=1.0)])
        bus.publish(EvtTrained(**ids, trajectory=trajectory))
        settle()
        bus.publish(EvtEvaluated(**ids, evaluation=evaluation(0.5 if node_id == ROOT_ID else 0.6, seed=seed)))
        settle()

    archive.start()
    settle()
    through_evaluation(ROOT_ID)
    through_evaluation("n001")
    through_evaluation("n001", replicate=1)  # the best, confirmed with a fresh seed: nothing else is in flight
    assert [n.status for n in store.nodes("late")] == [NodeStatus.EVALUATED] * 2
    assert not archive.state.finished
    bus.subscribe("work.reflect", ReflectorService(bus, store).handle)  # SIGCONT
    settle()
    assert [n.status for n in store.nodes("late")] == [NodeStatus.REFLECTED] * 2
    assert archive.state.finished and archive.state.stop_reason == "budget reached"
    store.close()


# --------------------------------------------------------------------------------------------- trials

# (fault, seed): a few trials of each kind, the archive included. Each is a regression test once it has
# found something (bench/results/chaos/README.md says what).
TRIALS = [
    ("stop", 16),  # SIGSTOP of the reflector at the end: the run finished before a node's reflection (fixed)
    ("kill:archive", 0),
    ("kill:implementer", 1),
    ("kill:trainer", 2),
    ("stop", 3),
    ("nats", 4),
]


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.nats
@pytest.mark.parametrize(("fault", "seed"), TRIALS, ids=[f"{f}-{s}" for f, s in TRIALS])
def test_a_fault_at_a_drawn_moment_loses_and_duplicates_no_node(fault: str, seed: int, tmp_path: Path):
    kind, target = parse_kind(fault)
    result = run_trial(seed, kind, tmp_path / "trial", target)
    print(result.line())
    assert result.injected, "the fault never struck; draw it earlier in the run"
    assert result.completed, result.verdict.problems
    assert result.verdict.ok, result.line()
    assert kind_table([result.as_dict()])[0]["lost"] == 0
