"""Metric definitions: unbiased pass@k, weighted Overall, bootstrap intervals."""

import itertools
import random

import pytest

from evaluator.metrics import bootstrap_intervals, half_of, pass_at_k, weighted_overall


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 8), (5, 5, 3), (16, 1, 4)])
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(4, 1, 8)


def test_weighted_overall_uses_the_paper_weights():
    weights = {"aime24": 0.2, "aime25": 0.2, "amc": 0.15, "math500": 0.15, "minerva": 0.15, "olympiad": 0.15}
    values = {"aime24": 0.1, "aime25": 0.2, "amc": 0.3, "math500": 0.4, "minerva": 0.5, "olympiad": 0.6}
    assert weighted_overall(values, weights) == pytest.approx(0.02 + 0.04 + 0.15 * 1.8)


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_more_prompts():
    rng = random.Random(0)
    small = {"a": [float(rng.random() < 0.4) for _ in range(50)], "b": [rng.random() for _ in range(50)]}
    large = {"a": [float(rng.random() < 0.4) for _ in range(2000)], "b": [rng.random() for _ in range(2000)]}
    weights = {"a": 0.5, "b": 0.5}
    suites, overall = bootstrap_intervals(small, weights, 500, seed=1)
    point = weighted_overall({k: sum(v) / len(v) for k, v in small.items()}, weights)
    assert overall[0] < point < overall[1]
    _, overall_large = bootstrap_intervals(large, weights, 500, seed=1)
    assert overall_large[1] - overall_large[0] < (overall[1] - overall[0]) / 3
    assert bootstrap_intervals(small, weights, 500, seed=1) == (suites, overall)  # seeded: reproducible


@pytest.mark.parametrize("size", [0, 1, 7, 300])
def test_the_two_halves_are_disjoint_cover_the_suite_and_interleave(size):
    items = list(range(size))
    selection, reporting = half_of(items, "selection"), half_of(items, "reporting")
    assert sorted(selection + reporting) == items and not set(selection) & set(reporting)
    assert len(selection) - len(reporting) in (0, 1)
    assert half_of(items, "all") == items
    if size >= 4:  # spread over the whole suite, not its first or second part
        assert selection[-1] > size // 2 and reporting[0] < size // 2
