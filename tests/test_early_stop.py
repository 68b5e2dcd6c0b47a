"""Early stopping on live curves (docs/early_stopping.md): the rule on constructed curves, the archive's plan, a real
tiny training stopped by it and recorded on its node, and the bench on a small constructed archive."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from test_contracts import make_evaluation, make_implementation, make_proposal

from app.bench_early_stop import bench_early_stop, read_archive
from app.cli import build_parser, run_config
from archive.sqlite_store import DB_FILENAME, SQLiteStore
from archive.update import STOPPED_EARLY, ArchiveUpdater, Outcome
from poise.algorithms import reference_algorithm
from poise.bus import InProcBus
from poise.contracts import (
    EarlyStopPlan,
    EarlyStopRule,
    EvtTrained,
    Genealogy,
    Node,
    NodeStatus,
    RunConfig,
    StopCheckpoint,
    TrainingStep,
    TrainingTrajectory,
    WorkTrain,
)
from poise.early_stop import (
    MIN_PAIRS,
    Pair,
    checkpoint_steps,
    decide,
    fit_rule,
    packaged_rule,
    pairs_from_nodes,
    partial_gap,
    replay,
)
from trainer.service import TrainerService

STEPS = 40
PARENT = tuple(0.40 + 0.005 * i for i in range(STEPS))  # a parent's reward curve, rising


def child_curve(offset: float, draw: random.Random) -> tuple[float, ...]:
    return tuple(r + offset + draw.gauss(0.0, 0.01) for r in PARENT)


def synthetic_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Children whose final utility difference to the parent is 0.3 × their reward offset, plus seed noise."""
    draw = random.Random(seed)
    pairs = []
    for i in range(n):
        offset = draw.uniform(-0.25, 0.1)
        pairs.append(Pair("r", f"n{i + 1:03d}", "n000", child_curve(offset, draw), PARENT,
                          0.6 + 0.3 * offset + draw.gauss(0.0, 0.004), 0.6))
    return pairs


def plan(rule: EarlyStopRule, noise_sd: float | None = 0.004) -> EarlyStopPlan:
    return EarlyStopPlan(rule=rule, parent_id="n000", parent_curve=list(PARENT), parent_utility=0.6, noise_sd=noise_sd)


# ------------------------------------------------------------------------------------------------ the rule


def test_checkpoints_are_a_quarter_half_and_three_quarters_of_the_steps():
    assert checkpoint_steps(40) == [10, 20, 30]
    assert checkpoint_steps(3) == [1, 2]  # the tiny protocol: never all the steps


def test_the_gap_is_the_childs_mean_reward_minus_the_parents_over_the_same_steps():
    assert partial_gap([0.2, 0.4, 9.0], [0.5, 0.5, 0.0], 2) == pytest.approx(-0.2)
    assert partial_gap([0.2, None], [0.5, 0.1], 2) == pytest.approx(-0.3)  # steps both measured
    assert partial_gap([0.2], [0.5, 0.5], 2) is None  # the child has not run that far


def test_a_child_far_below_its_parent_is_stopped_at_the_first_checkpoint():
    rule = fit_rule(synthetic_pairs(30), "default", STEPS)
    assert [c.step for c in rule.checkpoints] == [10, 20, 30]
    assert rule.checkpoints[0].slope == pytest.approx(0.3, abs=0.05)
    stop = replay(plan(rule), child_curve(-0.3, random.Random(1)), STEPS)
    assert stop is not None and stop.steps_run == 10 and stop.steps_planned == STEPS
    assert stop.probability < rule.alpha and stop.predicted < 0.6 and stop.gap < 0
    assert "P(reach parent)" in stop.reason and "n000" in stop.reason


