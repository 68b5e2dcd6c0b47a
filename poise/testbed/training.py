"""The testbed RL loop: any candidate module, the standardized protocol, a tiny LM on synthetic math.

Per step: P prompts x G samples from the current policy (old log-probs and entropies come from the
sampler), rewards from the grader, the candidate's advantages over the whole rollout batch, then
`minibatches` optimizer updates, each on a shuffled slice, with the candidate's per-token loss reduced
by its declared aggregation. The first update of a step is on-policy (ratio 1); later ones are not,
which is what makes the clipping mechanisms of candidates matter. What a step logs of its rollout (reward,
format-valid rate, entropy, length) is computed before candidate code sees the step, and checked after
(docs/sandbox.md, "Integrity of rewards and records").

This module runs candidate code: it is imported only in the sandboxed child (trainer.testbed_child).
"""

from __future__ import annotations

import math
import random
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from poise.algorithm import (
    Tampering,
    aggregate_loss,
    build_batch,
    loss_agg_mode,
    module_hparams,
    run_advantages,
    run_policy_loss,
    slice_batch,
)
from poise.algorithms.common import kl_penalty, masked_mean
from poise.contracts import KLEstimator, TrainingStep, TrainingTrajectory
from poise.early_abort import AbortRules, AbortWatch
from poise.testbed.model import load_model, response_log_probs_by_length, save_model
from poise.testbed.protocol import Protocol
from poise.testbed.sampler import sample
from poise.testbed.tasks import grade, training_batch
from poise.testbed.tokenizer import encode_prompts

CHECKPOINT_NAME = "policy"


class TrainingAborted(Exception):
    """The run is clearly broken; the reason says how."""


def train(
    candidate: types.ModuleType,
    protocol: Protocol,
    seed: int,
    base_path: Path,
    out_dir: Path,
    on_step: Callable[[TrainingStep], None] | None = None,
) -> TrainingTrajectory:
    """RL-train the base checkpoint with `candidate`; write the final policy to out_dir/policy."""
    started = time.perf_counter()
    torch.set_num_threads(protocol.threads)
    torch.manual_seed(seed)
    policy, spec = load_model(base_path)
    reference, _ = load_model(base_path)
    reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=protocol.lr, betas=protocol.adam_betas, weight_decay=0.0)
    warmup = max(protocol.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: min(1.0, (update + 1) / warmup))
    hparams = module_hparams(candidate)
    keep_reference_in_batch = float(hparams.get("kl_coef", 0.0)) > 0
    shuffle = torch.Generator().manual_seed(seed)
    trajectory = TrainingTrajectory(protocol=protocol.name, seed=seed)
    average = _WeightAverage(policy, protocol.policy_ema) if protocol.policy_ema > 0 else None
    abort_watch = AbortWatch(abort_rules(protocol))
    try:
        for step in range(protocol.steps):
            step_started = time.perf_counter()
            problems = training_batch(step, seed, protocol.prompts_per_step, protocol.train_chain_lengths)
            problems = [p for p in problems for _ in range(protocol.group_size)]
            prompt_ids, prompt_mask = encode_prompts([p.prompt for p in problems])    # (B, P) left-padded
            policy.eval()
            sample_started = time.perf_counter()
            rollout = sample(policy, prompt_ids, prompt_mask, protocol.max_new_tokens, protocol.temperature,
                             seed=_step_seed(seed, step))
            sample_s = time.perf_counter() - sample_started
            response_ids, response_mask = rollout.response_ids, rollout.response_mask  # (B, L)
            grades = [grade(p, text, bool(eos)) for p, text, eos in
                      zip(problems, rollout.texts(), rollout.ended_with_eos, strict=True)]
            scores = torch.tensor([float(g.correct) for g in grades])
            format_valid = torch.tensor([float(g.format_valid) for g in grades])
            mask = response_mask.float()
            log_kl = step < 3 or step % protocol.kl_log_every == 0 or step == protocol.steps - 1
            ref_log_prob = None
            if keep_reference_in_batch or log_kl:
                with torch.no_grad():
                    ref_log_prob, _ = response_log_probs_by_length(reference, prompt_ids, prompt_mask, response_ids,
                                                                   response_mask, protocol.temperature)
            # What is logged of the rollout (and the KL to the base) is computed before candidate code sees this
            # step, and logged as it was then; the candidate gets copies (poise.algorithm), and the check below
            # fails a step whose tensors changed anyway (docs/sandbox.md, "Integrity of rewards and records").
            logged = _rollout_record(scores, format_valid, rollout.entropy, mask)
            kl = None
            if log_kl:
                kl = masked_mean(kl_penalty(rollout.log_probs, ref_log_prob, KLEstimator.K3), mask).item()
            group_index = torch.arange(protocol.prompts_per_step).repeat_interleave(protocol.group_size)
            batch = build_batch(scores, mask, group_index, format_valid=format_valid, entropy=rollout.entropy,
                                ref_log_prob=ref_log_prob if keep_reference_in_batch else None, hparams=hparams)
            advantages, adv_metrics = run_advantages(candidate, batch)
            update_started = time.perf_counter()
            update_metrics = _update(policy, optimizer, schedule, candidate, protocol, batch, prompt_ids,
                                     prompt_mask, response_ids, rollout.log_probs, advantages, shuffle)
            update_s = time.perf_counter() - update_started
            if average:
                average.update(policy)
            _check_unchanged(logged, _rollout_record(scores, format_valid, rollout.entropy, mask), step)
            record = TrainingStep(
                step=step,
                **logged,
                kl=kl,
                grad_norm=update_metrics.pop("grad_norm"),
                clip_frac=update_metrics.pop("clip_frac", None),
                adv_mean=masked_mean(advantages, mask).item(),
                adv_std=masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt().item(),
                step_time_s=time.perf_counter() - step_started,
                extra={**_finite(adv_metrics, "adv/"), **_finite(update_metrics, ""),
                       "zero_adv_groups": _zero_advantage_groups(advantages, protocol),
                       "lr": schedule.get_last_lr()[0], "sample_s": sample_s, "update_s": update_s,
                       "sample_tokens": float(mask.sum()),
                       "update_tokens": float(protocol.epochs * (prompt_mask.sum() + mask.sum()))},
            )
            trajectory.steps.append(record)
            if on_step:
                on_step(record)
            reason = abort_watch.observe(record)
            if reason is not None:
                raise TrainingAborted(reason)
    except TrainingAborted as abort:
        trajectory.aborted, trajectory.abort_reason = True, str(abort)
    if average:
        average.copy_to(policy)
    trajectory.checkpoint_uri = str(save_model(policy, spec, out_dir / CHECKPOINT_NAME))
    trajectory.wall_s = time.perf_counter() - started
    return trajectory


