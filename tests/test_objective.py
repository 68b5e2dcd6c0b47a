"""The run objective (poise/objective.py): the length-compression utility and its constraint, stamped by the
archive on every evaluation and re-stamped when the root's yardstick moves; status, report and `poise run`
flags that carry the objective and the directive."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from app.cli import build_parser, run_config
from archive.report import pareto_front, write_report
from archive.sqlite_store import SQLiteStore
from archive.status import run_status
from archive.update import ArchiveUpdater, Outcome
from poise.contracts import (
    Evaluation,
    EvtEvaluated,
    Genealogy,
    Implementation,
    MechanismSpec,
    MetricKind,
    Node,
    NodeStatus,
    Objective,
    Proposal,
    RunConfig,
    SuiteResult,
    TrainingTrajectory,
)
from poise.objective import SHORTFALL_WEIGHT, Yardstick, score, yardstick
from poise.scoring import utility

RUN = "run-length"
SOURCE = "LOSS_AGG_MODE = 'token-mean'\nHPARAMS = {}\n"
LENGTH = Objective(kind="length", accuracy_tolerance=0.02, directive="answer in fewer tokens")


def evaluation(overall: float, mean_length: float, seed: int = 0) -> Evaluation:
    suite = SuiteResult(suite="hard", kind=MetricKind.ACC_AT_1, value=overall, ci_low=overall - 0.05,
                        ci_high=overall + 0.05, n_prompts=32, n_samples=32, mean_length=mean_length,
                        format_valid_rate=1.0, weight=1.0)  # fmt: skip
    return Evaluation(suites={"hard": suite}, overall=overall, mean_length=mean_length, seed=seed)


def trained(node_id: str, parents: list[Node]) -> Node:
    genealogy = (Genealogy.child(node_id, [p.genealogy for p in parents]) if parents
                 else Genealogy(run_id=RUN, node_id=node_id))  # fmt: skip
    proposal = Proposal(name=f"v-{node_id}", rationale="test", generator="offline",
                        mechanisms=[MechanismSpec(name="baseline:group_mean")],
                        parent_ids=[p.node_id for p in parents])  # fmt: skip
    trajectory = TrainingTrajectory(protocol="tiny", seed=0, steps=[], checkpoint_uri="file:///ckpt")
    implementation = Implementation.from_source(SOURCE, attempts=[], verified=True)
    return Node(genealogy=genealogy, proposal=proposal, status=NodeStatus.TRAINED, implementation=implementation,
                trajectory=trajectory)


# ------------------------------------------------------------------------------------------- scoring


def test_length_utility_rewards_compression_and_penalizes_the_accuracy_shortfall() -> None:
    stick = Yardstick(overall=0.50, mean_length=40.0, seeds=3)
    assert score(evaluation(0.50, 40.0), LENGTH, stick) == (pytest.approx(0.0), True)
    assert score(evaluation(0.49, 30.0), LENGTH, stick) == (pytest.approx(0.25), True)  # within tolerance
    assert score(evaluation(0.48, 20.0), LENGTH, stick) == (pytest.approx(0.5), True)  # exactly at the floor
    u, ok = score(evaluation(0.45, 20.0), LENGTH, stick)
    assert not ok and u == pytest.approx(0.5 - 1.0 - SHORTFALL_WEIGHT * 0.03)
    # a breaker ranks below every keeper no longer than the root, whatever its own length
    assert score(evaluation(0.47, 1.0), LENGTH, stick)[0] < score(evaluation(0.50, 40.0), LENGTH, stick)[0]


def test_overall_objective_leaves_the_utility_to_the_overall() -> None:
    stick = Yardstick(overall=0.5, mean_length=40.0, seeds=1)
    assert score(evaluation(0.3, 10.0), Objective(), stick) == (None, None)
    assert utility(evaluation(0.3, 10.0)) == 0.3
    assert score(evaluation(0.3, 10.0), LENGTH, None) == (None, None)  # no root yet: nothing to measure against


def test_yardstick_is_the_mean_over_the_roots_seeds() -> None:
    root = trained("n000", [])
    assert yardstick(root) is None
    root = root.model_copy(update={"evaluation": evaluation(0.5, 40.0),
                                   "replicates": [evaluation(0.4, 50.0, seed=1000)]})  # fmt: skip
    assert yardstick(root) == Yardstick(overall=pytest.approx(0.45), mean_length=pytest.approx(45.0), seeds=2)


# --------------------------------------------------------------------------------- archive stamping


@pytest.fixture
def store(tmp_path: Path):
    with SQLiteStore(tmp_path / "archive.db") as store:
        store.put_run(RunConfig(run_id=RUN, budget=4, objective=LENGTH))
        yield store


def test_archive_stamps_utilities_and_restamps_when_the_root_gains_a_seed(store: SQLiteStore) -> None:
    updater = ArchiveUpdater(store)
    root = trained("n000", [])
    short = trained("n001", [root])
    wrong = trained("n002", [root])
    for node in (root, short, wrong):
        assert store.insert_node(node)
    assert updater.apply(EvtEvaluated(run_id=RUN, node_id="n000", evaluation=evaluation(0.50, 40.0))).outcome \
        == Outcome.APPLIED
    result = updater.apply(EvtEvaluated(run_id=RUN, node_id="n001", evaluation=evaluation(0.49, 30.0)))
    assert result.node.evaluation.utility == pytest.approx(0.25) and result.node.evaluation.constraints_satisfied
    updater.apply(EvtEvaluated(run_id=RUN, node_id="n002", evaluation=evaluation(0.40, 20.0)))
    assert store.get_node(RUN, "n002").evaluation.constraints_satisfied is False
    stored_root = store.get_node(RUN, "n000").evaluation
    assert stored_root.utility == pytest.approx(0.0) and stored_root.constraints_satisfied

    # a second root seed moves the yardstick to Overall 0.46, length 50: every node is measured again
    updater.apply(EvtEvaluated(run_id=RUN, node_id="n000", replicate=1, evaluation=evaluation(0.42, 60.0, seed=1000)))
    n001 = store.get_node(RUN, "n001").evaluation
    assert n001.utility == pytest.approx(1 - 30.0 / 50.0) and n001.constraints_satisfied
    n002 = store.get_node(RUN, "n002").evaluation
    assert n002.utility == pytest.approx(1 - 20.0 / 50.0 - 1 - SHORTFALL_WEIGHT * (0.44 - 0.40))
    root_now = store.get_node(RUN, "n000")
    assert [e.constraints_satisfied for e in (root_now.evaluation, *root_now.replicates)] == [True, False]

    status = run_status(store, RUN)
    assert status.objective.kind == "length" and "fewer tokens" in status.objective.description
    assert status.constraints.model_dump() == {"satisfied": ["n001"], "violated": ["n000", "n002"]}


def test_report_draws_the_pareto_front_the_floor_and_who_meets_the_directive(store: SQLiteStore,
                                                                             tmp_path: Path) -> None:
    updater = ArchiveUpdater(store)
    root = trained("n000", [])
    children = [trained(f"n00{i}", [root]) for i in (1, 2, 3)]
    for node in (root, *children):
        store.insert_node(node)
    results = {"n000": (0.50, 40.0), "n001": (0.49, 30.0), "n002": (0.40, 20.0), "n003": (0.45, 35.0)}
    for node_id, (overall, length) in results.items():
        updater.apply(EvtEvaluated(run_id=RUN, node_id=node_id, evaluation=evaluation(overall, length)))
    # n003 is beaten by n001 on both axes; the rest trade accuracy for length
    assert [n.node_id for n in pareto_front(store.nodes(RUN))] == ["n002", "n001", "n000"]
    page = write_report(store, RUN, tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'class="pareto-front"' in page and 'data-nodes="n002 n001 n000"' in page
    assert 'class="accuracy-floor"' in page and "answer in fewer tokens" in page
    classes = {node_id: cls for cls, node_id in re.findall(r'<circle class="(point[^"]*)"[^>]*data-node-id="(\w+)"',
                                                             page)}
    assert classes == {"n000": "point root front satisfied", "n001": "point front satisfied",
                       "n002": "point front violated", "n003": "point violated"}  # the floor is 0.48
    rows = {row.split("</td>")[0].split(">")[-1]: row for row in page.split("<tr")[1:] if "data-node-id" in row}
    assert "<td>yes</td>" in rows["n001"] and "<td>no</td>" in rows["n002"]


# ---------------------------------------------------------------------------------------------- CLI


def test_run_flags_set_the_objective_and_keep_the_stored_one_on_resume() -> None:
    args = build_parser().parse_args(["run", "--objective", "length", "--directive", "be brief",
                                      "--accuracy-tolerance", "0.03"])  # fmt: skip
    config = run_config(args, None, "r")
    assert config.objective == Objective(kind="length", accuracy_tolerance=0.03, directive="be brief")
    resumed = run_config(build_parser().parse_args(["run", "--budget", "20"]), config, "r")
    assert resumed.objective == config.objective and resumed.budget == 20
    with pytest.raises(ValueError):
        run_config(build_parser().parse_args(["run", "--accuracy-tolerance", "-1"]), None, "r")
    assert isinstance(args, argparse.Namespace)