def test_a_child_above_its_parent_is_never_stopped_whatever_the_line_says():
    hopeless = StopCheckpoint(step=10, intercept=-1.0, slope=0.0, residual_sd=0.001, x_mean=0.0, sxx=1.0, n=30)
    rule = EarlyStopRule(protocol="default", steps=STEPS, checkpoints=[hopeless])
    assert replay(plan(rule), child_curve(0.05, random.Random(2)), STEPS) is None
    assert replay(plan(rule), PARENT, STEPS) is None  # level with the parent: not below it
    assert replay(plan(rule), child_curve(-0.05, random.Random(2)), STEPS) is not None


def test_a_child_close_to_its_parent_is_not_stopped():
    rule = fit_rule(synthetic_pairs(30), "default", STEPS)
    assert replay(plan(rule), child_curve(-0.01, random.Random(3)), STEPS) is None


def test_too_few_pairs_fit_no_checkpoint_and_stop_nothing():
    rule = fit_rule(synthetic_pairs(MIN_PAIRS - 1), "default", STEPS)
    assert rule.checkpoints == []
    assert replay(plan(rule), child_curve(-0.3, random.Random(1)), STEPS) is None
    assert fit_rule(synthetic_pairs(MIN_PAIRS), "default", STEPS).checkpoints  # from MIN_PAIRS on


def test_the_runs_seed_noise_bounds_how_sure_the_rule_can_be():
    rule = fit_rule(synthetic_pairs(30), "default", STEPS)
    far_below = child_curve(-0.3, random.Random(1))
    assert replay(plan(rule, noise_sd=0.004), far_below, STEPS) is not None
    assert replay(plan(rule, noise_sd=0.5), far_below, STEPS) is None  # two seeds that noisy could be anywhere


def test_the_rule_is_checked_only_at_its_checkpoints():
    rule = fit_rule(synthetic_pairs(30), "default", STEPS)
    far_below = child_curve(-0.3, random.Random(1))
    assert decide(plan(rule), far_below[:9], STEPS) is None
    assert decide(plan(rule), far_below[:11], STEPS) is None
    assert decide(plan(rule), far_below[:10], STEPS) is not None


# --------------------------------------------------------------------------------- archived nodes and the plan

RUN = "es-run"


def node(node_id: str, parent: Node | None, curve: list[float], overall: float | None,
         status: NodeStatus = NodeStatus.EVALUATED, protocol: str = "default") -> Node:
    """An evaluated node (or a trained or implemented one) with this reward curve and Overall."""
    genealogy = (Genealogy.child(node_id, [parent.genealogy]) if parent is not None
                 else Genealogy(run_id=RUN, node_id=node_id))
    steps = [TrainingStep(step=i, reward_mean=r) for i, r in enumerate(curve)]
    trajectory = TrainingTrajectory(protocol=protocol, seed=0, steps=steps, checkpoint_uri=f"/ckpt/{node_id}")
    evaluation = make_evaluation().model_copy(update={"overall": overall, "utility": None}) if overall else None
    return Node(genealogy=genealogy, status=status, proposal=make_proposal(), implementation=make_implementation(),
                trajectory=trajectory if status != NodeStatus.IMPLEMENTED else None,
                evaluation=evaluation if status == NodeStatus.EVALUATED else None)


def constructed_archive(run_dir: Path, pairs: list[Pair], early_stop: bool | None = None,
                        protocol: str = "default") -> tuple[SQLiteStore, Node]:
    """A run in run_dir: a root (GRPO) with three seeds, and one evaluated child of it per pair."""
    store = SQLiteStore(run_dir / DB_FILENAME)
    store.put_run(RunConfig(run_id=RUN, protocol=protocol, early_stop=early_stop))
    root = node("n000", None, list(pairs[0].parent_curve), pairs[0].parent_utility)
    root = root.model_copy(update={"replicates": [make_evaluation(seed=s).model_copy(
        update={"overall": pairs[0].parent_utility + d, "utility": None}) for s, d in ((1001, 0.004), (2001, -0.004))]})
    store.insert_node(root)
    for i, pair in enumerate(pairs):
        store.insert_node(node(f"n{i + 1:03d}", root, list(pair.child_curve), pair.child_utility))
    return store, root


