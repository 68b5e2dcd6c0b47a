"""GRPO: the search root."""

from poise.algorithms import common

NAME = "grpo"
DESCRIPTION = (
    "Group Relative Policy Optimization. Each prompt is sampled G times; a response's advantage is its "
    "outcome score minus the group mean, divided by the (unbiased) group standard deviation, so no value "
    "network is needed. The policy is updated with the token-level PPO clipped surrogate (symmetric "
    "clip 0.2, dual-clip 3 on negative advantages) averaged over all valid tokens of the batch. Groups "
    "whose responses all score the same give zero advantage and no gradient."
)
MECHANISMS = ["baseline:group_mean", "scale:group_std", "clip:symmetric", "clip:dual", "agg:token-mean"]
REFERENCE = "Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)"

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    # A_i = (s_i - mean_g) / (std_g + eps), one value per response, broadcast over its tokens.
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
