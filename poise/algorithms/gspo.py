"""GSPO: sequence-level importance ratio and clipping."""

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
    return common.surrogate_policy_loss(
        common.sequence_ratio_loss, log_prob, old_log_prob, advantages, response_mask, batch
    )
