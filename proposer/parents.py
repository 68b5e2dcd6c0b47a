"""Lineage prioritization: which evaluated node the next child grows from (part of the proposal operator P).

The archive owns budget, parallelism and scheduling and asks for a child by its pre-assigned node id; the
proposer chooses the parent here, so swapping the proposer service swaps all of Phase I. Deterministic in
(run seed, node id) and the archive as it stood when the child was asked for (`WorkPropose.as_of`): a
redelivered `work.propose`, or one handled after other candidates finished, picks the same parent, so the
search does not depend on when the proposer gets to a request.

- "greedy" / "random": the baseline's choice (proposer/baseline.py `select_parent`) over the run's evaluated,
  unfailed nodes by their seed-mean utility;
- "poise": Phase I acquisition s(d) (proposer/selection.py `select_parents`): each round of
  `parents_per_round` consecutive node numbers shares one set of diverse parents, taken in turn.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from poise.contracts import Node, NodeStatus, RunConfig, node_number
from poise.scoring import seed_mean
from proposer.baseline import select_parent

log = logging.getLogger("poise.proposer")


def as_of(nodes: Sequence[Node], evaluations: int | None) -> list[Node]:
    """The archive as it stood when it held `evaluations` evaluations: each evaluation stored later
    (`Evaluation.archive_seq` above it) is left out, so a node evaluated since then is not yet evaluated and a
    replicate trained since then does not count. None, or evaluations without a stamp (archives written before
    stamps), leave the nodes as they are. A failure recorded after the request still counts."""
    if evaluations is None:
        return list(nodes)

    def later(evaluation: object) -> bool:
        seq = getattr(evaluation, "archive_seq", None)
        return seq is not None and seq > evaluations

    view = []
    for node in nodes:
        if later(node.evaluation):
            # model_copy keeps the status: a view for selection only, never stored
            node = node.model_copy(update={"evaluation": None, "replicates": [], "reflection": None})
        elif any(later(r) for r in node.replicates):
            node = node.model_copy(update={"replicates": [r for r in node.replicates if not later(r)]})
        view.append(node)
    return view


def choose_parent(nodes: Sequence[Node], config: RunConfig, node_id: str, evaluations: int | None = None) -> Node:
    """The parent of the child `node_id` among `nodes` (the run's archive), read as it stood when it held
    `evaluations` evaluations (the request's `as_of`: the archive asked then, whatever finished since); ValueError
    if none is evaluated."""
    nodes = as_of(nodes, evaluations)
    parents = [n for n in nodes if n.evaluation is not None and n.status != NodeStatus.FAILED]
    if config.parent_selection != "poise":
        return select_parent(parents, config.parent_selection, _rng(config, node_id), seed_mean)
    from proposer.selection import select_parents  # scikit-learn: only for runs that use it

    number = node_number(node_id)
    chosen = select_parents(list(nodes), config.weights, k=config.parents_per_round,
                            rng=_rng(config, f"round{(number - 1) // config.parents_per_round}"),
                            objective=config.objective)
    if not chosen:
        return select_parent(parents, "greedy", _rng(config, node_id), seed_mean)
    pick = chosen[(number - 1) % len(chosen)]
    log.info("parent of %s: %s (s=%.3f: pareto %.2f, perf %.2f, div %.2f, bayes %.2f)", node_id, pick.node_id,
             pick.score, pick.pareto, pick.perf, pick.div, pick.bayes)
    return next((n for n in parents if n.node_id == pick.node_id), parents[0])


def _rng(config: RunConfig, key: str) -> random.Random:
    return random.Random(f"select/{config.seed}/{key}")
