"""REINFORCE++ (baseline variant): group-mean baseline, then whitening over the whole batch."""

from poise.algorithms import common

NAME = "reinforce_pp_baseline"
DESCRIPTION = (
    "REINFORCE++ with a group baseline. The group mean is subtracted from each score (as in GRPO), but "
    "instead of dividing by each group's std the token-level advantages are whitened with the mean and "
    "std of all valid tokens in the batch. Global normalisation avoids the instability of tiny per-group "
    "stds and keeps the advantage scale comparable across prompts. PPO clipped surrogate, token-mean."
)
MECHANISMS = ["baseline:group_mean", "scale:batch_std", "clip:symmetric", "clip:dual", "agg:token-mean"]
REFERENCE = "Hu 2025, REINFORCE++: A Simple and Efficient Approach for Aligning LLMs (arXiv:2501.03262)"

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    scores, mask = batch["scores"], batch["response_mask"]
    mean, _ = common.group_mean_std(scores, batch["group_index"])
    centered = common.token_level(scores - mean, mask)
    # Whitened per token over the batch, so longer responses weigh more in the statistics.
    return common.whiten(centered, mask) * mask


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
