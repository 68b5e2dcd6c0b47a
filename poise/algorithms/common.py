"""Pure-torch building blocks that candidate modules may import (`from poise.algorithms import common`).

Shapes: B responses, L padded response tokens, G groups. `mask` is the float (B, L) response mask,
`group_index` the long (B,) contiguous group id of each response.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from poise.contracts import DEFAULT_KL_ESTIMATOR, KLEstimator

# Clamp on log-ratios before exp, as VERL does, so one wild token cannot overflow the ratio.
LOG_RATIO_CLAMP = 20.0
DEFAULT_DUAL_CLIP = 3.0  # VERL's clip_ratio_c: a negative-advantage token's loss is capped at -A * 3
# VERL's names (core_algos.kl_penalty) for the estimators of poise.contracts.KLEstimator.
VERL_KL_NAMES = {"kl": KLEstimator.K1.value, "mse": KLEstimator.K2.value, "low_var_kl": KLEstimator.K3.value}
KL_ESTIMATORS = (*(estimator.value for estimator in KLEstimator), *VERL_KL_NAMES)


def token_counts(mask: Tensor) -> Tensor:
    """Valid tokens of each response (B,), at least 1: the per-sequence normalizer of VERL's production path (its
    masks are bool there, so the + 1e-8 it writes is lost in the integer count; docs/extending.md, "VERL facts the
    code relies on"). A response with no valid token has a zero numerator either way."""
    return mask.sum(-1).clamp(min=1)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (values * mask).sum() / (mask.sum() + 1e-8)
    return (values * mask).sum(dim) / (mask.sum(dim) + 1e-8)


def group_sum(values: Tensor, group_index: Tensor) -> Tensor:
    """Per-group sums (G,) of per-response values (B,)."""
    n_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group_index, values)


