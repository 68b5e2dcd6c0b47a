"""Seed statistics: a confirmed node is judged on its fresh seeds only (the winner's curse)."""

from __future__ import annotations

import pytest

from poise.contracts import Evaluation, Genealogy, MechanismSpec, Node, Proposal
from poise.scoring import confirmation_scores, seed_scores, summarize, welch_p


def evaluation(overall: float, seed: int) -> Evaluation:
    return Evaluation(suites={}, overall=overall, mean_length=40.0, seed=seed)


def node(first: float, *fresh: float) -> Node:
    proposal = Proposal(name="v", rationale="r", generator="offline", mechanisms=[MechanismSpec(name="kl:penalty")])
    return Node(genealogy=Genealogy(run_id="r", node_id="n001"), proposal=proposal,
                evaluation=evaluation(first, 0),
                replicates=[evaluation(u, 1000 * (i + 1)) for i, u in enumerate(fresh)])  # fmt: skip


def test_the_selection_seed_is_dropped_once_two_fresh_seeds_exist() -> None:
    lucky = node(0.70, 0.60, 0.62, 0.61)
    assert seed_scores(lucky) == [0.70, 0.60, 0.62, 0.61]
    assert confirmation_scores(lucky) == [0.60, 0.62, 0.61]
    assert summarize(confirmation_scores(lucky)).mean == pytest.approx(0.61)
    assert confirmation_scores(node(0.70, 0.60)) == [0.70, 0.60]  # one fresh seed: no interval without it
    assert confirmation_scores(lucky, is_root=True) == [0.70, 0.60, 0.62, 0.61]  # the root was not picked


def test_the_lucky_seed_can_no_longer_make_a_node_look_significant() -> None:
    # the budget-16 run of 2026-11-29 (bench/results/budget16_greedy.md): n015 was picked on seed 0
    root = [0.5893, 0.6045, 0.5868]
    n015 = node(0.6269, 0.6101, 0.6082, 0.6270)
    assert welch_p(seed_scores(n015), root) < 0.05 < welch_p(confirmation_scores(n015), root)
