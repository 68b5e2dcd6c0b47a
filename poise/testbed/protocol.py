"""The standardized training and evaluation protocol of the CPU testbed.

One protocol is applied to every candidate of a run so that nodes stay comparable (the paper's aligned
budgets, backend settings and metric definitions). Budgets are in steps and samples, never seconds: the
machine's load varies, the protocol must not. See poise/testbed/README.md for why each value is what it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from poise.testbed.tasks import DEFAULT_SUITES, TRAIN_CHAIN_LENGTHS, SuiteSpec


@dataclass(frozen=True)
class Protocol:
    name: str
    # --- RL training
    steps: int = 45
    prompts_per_step: int = 16
    group_size: int = 8                # G samples per prompt
    minibatches: int = 4               # optimizer updates per rollout batch; > 1 makes ratios and clipping matter
    epochs: int = 1
    lr: float = 3e-5
    warmup_steps: int = 5              # linear warmup: Adam's first bias-corrected steps are ~lr*sign(g) everywhere
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 96
    train_chain_lengths: tuple[int, ...] = TRAIN_CHAIN_LENGTHS   # the SFT distribution, 1-10 operations
    kl_log_every: int = 5              # KL to the base model is logged on steps 0-2 and every k-th step
    # The trained policy handed to evaluation is an exponential moving average of the weights after each
    # step, with this decay (0: the last iterate). Training itself always runs on the iterate.
    policy_ema: float = 0.0
    # --- early abort: a clearly broken run should cost seconds
    abort_kl: float = 2.0              # k3 KL to the base, per token
    abort_format_valid: float = 0.25   # format-valid rate of the rollouts ...
    abort_patience: int = 3            # ... below the threshold for this many consecutive steps
    # --- evaluation
    suites: tuple[SuiteSpec, ...] = DEFAULT_SUITES
    eval_samples: int = 8              # n samples per prompt on pass@k suites (unbiased pass@k from n >= k)
    eval_max_new_tokens: int = 100
    bootstrap_resamples: int = 1000
    threads: int = 2
    base_checkpoint: str = "default"   # name under poise/testbed/checkpoints/
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        too_big = [s.name for s in self.suites if s.kind == "pass@k" and s.k > self.eval_samples]
        if too_big:
            raise ValueError(f"protocol {self.name}: pass@k suites {too_big} need eval_samples >= k "
                             f"(eval_samples={self.eval_samples})")
        if not 0.0 <= self.policy_ema < 1.0:
            raise ValueError(f"protocol {self.name}: policy_ema must be in [0, 1), got {self.policy_ema}")
        if self.minibatches < 1 or self.prompts_per_step * self.group_size < self.minibatches:
            raise ValueError(f"protocol {self.name}: {self.minibatches} minibatches do not fit in a rollout batch")

    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    def replace(self, **changes) -> Protocol:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tiny_suites() -> tuple[SuiteSpec, ...]:
    return tuple(dataclasses.replace(s, n_prompts=8, k=min(s.k, 2)) for s in DEFAULT_SUITES)


PROTOCOLS: dict[str, Protocol] = {
    # 40 steps of 12 prompts x 8 samples, an EMA of the weights evaluated (README: why each value).
    "default": Protocol(name="default", steps=40, prompts_per_step=12, policy_ema=0.95),
    # Earlier defaults, kept so that their reports can be reproduced: 45 steps of 16 prompts, evaluating the
    # EMA of the weights (2026-11-29 report) or the last iterate (2026-11-22 report).
    "ema": Protocol(name="ema", policy_ema=0.95),
    "iterate": Protocol(name="iterate"),
    # For tests and CI: a few steps of the same loop and a small evaluation, seconds per candidate.
    "tiny": Protocol(
        name="tiny", steps=3, prompts_per_step=4, group_size=4, minibatches=2, max_new_tokens=48,
        kl_log_every=1, suites=_tiny_suites(), eval_samples=4, eval_max_new_tokens=64, bootstrap_resamples=100,
    ),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None


def protocol_from_dict(data: dict) -> Protocol:
    """Inverse of Protocol.as_dict (JSON turns tuples into lists and suites into dicts)."""
    fields = {f.name for f in dataclasses.fields(Protocol)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"unknown protocol settings: {', '.join(sorted(unknown))}")
    values = dict(data)
    for name in ("adam_betas", "train_chain_lengths"):
        if name in values:
            values[name] = tuple(values[name])
    if "suites" in values:
        values["suites"] = tuple(
            SuiteSpec(**{**suite, "chain_lengths": tuple(suite["chain_lengths"])}) for suite in values["suites"]
        )
    return Protocol(**values)


def protocol_sha256(name: str) -> str:
    """sha256 of the named protocol's settings as this code defines them (KeyError for an unknown name)."""
    return hashlib.sha256(json.dumps(get_protocol(name).as_dict(), sort_keys=True).encode()).hexdigest()


def protocol_drift(name: str, recorded: str | None) -> str | None:
    """Why a run that recorded `recorded` for protocol `name` cannot go on under this code, or None."""
    if recorded is None:
        return None
    current = protocol_sha256(name)
    if current == recorded:
        return None
    return (f"the settings of protocol {name!r} changed since the run started (sha256 {recorded[:12]} then, "
            f"{current[:12]} now): new nodes would not be comparable with its archive; finish it with the code "
            "it started with, or start a new run")