def group_mean_std(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per-response group mean and unbiased (n-1) group std, broadcast back to (B,).

    A group of one response has no baseline: mean 0 and std 1, VERL's convention.
    """
    return counted_group_mean_std(scores, group_index, torch.ones_like(scores))


def counted_group_mean_std(values: Tensor, group_index: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """group_mean_std over the counted responses only (counted (B,) 1 or 0), broadcast back to every response.

    Used to keep format-invalid responses out of a group's statistics. A group with fewer than two counted
    responses has no baseline: mean 0 and std 1.
    """
    count = group_sum(counted, group_index)
    mean = group_sum(values * counted, group_index) / count.clamp(min=1)
    centered = (values - mean[group_index]) * counted
    var = group_sum(centered * centered, group_index) / (count - 1).clamp(min=1)
    no_baseline = count[group_index] < 2
    mean_b = torch.where(no_baseline, torch.zeros_like(values), mean[group_index])
    std_b = torch.where(no_baseline, torch.ones_like(values), var.sqrt()[group_index])
    return mean_b, std_b


def leave_one_out_centered(scores: Tensor, group_index: Tensor, counted: Tensor | None = None) -> Tensor:
    """s_i minus the mean score of the *other* counted responses of its group, (B,): n/(n-1) (s_i - mean_g).

    A group with one counted response has mean 0 and factor 1, so it keeps its raw score (VERL's convention).
    `counted` (B,) 1 or 0 keeps responses out of the statistics; None counts every response.
    """
    counted = torch.ones_like(scores) if counted is None else counted
    mean, _ = counted_group_mean_std(scores, group_index, counted)
    count = group_sum(counted, group_index)[group_index]
    return count / (count - 1).clamp(min=1) * (scores - mean)


def group_count(group_index: Tensor, like: Tensor) -> Tensor:
    """Number of responses in each response's group, (B,)."""
    return group_sum(torch.ones_like(like), group_index)[group_index]


def correct_length_bonus(weight: Tensor | float, correct: Tensor, length: Tensor, group_index: Tensor) -> Tensor:
    """weight * (mean correct length - length) / mean correct length for each correct response (correct (B,) 1),
    0 for the others, (B,): the mean is over the correct responses of the group, so shorter correct ones gain."""
    n_correct = group_sum(correct, group_index)[group_index]
    mean_correct = group_sum(length * correct, group_index)[group_index] / n_correct.clamp(min=1.0)
    return weight * correct * (mean_correct - length) / mean_correct.clamp(min=1.0)


def whiten(values: Tensor, mask: Tensor) -> Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the valid tokens of the whole batch (unbiased var)."""
    n = mask.sum()
    if n < 2:
        raise ValueError("whitening needs at least two valid tokens in the batch")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * n / (n - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def token_level(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast (B,) sequence advantages to (B, L), zero on padding."""
    return advantages.unsqueeze(-1) * mask


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic surrogate max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) per token, and where the
    clipped term was the larger (the token's update was stopped)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_clip_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, float]]:
    """Token-level PPO clip (asymmetric when clip_high != clip_low) on r = pi / pi_old, without dual-clip."""
    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss, was_clipped = clipped_surrogate(torch.exp(log_ratio), advantages, clip_low, clip_high)
    metrics = {
        "clip_frac": masked_mean(was_clipped.to(mask.dtype), mask).item(),
        "ppo_kl": masked_mean(-log_ratio, mask).item(),
    }
    return loss, metrics


def dual_clip_loss(loss: Tensor, advantages: Tensor, mask: Tensor, dual_clip: float) -> tuple[Tensor, dict[str, float]]:
    """For A < 0 cap the per-token loss at -A * dual_clip, so a token whose ratio exploded cannot dominate the
    batch (Ye et al. 2020, dual-clip PPO)."""
    cap = -advantages * dual_clip
    lower = ((loss > cap) & (advantages < 0)).to(mask.dtype)
    capped = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
    return capped, {"clip_frac_lower": masked_mean(lower, mask).item()}


def ppo_clip_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float = DEFAULT_DUAL_CLIP,
) -> tuple[Tensor, dict[str, float]]:
    """Token-level PPO clip (asymmetric when clip_high != clip_low) with dual-clip for negative advantages.

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); for A < 0 additionally capped at -A c.
    """
    loss, metrics = ppo_clip_surrogate(log_prob, old_log_prob, advantages, mask, clip_low, clip_high)
    loss, lower = dual_clip_loss(loss, advantages, mask, dual_clip)
    return loss, {**metrics, **lower}


def sequence_ratio_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, float]]:
    """GSPO's surrogate: one ratio per response, s = exp(mean_t log(pi / pi_old)), in PPO's clipped surrogate.

    Each token carries s in its value and its own log-prob in its gradient: log s_it = sg(log s) + lp - sg(lp).
    """
    log_ratio = log_prob - old_log_prob
    seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    token_log_ratio = (log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(max=10.0)
    loss, was_clipped = clipped_surrogate(torch.exp(token_log_ratio), advantages, clip_low, clip_high)
    metrics = {
        "clip_frac": masked_mean(was_clipped.to(mask.dtype), mask).item(),
        "ppo_kl": masked_mean(-log_ratio, mask).item(),
    }
    return loss, metrics


def geometric_mean_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, float]]:
    """GMPO's surrogate: -(mean advantage) * (geometric mean of the token ratios) per response, spread over its
    tokens (seq-mean-token-mean recovers it), with a sign-aware token clip in log space to [-clip_low, clip_high]:
    for A > 0 the log-ratio is capped from above, for A < 0 from below (only the over-optimising side)."""
    log_ratio = log_prob - old_log_prob
    clamped = log_ratio.clamp(-clip_low, clip_high)
    sign = torch.sign(advantages)
    clipped_log_ratio = sign * torch.minimum(sign * log_ratio, sign * clamped)
    tokens = token_counts(mask)
    seq_ratio = torch.exp((clipped_log_ratio * mask).sum(-1) / tokens)
    seq_advantage = (advantages * mask).sum(-1) / tokens
    loss = (-seq_advantage * seq_ratio).unsqueeze(-1).expand_as(log_prob)
    was_clipped = (log_ratio != clamped).to(mask.dtype)
    metrics = {
        "clip_frac": masked_mean(was_clipped * (advantages > 0), mask).item(),
        "clip_frac_lower": masked_mean(was_clipped * (advantages < 0), mask).item(),
        "ppo_kl": masked_mean(-log_ratio, mask).item(),
    }
    return loss, metrics


