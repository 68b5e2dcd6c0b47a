"""Probe batches recorded from real testbed training, for fingerprints that see what training sees (docs/screening.md).

Synthetic probes (proposer/fingerprint.py, `PROBES`) reach regions a testbed run never does: ratios of 4 and more,
correct responses of one prompt with different lengths. A mechanism that only acts there looks different from its
parent on the probes and is an exact no-op in training. So the fingerprint also runs every candidate on a few
rollout batches that a real GRPO run produced, with the current-policy log-probs of each of its minibatch updates:
what `poise.testbed.training` hands `compute_advantages` and `policy_loss`, recorded from the inside.

`RECORDED_PROBES` (package data, proposer/probe_batches.npz) is written by `record_probe_batches` through
scripts/record_probe_batches.py, which records its own command, seed and protocol in the file's metadata.

Per recorded step the file holds the rollout batch in update order (the rows of minibatch 1, then 2, ...), so a
minibatch is a contiguous slice and the rows of the whole batch are what `compute_advantages` saw, permuted:

    s{i}_scores (B,) float32, s{i}_format_valid (B,) float32, s{i}_group (B,) int16, s{i}_length (B,) int16
    s{i}_old_log_prob, s{i}_log_prob, s{i}_entropy, s{i}_ref_log_prob (B, L) float32 (0 on padding)
    s{i}_minibatch_sizes (M,) int16; log_prob holds, for each minibatch's rows, the current policy's log-probs at
    that update (the first update of a step is on-policy)
    meta: a JSON string (recipe, protocol, the steps recorded, ratio statistics of every step of the run)

Recording runs GRPO (trusted reference code) in this process; loading runs nothing.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

RECORDED_PROBES = Path(__file__).resolve().with_name("probe_batches.npz")
STEP_ARRAYS = ("scores", "format_valid", "group", "length", "old_log_prob", "log_prob", "entropy", "ref_log_prob",
               "minibatch_sizes")
# Ratio thresholds of the statistics kept in the metadata: the PPO clip (0.2, DAPO's 0.28), GMPO's log clip 0.4
# (ratio 1.49), the dual-clip range (1.5..10, default 3).
RATIO_THRESHOLDS = (1.2, 1.28, 1.5, 2.0, 3.0, 5.0)
# Keeps the reference policy's log-probs in the batch (the harness computes them when kl_coef > 0); the recorder's
# loss sets kl_coef back to 0, so the run is GRPO's.
_KEEP_REFERENCE = 1e-12


@dataclass(frozen=True)
class RecordedStep:
    """One recorded training step: the rollout batch in update order and the log-probs of each update."""

    step: int
    scores: np.ndarray
    format_valid: np.ndarray
    group: np.ndarray
    length: np.ndarray
    old_log_prob: np.ndarray
    log_prob: np.ndarray
    entropy: np.ndarray
    ref_log_prob: np.ndarray
    minibatch_sizes: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """(B, L) float32: 1 on response tokens."""
        return (np.arange(self.old_log_prob.shape[1])[None, :] < self.length[:, None]).astype(np.float32)

    def minibatches(self) -> list[slice]:
        """The row slice of each minibatch update, in order."""
        ends = np.cumsum(self.minibatch_sizes)
        return [slice(int(end - size), int(end)) for size, end in zip(self.minibatch_sizes, ends, strict=True)]


@dataclass(frozen=True)
class RecordedProbes:
    meta: dict[str, Any]
    steps: tuple[RecordedStep, ...]


@lru_cache(maxsize=4)
def load_recorded_probes(path: Path = RECORDED_PROBES) -> RecordedProbes:
    """The recorded steps of `path` (default: the package's file), checked for the layout above."""
    if not path.exists():
        raise FileNotFoundError(f"no recorded probe batches at {path}: regenerate them with "
                                "scripts/record_probe_batches.py (docs/screening.md)")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        steps = []
        for position, step in enumerate(meta["steps"]):
            missing = [name for name in STEP_ARRAYS if f"s{position}_{name}" not in data]
            if missing:
                raise ValueError(f"{path}: recorded step {step} lacks {', '.join(missing)}")
            steps.append(RecordedStep(step, **{name: data[f"s{position}_{name}"] for name in STEP_ARRAYS}))
    for recorded in steps:
        rows = recorded.scores.shape[0]
        if int(recorded.minibatch_sizes.sum()) != rows or recorded.old_log_prob.shape[0] != rows:
            raise ValueError(f"{path}: step {recorded.step} has inconsistent row counts")
    return RecordedProbes(meta, tuple(steps))


# ------------------------------------------------------------------------------------------------ recording


class _Recorder:
    """GRPO as a candidate module that also keeps what the harness gave each `policy_loss` call."""

    def __init__(self, steps: Sequence[int]) -> None:
        from poise.algorithms import grpo

        self.grpo = grpo
        self.keep = set(steps)
        self.step, self.update = -1, 0
        self.calls: dict[int, list[dict[str, np.ndarray]]] = {}
        self.stats: list[dict[str, Any]] = []
        self.module = types.ModuleType("grpo_recorder")
        self.module.LOSS_AGG_MODE = grpo.LOSS_AGG_MODE
        self.module.HPARAMS = {**grpo.HPARAMS, "kl_coef": _KEEP_REFERENCE}
        self.module.compute_advantages = self.compute_advantages
        self.module.policy_loss = self.policy_loss

    def compute_advantages(self, batch: dict[str, Any]) -> Any:
        self.step, self.update = self.step + 1, 0  # once per training step, before its updates
        return self.grpo.compute_advantages(batch)

    def policy_loss(self, log_prob, old_log_prob, advantages, response_mask, batch) -> Any:
        log_ratio = (log_prob.detach() - old_log_prob).double().numpy()
        self.stats.append(update_ratio_statistics(self.step, self.update, log_ratio,
                                                  advantages.double().numpy(), response_mask.double().numpy()))
        self.update += 1
        if self.step in self.keep:
            self.calls.setdefault(self.step, []).append({
                "scores": batch["scores"].numpy(), "format_valid": batch["format_valid"].numpy(),
                "group": batch["group_index"].numpy(), "length": response_mask.sum(-1).numpy(),
                "old_log_prob": old_log_prob.numpy(), "log_prob": log_prob.detach().numpy(),
                "entropy": batch["entropy"].numpy(), "ref_log_prob": batch["ref_log_prob"].numpy()})
        grpo_batch = {**batch, "hparams": {**batch["hparams"], "kl_coef": 0.0}}
        return self.grpo.policy_loss(log_prob, old_log_prob, advantages, response_mask, grpo_batch)


def update_ratio_statistics(step: int, update: int, log_ratio: np.ndarray, advantages: np.ndarray,
                            mask: np.ndarray) -> dict[str, Any]:
    """Counts over one minibatch update's valid tokens: how many ratios r = pi / pi_old exceed each of
    RATIO_THRESHOLDS (and fall below 0.8), how many of those exceedances are on negative-advantage tokens (where
    dual-clip acts), the largest ratio, and the largest |sequence log-ratio| (GSPO's clip acts beyond ~3e-4)."""
    valid = mask > 0
    ratio = np.exp(log_ratio[valid])
    negative = advantages[valid] < 0
    length = np.maximum(mask.sum(-1), 1.0)
    sequence = np.abs((log_ratio * mask).sum(-1) / length)
    return {
        "step": step, "update": update, "tokens": int(valid.sum()),
        "above": {f"{t:g}": int((ratio > t).sum()) for t in RATIO_THRESHOLDS},
        "above_negative": {f"{t:g}": int(((ratio > t) & negative).sum()) for t in RATIO_THRESHOLDS},
        "below_0.8": int((ratio < 0.8).sum()),
        "max_ratio": float(ratio.max()) if ratio.size else 1.0,
        "max_sequence_log_ratio": float(sequence.max()) if sequence.size else 0.0,
    }


def record_probe_batches(protocol_name: str, seed: int, steps: Sequence[int], out: Path, command: str,
                         workdir: Path, overrides: dict[str, Any] | None = None) -> RecordedProbes:
    """Train GRPO under protocol `protocol_name` (with `overrides`) and seed `seed`, keep the batches of `steps`
    (0-based), write them to `out` (layout: module docstring) and return what was written."""
    import torch

    from poise.testbed.checkpoints import base_checkpoint
    from poise.testbed.protocol import get_protocol, protocol_sha256
    from poise.testbed.training import train

    protocol = get_protocol(protocol_name).replace(**(overrides or {}))
    wanted = sorted(set(steps))
    if not wanted or wanted[0] < 0 or wanted[-1] >= protocol.steps:
        raise ValueError(f"steps to record must lie in 0..{protocol.steps - 1}, got {list(steps)}")
    recorder = _Recorder(wanted)
    trajectory = train(recorder.module, protocol, seed, base_checkpoint(protocol.base_checkpoint), workdir)
    if trajectory.aborted:
        raise RuntimeError(f"the GRPO run aborted ({trajectory.abort_reason}): nothing representative to record")
    arrays: dict[str, np.ndarray] = {}
    for position, step in enumerate(wanted):
        calls = recorder.calls[step]
        width = max(int(call["length"].max()) for call in calls)
        for name in STEP_ARRAYS[:-1]:
            joined = np.concatenate([call[name] for call in calls])
            if joined.ndim == 2:
                joined = joined[:, :width].astype(np.float32)
            elif name in ("group", "length"):
                joined = joined.astype(np.int16)
            else:
                joined = joined.astype(np.float32)
            arrays[f"s{position}_{name}"] = joined
        arrays[f"s{position}_minibatch_sizes"] = np.array([len(call["scores"]) for call in calls], dtype=np.int16)
    meta = {
        "command": command, "seed": seed, "protocol": protocol_name, "overrides": overrides or {},
        "protocol_sha256": protocol_sha256(protocol_name) if not overrides else None,
        "steps": wanted, "algorithm": "grpo", "max_new_tokens": protocol.max_new_tokens,
        "rollouts_per_step": protocol.rollouts_per_step(), "minibatches": protocol.minibatches,
        "torch": torch.__version__, "python": sys.version.split()[0],
        "reward_mean": [round(s.reward_mean, 4) for s in trajectory.steps],
        "update_statistics": recorder.stats,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, meta=np.array(json.dumps(meta)), **arrays)
    load_recorded_probes.cache_clear()
    return load_recorded_probes(out)


def shaped_length_groups(probes: RecordedProbes, min_pass_rate: float = 0.0) -> tuple[int, int]:
    """(groups whose correct responses (score > 0) differ in length with a pass rate >= min_pass_rate, all groups)
    over the recorded steps: where the length-shaping mechanisms of the library can act at all."""
    shaped = groups = 0
    for step in probes.steps:
        for group in np.unique(step.group):
            rows = step.group == group
            correct = step.scores[rows] > 0
            groups += 1
            lengths = step.length[rows][correct]
            shaped += int(correct.mean() >= min_pass_rate and lengths.size > 1 and lengths.min() != lengths.max())
    return shaped, groups


def largest_negative_ratio(probes: RecordedProbes) -> float:
    """The largest ratio r = pi / pi_old on the recorded updates among tokens of responses that scored below their
    group's mean (negative advantage under any group-centred baseline): where dual-clip could act."""
    largest = 0.0
    for step in probes.steps:
        group_ids, inverse = np.unique(step.group, return_inverse=True)
        means = np.bincount(inverse, weights=step.scores) / np.bincount(inverse)
        below = (step.scores < means[inverse])[:, None] & (step.mask > 0)
        if below.any():
            largest = max(largest, float(np.exp(step.log_prob[below] - step.old_log_prob[below]).max()))
    return largest


def ratio_table(meta: dict[str, Any], skip_first_update: bool = True) -> list[dict[str, Any]]:
    """Per ratio threshold: the share of valid tokens above it (and on negative-advantage tokens) over the
    recorded run's updates (by default the off-policy ones: each step's first update has ratio 1)."""
    stats = [s for s in meta["update_statistics"]
             if not (skip_first_update and s["update"] == 0)]
    tokens = sum(s["tokens"] for s in stats)
    rows = []
    for threshold in RATIO_THRESHOLDS:
        key = f"{threshold:g}"
        above = sum(s["above"][key] for s in stats)
        negative = sum(s["above_negative"][key] for s in stats)
        rows.append({"ratio_above": threshold, "tokens": tokens, "share": above / max(tokens, 1),
                     "share_negative_advantage": negative / max(tokens, 1), "count": above,
                     "count_negative_advantage": negative})
    return rows


def describe_ratio_table(meta: dict[str, Any]) -> str:
    """The ratio table as markdown, with the largest ratio and sequence log-ratio seen."""
    rows = ratio_table(meta)
    stats = meta["update_statistics"]
    lines = ["| ratio r > | share of tokens | count | with A < 0 |", "|---|---|---|---|"]
    lines += [f"| {r['ratio_above']:g} | {r['share']:.2e} | {r['count']} of {r['tokens']} | "
              f"{r['count_negative_advantage']} |" for r in rows]
    lines.append(f"\nlargest ratio {max(s['max_ratio'] for s in stats):.3g}, largest |sequence log-ratio| "
                 f"{max(s['max_sequence_log_ratio'] for s in stats):.3g}, share below 0.8 "
                 f"{sum(s['below_0.8'] for s in stats) / max(sum(s['tokens'] for s in stats), 1):.2e}")
    return "\n".join(lines)


__all__ = [
    "RECORDED_PROBES",
    "RecordedProbes",
    "RecordedStep",
    "describe_ratio_table",
    "largest_negative_ratio",
    "load_recorded_probes",
    "ratio_table",
    "record_probe_batches",
    "shaped_length_groups",
    "update_ratio_statistics",
]
