"""Where a run stands (`RunStatus`, poise/contracts.py): counts, budget, the root, the leader and the best node
with its seed interval, agent-LLM spend.

It reads the store's counters and node scores (poise/store.py) and at most three whole documents (root,
leader, best), so it costs about the same at ten thousand nodes as at ten; only an objective with
constraints lists every evaluated node's verdict, and racing counts every child's seeds, from the scores, still
without parsing documents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from poise.ablation import ablation_sources
from poise.agents import OPERATORS
from poise.contracts import (
    ROOT_ID,
    ArmStatus,
    BestStatus,
    BudgetStatus,
    ConstraintsStatus,
    Contribution,
    Evaluation,
    LeaderStatus,
    LlmSpendStatus,
    Node,
    NodeScore,
    NodeStatus,
    ObjectiveStatus,
    ReportStatus,
    RootStatus,
    RunConfig,
    RunCounters,
    RunStatus,
    node_number,
)
from poise.objective import describe, satisfies
from poise.racing import SEED_POLICIES
from poise.scoring import (
    ALPHA,
    SeedSummary,
    confirmation_scores,
    paired_p,
    seed_scores,
    summarize,
    utility,
    welch_p,
)
from poise.store import ArchiveError, ArchiveStore


def run_status(store: ArchiveStore, run_id: str) -> RunStatus:
    """The run's status; KeyError for a run not in the archive."""
    config = store.get_run(run_id)
    if config is None:
        raise KeyError(f"no run {run_id!r} in this archive")
    counters = store.counters(run_id)
    root = store.get_node(run_id, ROOT_ID)
    root_scores = seed_scores(root) if root else []
    root_summary = summarize(root_scores)
    top = store.scores(run_id, limit=2)
    leader = next((s for s in top if s.node_id != ROOT_ID), None)
    best = best_score(store, run_id, top)
    return RunStatus(
        run_id=run_id,
        protocol=config.protocol,
        seed=config.seed,
        counts=counters.counts,
        budget=_budget(store, config, counters, root),
        depth=counters.depth,
        root=None if root is None else RootStatus(node_id=root.node_id, status=root.status, scores=root_scores,
                                                  **(root_summary.as_dict() if root_summary else {})),
        objective=ObjectiveStatus(**config.objective.model_dump(), description=describe(config.objective)),
        best=None if best is None else _best_status(_document(store, run_id, best.node_id), root_scores, root),
        leader=None if leader is None else _leader_status(store, run_id, leader),
        llm=_llm_spend(store, config),
        constraints=None if config.objective.kind == "overall" else _constraints(store.scores(run_id)),
    )


def children_trainings(counters: RunCounters, scores: Sequence[NodeScore]) -> int:
    """The trainings racing's budget counts (docs/racing.md): every child carrying an evaluation (failed ones
    included) and every fresh-seed replicate of a scored child; the root's seeds are not counted."""
    root_evaluated = any(s.node_id == ROOT_ID for s in scores)
    return (counters.evaluated - root_evaluated
            + sum(len(s.replicate_utilities) for s in scores if s.node_id != ROOT_ID))


def _budget(store: ArchiveStore, config: RunConfig, counters: RunCounters, root: Node | None) -> BudgetStatus:
    """The budget; with racing it reads every score (the children's extra seeds), otherwise only counters."""
    evaluated = _evaluated_children(counters, root)
    policy = SEED_POLICIES[config.seeding]
    if not policy.racing:
        return BudgetStatus(total=config.budget, evaluated=evaluated, parallel=config.parallel,
                            reached=evaluated >= config.budget)
    trainings = children_trainings(counters, store.scores(config.run_id))
    return BudgetStatus(total=config.budget, evaluated=evaluated, parallel=config.parallel, trainings=trainings,
                        reached=not policy.affords_child(config.budget - trainings))


