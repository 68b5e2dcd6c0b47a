"""The run's objective: what the utility U of an evaluation is, and whether the evaluation meets the constraints.

Two objectives (RunConfig.objective.kind):

- `overall` (default): U is the weighted Overall; there are no constraints, so `Evaluation.utility` and
  `constraints_satisfied` stay None and `poise.scoring.utility` reads the Overall.
- `length` (length compression, the paper's directive-driven search): accuracy must stay within
  `accuracy_tolerance` of the root (GRPO) and shorter responses are rewarded. Against the yardstick — the
  root's Overall A₀ and mean length L₀, each the mean over every seed the root was trained with — an evaluation
  with Overall A and mean length L gets

      compression = 1 − L / L₀                     (0 at the root's length, 0.5 at half its length)
      satisfied   = A ≥ A₀ − tolerance
      U           = compression                                    when satisfied
      U           = compression − 1 − SHORTFALL_WEIGHT · (A₀ − tolerance − A)   otherwise

  so a node that breaks the accuracy constraint (U < 0, as compression ≤ 1) ranks below every node that keeps
  it and is no longer than the root (U ≥ 0), and among equally short breakers the smaller shortfall ranks
  higher.

The archive stamps `utility` and `constraints_satisfied` on every evaluation it stores (archive/update.py); when
the root gains a seed the yardstick moves and every stored evaluation is stamped again, so all nodes are
always measured against the same yardstick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from poise.contracts import Evaluation, Node, Objective

SHORTFALL_WEIGHT = 10.0  # utility lost per point of Overall below the tolerated floor


@dataclass(frozen=True)
class Yardstick:
    """The root's mean Overall and mean response length over its seeds."""

    overall: float
    mean_length: float
    seeds: int


def yardstick(root: Node | None) -> Yardstick | None:
    """The root's yardstick, None until the root is evaluated."""
    if root is None or root.evaluation is None:
        return None
    evaluations = [root.evaluation, *root.replicates]
    overall = [e.overall for e in evaluations if math.isfinite(e.overall)]
    lengths = [e.mean_length for e in evaluations if math.isfinite(e.mean_length)]
    if not overall or not lengths:
        return None
    return Yardstick(sum(overall) / len(overall), sum(lengths) / len(lengths), len(evaluations))


def score(evaluation: Evaluation, objective: Objective, stick: Yardstick | None) -> tuple[float | None, bool | None]:
    """(utility, constraints_satisfied) of one evaluation; (None, None) under the overall objective or without a
    yardstick."""
    if objective.kind == "overall" or stick is None:
        return None, None
    if not (math.isfinite(evaluation.overall) and math.isfinite(evaluation.mean_length)) or stick.mean_length <= 0:
        return None, False
    compression = 1.0 - evaluation.mean_length / stick.mean_length
    floor = stick.overall - objective.accuracy_tolerance
    if evaluation.overall >= floor:
        return compression, True
    return compression - 1.0 - SHORTFALL_WEIGHT * (floor - evaluation.overall), False


def stamped(evaluation: Evaluation, objective: Objective, stick: Yardstick | None) -> Evaluation:
    """`evaluation` with the objective's utility and constraint verdict."""
    utility, satisfied = score(evaluation, objective, stick)
    if utility == evaluation.utility and satisfied == evaluation.constraints_satisfied:
        return evaluation
    return evaluation.model_copy(update={"utility": utility, "constraints_satisfied": satisfied})


def stamped_node(node: Node, objective: Objective, stick: Yardstick | None) -> Node:
    """`node` with every evaluation (its own and its replicates') stamped."""
    if node.evaluation is None:
        return node
    evaluation = stamped(node.evaluation, objective, stick)
    replicates = [stamped(r, objective, stick) for r in node.replicates]
    if evaluation is node.evaluation and all(a is b for a, b in zip(replicates, node.replicates, strict=True)):
        return node
    return node.model_copy(update={"evaluation": evaluation, "replicates": replicates})


def satisfies(node: Node) -> bool | None:
    """Whether the node meets the objective's constraints on every seed it was evaluated with (None: the
    objective has none, or the node is not evaluated)."""
    verdicts = [e.constraints_satisfied for e in (node.evaluation, *node.replicates)
                if e is not None and e.constraints_satisfied is not None]
    return all(verdicts) if verdicts else None


def describe(objective: Objective) -> str:
    """One line for logs, status and agents' context."""
    if objective.kind == "overall":
        text = "maximize the weighted Overall"
    else:
        text = (f"shorten responses (mean length vs GRPO) while keeping Overall within "
                f"{objective.accuracy_tolerance:g} of GRPO")
    return text + (f"; directive: {objective.directive}" if objective.directive else "")
