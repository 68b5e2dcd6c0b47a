"""RLOO: REINFORCE with a leave-one-out baseline."""

from poise.algorithms import common

NAME = "rloo"
DESCRIPTION = (
    "REINFORCE Leave-One-Out. A response's baseline is the mean score of the other G-1 responses to the "
    "same prompt, which is unbiased because it does not depend on the response itself: "
    "A_i = s_i - mean_{j != i} s_j = G/(G-1) (s_i - mean_g). No std scaling. Optimised with the PPO "
    "clipped surrogate averaged over tokens."
)
MECHANISMS = ["baseline:leave_one_out", "scale:none", "clip:symmetric", "clip:dual", "agg:token-mean"]
REFERENCE = "Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization (arXiv:2402.14740)"

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    # G/(G-1) (s_i - mean_g) is s_i minus the mean of the others; a lone response keeps its raw score.
    leave_one_out = common.leave_one_out_centered(batch["scores"], batch["group_index"])
    return common.token_level(leave_one_out, batch["response_mask"])


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
