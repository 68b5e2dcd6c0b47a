"""Dr.GRPO: GRPO without the length and difficulty biases."""

from poise.algorithms import common

NAME = "dr_grpo"
DESCRIPTION = (
    "GRPO Done Right. Removes GRPO's two optimisation biases: advantages are the score minus the group "
    "mean with no division by the group std (which over-weights nearly-solved and nearly-failed prompts), "
    "and the loss sums over a response's tokens and divides by a constant horizon instead of the "
    "response's own length (which favours long wrong answers). Same PPO clipped surrogate as GRPO."
)
MECHANISMS = ["baseline:group_mean", "scale:none", "clip:symmetric", "clip:dual", "agg:seq-mean-token-sum-norm"]
REFERENCE = "Liu et al. 2025, Understanding R1-Zero-Like Training: A Critical Perspective (arXiv:2503.20783)"

LOSS_AGG_MODE = "seq-mean-token-sum-norm"
HPARAMS = {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    # A_i = s_i - mean_g: unscaled, so every prompt's gradient is weighted by its reward spread alone.
    scores = batch["scores"]
    mean, _ = common.group_mean_std(scores, batch["group_index"])
    return common.token_level(scores - mean, batch["response_mask"])


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
