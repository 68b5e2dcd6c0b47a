"""The shared algorithm interface (docs/architecture.md, "The algorithm interface").

A candidate algorithm is one small, framework-neutral Python module (pure torch) that runs unchanged in
the CPU testbed trainer and inside VERL:

    LOSS_AGG_MODE = "token-mean"     # one of LOSS_AGG_MODES
    HPARAMS = {...}                  # constants of this algorithm

    def compute_advantages(batch) -> Tensor | (Tensor, dict)
        # (B,) sequence-level or (B, L) token-level advantages, optionally with scalar metrics
    def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch) -> Tensor | (Tensor, dict)
        # (B, L) per-token loss matrix, optionally with scalar metrics

The caller aggregates the per-token loss with the declared mode (VERL needs its global-batch normalizer
there), always runs `compute_advantages` under `torch.no_grad()`, and broadcasts sequence-level
advantages over the valid tokens. Inputs are read-only: the candidate gets copies of every input tensor,
and one that writes into a copy fails with `Tampering` (docs/sandbox.md, "Integrity of rewards and records").

This module also loads a candidate from source text and checks its structure. Both execute candidate
code: in a service they are only ever called inside the sandboxed child process (docs/sandbox.md),
never in the service's own process.
"""

from __future__ import annotations

import inspect
import json
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from poise.algorithms.common import group_sum, token_counts
from poise.contracts import DEFAULT_LOSS_AGG_MODE, CheckResult, LossAggMode

LOSS_AGG_MODES = tuple(mode.value for mode in LossAggMode)
REQUIRED_FUNCTIONS = ("compute_advantages", "policy_loss")
POLICY_LOSS_PARAMS = ("log_prob", "old_log_prob", "advantages", "response_mask", "batch")
HParamValue = float | int | str | bool
QUOTED_CHARS = 300  # how much of a candidate's own text (an exception message) a reason quotes


class CandidateError(ValueError):
    """A candidate module broke the interface; the message says what to change, for a human or an LLM."""


class Tampering(CandidateError):
    """Candidate code changed what it must not: an input it was given, or trusted code (poise/integrity.py).
    The message starts with "tampering:" and names what changed."""


# --------------------------------------------------------------------------------------------- batch


