"""Metric definitions shared by every evaluator backend: pass@k, Overall, bootstrap intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def weighted_overall(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The paper's weighted Overall: sum of weight x suite score (weights sum to 1)."""
    return float(sum(weights[name] * values[name] for name in weights))


def bootstrap_intervals(
    per_prompt: Mapping[str, Sequence[float]],
    weights: Mapping[str, float],
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """Percentile bootstrap over prompts: per-suite intervals and the Overall interval.

    Each replicate resamples every suite's prompts with replacement, independently per suite, so the
    Overall interval carries the evaluation-sampling uncertainty of all suites at once. It does not
    include training-seed noise: that needs several seeds.
    """
    rng = np.random.default_rng(seed)
    alpha = (1.0 - level) / 2
    means: dict[str, np.ndarray] = {}
    for name, scores in per_prompt.items():
        scores = np.asarray(scores, dtype=float)
        picks = rng.integers(0, len(scores), size=(resamples, len(scores)))
        means[name] = scores[picks].mean(axis=1)
    suites = {name: (float(np.quantile(m, alpha)), float(np.quantile(m, 1 - alpha))) for name, m in means.items()}
    overall = sum(weights[name] * means[name] for name in weights)
    return suites, (float(np.quantile(overall, alpha)), float(np.quantile(overall, 1 - alpha)))