def best_score(store: ArchiveStore, run_id: str, top: list[NodeScore] | None = None) -> NodeScore | None:
    """The node to report as the best: the highest fresh-seed mean among nodes with more than one seed (the
    root's seeds count as fresh; the lower node number among equal means), else the top single seed. `top`:
    the first scores, if already read."""
    confirmed = store.scores(run_id, min_seeds=2)
    if confirmed:
        return max(confirmed, key=lambda s: (summarize(confirmation_scores(s, s.node_id == ROOT_ID)).mean,
                                             -node_number(s.node_id)))
    top = store.scores(run_id, limit=1) if top is None else top
    return top[0] if top else None


def _evaluated_children(counters: RunCounters, root: Node | None) -> int:
    """Children evaluated and not failed (the nodes at evaluated or reflected, less the root)."""
    done = (NodeStatus.EVALUATED, NodeStatus.REFLECTED)
    return sum(counters.counts[s] for s in done) - int(root is not None and root.status in done)


def _document(store: ArchiveStore, run_id: str, node_id: str) -> Node:
    node = store.get_node(run_id, node_id)
    if node is None:  # the score was read from the same store a moment ago; nodes are never deleted
        raise ArchiveError(f"node {node_id} of run {run_id} has a score but no document")
    return node


def _best_status(best: Node, root_scores: list[float], root: Node | None = None) -> BestStatus:
    is_root = best.node_id == ROOT_ID
    scores = confirmation_scores(best, is_root)
    summary = summarize(scores)
    root_summary = summarize(root_scores)
    p = welch_p(scores, root_scores) if not is_root else None
    gain = summary.mean - root_summary.mean if root_summary else None
    evaluations = (best.evaluation, *best.replicates)
    return BestStatus(
        node_id=best.node_id,
        name=best.proposal.name,
        mechanisms=[m.name for m in best.proposal.mechanisms],
        utility=summary.mean,
        interval=(summary.ci_low, summary.ci_high) if summary.ci_low is not None else None,
        seeds=len(scores),
        scores=scores,
        selection_score=None if is_root else utility(best.evaluation),
        confirmed=len(best.replicates) >= 2,
        gain_over_root=gain,
        p_vs_root=p,
        verdict=_verdict(best.node_id, gain, p),
        overall=_mean([e.overall for e in evaluations]),
        mean_length=_mean([e.mean_length for e in evaluations]),
        constraints_satisfied=satisfies(best),
        report=report_status(best, root),
    )


def report_arms(best: Node, root: Node) -> dict[str, str]:
    """The report's arms and their code (docs/reporting.md): the best, GRPO, and each ablation of the best
    (poise/ablation.py) whose code is neither of theirs (an ablation that leaves GRPO is read from GRPO's runs).
    No ablation when the best's code is not the library's compilation of its description."""
    arms = {"best": best.implementation.source, "grpo": root.implementation.source}
    ablations = ablation_sources(best.proposal, best.implementation.source, root.proposal) or {}
    arms.update({arm: source for arm, source in ablations.items() if source is not None})
    return arms


def report_status(best: Node, root: Node | None = None) -> ReportStatus | None:
    """The report stored on the best node (docs/reporting.md), or None before it has any run. The gain pairs the
    best's and GRPO's Overall seed by seed (both were trained on the same report seeds); each ablation's
    contribution pairs the best with the arm that undoes it (GRPO's runs when undoing it leaves GRPO)."""
    if not best.reported:
        return None
    by_arm: dict[str, dict[int, Evaluation]] = {}
    for run in best.reported:
        by_arm.setdefault(run.arm, {})[run.evaluation.seed] = run.evaluation
    arms = [_arm_status(arm, runs) for arm, runs in by_arm.items()]
    best_runs = by_arm.get("best", {})
    gain, paired, p, lengths = _paired(best_runs, by_arm.get("grpo", {}))
    half = best.reported[0].evaluation.half
    contributions = []
    if root is not None and best.implementation is not None and root.implementation is not None:
        ablations = ablation_sources(best.proposal, best.implementation.source, root.proposal) or {}
        for arm, source in ablations.items():
            against = "grpo" if source is None else arm
            summary, seeds, arm_p, _ = _paired(best_runs, by_arm.get(against, {}))
            contributions.append(Contribution(
                difference=arm, arm=against, seeds=seeds, p=arm_p, gain=summary.mean if summary else None,
                interval=(summary.ci_low, summary.ci_high) if summary and summary.ci_low is not None else None))
    return ReportStatus(half=half, arms=arms, paired_seeds=paired, gain=gain.mean if gain else None,
                        gain_interval=(gain.ci_low, gain.ci_high) if gain and gain.ci_low is not None else None,
                        p=p, length_change=_mean(lengths), verdict=_report_verdict(gain, p, paired, half),
                        contributions=contributions)


