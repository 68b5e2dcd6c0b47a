"""Where a run stands, as one JSON-ready dict: counts, budget, the best node with its seed interval."""

from __future__ import annotations

import math

from poise.agents import OPERATORS
from poise.contracts import ROOT_ID, Node, NodeStatus, RunConfig
from poise.objective import describe, satisfies
from poise.scoring import ALPHA, confirmation_scores, seed_scores, summarize, utility, welch_p
from poise.store import ArchiveStore


def run_status(store: ArchiveStore, run_id: str) -> dict:
    config = store.get_run(run_id)
    if config is None:
        raise KeyError(f"no run {run_id!r} in this archive")
    nodes = store.nodes(run_id)
    counts = {status.value: 0 for status in NodeStatus}
    for node in nodes:
        counts[node.status.value] += 1
    root = next((n for n in nodes if n.node_id == ROOT_ID), None)
    root_scores = seed_scores(root) if root else []
    root_summary = summarize(root_scores)
    evaluated = [n for n in nodes if n.evaluation is not None and n.status != NodeStatus.FAILED]
    children = [n for n in evaluated if n.node_id != ROOT_ID]
    best = _best(evaluated, config.replicate_seeds)
    status = {
        "run_id": run_id,
        "protocol": config.protocol,
        "seed": config.seed,
        "counts": counts,
        "budget": {"total": config.budget, "evaluated": len(children), "parallel": config.parallel},
        "depth": max((n.genealogy.depth for n in nodes), default=0),
        "root": None if root is None else {
            "node_id": root.node_id, "status": root.status.value, "scores": root_scores,
            **(root_summary.as_dict() if root_summary else {}),
        },
        "objective": {**config.objective.model_dump(), "description": describe(config.objective)},
        "best": None,
        "leader": None,
        "llm": _llm_spend(nodes, config),
    }
    if config.objective.kind != "overall":
        status["constraints"] = {
            "satisfied": [n.node_id for n in evaluated if satisfies(n) is True],
            "violated": [n.node_id for n in evaluated if satisfies(n) is False],
        }
    leader = max(children, key=lambda n: utility(n.evaluation), default=None)
    if leader is not None:
        status["leader"] = {"node_id": leader.node_id, "name": leader.proposal.name,
                            "utility": utility(leader.evaluation), "seeds": len(seed_scores(leader))}
    if best is not None:
        is_root = best.node_id == ROOT_ID
        scores = confirmation_scores(best, is_root)
        summary = summarize(scores)
        p = welch_p(scores, root_scores) if not is_root else None
        gain = summary.mean - root_summary.mean if root_summary else None
        status["best"] = {
            "node_id": best.node_id,
            "name": best.proposal.name,
            "mechanisms": [m.name for m in best.proposal.mechanisms],
            "utility": summary.mean,
            "interval": [summary.ci_low, summary.ci_high] if summary.ci_low is not None else None,
            "seeds": len(scores),
            "scores": scores,
            "selection_score": None if is_root else utility(best.evaluation),
            "confirmed": len(best.replicates) >= 2,
            "gain_over_root": gain,
            "p_vs_root": p,
            "verdict": _verdict(best.node_id, gain, p),
            "overall": _mean([e.overall for e in (best.evaluation, *best.replicates)]),
            "mean_length": _mean([e.mean_length for e in (best.evaluation, *best.replicates)]),
            "constraints_satisfied": satisfies(best),
        }
    return status


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _best(evaluated: list, replicate_seeds: int):
    """The node with the highest fresh-seed mean among confirmed ones (the root's seeds count as fresh); else
    the top single seed."""
    confirmed = [n for n in evaluated if len(seed_scores(n)) > 1]
    if confirmed:
        return max(confirmed, key=lambda n: summarize(confirmation_scores(n, n.node_id == ROOT_ID)).mean)
    scored = [n for n in evaluated if utility(n.evaluation) is not None]
    return max(scored, key=lambda n: utility(n.evaluation), default=None)


def _verdict(node_id: str, gain: float | None, p: float | None) -> str:
    if node_id == ROOT_ID:
        return "GRPO (the root) is the best node"
    if p is None:
        return "not yet confirmed with fresh seeds"
    if p >= ALPHA:
        return f"indistinguishable from GRPO (Welch p = {p:.2f})"
    return f"{'better' if gain > 0 else 'worse'} than GRPO (Welch p = {p:.3f})"


def _llm_spend(nodes: list[Node], config: RunConfig) -> dict:
    """The run's agent-LLM requests and spend per operator, against its cap; the agents each operator uses."""
    calls = [call for node in nodes for call in node.llm_calls]
    per_operator: dict[str, dict] = {}
    for call in calls:
        entry = per_operator.setdefault(call.operator, {"calls": 0, "failed": 0, "usd": 0.0})
        entry["calls"] += 1
        entry["failed"] += not call.ok
        entry["usd"] += call.cost_usd
    return {
        "agents": {op: config.backends.llm_for(op) for op in OPERATORS},
        "calls": len(calls),
        "usd": sum(call.cost_usd for call in calls),
        "unpriced_calls": sum(not call.priced for call in calls),
        "cap_usd": config.llm_budget_usd,
        "per_operator": per_operator,
    }
