"""Lineage prioritization: which evaluated node the next child grows from (part of the proposal operator P).

The archive owns budget, parallelism and scheduling and asks for a child by its pre-assigned node id; the
proposer chooses the parent here, so swapping the proposer service swaps all of Phase I. Deterministic in
(run seed, node id): a redelivered or resumed `work.propose` picks the same parent from the same archive.

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


def choose_parent(nodes: Sequence[Node], config: RunConfig, node_id: str) -> Node:
    """The parent of the child `node_id` among `nodes` (the run's archive); ValueError if none is evaluated."""
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
