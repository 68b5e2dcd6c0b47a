"""GMPO: geometric-mean policy optimisation."""

import torch

from poise.algorithms import common

NAME = "gmpo"
DESCRIPTION = (
    "Geometric-Mean Policy Optimization. Instead of the arithmetic mean of token-level surrogate terms, "
    "GMPO maximises the geometric mean of the token ratios of a response times its advantage, which is "
    "far less sensitive to outlier tokens with extreme ratios. Clipping is token-level, in log space and "
    "sign-aware (only the side that would over-optimise is clipped), with a wide range (e^-0.4, e^0.4). "
    "GRPO advantages; one loss value per response, averaged over responses."
)
MECHANISMS = ["baseline:group_mean", "scale:group_std", "clip:geometric_mean", "agg:seq-mean-token-mean"]
REFERENCE = "Zhao et al. 2025, Geometric-Mean Policy Optimization (arXiv:2507.20673)"

LOSS_AGG_MODE = "seq-mean-token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.4, "clip_high": 0.4, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    hp = batch["hparams"]
    log_ratio = log_prob - old_log_prob
    clamped = log_ratio.clamp(-hp["clip_low"], hp["clip_high"])
    sign = torch.sign(advantages)
    # Sign-aware clip: for A > 0 cap the log-ratio from above, for A < 0 from below.
    clipped_log_ratio = sign * torch.minimum(sign * log_ratio, sign * clamped)
    tokens = response_mask.sum(-1) + 1e-8
    seq_ratio = torch.exp((clipped_log_ratio * response_mask).sum(-1) / tokens)
    seq_advantage = (advantages * response_mask).sum(-1) / tokens
    # One value per response, spread over its tokens: the seq-mean-token-mean aggregation recovers it.
    loss = (-seq_advantage * seq_ratio).unsqueeze(-1).expand_as(log_prob)
    loss, kl_metrics = common.add_kl_penalty(loss, log_prob, batch)
    was_clipped = (log_ratio != clamped).to(response_mask.dtype)
    metrics = {
        "clip_frac": common.masked_mean(was_clipped * (advantages > 0), response_mask).item(),
        "clip_frac_lower": common.masked_mean(was_clipped * (advantages < 0), response_mask).item(),
        "ppo_kl": common.masked_mean(-log_ratio, response_mask).item(),
    }
    return loss, {**metrics, **kl_metrics}