def build_batch(
    scores: Tensor,
    response_mask: Tensor,
    group_index: Sequence[Any] | Tensor,
    *,
    format_valid: Tensor | None = None,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    hparams: Mapping[str, HParamValue] | None = None,
) -> dict[str, Any]:
    """The `batch` a candidate sees, built from rollout tensors.

    scores (B,) outcome reward per response; response_mask (B, L) 1 on response tokens, 0 on padding;
    group_index (B,) any hashable per-prompt id (uids, ints), remapped to contiguous 0..G-1 in order of
    first appearance; entropy (B, L) old-policy token entropy; ref_log_prob (B, L) when a reference
    policy is kept. Everything floating is cast to the dtype of `scores`.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (B,), got {tuple(scores.shape)}")
    rows = scores.shape[0]
    if response_mask.dim() != 2 or response_mask.shape[0] != rows:
        raise ValueError(f"response_mask must have shape ({rows}, L), got {tuple(response_mask.shape)}")
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    scores = scores.to(dtype)
    mask = response_mask.to(dtype)
    index = contiguous_group_index(group_index, device=scores.device)
    if index.shape[0] != rows:
        raise ValueError(f"group_index has {index.shape[0]} entries for {rows} responses")
    counts = group_sum(torch.ones_like(scores), index)
    sums = group_sum(scores, index)
    # Outcome reward on the last valid response token, zeros elsewhere: VERL's token_level_rewards.
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    token_level_rewards = torch.zeros_like(mask)
    token_level_rewards[torch.arange(rows, device=scores.device), last] = scores * (mask.sum(-1) > 0)
    batch: dict[str, Any] = {
        "scores": scores,
        "token_level_rewards": token_level_rewards,
        "format_valid": (format_valid.to(dtype) if format_valid is not None else torch.ones_like(scores)),
        "group_index": index,
        "group_size": counts[index],
        "group_mean_score": (sums / counts)[index],
        "response_mask": mask,
        "response_length": mask.sum(-1),
        "hparams": dict(hparams or {}),
    }
    for name, value in (("entropy", entropy), ("ref_log_prob", ref_log_prob)):
        if value is not None:
            if tuple(value.shape) != tuple(mask.shape):
                raise ValueError(f"{name} must have shape {tuple(mask.shape)}, got {tuple(value.shape)}")
            batch[name] = value.to(dtype)
    return batch


def slice_batch(batch: Mapping[str, Any], index: Tensor) -> dict[str, Any]:
    """The rows `index` of a batch (a minibatch): per-response tensors are indexed, the rest kept.

    group_index keeps its ids, so group statistics precomputed over the whole batch stay valid.
    """
    rows = batch["scores"].shape[0]
    return {
        key: value[index] if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows else value
        for key, value in batch.items()
    }


def contiguous_group_index(group_index: Sequence[Any] | Tensor, device: torch.device | None = None) -> Tensor:
    """Map per-row group ids (uids, ints) to 0..G-1 in order of first appearance, as a long tensor (B,)."""
    ids = group_index.tolist() if isinstance(group_index, Tensor) else list(group_index)
    first_seen: dict[Any, int] = {}
    mapped = [first_seen.setdefault(g, len(first_seen)) for g in ids]
    return torch.tensor(mapped, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------- aggregation


def aggregate_loss(
    loss_mat: Tensor,
    response_mask: Tensor,
    mode: str,
    *,
    global_num_tokens: float | Tensor | None = None,
    global_batch_size: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Reduce a (B, L) per-token loss to a scalar with VERL's semantics for the four modes.

    Under data parallelism each rank aggregates its micro-batch against the *global* normalizer
    (valid tokens or sequences of the whole mini-batch) and multiplies by dp_size, so that the gradient
    average across ranks equals the loss over the global batch. Without a global normalizer and with
    dp_size == 1 the local micro-batch is the whole batch. Sequences with no valid token are excluded.
    A per-sequence mean divides by the exact token count, as VERL's production path does (common.token_counts).
    """
    if mode not in LOSS_AGG_MODES:
        raise CandidateError(f"LOSS_AGG_MODE {mode!r} is not one of {', '.join(LOSS_AGG_MODES)}")
    needs_global = global_num_tokens is None if mode == LossAggMode.TOKEN_MEAN else global_batch_size is None
    if needs_global and dp_size > 1:
        raise ValueError(f"{mode} aggregation with dp_size={dp_size} needs the global-batch normalizer")
    mask = response_mask.to(loss_mat.dtype)
    if mode == LossAggMode.TOKEN_MEAN:
        tokens = mask.sum() if global_num_tokens is None else global_num_tokens
        return (loss_mat * mask).sum() / tokens * dp_size
    valid_tokens = mask.sum(-1)
    has_tokens = (valid_tokens > 0).to(loss_mat.dtype)
    if mode == LossAggMode.SEQ_MEAN_TOKEN_MEAN:
        per_sequence = (loss_mat * mask).sum(-1) / token_counts(mask)
    else:
        per_sequence = (loss_mat * mask).sum(-1)
    sequences = has_tokens.sum() if global_batch_size is None else global_batch_size
    loss = (per_sequence * has_tokens).sum() / sequences * dp_size
    if mode == LossAggMode.SEQ_MEAN_TOKEN_SUM_NORM:
        # Dr.GRPO divides by a constant horizon; VERL falls back to the padded length of this micro-batch.
        loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mat.shape[-1])
    return loss


# --------------------------------------------------------------------------------------- candidates


def load_candidate(source: str, name: str = "candidate") -> types.ModuleType:
    """Execute candidate source text as a fresh module (never registered in sys.modules).

    Runs untrusted code: call it only inside the sandboxed child process.
    """
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    try:
        code = compile(source, f"<{name}>", "exec")
    except SyntaxError as err:
        raise CandidateError(f"the module does not parse: {err.msg} at line {err.lineno}") from None
    try:
        exec(code, module.__dict__)
    except SystemExit as err:  # sys.exit() at import: the candidate's failure, not the harness's exit
        raise CandidateError(f"importing the module called {describe_exit(err)}"
                             f"{candidate_line(err, module.__file__)}") from None
    except Exception as err:  # noqa: BLE001 - any failure at import time is the candidate's fault
        raise CandidateError(f"importing the module raised {describe_candidate_exception(err, module.__file__)}"
                             ) from None
    return module


def loss_agg_mode(module: types.ModuleType) -> str:
    return getattr(module, "LOSS_AGG_MODE", DEFAULT_LOSS_AGG_MODE)


def module_hparams(module: types.ModuleType, overrides: Mapping[str, HParamValue] | None = None) -> dict:
    """The candidate's HPARAMS with protocol overrides applied on top."""
    return {**dict(getattr(module, "HPARAMS", {}) or {}), **dict(overrides or {})}


