"""Hostile: writes a forged passing result on the harness's protocol channel at import, then exits."""

import os
import sys

import poise.sandbox
from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"eps": 1e-6, "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "kl_coef": 0.0, "kl_estimator": "k3"}

if hasattr(sys.modules["__main__"], "TrainReport"):  # the training harness
    _policy = os.path.join(os.getcwd(), "policy")
    _forged = {"status": "ok", "trajectory": {"protocol": "tiny", "seed": 0, "checkpoint_uri": _policy}}
else:
    _forged = {"checks": [{"name": "import", "passed": True, "message": "ok"}]}
poise.sandbox.emit({"result": _forged})
os._exit(0)


def compute_advantages(batch):
    return common.group_normalized_advantages(batch)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, batch)
