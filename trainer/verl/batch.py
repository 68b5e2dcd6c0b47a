"""The candidate's `batch` built from the fields verl hands over (docs/verl.md, "What the candidate sees").

Pure functions over tensors and lists, no verl import, so the mapping is tested without verl. The batch itself is
`poise.algorithm.build_batch`'s, the testbed trainer's: the same keys, group statistics and dtypes in both trainers.

verl's shapes: B rows (prompts x rollout.n), L the longest response of the batch; `token_level_rewards` (B, L) holds
each response's score on its last valid token, `response_mask` (B, L) is 0/1 (int64 from TransferQueue, bool in the
loss), `index` (B,) the per-prompt uid strings.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from poise.algorithm import HParamValue, build_batch

# TransferQueue fields the trainer extension (trainer/verl/trainer.py) fetches for the estimator beyond verl's own.
STEP_FIELDS = ("extra_fields", "entropy", "ref_log_prob")


def reward_columns(reward_extra_info: Sequence[Mapping[str, Any] | None], rows: int) -> dict[str, Tensor]:
    """Per-response reward extras (one dict per row, as the reward function returned them: trainer/verl/reward.py)
    as columns: every key whose values are numbers on all rows becomes a float64 tensor (B,); others are left out."""
    if len(reward_extra_info) != rows:
        raise ValueError(f"reward extras cover {len(reward_extra_info)} responses but the batch has {rows}: "
                         "the trainer must fetch them for exactly the rows it computes advantages for")
    infos = [dict(info or {}) for info in reward_extra_info]
    keys = set().union(*infos) if infos else set()
    columns: dict[str, Tensor] = {}
    for key in sorted(keys):
        values = [info.get(key) for info in infos]
        if all(isinstance(v, numbers.Real) for v in values):  # bool is a Real: format_valid may come as True/False
            columns[key] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return columns


def step_fields(data: Any) -> dict[str, Any]:
    """The fields of `STEP_FIELDS` that a TransferQueue TensorDict of the step's rows holds, as the plugin's estimator
    takes them (trainer/verl/plugin.py `stage_step_fields`): each row's reward extras (`extra_fields` →
    `reward_extra_info`, read as verl's validation reads them) and the padded (B, L) entropy and reference log-probs."""
    keys = set(data.keys())
    fields: dict[str, Any] = {}
    if "extra_fields" in keys:
        rows = data.get("extra_fields")
        rows = rows.tolist() if hasattr(rows, "tolist") else list(rows)
        fields["reward_extra_info"] = [row.get("reward_extra_info", {}) if isinstance(row, Mapping) else {}
                                       for row in rows]
    for name in ("entropy", "ref_log_prob"):
        if name in keys:
            fields[name] = data.select(name).to_padded_tensor()[name]
    return fields


def advantage_batch(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Sequence[Any],
    *,
    reward_extra_info: Sequence[Mapping[str, Any] | None] | None = None,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    hparams: Mapping[str, HParamValue] | None = None,
) -> dict[str, Any]:
    """The batch `compute_advantages` sees under verl: `build_batch` of the row scores and verl's group uids.

    A response's score is the row sum of `token_level_rewards` (verl puts the whole outcome reward on the last valid
    token; POISE protocols keep `algorithm.use_kl_in_reward=False`, so nothing else is added). `format_valid` comes
    from the reward extras when the reward function reported it (all ones otherwise, as in build_batch); `entropy`
    (old-policy token entropy) and `ref_log_prob` are (B, L) when the trainer extension fetched them.
    """
    rows = token_level_rewards.shape[0]
    dtype = token_level_rewards.dtype if token_level_rewards.is_floating_point() else torch.float32
    scores = token_level_rewards.to(dtype).sum(-1)
    columns = reward_columns(reward_extra_info, rows) if reward_extra_info is not None else {}
    return build_batch(
        scores,
        response_mask,
        list(index),
        format_valid=columns.get("format_valid"),
        entropy=entropy,
        ref_log_prob=ref_log_prob,
        hparams=hparams,
    )


def loss_batch(
    response_mask: Tensor,
    hparams: Mapping[str, HParamValue],
    *,
    ref_log_prob: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The batch `policy_loss` sees in a verl actor worker, one micro-batch: hparams, the float response mask and
    lengths, and `ref_log_prob` (B, L) when verl keeps a reference policy.

    The worker has no scores or group ids (they stay in the TaskRunner; whatever a loss needs from them travels in
    the per-token advantages), so a policy_loss that reads other keys works in the testbed but not under verl.
    """
    mask = response_mask.to(dtype)
    batch: dict[str, Any] = {"response_mask": mask, "response_length": mask.sum(-1), "hparams": dict(hparams)}
    if ref_log_prob is not None:
        if tuple(ref_log_prob.shape) != tuple(mask.shape):
            raise ValueError(f"ref_log_prob must have shape {tuple(mask.shape)}, got {tuple(ref_log_prob.shape)}")
        batch["ref_log_prob"] = ref_log_prob.to(dtype)
    return batch
