"""The verl plugin: registers a POISE candidate with verl in every verl process (docs/verl.md).

verl imports each module named in `VERL_USE_EXTERNAL_MODULES` when `verl` is imported, in every process that imports
it (the driver, the TaskRunner, the FSDP actor workers, rollout and reward workers). Name this module there and the
candidate file in `POISE_CANDIDATE_MODULE`, both in the Ray runtime environment:

    VERL_USE_EXTERNAL_MODULES=trainer.verl.plugin
    POISE_CANDIDATE_MODULE=/abs/path/candidate.py     # the candidate's source file (poise/algorithm.py interface)
    POISE_CANDIDATE_HPARAMS='{"clip_high": 0.3}'      # optional: protocol overrides of the module's HPARAMS (JSON)

and select it with `algorithm.adv_estimator=poise` and `actor_rollout_ref.actor.policy_loss.loss_mode=poise`. The
candidate is loaded and checked (poise.algorithm.structural_check) when this module is imported, so a missing or
malformed file stops `import verl` with a message naming the file and the problem. It is called only through
`run_advantages` / `run_policy_loss`, as in the testbed trainer: copies of the inputs, checked shapes.

Importing this module imports verl's `core_algos` and `workers.utils.losses` (no trainer, no TransferQueue), and
wraps `losses.ppo_loss` so that the reference log-probs of a micro-batch reach the candidate's loss (verl hands the
policy-loss function only log-probs, advantages and the mask). verl's own aggregation, entropy bonus and KL term
around it are unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from verl.trainer.ppo import core_algos
from verl.workers.utils import losses as verl_losses

from poise.algorithm import (
    CandidateError,
    HParamValue,
    check_passed,
    describe_problems,
    load_candidate,
    loss_agg_mode,
    module_hparams,
    run_advantages,
    run_policy_loss,
    structural_check,
)
from trainer.verl.batch import advantage_batch, loss_batch

CANDIDATE_ENV = "POISE_CANDIDATE_MODULE"
HPARAMS_ENV = "POISE_CANDIDATE_HPARAMS"
ADV_ESTIMATOR = "poise"  # algorithm.adv_estimator=poise
POLICY_LOSS = "poise"    # actor_rollout_ref.actor.policy_loss.loss_mode=poise
# The candidate's loss metrics under verl's names where verl has one, so dashboards read the same for every loss.
VERL_METRIC_NAMES = {"clip_frac": "actor/pg_clipfrac", "clip_frac_lower": "actor/pg_clipfrac_lower",
                     "ppo_kl": "actor/ppo_kl"}

logger = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """The plugin cannot serve a candidate: the file is missing or malformed, or verl is configured against it."""


# ------------------------------------------------------------------------------------------ the candidate


def load_candidate_file(path: str | os.PathLike[str]) -> types.ModuleType:
    """Load a candidate's source file and check it (poise.algorithm.structural_check), or refuse with a PluginError
    that names the file and what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise PluginError(f"{CANDIDATE_ENV}={str(path)!r}: no such file; set it to the absolute path of the "
                          "candidate's .py file, readable in every verl process (a volume of the training pod)")
    try:
        module = load_candidate(file.read_text(encoding="utf-8"), name=str(file))
    except (OSError, UnicodeDecodeError) as err:
        raise PluginError(f"candidate {file}: cannot be read: {err}") from None
    except CandidateError as err:
        raise PluginError(f"candidate {file}: {err}") from None
    results = structural_check(module)
    if not check_passed(results):
        raise PluginError(f"candidate {file} does not follow the candidate interface (docs/architecture.md, "
                          f"\"The algorithm interface\"):\n{describe_problems(results)}")
    return module


def hparam_overrides(text: str | None) -> dict[str, HParamValue]:
    """The protocol's HPARAMS overrides from `POISE_CANDIDATE_HPARAMS` (a JSON object; empty when unset)."""
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise PluginError(f"{HPARAMS_ENV} is not valid JSON ({err.msg} at column {err.colno}): {text[:200]!r}; "
                          "give a JSON object such as '{\"clip_high\": 0.28}'") from None
    if not isinstance(overrides, dict) or not all(
            isinstance(k, str) and isinstance(v, HParamValue) for k, v in overrides.items()):
        raise PluginError(f"{HPARAMS_ENV} must be a JSON object of str to number, string or bool; got {text[:200]!r}")
    return overrides


@functools.cache
def _loaded(path: str, overrides_text: str | None) -> tuple[types.ModuleType, dict[str, HParamValue]]:
    module = load_candidate_file(path)
    return module, module_hparams(module, hparam_overrides(overrides_text))


def candidate() -> tuple[types.ModuleType, dict[str, HParamValue]]:
    """The candidate named by `POISE_CANDIDATE_MODULE` and its hparams (HPARAMS with the overrides applied), loaded
    once per process."""
    path = os.environ.get(CANDIDATE_ENV)
    if not path:
        raise PluginError(f"{CANDIDATE_ENV} is not set in this process: put it in the Ray runtime environment "
                          f"(+ray_kwargs.ray_init.runtime_env.env_vars.{CANDIDATE_ENV}=/abs/path/candidate.py) "
                          "beside VERL_USE_EXTERNAL_MODULES")
    return _loaded(path, os.environ.get(HPARAMS_ENV))


# ---------------------------------------------------------------------------------- advantage estimator

# Per-step fields the trainer extension (trainer/verl/trainer.py) fetched for the estimator, in the TaskRunner:
# reward_extra_info (one dict per row), entropy and ref_log_prob (B, L). Empty outside such a step.
_STEP_FIELDS: dict[str, Any] = {}
# The candidate's advantage metrics of the last call, for the trainer extension to log with the step.
ADVANTAGE_METRICS: dict[str, float] = {}


