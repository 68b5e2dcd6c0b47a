"""Racing in the archive's loop (docs/racing.md): the real archive, proposer and reflector services on the
in-process bus, with implementation, training and evaluation scripted, so each node's score is its true value
plus a known seed noise and every scheduling decision can be checked against the racing rule."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from app.cli import main
from archive.report import render_report
from archive.service import ArchiveService
from archive.sqlite_store import SQLiteStore
from archive.status import children_trainings, report_arms, report_status, run_status
from poise.bus import InProcBus
from poise.contracts import (
    ROOT_ID,
    Evaluation,
    EvtEvaluated,
    EvtImplemented,
    EvtTrained,
    Genealogy,
    Implementation,
    Message,
    MetricKind,
    Node,
    NodeStatus,
    Reflection,
    ReportedRun,
    RunConfig,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
    WorkEvaluate,
    WorkImplement,
    WorkPropose,
    WorkTrain,
)
from poise.description.codegen import compile_proposal
from poise.description.mechanisms import AlgorithmDescription
from poise.description.proposals import make_proposal
from poise.racing import SEED_CAP
from poise.scoring import report_seed, seed_scores
from proposer.service import ProposerService
from reflector.service import ReflectorService

SOURCE = "LOSS_AGG_MODE = 'token-mean'\n"
NOISE_SD = 0.01


def true_value(node_id: str) -> float:
    """A node's true score: the root's 0.5, children spread by about one noise SD around it."""
    return 0.5 if node_id == ROOT_ID else 0.5 + random.Random(f"true/{node_id}").gauss(0.0, NOISE_SD)


def seed_score(node_id: str, seed: int, truth: Callable[[str], float] = true_value) -> float:
    return truth(node_id) + random.Random(f"noise/{node_id}/{seed}").gauss(0.0, NOISE_SD)


def evaluation(overall: float, seed: int) -> Evaluation:
    suite = SuiteResult(suite="easy", kind=MetricKind.ACC_AT_1, value=overall, ci_low=overall - 0.02,
                        ci_high=overall + 0.02, n_prompts=100, n_samples=100, mean_length=40.0,
                        format_valid_rate=0.9, weight=1.0)
    return Evaluation(suites={"easy": suite}, overall=overall, mean_length=40.0, seed=seed)


class ScriptedWorld:
    """Implements, trains and evaluates by script on the bus and records every message published, in order."""

    def __init__(self, bus: InProcBus, truth: Callable[[str], float] = true_value) -> None:
        self.bus = bus
        self.truth = truth
        self.log: list[Message] = []
        self.confirming: list[Message] = []  # published once the archive confirms the best at the end
        self.archive: ArchiveService | None = None
        self.authors: dict[str, str] = {}  # source → the node that wrote it
        publish = bus.publish

        def recorded(message: Message) -> None:
            self.log.append(message)
            if self.archive is not None and self.archive.state.confirming:
                self.confirming.append(message)
            publish(message)

        bus.publish = recorded
        bus.subscribe("work.implement", self.implement)
        bus.subscribe("work.train", self.train)
        bus.subscribe("work.evaluate", self.evaluate)

    def implement(self, work: WorkImplement) -> None:
        source = compile_proposal(work.proposal)  # the library's code, so the report can ablate it
        self.authors.setdefault(source, work.node_id)
        self.bus.publish(EvtImplemented(run_id=work.run_id, node_id=work.node_id,
                                        implementation=Implementation.from_source(source, verified=True)))

    def train(self, work: WorkTrain) -> None:
        # whose code it is: a report arm trains another node's, or an ablation no node has
        author = self.authors.get(work.source) or "ablation-" + hashlib.sha256(work.source.encode()).hexdigest()[:8]
        trajectory = TrainingTrajectory(protocol=work.protocol, seed=work.seed, checkpoint_uri=f"/ckpt/{author}",
                                        steps=[TrainingStep(step=0, reward_mean=0.5)])
        self.bus.publish(EvtTrained(run_id=work.run_id, node_id=work.node_id, replicate=work.replicate,
                                    arm=work.arm, trajectory=trajectory))

    def evaluate(self, work: WorkEvaluate) -> None:
        author = work.checkpoint_uri.removeprefix("/ckpt/")
        score = seed_score(author, work.seed, self.truth)
        scored = evaluation(score, work.seed).model_copy(update={"half": work.half})
        self.bus.publish(EvtEvaluated(run_id=work.run_id, node_id=work.node_id, replicate=work.replicate,
                                      arm=work.arm, evaluation=scored))


def wire(bus: InProcBus, store: SQLiteStore, config: RunConfig, truth: Callable[[str], float] = true_value
         ) -> tuple[ArchiveService, ScriptedWorld]:
    """The real archive, proposer and reflector on `bus`, with the scripted world doing the rest."""
    world = ScriptedWorld(bus, truth)
    archive = world.archive = ArchiveService(bus, store, config)
    bus.dead_letter = archive.dead_letter
    bus.subscribe("work.propose", ProposerService(bus, store).handle)
    bus.subscribe("work.reflect", ReflectorService(bus, store).handle)
    for subject in ("evt.proposed", "evt.implemented", "evt.trained", "evt.evaluated", "evt.reflected",
                    "evt.failed"):
        bus.subscribe(subject, archive.handle)
    return archive, world


def run_scripted(tmp_path: Path, truth: Callable[[str], float] = true_value, **settings
                 ) -> tuple[SQLiteStore, ArchiveService, ScriptedWorld]:
    store = SQLiteStore(tmp_path / "archive.db")
    config = RunConfig(run_id="race", protocol="tiny", seed=3, **settings)
    store.put_run(config)
    bus = InProcBus()
    archive, world = wire(bus, store, config, truth)
    archive.start()
    for _ in range(100_000):
        if not bus.step():
            break
    return store, archive, world


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    store, archive, world = run_scripted(tmp_path_factory.mktemp("race"), budget=16, parallel=2,
                                         seeding="racing")
    yield store, archive, world
    store.close()


def test_a_racing_run_spends_its_budget_in_trainings_and_finishes(raced):
    store, archive, world = raced
    assert archive.state.finished and archive.state.stop_reason == "budget reached"
    counters = store.counters("race")
    trainings = children_trainings(counters, store.scores("race"))
    status = run_status(store, "race")
    confirmation = sum(isinstance(m, WorkTrain) for m in world.confirming)
    assert confirmation and all(m.node_id == status.best.node_id for m in world.confirming
                                if isinstance(m, WorkTrain)), "the end confirms the best, nothing else"
    # The budget counts the children's trainings; at most the final confirmation goes beyond it, and the run
    # stops only once no new child could get its cap of seeds.
    assert 16 - SEED_CAP < trainings - confirmation <= 16
    assert status.budget.trainings == trainings and status.budget.reached
    assert status.budget.text().startswith(f"trainings {trainings}/16")
    children = [s for s in store.scores("race") if s.node_id != ROOT_ID]
    assert len(children) < 16, "racing spent some trainings on extra seeds, so fewer children were made"
    assert all(n.status == NodeStatus.REFLECTED for n in store.nodes("race"))


def test_extra_seeds_go_only_to_nodes_the_rule_names_and_never_beyond_the_cap(raced):
    store, _, world = raced
    confirming = set(map(id, world.confirming))
    extra = [m for m in world.log if isinstance(m, WorkTrain) and m.replicate and m.node_id != ROOT_ID
             and id(m) not in confirming]
    assert extra, "no child got an extra seed"
    for node in store.nodes("race"):
        confirmed = sum(isinstance(m, WorkTrain) and m.node_id == node.node_id for m in world.confirming)
        if node.node_id != ROOT_ID:
            assert len(seed_scores(node)) - confirmed <= SEED_CAP


def test_no_child_is_asked_for_while_an_extra_seed_is_pending(raced):
    _, _, world = raced
    pending: set[tuple[str, int]] = set()
    for message in world.log:
        if isinstance(message, WorkTrain) and message.replicate and message.node_id != ROOT_ID:
            pending.add((message.node_id, message.replicate))
        elif isinstance(message, EvtEvaluated) and message.replicate:
            pending.discard((message.node_id, message.replicate))
        elif isinstance(message, WorkPropose):
            assert not pending, f"{message.node_id} was asked for while {sorted(pending)} still trained"


def test_the_first_extra_seed_follows_the_racing_rule(raced):
    """Replay the archive up to the first children's extra seed: the node it went to is the one `next_seed`
    names from the seed scores that existed then."""
    from poise.racing import next_seed
    from poise.scoring import pooled_sd

    _, _, world = raced
    scores: dict[str, list[float]] = {}
    for message in world.log:
        if isinstance(message, EvtEvaluated):
            scores.setdefault(message.node_id, []).append(message.evaluation.overall)
        if isinstance(message, WorkTrain) and message.replicate and message.node_id != ROOT_ID:
            ordered = dict(sorted(scores.items()))
            noise = pooled_sd(list(ordered.values()))
            assert next_seed(ordered, noise, SEED_CAP, 1) == message.node_id
            return
    pytest.fail("no extra seed was given")


def test_one_seed_per_child_keeps_counting_children(tmp_path):
    store, archive, world = run_scripted(tmp_path, budget=5, parallel=2)
    status = run_status(store, "race")
    assert archive.state.finished and status.budget.evaluated == 5 and status.budget.trainings is None
    raced = {m.node_id for m in world.log if isinstance(m, WorkTrain) and m.replicate and m.node_id != ROOT_ID}
    assert raced <= {status.best.node_id} | {s.node_id for s in store.scores("race") if len(s.replicate_utilities)}
    assert math.isfinite(status.best.utility)
    store.close()


def test_a_racing_run_resumed_midway_redoes_the_pending_seed_and_ends_the_same(tmp_path):
    """Stop delivering messages at the first extra seed, drop what was queued (a crash), and start a new archive
    service on the same store: it asks for the same seed again, and the run finishes within its budget."""
    store = SQLiteStore(tmp_path / "archive.db")
    config = RunConfig(run_id="race", protocol="tiny", seed=3, budget=12, parallel=2, seeding="racing")
    store.put_run(config)

    first_bus = InProcBus()
    archive, world = wire(first_bus, store, config)
    archive.start()
    first = None
    while first_bus.step():
        first = next((m for m in world.log if isinstance(m, WorkTrain) and m.replicate
                      and m.node_id != ROOT_ID), None)
        if first is not None:
            break
    assert first is not None, "no extra seed was asked for"
    second_bus = InProcBus()
    archive, world = wire(second_bus, store, config)
    archive.start()
    redone = [m for m in world.log if isinstance(m, WorkTrain) and m.replicate and m.node_id != ROOT_ID]
    assert redone and (redone[0].node_id, redone[0].seed) == (first.node_id, first.seed)
    while second_bus.step():
        pass
    assert archive.state.finished
    trainings = children_trainings(store.counters("race"), store.scores("race"))
    assert trainings - sum(isinstance(m, WorkTrain) for m in world.confirming) <= 12
    store.close()


def test_the_root_is_never_raced_even_below_the_cap(tmp_path):
    """With 2 root seeds (below the cap of 3) the root still ranks, but its seeds are not the budget's to give:
    here the root leads every child by a little, so the rule would name it first if it could."""
    store, archive, world = run_scripted(tmp_path, truth=lambda node_id: 0.5 if node_id == ROOT_ID else 0.497,
                                         budget=10, parallel=2, seeding="racing", root_seeds=2)
    assert archive.state.finished
    root_trainings = [m for m in world.log if isinstance(m, WorkTrain) and m.node_id == ROOT_ID]
    assert [m.replicate for m in root_trainings] == [0, 1]
    store.close()


# ------------------------------------------------------------------------------------------- the report


def test_the_report_trains_the_best_and_grpo_on_the_same_fresh_seeds_on_the_reporting_half(tmp_path, capsys):
    store, archive, world = run_scripted(tmp_path, budget=8, parallel=2, seeding="racing", split=True,
                                         report_seeds=3)
    assert archive.state.finished
    evaluations = [m for m in world.log if isinstance(m, WorkEvaluate)]
    assert {m.half for m in evaluations if m.arm is None} == {"selection"}
    assert {m.half for m in evaluations if m.arm} == {"reporting"}
    status = run_status(store, "race")
    best = store.get_node("race", status.best.node_id)
    runs = {(r.arm, r.evaluation.seed): r.evaluation for r in best.reported}
    seeds = sorted({seed for _, seed in runs})
    root = store.get_node("race", ROOT_ID)
    arms = report_arms(best, root)
    assert {"best", "grpo"} <= set(arms)
    assert len(seeds) == 3 and set(runs) == {(arm, s) for arm in arms for s in seeds}
    used_before = {e.seed for n in store.nodes("race") for e in (n.evaluation, *n.replicates) if e is not None}
    assert not used_before & set(seeds), "the report's seeds are fresh"
    # each arm is the right code: GRPO's runs score as the root does on that seed, the best's as the best
    for seed in seeds:
        assert runs["grpo", seed].overall == pytest.approx(seed_score(ROOT_ID, seed))
        assert runs["best", seed].overall == pytest.approx(seed_score(best.node_id, seed))
    report = status.best.report
    differences = [runs["best", s].overall - runs["grpo", s].overall for s in seeds]
    assert report.paired_seeds == 3 and report.half == "reporting"
    assert report.gain == pytest.approx(sum(differences) / 3)
    assert report.gain_interval[0] < report.gain < report.gain_interval[1] and 0 <= report.p <= 1
    # the report is not selection: it never moves the best or the racing scores
    assert all(len(s.replicate_utilities) <= 3 for s in store.scores("race"))
    store.close()
    for command in (["status"], ["show", "best"]):
        assert main([*command, "--run-dir", str(tmp_path)]) == 0
        shown = capsys.readouterr().out
        assert "report (reporting half, fresh seeds):" in shown and "best − GRPO" in shown
        assert report.verdict in shown and all(c.difference in shown for c in report.contributions)
    assert main(["report", "--run-dir", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert '<section id="report">' in page and "on the reporting half" in page
    assert all(f"<td>{arm.arm}</td>" in page for arm in report.arms)


def test_a_report_interrupted_by_a_crash_is_finished_by_the_next_archive(tmp_path):
    store = SQLiteStore(tmp_path / "archive.db")
    config = RunConfig(run_id="race", protocol="tiny", seed=3, budget=6, parallel=2, report_seeds=2)
    store.put_run(config)

    bus = InProcBus()
    archive, world = wire(bus, store, config)
    archive.start()
    while bus.step():
        if sum(isinstance(m, EvtEvaluated) and m.arm is not None for m in world.log) == 2:
            break  # two report runs stored, the rest lost with the process
    bus = InProcBus()
    archive, world = wire(bus, store, config)
    archive.start()
    while bus.step():
        pass
    assert archive.state.finished
    best = store.get_node("race", run_status(store, "race").best.node_id)
    assert sorted((r.arm, r.evaluation.seed) for r in best.reported) == sorted(
        (arm, seed) for arm in report_arms(best, store.get_node("race", ROOT_ID))
        for seed in {r.evaluation.seed for r in best.reported})
    arms = report_arms(best, store.get_node("race", ROOT_ID))
    assert len(best.reported) == 2 * len(arms) and {r.evaluation.half for r in best.reported} == {"all"}
    store.close()


def reported_node(node_id: str, mechanisms: list[str], runs: dict[str, list[float]], parent: Node | None = None
                  ) -> Node:
    """An evaluated node whose code is the library's compilation of `mechanisms`, with report `runs` per arm on
    the report seeds 1, 2, 3 (in that order)."""
    proposal = make_proposal(AlgorithmDescription.from_specs(mechanisms), name=node_id, rationale="test",
                             generator="offline")
    genealogy = Genealogy.child(node_id, [parent.genealogy]) if parent else Genealogy(run_id="race", node_id=node_id)
    reported = [ReportedRun(arm=arm, evaluation=evaluation(score, report_seed(3, k)).model_copy(
        update={"half": "reporting"})) for arm, scores in runs.items() for k, score in enumerate(scores, 1)]
    return Node(genealogy=genealogy, status=NodeStatus.REFLECTED, proposal=proposal,
                implementation=Implementation.from_source(compile_proposal(proposal), verified=True),
                trajectory=TrainingTrajectory(protocol="tiny", seed=0), evaluation=evaluation(0.5, 0),
                reflection=Reflection(text="ok", generator="offline"), reported=reported)


GRPO_MECHANISMS = ["baseline:group_mean", "scale:group_std", "clip:symmetric", "clip:dual", "agg:token-mean"]


def test_the_ablation_attributes_the_gain_to_each_difference_with_paired_intervals():
    root = reported_node(ROOT_ID, GRPO_MECHANISMS, {})
    mechanisms = ["baseline:group_mean", "scale:none", "failure:all_fail_penalty", "clip:symmetric", "clip:dual",
                  "agg:token-mean"]
    arms = {"best": [0.60, 0.62, 0.61], "grpo": [0.50, 0.53, 0.51],
            "minus:scale:none": [0.55, 0.56, 0.57], "minus:failure:all_fail_penalty": [0.60, 0.61, 0.62]}
    best = reported_node("n004", mechanisms, arms, root)
    assert set(report_arms(best, root)) == set(arms)
    report = report_status(best, root)
    assert report.paired_seeds == 3 and report.gain == pytest.approx((0.10 + 0.09 + 0.10) / 3)
    by_difference = {c.difference: c for c in report.contributions}
    scale, failure = by_difference["minus:scale:none"], by_difference["minus:failure:all_fail_penalty"]
    assert scale.arm == "minus:scale:none" and scale.gain == pytest.approx(0.05) and scale.p < 0.05
    low, high = scale.interval
    assert low < 0.05 < high
    assert failure.gain == pytest.approx(0.0) and failure.p > 0.05  # undoing it changed nothing
    assert "better than GRPO on the reporting half over 3 fresh seeds" in report.verdict
    page = render_report("race", None, [root, best], best_id=best.node_id)
    assert "Ablation: what each difference from GRPO contributed" in page
    assert "<td>minus:scale:none</td><td>minus:scale:none</td><td class=\"num\">+0.0500</td>" in page


def test_an_ablation_that_leaves_grpo_is_read_from_grpos_runs():
    root = reported_node(ROOT_ID, GRPO_MECHANISMS, {})
    best = reported_node("n002", ["baseline:group_mean", "scale:none", "clip:symmetric", "clip:dual",
                                  "agg:token-mean"], {"best": [0.52, 0.50, 0.51], "grpo": [0.50, 0.50, 0.52]}, root)
    assert set(report_arms(best, root)) == {"best", "grpo"}, "no training for an arm that is GRPO's code"
    (only,) = report_status(best, root).contributions
    assert (only.difference, only.arm, only.seeds) == ("minus:scale:none", "grpo", 3)
    assert only.gain == pytest.approx(0.01 / 3)


def test_no_ablation_when_the_best_code_is_not_the_librarys():
    root = reported_node(ROOT_ID, GRPO_MECHANISMS, {})
    best = reported_node("n002", ["baseline:group_mean", "scale:none", "clip:symmetric", "clip:dual",
                                  "agg:token-mean"], {"best": [0.5, 0.5], "grpo": [0.5, 0.5]}, root)
    written = best.model_copy(update={"implementation": Implementation.from_source(
        best.implementation.source + "\n# edited by an LLM\n", verified=True)})
    assert set(report_arms(written, root)) == {"best", "grpo"} and not report_status(written, root).contributions
