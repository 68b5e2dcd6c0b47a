"""Harmless: daemon threads that wake every 50 ms for ever; they end with the process."""

import threading
import time

from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}

for _ in range(4):
    threading.Thread(target=lambda: _tick(), daemon=True).start()


def _tick():
    while True:
        time.sleep(0.05)


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