def stage_step_fields(*, reward_extra_info: Sequence[Mapping[str, Any] | None] | None = None,
                      entropy: Tensor | None = None, ref_log_prob: Tensor | None = None) -> None:
    """Hand the next estimator call the fields verl does not pass it (docs/verl.md, "What the candidate sees")."""
    _STEP_FIELDS.clear()
    _STEP_FIELDS.update({key: value for key, value in (
        ("reward_extra_info", reward_extra_info), ("entropy", entropy), ("ref_log_prob", ref_log_prob))
        if value is not None})


def clear_step_fields() -> None:
    _STEP_FIELDS.clear()
    ADVANTAGE_METRICS.clear()


@core_algos.register_adv_est(ADV_ESTIMATOR)
def poise_advantages(token_level_rewards: Tensor, response_mask: Tensor, index: Sequence[Any] | None = None,
                     config: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's advantage estimator `poise`: the candidate's compute_advantages on the POISE batch (verl/batch.py).

    Returns (advantages, returns), both (B, L) in the dtype of token_level_rewards; outcome methods have no critic,
    so the returns are the advantages, as in verl's GRPO.
    """
    if index is None:
        raise PluginError("verl called the poise estimator without group uids (index): the batch has no `uid`; "
                          "run a V1 (or Ray) trainer that assigns one uid per prompt")
    module, hparams = candidate()
    batch = advantage_batch(token_level_rewards, response_mask, index, hparams=hparams, **_STEP_FIELDS)
    advantages, metrics = run_advantages(module, batch)
    if not torch.isfinite(advantages).all():
        bad = int((~torch.isfinite(advantages)).sum())
        raise CandidateError(f"compute_advantages returned {bad} non-finite values (nan/inf) on this step's batch "
                             f"of {advantages.shape[0]} responses; guard divisions, e.g. by a zero group std")
    ADVANTAGE_METRICS.clear()
    ADVANTAGE_METRICS.update(metrics)
    advantages = advantages.to(token_level_rewards.dtype)
    return advantages, advantages


# ------------------------------------------------------------------------------------------- policy loss

# Padded per-micro-batch fields of the loss call that verl does not pass a policy-loss function (ref_log_prob),
# set by the ppo_loss wrapper below for the duration of one call.
_LOSS_FIELDS: contextvars.ContextVar[Mapping[str, Tensor] | None] = contextvars.ContextVar("poise_loss_fields",
                                                                                           default=None)


@core_algos.register_policy_loss(POLICY_LOSS)
def poise_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                      loss_agg_mode: str = "token-mean", config: Any = None,
                      rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """verl's policy loss `poise`: the candidate's per-token loss, aggregated by verl's `agg_loss` with the candidate's
    LOSS_AGG_MODE and the global-batch normalizer verl put in `config.global_batch_info`.

    The mask goes to agg_loss as verl gave it (bool), so per-sequence means divide by exactly the token count, as
    every built-in verl loss does (docs/extending.md, "VERL facts the code relies on").
    """
    module, hparams = candidate()
    mode = loss_agg_mode_of(module, loss_agg_mode)
    mask = response_mask.to(log_prob.dtype)
    batch = loss_batch(mask, hparams, ref_log_prob=(_LOSS_FIELDS.get() or {}).get("ref_log_prob"), dtype=log_prob.dtype)
    loss_mat, metrics = run_policy_loss(module, log_prob, old_log_prob, advantages, mask, batch)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    global_batch_info = dict(getattr(config, "global_batch_info", None) or {})
    loss = core_algos.agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=mode, **global_batch_info)
    return loss, {VERL_METRIC_NAMES.get(key, f"actor/poise/{key}"): value for key, value in metrics.items()}


@functools.cache
def _warn_mode_mismatch(configured: str, declared: str) -> None:
    logger.warning("actor.loss_agg_mode is %r but the candidate declares LOSS_AGG_MODE %r: the policy loss uses the "
                   "candidate's, verl's entropy bonus and KL term the configured one; set "
                   "actor_rollout_ref.actor.loss_agg_mode=%s", configured, declared, declared)


def loss_agg_mode_of(module: types.ModuleType, configured: str) -> str:
    """The candidate's declared LOSS_AGG_MODE (warning once when verl is configured with another)."""
    declared = loss_agg_mode(module)
    if configured != declared:
        _warn_mode_mismatch(configured, str(declared))
    return str(declared)


def _with_loss_fields(ppo_loss: Any) -> Any:
    """verl's ppo_loss, making the micro-batch's reference log-probs (padded like verl pads the other fields)
    available to poise_policy_loss for the duration of the call."""
    if getattr(ppo_loss, "poise_wrapped", False):
        return ppo_loss

    @functools.wraps(ppo_loss)
    def ppo_loss_with_poise_fields(config: Any, model_output: Any, data: Any, dp_group: Any = None) -> Any:
        fields: dict[str, Tensor] = {}
        if "ref_log_prob" in data.keys():
            fields["ref_log_prob"] = data.select("ref_log_prob").to_padded_tensor()["ref_log_prob"]
        token = _LOSS_FIELDS.set(fields)
        try:
            return ppo_loss(config, model_output, data, dp_group)
        finally:
            _LOSS_FIELDS.reset(token)

    ppo_loss_with_poise_fields.poise_wrapped = True  # type: ignore[attr-defined]
    return ppo_loss_with_poise_fields


# verl.workers.engine_workers binds `ppo_loss` by name when it is imported, which is after `import verl` has
# imported this plugin: the workers get the wrapped function.
verl_losses.ppo_loss = _with_loss_fields(verl_losses.ppo_loss)

if os.environ.get(CANDIDATE_ENV):
    candidate()  # a missing or malformed candidate stops `import verl` here, in the first process that imports it