def test_pairs_are_evaluated_children_of_evaluated_parents(tmp_path):
    store, root = constructed_archive(tmp_path, synthetic_pairs(3))
    store.insert_node(node("n009", root, [0.1] * STEPS, None, status=NodeStatus.TRAINED))  # not evaluated: no pair
    pairs = pairs_from_nodes(store.nodes(RUN))
    assert sorted(p.child_id for p in pairs) == ["n001", "n002", "n003"] and {p.parent_id for p in pairs} == {"n000"}
    assert pairs[0].parent_curve == pytest.approx(PARENT)


def implemented_child(store: SQLiteStore, root: Node) -> Node:
    child = node("n050", root, [], None, status=NodeStatus.IMPLEMENTED)
    store.insert_node(child)
    return child


def test_the_archive_sends_a_childs_training_its_plan_fitted_on_the_runs_own_archive(tmp_path):
    store, root = constructed_archive(tmp_path, synthetic_pairs(MIN_PAIRS + 3), early_stop=True)
    child = implemented_child(store, root)
    updater = ArchiveUpdater(store)
    (work,) = updater.work_for(child, store.get_run(RUN))
    assert isinstance(work, WorkTrain) and work.early_stop is not None
    sent = work.early_stop
    assert sent.parent_id == "n000" and sent.parent_curve == pytest.approx(PARENT) and sent.parent_utility == 0.6
    assert sent.noise_sd == pytest.approx(0.004)  # the root's three seeds
    assert [c.step for c in sent.rule.checkpoints] == [10, 20, 30] and "own archive" in sent.rule.source
    assert updater.work_for(root.model_copy(update={"status": NodeStatus.IMPLEMENTED, "trajectory": None,
                                                    "evaluation": None, "replicates": []}),
                            store.get_run(RUN))[0].early_stop is None  # the root has no parent to reach


def test_a_run_that_turned_early_stopping_off_or_has_too_few_pairs_sends_no_plan(tmp_path):
    store, root = constructed_archive(tmp_path, synthetic_pairs(MIN_PAIRS + 3), early_stop=False)
    child = implemented_child(store, root)
    assert ArchiveUpdater(store).work_for(child, store.get_run(RUN))[0].early_stop is None
    few, root = constructed_archive(tmp_path / "few", synthetic_pairs(MIN_PAIRS - 1), early_stop=True)
    assert ArchiveUpdater(few).work_for(implemented_child(few, root), few.get_run(RUN))[0].early_stop is None


def test_by_default_only_a_protocol_with_a_packaged_rule_stops_early(tmp_path):
    assert packaged_rule("tiny") is None  # nothing fitted for the tests' protocol
    store, root = constructed_archive(tmp_path, synthetic_pairs(MIN_PAIRS + 3), early_stop=None, protocol="tiny")
    assert ArchiveUpdater(store).work_for(implemented_child(store, root), store.get_run(RUN))[0].early_stop is None


def test_poise_run_takes_early_stop_on_and_off():
    parser = build_parser()
    on = run_config(parser.parse_args(["run", "--early-stop"]), None, "r")
    off = run_config(parser.parse_args(["run", "--no-early-stop"]), on, "r")
    default = run_config(parser.parse_args(["run"]), None, "r")
    assert (on.early_stop, off.early_stop, default.early_stop) == (True, False, None)


# ------------------------------------------------------------------------------ a real training, stopped


