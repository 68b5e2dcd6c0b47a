"""DAPO's clip-higher: decoupled clipping ranges with token-level loss averaging."""

from poise.algorithms import common

NAME = "dapo_clip_higher"
DESCRIPTION = (
    "The clip-higher mechanism of DAPO. GRPO advantages, but the PPO ratio is clipped asymmetrically: "
    "1 - 0.2 below and 1 + 0.28 above, so low-probability tokens with positive advantage can still gain "
    "probability mass, which counters entropy collapse. The loss is averaged over all valid tokens of "
    "the batch (token-mean), so long responses count per token. DAPO's dynamic sampling and overlong "
    "shaping are separate mechanisms and not included."
)
MECHANISMS = ["baseline:group_mean", "scale:group_std", "clip:clip_higher", "clip:dual", "agg:token-mean"]
REFERENCE = "Yu et al. 2025, DAPO: An Open-Source LLM Reinforcement Learning System at Scale (arXiv:2503.14476)"

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
