"""Early stopping on live curves: stop a child's training when it cannot reach its parent (docs/early_stopping.md).

The rule, at checkpoints (25%, 50% and 75% of the protocol's steps): the child's mean training reward over the steps
run so far minus its parent's over the same steps is the *gap* g. From archived (child, parent) pairs a line is fitted
per checkpoint,

    Δ = U(child) − U(parent) = a + b·g + ε,      ε ~ s·t(n − 2)

(ordinary least squares; s the residual SD). For a running child the predicted Δ̂ has the spread of a new point,
s·√(1 + 1/n + (g − ḡ)²/Sxx), never below √2·σ (σ the run's seed SD from the root's seeds: both utilities are one
seed each), and

    P(reach parent) = P(Δ > 0) = P(T_{n−2} > −Δ̂ / spread).

The child is stopped at the first checkpoint where P(reach parent) < alpha (5%) and its gap is negative (a child
whose curve is at or above its parent's is never stopped, whatever the line says). A checkpoint is fitted only on
`MIN_PAIRS` pairs or more; a rule without checkpoints stops nothing.

Everything here is pure: the trainer (trainer/service.py) evaluates a plan on the steps it streams, the archive
(archive/early_stop.py) fits and sends the plan, and `poise bench early-stop` (app/bench_early_stop.py) replays
archived curves through it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from poise import student_t
from poise.contracts import (
    EarlyStop,
    EarlyStopPlan,
    EarlyStopRule,
    Node,
    NodeStatus,
    StopCheckpoint,
    TrainingStep,
)
from poise.scoring import seed_scores, summarize, utility

FRACTIONS = (0.25, 0.5, 0.75)  # checkpoints, as fractions of the protocol's steps
ALPHA = 0.05                   # stop when P(reach parent) is below this
MIN_PAIRS = 12                 # (child, parent) pairs a checkpoint's fit needs; fewer: it is not fitted
METRIC = "reward_mean"
RULES_FILE = Path(__file__).with_name("early_stop_rules.json")


@dataclass(frozen=True)
class Pair:
    """One archived child and its parent: their reward curves and final utilities."""

    run_id: str
    child_id: str
    parent_id: str
    child_curve: tuple[float | None, ...]
    parent_curve: tuple[float | None, ...]
    child_utility: float
    parent_utility: float

    @property
    def difference(self) -> float:
        return self.child_utility - self.parent_utility


def curve_of(node: Node, metric: str = METRIC) -> tuple[float | None, ...]:
    if node.trajectory is None:
        return ()
    return tuple(getattr(step, metric) for step in node.trajectory.steps)


def _finite_utility(node: Node) -> float | None:
    value = utility(node.evaluation)
    return value if value is not None and math.isfinite(value) else None


def pairs_from_nodes(nodes: Iterable[Node], metric: str = METRIC) -> list[Pair]:
    """Every evaluated child whose parent (its first) is evaluated too, both with a curve; a node that failed after
    its evaluation (at reflection) still counts, one stopped early has no utility and does not."""
    by_id = {node.node_id: node for node in nodes}
    pairs = []
    for child in by_id.values():
        parent = by_id.get(child.genealogy.parent_ids[0]) if child.genealogy.parent_ids else None
        if parent is None:
            continue
        child_u, parent_u = _finite_utility(child), _finite_utility(parent)
        child_curve, parent_curve = curve_of(child, metric), curve_of(parent, metric)
        if child_u is None or parent_u is None or not child_curve or not parent_curve:
            continue
        pairs.append(Pair(child.run_id, child.node_id, parent.node_id, child_curve, parent_curve, child_u, parent_u))
    return pairs


def checkpoint_steps(steps: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """The steps run at each checkpoint (at least 1, fewer than all), without repeats."""
    return sorted({min(max(1, round(f * steps)), steps - 1) for f in fractions} - {0})


def partial_gap(child: Sequence[float | None], parent: Sequence[float | None], steps: int) -> float | None:
    """Mean of the child's curve over its first `steps` steps minus the parent's over the same steps (finite values
    at steps both have); None when either curve is shorter or nothing is finite."""
    if len(child) < steps or len(parent) < steps:
        return None
    both = [(c, p) for c, p in zip(child[:steps], parent[:steps], strict=True)
            if c is not None and p is not None and math.isfinite(c) and math.isfinite(p)]
    if not both:
        return None
    return sum(c for c, _ in both) / len(both) - sum(p for _, p in both) / len(both)


def fit_checkpoint(step: int, points: Sequence[tuple[float, float]]) -> StopCheckpoint | None:
    """Least squares of Δ on the gap over (gap, Δ) points; None with fewer than MIN_PAIRS."""
    n = len(points)
    if n < MIN_PAIRS:
        return None
    x_mean = sum(x for x, _ in points) / n
    y_mean = sum(y for _, y in points) / n
    sxx = sum((x - x_mean) ** 2 for x, _ in points)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in points) / sxx if sxx > 0 else 0.0
    intercept = y_mean - slope * x_mean
    residuals = sum((y - intercept - slope * x) ** 2 for x, y in points)
    return StopCheckpoint(step=step, intercept=intercept, slope=slope, residual_sd=math.sqrt(residuals / (n - 2)),
                          x_mean=x_mean, sxx=sxx, n=n)


def fit_rule(pairs: Sequence[Pair], protocol: str, steps: int, source: str = "", alpha: float = ALPHA,
             fractions: Sequence[float] = FRACTIONS) -> EarlyStopRule:
    """The rule fitted on `pairs` at each checkpoint that has MIN_PAIRS pairs (with none, a rule that stops
    nothing)."""
    checkpoints = []
    for step in checkpoint_steps(steps, fractions):
        points = [(gap, pair.difference) for pair in pairs
                  if (gap := partial_gap(pair.child_curve, pair.parent_curve, step)) is not None]
        fitted = fit_checkpoint(step, points)
        if fitted is not None:
            checkpoints.append(fitted)
    return EarlyStopRule(protocol=protocol, steps=steps, alpha=alpha, checkpoints=checkpoints,
                         source=source or f"{len(pairs)} (child, parent) pairs")


def upper_tail(t: float, dof: float) -> float:
    """P(T > t) for T ~ Student's t with `dof` degrees of freedom."""
    half = student_t.two_sided_p(t, dof) / 2.0
    return half if t >= 0 else 1.0 - half


