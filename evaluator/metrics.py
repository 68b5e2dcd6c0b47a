"""Metric definitions shared by every evaluator backend: pass@k, Overall, bootstrap intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import TypeVar

import numpy as np

from poise.contracts import Evaluation, Half, MetricKind, SuiteResult

Item = TypeVar("Item")


def half_of(items: Sequence[Item], half: Half) -> list[Item]:
    """A suite's problems for `half` (docs/reporting.md): every one, the selection half (the even positions of the
    suite's fixed order) or the reporting half (the odd ones). Disjoint, fixed by the suite alone, and each half
    spread over the whole suite rather than its first or second part."""
    if half == "all":
        return list(items)
    return list(items[0 if half == "selection" else 1::2])


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


def suite_score(kind: str, n: int, k: int, correct: int) -> float:
    """A prompt's score from its n samples of which `correct` were right: unbiased pass@k, or acc@1 (n = 1)."""
    return pass_at_k(n, correct, k) if kind == "pass@k" else float(correct)


def assemble_evaluation(suites: Sequence[SuiteOutcome], resamples: int, seed: int, backend: str) -> Evaluation:
    """The Evaluation of one pass over all suites: per-suite values with bootstrap intervals over prompts,
    the weighted Overall with its interval, and the weighted mean response length. Every backend builds its
    Evaluation here, so the testbed sampler and vLLM report the same metrics in the same way."""
    weights = {s.name: s.weight for s in suites}
    per_prompt = {s.name: s.scores for s in suites}
    suite_ci, overall_ci = bootstrap_intervals(per_prompt, weights, resamples, seed)
    results = {}
    for s in suites:
        low, high = suite_ci[s.name]
        results[s.name] = SuiteResult(
            suite=s.name, kind=MetricKind(s.kind), k=s.k if s.kind == "pass@k" else 1,
            value=float(sum(s.scores) / len(s.scores)), ci_low=low, ci_high=high,
            n_prompts=len(s.scores), n_samples=s.n, mean_length=float(sum(s.lengths) / len(s.lengths)),
            format_valid_rate=float(sum(s.format_valid) / len(s.format_valid)), weight=s.weight)
    return Evaluation(
        suites=results,
        overall=weighted_overall({n: r.value for n, r in results.items()}, weights),
        overall_ci=overall_ci,
        mean_length=weighted_overall({n: r.mean_length for n, r in results.items()}, weights),
        seed=seed, backend=backend,
    )


@dataclass
class EvalStats:
    """Throughput of one evaluation pass, for benchmarks (`poise bench sampler`, `poise bench evaluator`)."""

    wall_s: float = 0.0
    generated_tokens: int = 0
    per_suite_pass_at_1: dict[str, float] = field(default_factory=dict)


@dataclass
class SuiteOutcome:
    """What one backend measured on one suite: a score per prompt, a length and format flag per sample."""

    name: str
    kind: str            # "pass@k" or "acc@1"
    k: int
    n: int               # samples per prompt
    weight: float
    scores: list[float]
    lengths: list[int]
    format_valid: list[bool]
