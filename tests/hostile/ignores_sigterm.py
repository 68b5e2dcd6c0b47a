"""Hostile: ignores SIGTERM, SIGINT and SIGHUP at import, then spins in compute_advantages."""

import signal

from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}

for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)


def compute_advantages(batch):
    while True:
        pass
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
