"""The racing rule (poise/racing.py, docs/racing.md): which node gets the next training seed, or none.

Scores are in Overall units; σ = 0.01 and z = 1 unless a test says otherwise, so a node's interval is its mean
± 0.01/√n.
"""

from __future__ import annotations

import math

import pytest

from poise.racing import SEED_CAP, SEED_POLICIES, next_seed

SD = 0.01
CAP = 3
MEASURED = [0.280, 0.290, 0.285]  # a node at the cap, mean 0.285, interval ± 0.0058


def pick(scores: dict[str, list[float]], sd: float = SD, cap: int = CAP, left: int = 10, z: float = 1.0) -> str | None:
    return next_seed(scores, sd, cap, left, z=z)


def test_a_lucky_one_seed_leader_is_checked_before_it_counts() -> None:
    # lucky's lower bound 0.290 is below the measured node's upper bound 0.2908: the ranking is not decided.
    assert pick({"root": MEASURED, "lucky": [0.300]}) == "lucky"


def test_a_node_whose_upper_bound_cannot_reach_the_leaders_lower_bound_gets_nothing() -> None:
    leader = [0.300, 0.302, 0.298]  # at the cap, lower bound 0.2942
    assert pick({"leader": leader, "far": [0.280]}) is None  # upper bound 0.290
    assert pick({"leader": leader, "close": [0.290]}) == "close"  # upper bound 0.300


def test_a_leader_clear_of_every_other_node_is_settled_even_on_one_seed() -> None:
    assert pick({"root": MEASURED, "big_gain": [0.350]}) is None


def test_the_open_contender_with_the_highest_upper_bound_goes_first() -> None:
    scores = {"leader": [0.300, 0.300, 0.300], "one_seed": [0.296], "two_seeds": [0.298, 0.298]}
    assert pick(scores) == "one_seed"  # upper bounds 0.306 against 0.3051
    scores["one_seed"].append(0.296)  # now 0.3031: the two-seed node with the higher mean is ahead
    assert pick(scores) == "two_seeds"


def test_an_uncertain_leader_is_seeded_before_its_challengers() -> None:
    assert pick({"leader": [0.300], "challenger": [0.298]}) == "leader"  # same seeds: the higher upper bound


def test_nodes_at_the_cap_and_an_exhausted_budget_get_nothing() -> None:
    scores = {"root": MEASURED, "lucky": [0.300]}
    assert pick(scores, left=0) is None
    assert pick(scores, cap=1) is None
    scores["lucky"] += [0.291, 0.289]  # lucky at the cap too: mean 0.2933, still overlapping, nothing to add
    assert pick(scores) is None
    assert pick(scores, cap=4) == "lucky"  # higher upper bound than root's


def test_a_closed_node_still_ranks_but_gets_no_seed() -> None:
    scores = {"leader": [0.300], "challenger": [0.298]}
    assert next_seed(scores, SD, CAP, 10, z=1.0, closed={"leader"}) == "challenger"  # still its contender
    assert next_seed(scores, SD, CAP, 10, z=1.0, closed={"leader", "challenger"}) is None
    assert next_seed({"leader": [0.300, 0.302, 0.298], "far": [0.280]}, SD, CAP, 10, z=1.0,
                     closed={"leader"}) is None  # far still cannot reach the closed leader's lower bound


def test_more_noise_widens_the_race_and_no_noise_settles_it() -> None:
    scores = {"root": MEASURED, "other": [0.265]}
    assert pick(scores) is None  # 0.265 + 0.01 does not reach 0.285 − 0.0058
    assert pick(scores, sd=0.03) == "other"
    assert pick({"a": [0.300], "b": [0.2999]}, sd=0.0) is None


def test_the_interval_width_is_z_standard_errors() -> None:
    scores = {"root": MEASURED, "near": [0.277]}  # the gap 0.008 is bridged at z = 1 (0.0158), not at z = 0.5
    assert pick(scores, z=1.0) == "near"
    assert pick(scores, z=0.5) is None


def test_nodes_without_a_finite_score_are_ignored_and_one_node_is_no_race() -> None:
    assert pick({"failed": [], "root": MEASURED}) is None
    assert pick({"root": MEASURED, "nan": [math.nan]}) is None
    assert pick({"root": MEASURED, "lucky": [0.300, math.nan]}) == "lucky"


def test_ties_go_to_the_earliest_node() -> None:
    assert pick({"first": [0.300], "second": [0.300]}) == "first"
    assert pick({"second": [0.300], "first": [0.300]}) == "second"


@pytest.mark.parametrize("sd", [math.nan, math.inf, -0.01])
def test_a_noise_that_is_not_a_measured_sd_is_refused(sd: float) -> None:
    with pytest.raises(ValueError, match="measured seed SD"):
        pick({"root": MEASURED, "lucky": [0.300]}, sd=sd)


def test_a_child_is_only_started_when_the_budget_can_give_it_its_cap() -> None:
    one, fixed, racing = SEED_POLICIES["one"], SEED_POLICIES["fixed"], SEED_POLICIES["racing"]
    assert one.affords_child(1) and not one.affords_child(0)
    for policy in (fixed, racing):
        assert policy.cap == SEED_CAP
        assert policy.affords_child(SEED_CAP) and not policy.affords_child(SEED_CAP - 1)
    assert (one.at_birth, fixed.at_birth, racing.at_birth) == (1, SEED_CAP, 1)
    assert racing.racing and not one.racing and not fixed.racing