def test_a_tiny_training_is_stopped_at_its_checkpoint_and_its_node_records_why(tmp_path):
    """The tiny protocol's first checkpoint is after step 1 of 3; a parent that scored reward 1.0 at every step and a
    line that predicts the child far below it stop the child there: the child is killed, its node fails in train with
    the stop kept on its trajectory, and no checkpoint is written."""
    line = StopCheckpoint(step=1, intercept=-0.5, slope=0.0, residual_sd=0.01, x_mean=0.0, sxx=1.0, n=20)
    rule = EarlyStopRule(protocol="tiny", steps=3, checkpoints=[line])
    early_stop = EarlyStopPlan(rule=rule, parent_id="n000", parent_curve=[1.0, 1.0, 1.0], parent_utility=0.5)
    bus = InProcBus()
    trained: list[EvtTrained] = []
    bus.subscribe(EvtTrained.subject, trained.append)
    work = WorkTrain(run_id=RUN, node_id="n001", source=reference_algorithm("grpo").source(), protocol="tiny",
                     seed=0, early_stop=early_stop)
    assert TrainerService(bus, tmp_path / "nodes").handle(work) == "stopped"
    while bus.step():
        pass
    (event,) = trained
    trajectory = event.trajectory
    assert trajectory.stopped_early is not None and trajectory.stopped_early.steps_run == 1
    assert [s.step for s in trajectory.steps] == [0] and trajectory.checkpoint_uri is None and not trajectory.aborted
    assert trajectory.stopped_early.probability < 0.05 and trajectory.stopped_early.predicted == pytest.approx(0.0)
    assert not (tmp_path / "nodes" / "n001" / "train" / "policy").exists()

    store = SQLiteStore(tmp_path / DB_FILENAME)
    store.put_run(RunConfig(run_id=RUN, protocol="tiny"))
    root = node("n000", None, [1.0, 1.0, 1.0], 0.5, protocol="tiny")
    store.insert_node(root)
    store.insert_node(node("n001", root, [], None, status=NodeStatus.IMPLEMENTED, protocol="tiny"))
    result = ArchiveUpdater(store).apply(event)
    assert result.outcome == Outcome.APPLIED and result.next_work == ()  # not evaluated as if it were complete
    stored = store.get_node(RUN, "n001")
    assert stored.status == NodeStatus.FAILED and stored.failure.reason.startswith(f"{STOPPED_EARLY} after 1 of 3")
    assert stored.trajectory.stopped_early == trajectory.stopped_early
    assert store.counters(RUN).evaluated == 1  # the root only: a stopped child does not spend the budget


# ------------------------------------------------------------------------------------------------ the bench


def test_the_bench_replays_held_out_curves_and_never_writes_the_archive(tmp_path):
    pairs = synthetic_pairs(30, seed=5)
    far = [Pair("r", f"x{i}", "n000", child_curve(-0.3, random.Random(10 + i)), PARENT, 0.5, 0.6) for i in range(3)]
    store, _ = constructed_archive(tmp_path / "run", pairs + far)
    store.close()
    archive = tmp_path / "run" / DB_FILENAME
    before = hashlib.sha256(archive.read_bytes()).hexdigest()
    report = bench_early_stop([tmp_path / "run"], json_path=tmp_path / "out.json", markdown_path=tmp_path / "out.md",
                              command="poise bench early-stop --runs run")
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == before
    summary = report["summary"]
    assert summary["cases"] == 33 and report["held_out"].startswith("leave one node out")
    stopped = {c["node"] for c in report["cases"] if c["stopped_at"] is not None}
    assert {"n031", "n032", "n033"} <= stopped  # the three far below their parent
    above = [c for c in report["cases"] if c["ended_above_parent"]]
    assert summary["stopped_among_above_parent"]["of"] == len(above) > 0
    assert summary["false_stop_rate"]["count"] == sum(1 for c in above if c["stopped_at"] is not None)
    saved = summary["compute_saved"]
    assert saved["steps_planned"] == 33 * STEPS and saved["steps_saved"] >= 3 * 30
    assert saved["ci95"][0] <= saved["fraction"] <= saved["ci95"][1]
    assert json.loads((tmp_path / "out.json").read_text())["summary"] == json.loads(json.dumps(summary))
    assert "false-stop rate" in (tmp_path / "out.md").read_text()
    assert [c.run_id for c, _ in read_archive(tmp_path / "run")] == [RUN]