def _paired(first: dict[int, Evaluation], second: dict[int, Evaluation]
            ) -> tuple[SeedSummary | None, int, float | None, list[float]]:
    """first − second on the seeds both have: the summary of the Overall differences, how many, the paired-t p,
    and the mean-length differences."""
    seeds = sorted(set(first) & set(second))
    differences = [first[s].overall - second[s].overall for s in seeds]
    return (summarize(differences), len(seeds), paired_p(differences),
            [first[s].mean_length - second[s].mean_length for s in seeds])


def _arm_status(arm: str, runs: dict[int, Evaluation]) -> ArmStatus:
    seeds = sorted(runs)
    overall = [runs[s].overall for s in seeds]
    summary = summarize(overall)
    return ArmStatus(arm=arm, seeds=seeds, overall=overall, mean=summary.mean if summary else None,
                     ci_low=summary.ci_low if summary else None, ci_high=summary.ci_high if summary else None,
                     mean_length=_mean([runs[s].mean_length for s in seeds]))


def _report_verdict(gain, p: float | None, paired: int, half: str) -> str:
    where = "on the reporting half" if half == "reporting" else "on every problem"
    if p is None:
        return f"the report has {paired} paired seed(s) so far; it needs 2 to test"
    direction = "better" if gain.mean > 0 else "worse"
    if p >= ALPHA:
        return f"indistinguishable from GRPO {where} over {paired} fresh seeds (paired t p = {p:.2f})"
    return f"{direction} than GRPO {where} over {paired} fresh seeds (paired t p = {p:.3f})"


def _leader_status(store: ArchiveStore, run_id: str, leader: NodeScore) -> LeaderStatus:
    name = _document(store, run_id, leader.node_id).proposal.name
    return LeaderStatus(node_id=leader.node_id, name=name, utility=leader.utility, seeds=len(seed_scores(leader)))


def _constraints(scores: list[NodeScore]) -> ConstraintsStatus:
    """Who meets the objective's constraints on every seed, and who does not, in node order."""
    in_order = sorted(scores, key=lambda s: node_number(s.node_id))
    return ConstraintsStatus(satisfied=[s.node_id for s in in_order if s.constraints_satisfied is True],
                             violated=[s.node_id for s in in_order if s.constraints_satisfied is False])


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _verdict(node_id: str, gain: float | None, p: float | None) -> str:
    if node_id == ROOT_ID:
        return "GRPO (the root) is the best node"
    if p is None:
        return "not yet confirmed with fresh seeds"
    if p >= ALPHA:
        return f"indistinguishable from GRPO (Welch p = {p:.2f})"
    return f"{'better' if gain > 0 else 'worse'} than GRPO (Welch p = {p:.3f})"


def _llm_spend(store: ArchiveStore, config: RunConfig) -> LlmSpendStatus:
    """The run's agent-LLM requests and spend per operator, against its cap; the agents each operator uses."""
    per_operator = store.llm_spend(config.run_id)
    return LlmSpendStatus(
        agents={op: config.backends.llm_for(op) for op in OPERATORS},
        calls=sum(s.calls for s in per_operator.values()),
        usd=sum(s.usd for s in per_operator.values()),
        unpriced_calls=sum(s.unpriced for s in per_operator.values()),
        cap_usd=config.llm_budget_usd,
        per_operator=per_operator,
    )
