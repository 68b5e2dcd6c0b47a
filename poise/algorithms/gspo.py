"""GSPO: sequence-level importance ratio and clipping."""

import torch

from poise.algorithms import common

NAME = "gspo"
DESCRIPTION = (
    "Group Sequence Policy Optimization. The importance ratio is defined per response as the geometric "
    "mean of its token ratios, s_i = exp(mean_t log(pi/pi_old)), and clipping acts on that sequence ratio "
    "with a very narrow range (3e-4 below, 4e-4 above), which matches the sequence-level reward and "
    "avoids the high-variance token ratios that destabilise long responses. Each token carries the "
    "sequence ratio in its value and its own log-prob in its gradient. GRPO advantages; the loss is "
    "averaged per sequence, then over sequences."
)
MECHANISMS = ["baseline:group_mean", "scale:group_std", "clip:sequence_ratio", "agg:seq-mean-token-mean"]
REFERENCE = "Zheng et al. 2025, Group Sequence Policy Optimization (arXiv:2507.18071)"

LOSS_AGG_MODE = "seq-mean-token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 3e-4, "clip_high": 4e-4, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    hp = batch["hparams"]
    log_ratio = log_prob - old_log_prob
    seq_log_ratio = (log_ratio * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
    # Value of the sequence ratio s_i, gradient of the token's own log-prob: log s_it = sg(log s_i) + lp - sg(lp).
    token_log_ratio = (log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(max=10.0)
    ratio = torch.exp(token_log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - hp["clip_low"], 1.0 + hp["clip_high"])
    loss, kl_metrics = common.add_kl_penalty(torch.maximum(unclipped, clipped), log_prob, batch)
    metrics = {
        "clip_frac": common.masked_mean((clipped > unclipped).to(response_mask.dtype), response_mask).item(),
        "ppo_kl": common.masked_mean(-log_ratio, response_mask).item(),
    }
    return loss, {**metrics, **kl_metrics}