def run_advantages(module: types.ModuleType, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
    """Call `compute_advantages`, returning (B, L) advantages and float metrics.

    Runs under no_grad (advantages are constants for the loss), on a copy of `batch`. Sequence-level (B,)
    advantages are broadcast over the valid tokens; token-level ones are returned as the candidate gave them, so the
    structural check can point at values left on padding.
    """
    mask = batch["response_mask"]
    inputs: list[tuple[str, Tensor, Tensor]] = []
    given = _copies("batch", batch, inputs)
    with torch.no_grad():
        output = _call(module, "compute_advantages", lambda: module.compute_advantages(given))
    _check_inputs(inputs, "compute_advantages")
    advantages, metrics = _split_output(output, "compute_advantages")
    if advantages.dim() == 1 and advantages.shape[0] == mask.shape[0]:
        advantages = advantages.unsqueeze(-1) * mask
    if tuple(advantages.shape) != tuple(mask.shape):
        raise CandidateError(
            f"compute_advantages returned shape {tuple(advantages.shape)} but ({mask.shape[0]},) or "
            f"{tuple(mask.shape)} was expected: one advantage per response, or one per response token"
        )
    return advantages.detach(), metrics


def run_policy_loss(
    module: types.ModuleType,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    batch: Mapping[str, Any],
) -> tuple[Tensor, dict[str, float]]:
    """Call `policy_loss` on copies of its inputs (the copy of `log_prob` keeps its gradient), returning the
    (B, L) per-token loss matrix and float metrics."""
    inputs: list[tuple[str, Tensor, Tensor]] = []
    given = {name: _copies(name, value, inputs) for name, value in (
        ("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages),
        ("response_mask", response_mask), ("batch", batch))}
    output = _call(module, "policy_loss", lambda: module.policy_loss(**given))
    _check_inputs(inputs, "policy_loss")
    loss_mat, metrics = _split_output(output, "policy_loss")
    if tuple(loss_mat.shape) != tuple(log_prob.shape):
        raise CandidateError(
            f"policy_loss returned shape {tuple(loss_mat.shape)} but {tuple(log_prob.shape)} was expected: "
            "return the per-token loss matrix; the caller aggregates it with LOSS_AGG_MODE"
        )
    return loss_mat, metrics


def _copies(name: str, value: Any, inputs: list[tuple[str, Tensor, Tensor]]) -> Any:
    """What the candidate is given for input `name`: tensors cloned, mappings copied (recursively), anything
    else as it is; each (name, original, copy) of a tensor goes to `inputs`, for `_check_inputs`."""
    if isinstance(value, Tensor):
        copy = value.clone()  # a clone keeps the autograd graph: the loss still reaches the policy
        inputs.append((name, value, copy))
        return copy
    if isinstance(value, Mapping):
        return {key: _copies(f"{name}[{key!r}]", item, inputs) for key, item in value.items()}
    return value


def _check_inputs(inputs: Sequence[tuple[str, Tensor, Tensor]], function: str) -> None:
    """Tampering when a copy the candidate was given no longer equals its original (written into in place)."""
    for name, original, copy in inputs:
        if not _same_tensor(original, copy):
            raise Tampering(
                f"tampering: {function} wrote into its input {name} in place; inputs are read-only (the harness "
                f"keeps its own copy and logs from it): compute new tensors, e.g. `x = x - m`, not `x -= m` or "
                f"`x.fill_(...)`")


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype and values, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach()
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _call(module: types.ModuleType, function: str, call: Callable[[], Any]) -> Any:
    """`call()`, a candidate function; its sys.exit() becomes a CandidateError instead of ending the harness."""
    try:
        return call()
    except SystemExit as err:
        raise CandidateError(f"{function} called {describe_exit(err)}"
                             f"{candidate_line(err, getattr(module, '__file__', None))}") from None


def _split_output(output: Any, function: str) -> tuple[Tensor, dict[str, float]]:
    value, metrics = output if isinstance(output, tuple) else (output, {})
    if isinstance(output, tuple) and len(output) != 2:
        raise CandidateError(f"{function} returned a tuple of {len(output)} items; return a tensor or (tensor, dict)")
    if not isinstance(value, Tensor):
        raise CandidateError(f"{function} returned {type(value).__name__}; a torch.Tensor was expected")
    if not value.is_floating_point():
        raise CandidateError(f"{function} returned a {value.dtype} tensor; a floating-point tensor was expected")
    if not isinstance(metrics, Mapping):
        raise CandidateError(f"{function} returned metrics of type {type(metrics).__name__}; a dict was expected")
    floats: dict[str, float] = {}
    for key, metric in metrics.items():
        try:
            floats[str(key)] = float(metric)
        except (TypeError, ValueError, RuntimeError):
            raise CandidateError(f"{function} metric {key!r} is not a scalar number") from None
    return value, floats


# --------------------------------------------------------------------------------- structural check


@dataclass(frozen=True)
class SyntheticRollout:
    """A small random rollout for checking a candidate: batch plus policy log-probs."""

    batch: dict[str, Any]
    log_prob: Tensor
    old_log_prob: Tensor


def synthetic_rollout(
    *,
    groups: int = 4,
    group_size: int = 4,
    max_len: int = 7,
    seed: int = 0,
    hparams: Mapping[str, HParamValue] | None = None,
    score_pattern: str = "mixed",
    dtype: torch.dtype = torch.float32,
) -> SyntheticRollout:
    """Random responses of ragged lengths (every row has padding but one) with binary scores.

    score_pattern: "mixed" (random 0/1 with each group mixed where possible), "equal" (every group
    all-equal: zero-variance groups), "fail" (all scores 0).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = groups * group_size
    lengths = torch.randint(1, max_len, (rows,), generator=gen)
    lengths[0] = max_len
    mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)
    if score_pattern == "mixed":
        scores = (torch.rand(rows, generator=gen) < 0.5).to(dtype)
        scores.view(groups, group_size)[:, 0] = 1.0
        scores.view(groups, group_size)[:, 1] = 0.0
    elif score_pattern == "equal":
        scores = torch.arange(groups, dtype=dtype).repeat_interleave(group_size) % 2
    elif score_pattern == "fail":
        scores = torch.zeros(rows, dtype=dtype)
    else:
        raise ValueError(f"unknown score_pattern {score_pattern!r}")
    old_log_prob = -torch.rand(rows, max_len, generator=gen, dtype=dtype) * 2.0 * mask
    log_prob = old_log_prob + 0.3 * torch.randn(rows, max_len, generator=gen, dtype=dtype) * mask
    batch = build_batch(
        scores,
        mask,
        torch.arange(groups).repeat_interleave(group_size),
        format_valid=(torch.rand(rows, generator=gen) < 0.8).to(dtype),
        entropy=torch.rand(rows, max_len, generator=gen, dtype=dtype) * mask,
        ref_log_prob=old_log_prob - 0.1 * torch.rand(rows, max_len, generator=gen, dtype=dtype) * mask,
        hparams=hparams,
    )
    return SyntheticRollout(batch=batch, log_prob=log_prob, old_log_prob=old_log_prob)


def structural_check(candidate: types.ModuleType | str,
                     load: Callable[[str], types.ModuleType] | None = None) -> list[CheckResult]:
    """Fast structural check of a candidate: what is wrong, precisely, in words an LLM can act on.

    Checks in order, stopping at the first failure that makes later checks meaningless: the module
    imports; required functions and constants exist with the right signature; on synthetic rollouts
    (mixed, all-equal and all-fail groups) advantages have the right shape, are finite and are zero on
    padding; the per-token loss has the right shape, is finite and sends a non-zero gradient to
    `log_prob`. Runs candidate code: call only inside the sandbox. `load` loads source text (default:
    `load_candidate`; the harness passes its guarded loader, poise/integrity.py).
    """
    results: list[CheckResult] = []

    def record(name: str, problem: str | None) -> bool:
        results.append(CheckResult(name=name, passed=problem is None, message=problem or "ok"))
        return problem is None

    if isinstance(candidate, str):
        try:
            module = (load or load_candidate)(candidate)
        except CandidateError as err:
            record("import", str(err))
            return results
    else:
        module = candidate
    record("import", None)
    if not record("interface", _interface_problem(module)):
        return results
    hparams = module_hparams(module)
    for pattern in ("mixed", "equal", "fail"):
        rollout = synthetic_rollout(hparams=hparams, score_pattern=pattern)
        if not record(f"advantages[{pattern}]", _advantage_problem(module, rollout, pattern)):
            return results
    record("policy_loss", _loss_problem(module, synthetic_rollout(hparams=hparams)))
    return results


def check_passed(results: Sequence[CheckResult]) -> bool:
    return all(result.passed for result in results)


def describe_problems(results: Sequence[CheckResult]) -> str:
    """The failed checks as one message, one line each."""
    return "\n".join(f"{r.name}: {r.message}" for r in results if not r.passed)


def _interface_problem(module: types.ModuleType) -> str | None:
    for function in REQUIRED_FUNCTIONS:
        if not callable(getattr(module, function, None)):
            return f"the module must define a function `{function}`; it is missing"
    mode = getattr(module, "LOSS_AGG_MODE", None)
    if mode not in LOSS_AGG_MODES:
        return f"LOSS_AGG_MODE must be one of {', '.join(map(repr, LOSS_AGG_MODES))}; got {mode!r}"
    hparams = getattr(module, "HPARAMS", None)
    if not isinstance(hparams, dict):
        return f"HPARAMS must be a dict of constants; got {type(hparams).__name__}"
    for key, value in hparams.items():
        if not isinstance(key, str) or not isinstance(value, HParamValue):
            return f"HPARAMS[{key!r}] must map a str to a float, int, str or bool; got {type(value).__name__}"
    return _signature_problem(module.compute_advantages, ("batch",), "compute_advantages") or _signature_problem(
        module.policy_loss, POLICY_LOSS_PARAMS, "policy_loss"
    )


def _signature_problem(function: Callable, params: Sequence[str], name: str) -> str | None:
    try:
        inspect.signature(function).bind(**{p: None for p in params})
    except TypeError as err:
        return f"`{name}` must accept the arguments ({', '.join(params)}) by name: {err}"
    except ValueError:
        return None  # builtins without a signature: let the call decide
    return None


def _advantage_problem(module: types.ModuleType, rollout: SyntheticRollout, pattern: str) -> str | None:
    batch = rollout.batch
    mask = batch["response_mask"]
    where = {"mixed": "", "equal": " on a batch where every group has equal scores",
             "fail": " on a batch where every score is 0"}[pattern]
    try:
        advantages, _ = run_advantages(module, batch)
    except CandidateError as err:
        return f"{err}{where}"
    except Exception as err:  # noqa: BLE001
        raised = describe_candidate_exception(err, getattr(module, "__file__", None))
        return f"compute_advantages raised {raised}{where}"
    if not torch.isfinite(advantages).all():
        bad = int((~torch.isfinite(advantages)).sum())
        return (f"compute_advantages returned {bad} non-finite values (nan/inf){where}; "
                "guard divisions, e.g. by a zero group std")
    on_padding = advantages[mask == 0]
    if on_padding.numel() and on_padding.abs().max() > 0:
        return ("compute_advantages returned non-zero advantages on padding tokens (response_mask == 0): "
                "multiply token-level advantages by batch['response_mask']")
    return None


def _loss_problem(module: types.ModuleType, rollout: SyntheticRollout) -> str | None:
    batch = rollout.batch
    mask = batch["response_mask"]
    log_prob = rollout.log_prob.clone().requires_grad_(True)
    try:
        advantages, _ = run_advantages(module, batch)
        loss_mat, _ = run_policy_loss(module, log_prob, rollout.old_log_prob, advantages, mask, batch)
    except CandidateError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001
        return f"policy_loss raised {describe_candidate_exception(err, getattr(module, '__file__', None))}"
    if not torch.isfinite(loss_mat[mask > 0]).all():
        return "policy_loss returned non-finite values (nan/inf) on valid tokens"
    if not loss_mat.requires_grad:
        return ("policy_loss returned a tensor with no gradient: the loss must be computed from `log_prob` "
                "without detaching it")
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode(module))
    (grad,) = torch.autograd.grad(loss, log_prob, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all() or grad[mask > 0].abs().max() == 0:
        return "the loss sends no (finite) gradient to `log_prob`; the policy would never change"
    return None


def candidate_line(err: BaseException, filename: str | None) -> str:
    """" at line N of the candidate": the innermost frame of `err` in the candidate's own file (its module's
    `__file__`, "<name>" as load_candidate compiles it; a frame of importlib's "<frozen ...>" is not the
    candidate's), or "" when no frame is."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if filename and f.filename == filename]
    return f" at line {frames[-1].lineno} of the candidate" if frames else ""


def describe_candidate_exception(err: BaseException, filename: str | None) -> str:
    """An exception out of candidate code, its message quoted as the candidate's text (it chose the message, so
    it is never presented as the verdict): 'KeyError at line 7 of the candidate: "\'reward\'"'."""
    message = str(err)
    quoted = f": {quote_candidate_text(message)}" if message else ""
    return f"{type(err).__name__}{candidate_line(err, filename)}{quoted}"


def describe_exit(err: SystemExit) -> str:
    """"sys.exit(3)", or with a message the candidate chose, quoted."""
    code = err.code
    return f"sys.exit({code if code is None or isinstance(code, int) else quote_candidate_text(str(code))})"


def quote_candidate_text(text: str, limit: int = QUOTED_CHARS) -> str:
    """Text the candidate controls, as a JSON string (one line, its own quotes escaped), cut to `limit`."""
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)