class _WeightAverage:
    """Exponential moving average of the policy's weights, started from the base weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.weights = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.weights, model.parameters(), strict=True):
            average.mul_(self.decay).add_(current, alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.weights, model.parameters(), strict=True):
            current.copy_(average)


def _update(policy, optimizer, schedule, candidate, protocol: Protocol, batch, prompt_ids, prompt_mask,
            response_ids, old_log_prob, advantages, shuffle: torch.Generator) -> dict[str, float]:
    """`epochs` x `minibatches` optimizer updates on shuffled slices of the rollout batch."""
    policy.train()
    rows = response_ids.shape[0]
    mode = loss_agg_mode(candidate)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(protocol.epochs):
        order = torch.randperm(rows, generator=shuffle)
        for index in order.chunk(protocol.minibatches):
            mask = batch["response_mask"][index]
            log_prob, _ = response_log_probs_by_length(policy, prompt_ids[index], prompt_mask[index],
                                                       response_ids[index], mask.long(), protocol.temperature)
            loss_mat, metrics = run_policy_loss(candidate, log_prob, old_log_prob[index], advantages[index], mask,
                                                slice_batch(batch, index))
            loss = aggregate_loss(loss_mat, mask, mode, loss_scale_factor=protocol.max_new_tokens)
            if not torch.isfinite(loss):
                raise TrainingAborted(f"non-finite loss ({loss.item()}) at update {updates} of the step")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), protocol.grad_clip).item()
            if not math.isfinite(grad_norm):
                raise TrainingAborted(f"non-finite gradient norm at update {updates} of the step")
            optimizer.step()
            schedule.step()
            updates += 1
            for key, value in {**metrics, "loss": loss.item(), "grad_norm": grad_norm}.items():
                sums[key] = sums.get(key, 0.0) + value
    return {key: value / updates for key, value in sums.items()}


def _rollout_record(scores: torch.Tensor, format_valid: torch.Tensor, entropy: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, float]:
    """What a step logs of its rollout: the reward and format-valid rate (B,), entropy and length (B, L)."""
    return {"reward_mean": scores.mean().item(), "format_valid_rate": format_valid.mean().item(),
            "entropy": masked_mean(entropy, mask).item(), "response_length": mask.sum(-1).mean().item()}


def _check_unchanged(logged: dict[str, float], now: dict[str, float], step: int) -> None:
    """Tampering when the step's own rollout tensors no longer give what was logged before candidate code ran."""
    changed = [f"{key} {value:.4g} before, {now[key]:.4g} after" for key, value in logged.items()
               if not (value == now[key] or math.isnan(value) and math.isnan(now[key]))]
    if changed:
        raise Tampering(f"tampering: the harness's own rollout tensors changed while candidate code ran at step "
                        f"{step} ({'; '.join(changed)}); the candidate is given copies and must not reach them")


def abort_rules(protocol: Protocol) -> AbortRules:
    """The protocol's early-abort thresholds (the rules themselves: poise/early_abort.py)."""
    return AbortRules(kl=protocol.abort_kl, format_valid=protocol.abort_format_valid, patience=protocol.abort_patience)


def _zero_advantage_groups(advantages: torch.Tensor, protocol: Protocol) -> float:
    per_response = advantages.abs().sum(-1).view(protocol.prompts_per_step, protocol.group_size)
    return (per_response.sum(-1) == 0).float().mean().item()


def _finite(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {prefix + key: value for key, value in metrics.items() if math.isfinite(value)}


def _step_seed(seed: int, step: int) -> int:
    return random.Random(f"sample:{seed}:{step}").getrandbits(63)
