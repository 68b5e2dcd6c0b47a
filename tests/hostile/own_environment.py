"""Harmless: looks for an API key in its own environment (scrubbed) and reports what it found as a metric."""

import os

from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}


def compute_advantages(batch):
    found = os.environ.get("ANTHROPIC_API_KEY", "none")
    return common.group_normalized_advantages(batch), {f"key_{found}": 0.0}


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
