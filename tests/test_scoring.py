"""Seed statistics: a confirmed node is judged on its fresh seeds only (the winner's curse)."""

from __future__ import annotations

import pytest

from poise import student_t
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


def test_welch_p_is_scipys_welch_test_without_its_warning_on_tied_seeds() -> None:
    import warnings

    from scipy import stats

    samples = [([0.5, 0.5, 0.5], [0.4, 0.6, 0.45]),  # tied seeds: scipy warns "catastrophic cancellation"
               ([0.5893, 0.6045, 0.5868], [0.6269, 0.6101, 0.6082, 0.6270]), ([0.1, 0.3], [0.2, 0.25, 0.31])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = [welch_p(a, b) for a, b in samples]
        intervals = [summarize(a) for a, _ in samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [float(stats.ttest_ind(a, b, equal_var=False).pvalue) for a, b in samples]
    assert ours == pytest.approx(expected, rel=1e-9)
    for (a, _), interval in zip(samples, intervals, strict=True):
        half = float(stats.t.ppf(0.975, len(a) - 1)) * interval.sd / len(a) ** 0.5
        assert (interval.ci_low, interval.ci_high) == pytest.approx((interval.mean - half, interval.mean + half))


@pytest.mark.parametrize("dof", [1, 1.3, 2, 2.7, 4, 7.5, 30, 1000])
def test_student_t_is_scipys_to_1e_9(dof) -> None:
    from scipy import stats

    for t in (0.0, 0.01, 0.5, 1.0, 2.0, 3.0, 10.0, 100.0):
        assert student_t.two_sided_p(t, dof) == pytest.approx(2 * stats.t.sf(t, dof), rel=1e-9, abs=1e-300)
    for p in (0.5, 0.9, 0.975, 0.995, 0.9999):
        assert student_t.quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9, abs=1e-12)
