"""Utility and noise: how a node is scored, and how sure we are of it.

A node's own evaluation is one training seed. The root (GRPO) is trained with `root_seeds` seeds to measure
the run's seed noise, and a node is re-trained with `replicate_seeds` fresh seeds before it is reported as
the best. Means come with a t-based 95% confidence interval over seeds, and a node is "indistinguishable
from GRPO" when Welch's t-test cannot tell their seed scores apart at p < 0.05.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from poise import student_t
from poise.contracts import Evaluation, Node, NodeScore, NodeStatus
from poise.objective import satisfies

REPLICATE_SEED_STRIDE = 1000  # replicate i trains and evaluates with seed + i * stride: far from other seeds
ALPHA = 0.05


def utility(evaluation: Evaluation | None) -> float | None:
    """U of one evaluation: the stored utility when the objective set one, else the weighted Overall."""
    if evaluation is None:
        return None
    return evaluation.utility if evaluation.utility is not None else evaluation.overall


REPORT_SEED_BASE = 100  # the report's k-th seed is replicate_seed(seed, REPORT_SEED_BASE + k): never a replicate's


def replicate_seed(seed: int, replicate: int) -> int:
    return seed + replicate * REPLICATE_SEED_STRIDE


def report_seed(seed: int, k: int) -> int:
    """The report's k-th fresh seed (k >= 1; docs/reporting.md), the same for every arm so the arms pair up."""
    return replicate_seed(seed, REPORT_SEED_BASE + k)


def _utilities(node: Node | NodeScore) -> tuple[float | None, list[float | None]]:
    """U of the node's own evaluation and of each replicate, from its document or from its stored score."""
    if isinstance(node, NodeScore):
        return node.utility, list(node.replicate_utilities)
    return utility(node.evaluation), [utility(e) for e in node.replicates]


def _finite(values: list[float | None]) -> list[float]:
    return [u for u in values if u is not None and math.isfinite(u)]


def seed_scores(node: Node | NodeScore) -> list[float]:
    """U over every seed the node was trained with: its own evaluation, then its replicates."""
    own, replicates = _utilities(node)
    return _finite([own, *replicates])


def confirmation_scores(node: Node | NodeScore, is_root: bool = False) -> list[float]:
    """The scores a node is judged on once confirmed: its fresh-seed replicates only. The seed it was first
    evaluated with is the one it was picked on (the best of many single seeds is biased upward: the winner's
    curse), so it is left out as soon as at least two fresh seeds exist. The root was not picked, so every one
    of its seeds counts."""
    fresh = _finite(_utilities(node)[1])
    if is_root or len(fresh) < 2:
        return seed_scores(node)
    return fresh


def confirmation_evaluations(node: Node, is_root: bool = False) -> list[Evaluation]:
    """The evaluations `confirmation_scores` scores, for what else they measured (Overall, length)."""
    scored = [e for e in (node.evaluation, *node.replicates) if e is not None and _finite([utility(e)])]
    fresh = [e for e in node.replicates if _finite([utility(e)])]
    return scored if is_root or len(fresh) < 2 else fresh


def node_score(node: Node) -> NodeScore | None:
    """What ranking the node needs, as the store keeps it beside the document; None unless it is evaluated and
    did not fail."""
    if node.evaluation is None or node.status == NodeStatus.FAILED:
        return None
    score = NodeScore(node_id=node.node_id, utility=utility(node.evaluation),
                      replicate_utilities=[utility(e) for e in node.replicates], constraints_satisfied=satisfies(node))
    return score.model_copy(update={"seeds": len(seed_scores(score))})


def seed_mean(node: Node) -> float | None:
    """The utility parents are selected by: the mean over every seed the node was trained with (its own
    evaluation and its replicates), so one lucky seed does not carry a node; the raw utility when no seed has a
    finite score."""
    scores = seed_scores(node)
    return sum(scores) / len(scores) if scores else utility(node.evaluation)


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    sd: float | None
    n: int
    ci_low: float | None
    ci_high: float | None

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        if self.ci_low is None:
            return f"{self.mean:.4f} (1 seed)"
        return f"{self.mean:.4f} ± {(self.ci_high - self.ci_low) / 2:.4f} (95% CI, {self.n} seeds)"


def summarize(scores: list[float]) -> SeedSummary | None:
    if not scores:
        return None
    n = len(scores)
    mean = sum(scores) / n
    if n < 2:
        return SeedSummary(mean, None, n, None, None)
    sd = math.sqrt(_sample_variance(scores, mean))
    half = student_t.quantile(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    return SeedSummary(mean, sd, n, mean - half, mean + half)


def _sample_variance(scores: list[float], mean: float) -> float:
    return sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value of two seed samples; None when either has fewer than 2 seeds.

    Written out rather than scipy.stats.ttest_ind, which warns of precision loss whenever one sample's seeds
    tie (common: the testbed's scores are fractions of a few hundred prompts), though the test is well defined
    there: a sample without spread adds nothing to the standard error."""
    if len(a) < 2 or len(b) < 2:
        return None
    if max(a) == min(a) and max(b) == min(b):
        return 1.0 if a[0] == b[0] else 0.0
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    se2_a, se2_b = _sample_variance(a, mean_a) / len(a), _sample_variance(b, mean_b) / len(b)
    t = (mean_a - mean_b) / math.sqrt(se2_a + se2_b)
    dof = (se2_a + se2_b) ** 2 / (se2_a**2 / (len(a) - 1) + se2_b**2 / (len(b) - 1))  # Welch–Satterthwaite
    return student_t.two_sided_p(t, dof)


def paired_p(differences: list[float]) -> float | None:
    """Two-sided paired t-test p-value of per-seed differences (two arms trained on the same seeds); None with
    fewer than 2."""
    if len(differences) < 2:
        return None
    mean = sum(differences) / len(differences)
    variance = _sample_variance(differences, mean)
    if variance == 0:
        return 1.0 if mean == 0 else 0.0
    return student_t.two_sided_p(mean / math.sqrt(variance / len(differences)), len(differences) - 1)


def pooled_sd(samples: list[list[float]]) -> float | None:
    """Pooled within-node seed SD over nodes with at least 2 seeds."""
    num = sum(sum((s - sum(x) / len(x)) ** 2 for s in x) for x in samples if len(x) >= 2)
    dof = sum(len(x) - 1 for x in samples if len(x) >= 2)
    return math.sqrt(num / dof) if dof else None