def predict(checkpoint: StopCheckpoint, gap: float, noise_sd: float | None = None) -> tuple[float, float]:
    """(Δ̂, P(Δ > 0)) at this checkpoint for a child with this gap: the line's prediction and the probability the
    child ends above its parent, with the spread of a new point, floored at √2 × the seed noise."""
    predicted = checkpoint.intercept + checkpoint.slope * gap
    leverage = (gap - checkpoint.x_mean) ** 2 / checkpoint.sxx if checkpoint.sxx > 0 else 0.0
    spread = checkpoint.residual_sd * math.sqrt(1.0 + 1.0 / checkpoint.n + leverage)
    spread = max(spread, math.sqrt(2.0) * (noise_sd or 0.0))
    if spread <= 0:
        return predicted, 1.0 if predicted > 0 else 0.0
    return predicted, upper_tail(-predicted / spread, checkpoint.n - 2)


def decide(plan: EarlyStopPlan, curve: Sequence[float | None], steps_planned: int) -> EarlyStop | None:
    """The stop, when the child whose curve so far is `curve` sits at a checkpoint of the plan's rule and cannot
    reach its parent; None to go on."""
    checkpoint = next((c for c in plan.rule.checkpoints if c.step == len(curve)), None)
    if checkpoint is None:
        return None
    gap = partial_gap(curve, plan.parent_curve, checkpoint.step)
    if gap is None or not gap < 0:
        return None
    difference, probability = predict(checkpoint, gap, plan.noise_sd)
    if not probability < plan.rule.alpha:
        return None
    predicted = plan.parent_utility + difference
    reason = (f"stopped after {checkpoint.step} of {steps_planned} steps: mean {plan.rule.metric} {gap:+.3f} against "
              f"parent {plan.parent_id} over the same steps predicts utility {predicted:.4f} (parent "
              f"{plan.parent_utility:.4f}); P(reach parent) {probability:.3f} < {plan.rule.alpha}")
    return EarlyStop(steps_run=checkpoint.step, steps_planned=steps_planned, parent_id=plan.parent_id,
                     parent_utility=plan.parent_utility, gap=gap, predicted=predicted,
                     probability=probability, reason=reason)


class EarlyStopWatch:
    """A plan applied to a training as its steps come in (the trainer's on_step stream)."""

    def __init__(self, plan: EarlyStopPlan, steps_planned: int) -> None:
        self.plan = plan
        self.steps_planned = steps_planned
        self.curve: list[float | None] = []
        self.stop: EarlyStop | None = None

    def observe(self, step: TrainingStep) -> EarlyStop | None:
        """Take one step; the stop when the rule says so (then it is kept in `stop`)."""
        self.curve.append(getattr(step, self.plan.rule.metric))
        if self.stop is None:
            self.stop = decide(self.plan, self.curve, self.steps_planned)
        return self.stop


def replay(plan: EarlyStopPlan, curve: Sequence[float | None], steps_planned: int) -> EarlyStop | None:
    """What the rule would have done to a finished child with this curve: its first stop, or None."""
    for end in range(1, len(curve) + 1):
        stop = decide(plan, curve[:end], steps_planned)
        if stop is not None:
            return stop
    return None


def noise_sd(root: Node | None) -> float | None:
    """The run's seed noise: the SD of the root's seed scores (None before it has two)."""
    summary = summarize(seed_scores(root)) if root is not None else None
    return summary.sd if summary is not None else None


def plan_for(rule: EarlyStopRule | None, parent: Node | None, root: Node | None) -> EarlyStopPlan | None:
    """The plan for a child of `parent`: None when there is no usable rule or the parent has no curve or utility."""
    if rule is None or not rule.checkpoints or parent is None or parent.status == NodeStatus.FAILED:
        return None
    parent_utility = _finite_utility(parent)
    curve = curve_of(parent, rule.metric)
    if parent_utility is None or not curve:
        return None
    return EarlyStopPlan(rule=rule, parent_id=parent.node_id, parent_curve=list(curve), parent_utility=parent_utility,
                         noise_sd=noise_sd(root))


def packaged_rule(protocol: str, path: Path = RULES_FILE) -> EarlyStopRule | None:
    """The rule the package holds for `protocol` (fitted by the command recorded in the file), or None when it holds
    none or the protocol's settings changed since the fit (its sha256 differs)."""
    from poise.testbed.protocol import PROTOCOLS, protocol_sha256

    if not path.is_file() or protocol not in PROTOCOLS:
        return None
    entry = json.loads(path.read_text()).get("rules", {}).get(protocol)
    if entry is None or entry.get("protocol_sha256") != protocol_sha256(protocol):
        return None
    return EarlyStopRule.model_validate(entry["rule"])