def cispo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, float]]:
    """CISPO's loss -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * log pi: every token keeps its REINFORCE
    gradient and only the detached importance weight is clipped."""
    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    metrics = {
        "clip_frac": masked_mean((ratio != weight).to(mask.dtype), mask).item(),
        "ppo_kl": masked_mean(-log_ratio, mask).item(),
    }
    return -weight * advantages * log_prob, metrics


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman 2020, "Approximating KL").

    k1 ("kl"): log r; abs: |log r|; k2 ("mse"): (log r)^2 / 2; k3 ("low_var_kl"): exp(-log r) + log r - 1,
    with log r = log_prob - ref_log_prob. A trailing "+" (e.g. "k3+") keeps the estimator's value but takes
    the gradient of k2, whose expected gradient is the true KL gradient.
    """
    straight_through = estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    base = VERL_KL_NAMES.get(base, base)
    log_ratio = log_prob - ref_log_prob
    if base == KLEstimator.K1:
        value = log_ratio
    elif base == KLEstimator.ABS:
        value = log_ratio.abs()
    elif base == KLEstimator.K2:
        value = 0.5 * log_ratio.square()
    elif base == KLEstimator.K3:
        reverse = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        value = (torch.exp(reverse) - reverse - 1.0).clamp(-10.0, 10.0)
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)} (+ suffix ok)")
    if not straight_through or base == KLEstimator.K2:
        return value
    k2 = 0.5 * log_ratio.square()
    return k2 - k2.detach() + value.detach()


def add_kl_penalty(loss: Tensor, log_prob: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
    """Add `kl_coef * kl_penalty(log_prob, ref_log_prob, kl_estimator)` per token when kl_coef > 0.

    Aggregation is linear, so adding the penalty per token before aggregation equals VERL's separate
    `kl_loss_coef * agg_loss(kl)` term under the same mode.
    """
    coef = float(batch["hparams"].get("kl_coef", 0.0))
    if coef == 0.0:
        return loss, {}
    if "ref_log_prob" not in batch:
        raise ValueError("kl_coef > 0 but the batch has no ref_log_prob: the protocol must keep a reference model")
    kl = kl_penalty(log_prob, batch["ref_log_prob"], str(batch["hparams"].get("kl_estimator", DEFAULT_KL_ESTIMATOR)))
    return loss + coef * kl, {"kl": masked_mean(kl.detach(), batch["response_mask"]).item()}


def surrogate_policy_loss(
    surrogate: Callable[..., tuple[Tensor, dict[str, float]]],
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    batch: dict[str, Any],
) -> tuple[Tensor, dict[str, float]]:
    """A policy_loss from a clipped surrogate (ppo_clip_surrogate, sequence_ratio_loss, geometric_mean_loss,
    cispo_loss) with hparams clip_low and clip_high, plus the optional KL penalty."""
    hp = batch["hparams"]
    loss, metrics = surrogate(log_prob, old_log_prob, advantages, response_mask, hp["clip_low"], hp["clip_high"])
    loss, kl_metrics = add_kl_penalty(loss, log_prob, batch)
    return loss, {**metrics, **kl_metrics}


def clipped_policy_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor, batch: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """PPO clip + dual-clip with hparams clip_low, clip_high, dual_clip, plus the optional KL penalty."""
    surrogate = functools.partial(ppo_clip_loss, dual_clip=batch["hparams"].get("dual_clip", DEFAULT_DUAL_CLIP))
    return surrogate_policy_loss(surrogate, log_prob, old_log_prob, advantages, response_mask, batch)


def group_normalized_advantages(batch: dict[str, Any]) -> Tensor:
    """GRPO's advantage: (s_i - mean_g) / (std_g + eps) per response, broadcast over its tokens, (B, L)."""
    scores = batch["scores"]
    mean, std = group_mean_std(scores, batch["group_index"])
    return token_level((scores - mean) / (std + batch["hparams"]["eps"]), batch["response_mask"])
