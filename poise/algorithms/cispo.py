"""CISPO: clipped importance-sampling weights instead of clipped updates."""

from poise.algorithms import common

NAME = "cispo"
DESCRIPTION = (
    "Clipped IS-weight Policy Optimization. PPO's clip zeroes the gradient of tokens whose ratio left "
    "the trust region, and those are often the rare reflective tokens that matter most. CISPO keeps every "
    "token's REINFORCE gradient (A * grad log pi) and clips only the importance weight, detached: "
    "loss = -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * log pi. Here clip_low = 1 (no lower bound) "
    "and clip_high = 0.28. GRPO advantages, token-mean."
)
MECHANISMS = ["baseline:group_mean", "scale:group_std", "clip:cispo", "agg:token-mean"]
REFERENCE = "MiniMax 2025, MiniMax-M1: Scaling Test-Time Compute Efficiently (arXiv:2506.13585)"

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 1.0, "clip_high": 0.28, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.surrogate_policy_loss(
        common.cispo_loss, log_prob, old_log_prob, advantages, response_mask, batch
    )
