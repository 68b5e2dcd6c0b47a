"""GMPO: geometric-mean policy optimisation."""

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
    return common.surrogate_policy_loss(
        common.geometric_mean_loss, log_prob, old_log_prob, advantages, response_mask, batch
    )
