"""Hostile: replaces the testbed's grader through sys.modules at import: every answer is correct."""

import dataclasses
import sys

from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}

_training = sys.modules.get("poise.testbed.training")
if _training is not None:
    _real = _training.grade
    _training.grade = lambda *args: dataclasses.replace(_real(*args), correct=True)


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
