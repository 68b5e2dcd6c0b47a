"""The early-abort rules of a training run, shared by every trainer backend (testbed and VERL).

A clearly broken run should cost seconds, not the whole budget: after each logged step the trainer asks
`AbortWatch.observe` whether the curve so far is broken, and stops the run with the reason it gives. The
thresholds come from the protocol (poise/testbed/protocol.py `Protocol`, trainer/verl/protocol.py
`GpuProtocol.abort`), the rules are here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from poise.contracts import TrainingStep

# Named fields of a step that must stay finite: a nan or inf here means the run diverged (a measured nan is a
# real value in TrainingStep, so it reaches this check instead of being dropped).
FINITE_FIELDS = ("reward_mean", "entropy", "grad_norm")


@dataclass(frozen=True)
class AbortRules:
    kl: float              # k3 KL to the base model, per token, above which the policy collapsed
    format_valid: float    # format-valid rate of the rollouts below which a step counts as low ...
    patience: int          # ... and this many low steps in a row abort the run


class AbortWatch:
    """Follows one run's steps in order; `observe` returns why the run must stop, or None."""

    def __init__(self, rules: AbortRules) -> None:
        self.rules = rules
        self.low_format_streak = 0

    def observe(self, record: TrainingStep) -> str | None:
        rules = self.rules
        for name in FINITE_FIELDS:
            value = getattr(record, name)
            if value is not None and not math.isfinite(value):
                return f"{name} is {value} at step {record.step}: the run diverged"
        if record.kl is not None and not (record.kl <= rules.kl):
            return (f"KL to the base model {record.kl:.3g} exceeds {rules.kl} at step {record.step}: "
                    "the policy collapsed")
        rate = record.format_valid_rate
        if rate is not None:
            self.low_format_streak = self.low_format_streak + 1 if not (rate >= rules.format_valid) else 0
        if self.low_format_streak >= rules.patience:
            return (f"format-valid rate {rate:.2f} below {rules.format_valid} for {self.low_format_streak} steps "
                    f"(step {record.step}): the policy stopped answering in the required format")
        return None
