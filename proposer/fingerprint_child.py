"""Sandboxed child process: structural check and behavioural fingerprint of one candidate module.

Started only by proposer.fingerprint.fingerprint_in_sandbox through poise.sandbox.run_sandboxed. It receives
the candidate's source (a `FingerprintPayload`) and reports a `FingerprintReport` (both in poise/contracts.py):
the structural checks (poise.algorithm) and, when they pass, the fingerprint vector on the probes of
proposer/fingerprint.py (synthetic) and proposer/probe_batches.py (recorded from a real run), with the module's
LOSS_AGG_MODE and HPARAMS. The candidate is loaded and called under a
`CandidateGuard` (poise/integrity.py), as in the other harnesses.
"""

from __future__ import annotations

import traceback

from poise.contracts import FingerprintPayload, FingerprintReport, PhaseEvent
from poise.sandbox import emit, emit_result, enter_sandbox
from poise.sandbox_audit import record_attempts

# Trusted modules the fork server (poise.forkserver) imports once, before it forks any child.
PRELOAD = ("torch", "poise.algorithm", "poise.integrity", "proposer.fingerprint", "proposer.probe_batches")


def main() -> None:
    payload, isolation_notes = enter_sandbox(FingerprintPayload)
    import proposer.fingerprint  # noqa: F401 - trusted, so imported before the candidate is
    from poise.algorithm import (
        check_passed,
        describe_candidate_exception,
        loss_agg_mode,
        module_hparams,
        structural_check,
    )
    from poise.integrity import CandidateGuard

    record_attempts(imports=PRELOAD)  # what the candidate attempts is blocked and sent
    guard = CandidateGuard(on_phase=lambda phase: emit(PhaseEvent(phase=phase).model_dump(mode="json")))
    report = FingerprintReport(isolation=isolation_notes)
    try:
        report.checks = structural_check(payload.source, load=guard.load)
        if check_passed(report.checks):
            module = guard.load(payload.source)
            report.loss_agg_mode = loss_agg_mode(module)
            report.hparams = module_hparams(module)
            report.fingerprint, report.failure = fingerprint(module)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is a result, not a crash
        report.failure = f"harness: {describe_candidate_exception(err, '<candidate>')}"
        report.traceback = traceback.format_exc()[-4000:]
    emit_result(report)


def fingerprint(module) -> tuple[list[float] | None, str | None]:
    """The fingerprint vector (layout: proposer.fingerprint.fingerprint_blocks), or None and what went wrong."""
    import torch

    from poise.algorithm import (
        CandidateError,
        aggregate_loss,
        describe_candidate_exception,
        loss_agg_mode,
        module_hparams,
        run_advantages,
        run_policy_loss,
    )
    from proposer.fingerprint import PERTURBATION_SCALES, PROBES

    def describe(err: Exception) -> str:  # the candidate's message quoted, at its own line
        return describe_candidate_exception(err, getattr(module, "__file__", None))

    hparams = module_hparams(module)
    parts: list[torch.Tensor] = []
    for probe in PROBES:
        batch, old_log_prob, noise = probe_rollout(probe, hparams)
        mask = batch["response_mask"]
        where = f"on fingerprint probe {probe.name!r}"
        try:
            advantages, _ = run_advantages(module, batch)
        except CandidateError as err:
            return None, f"fingerprint: {err} {where}"
        except Exception as err:  # noqa: BLE001
            return None, f"fingerprint: compute_advantages raised {describe(err)} {where}"
        if not torch.isfinite(advantages).all():
            return None, f"fingerprint: compute_advantages returned non-finite values {where}"
        parts.append(advantages * mask)
        for scale in PERTURBATION_SCALES:
            log_prob = (old_log_prob + scale * noise).requires_grad_(True)
            at = f"{where} with log_prob = old_log_prob + {scale:g} * noise"
            try:
                loss_mat, _ = run_policy_loss(module, log_prob, old_log_prob, advantages, mask, batch)
                loss = aggregate_loss(loss_mat, mask, loss_agg_mode(module))
                (grad,) = torch.autograd.grad(loss, log_prob, allow_unused=True) if loss.requires_grad else (None,)
            except CandidateError as err:
                return None, f"fingerprint: {err} {at}"
            except Exception as err:  # noqa: BLE001
                return None, f"fingerprint: policy_loss raised {describe(err)} {at}"
            grad = torch.zeros_like(log_prob) if grad is None else grad
            masked_loss = loss_mat.detach() * mask
            if not (torch.isfinite(masked_loss).all() and torch.isfinite(grad).all()):
                return None, f"fingerprint: policy_loss or its gradient is non-finite {at}"
            parts += [masked_loss, grad * mask]
    recorded, failure = recorded_sketches(module, describe)
    if failure is not None:
        return None, failure
    return torch.cat([p.reshape(-1).double() for p in parts] + recorded).tolist(), None


def recorded_sketches(module, describe) -> tuple[list, str | None]:
    """The sketches of the candidate's advantages, per-token losses and loss gradients on the recorded probe
    batches (proposer/probe_batches.py), as training computes them: advantages over each step's whole rollout
    batch, then the loss of each minibatch update at the log-probs the recorded run had there, aggregated with the
    candidate's mode and the protocol's horizon. Layout: proposer.fingerprint.recorded_blocks."""
    import torch

    from poise.algorithm import (
        CandidateError,
        aggregate_loss,
        build_batch,
        loss_agg_mode,
        module_hparams,
        run_advantages,
        run_policy_loss,
        slice_batch,
    )
    from proposer.fingerprint import RECORDED_QUANTITIES, SKETCH_SEED, SKETCH_SIZE
    from proposer.probe_batches import load_recorded_probes

    probes = load_recorded_probes()
    hparams, mode = module_hparams(module), loss_agg_mode(module)
    values: dict[str, list[torch.Tensor]] = {quantity: [] for quantity in RECORDED_QUANTITIES}
    for step in probes.steps:
        mask = torch.from_numpy(step.mask)
        valid = mask > 0
        batch = build_batch(torch.from_numpy(step.scores), mask, torch.from_numpy(step.group).long(),
                            format_valid=torch.from_numpy(step.format_valid), entropy=torch.from_numpy(step.entropy),
                            ref_log_prob=torch.from_numpy(step.ref_log_prob), hparams=hparams)
        where = f"on the recorded training batch of step {step.step}"
        try:
            advantages, _ = run_advantages(module, batch)
        except CandidateError as err:
            return [], f"fingerprint: {err} {where}"
        except Exception as err:  # noqa: BLE001
            return [], f"fingerprint: compute_advantages raised {describe(err)} {where}"
        if not torch.isfinite(advantages).all():
            return [], f"fingerprint: compute_advantages returned non-finite values {where}"
        values["advantages"].append(advantages[valid])
        old_log_prob = torch.from_numpy(step.old_log_prob)
        for update, rows in enumerate(step.minibatches()):
            index = torch.arange(rows.start, rows.stop)
            log_prob = torch.from_numpy(step.log_prob[rows]).clone().requires_grad_(True)
            at = f"{where}, minibatch update {update + 1}"
            try:
                loss_mat, _ = run_policy_loss(module, log_prob, old_log_prob[rows], advantages[rows], mask[rows],
                                              slice_batch(batch, index))
                loss = aggregate_loss(loss_mat, mask[rows], mode, loss_scale_factor=probes.meta["max_new_tokens"])
                (grad,) = torch.autograd.grad(loss, log_prob, allow_unused=True) if loss.requires_grad else (None,)
            except CandidateError as err:
                return [], f"fingerprint: {err} {at}"
            except Exception as err:  # noqa: BLE001
                return [], f"fingerprint: policy_loss raised {describe(err)} {at}"
            grad = torch.zeros_like(log_prob) if grad is None else grad
            if not (torch.isfinite(loss_mat.detach()[valid[rows]]).all() and torch.isfinite(grad).all()):
                return [], f"fingerprint: policy_loss or its gradient is non-finite {at}"
            values["loss"].append(loss_mat.detach()[valid[rows]])
            values["grad"].append(grad[valid[rows]])
    sketches = []
    for position, quantity in enumerate(RECORDED_QUANTITIES):
        vector = torch.cat(values[quantity]).double()
        directions = torch.randn(SKETCH_SIZE, vector.numel(), dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(SKETCH_SEED + position))
        sketches.append(directions @ vector / SKETCH_SIZE ** 0.5)
    return sketches, None


def probe_rollout(probe, hparams: dict):
    """The fixed batch of `probe` (poise.algorithm.build_batch), its old log-probs and the perturbation noise."""
    import torch

    from poise.algorithm import build_batch

    gen = torch.Generator().manual_seed(probe.seed)
    rows, sizes = probe.rows, torch.tensor(probe.group_sizes)
    group_index = torch.repeat_interleave(torch.arange(len(probe.group_sizes)), sizes)
    lengths = torch.randint(1, probe.max_len + 1, (rows,), generator=gen)
    lengths[0] = probe.max_len
    mask = (torch.arange(probe.max_len).unsqueeze(0) < lengths.unsqueeze(1)).float()
    if probe.scores == "equal":
        scores = (group_index % 2 == 0).float()  # groups alternate all-pass, all-fail
    else:
        scores = (torch.rand(rows, generator=gen) < 0.5).float()
        starts = torch.cumsum(sizes, 0) - sizes
        scores[starts], scores[starts + 1] = 1.0, 0.0  # every group has a pass and a fail
    # Passing responses are format-valid; some failing ones are not.
    format_valid = torch.where(scores > 0, 1.0, (torch.rand(rows, generator=gen) < 0.6).float())
    old_log_prob = -torch.rand(rows, probe.max_len, generator=gen) * 2.0 * mask
    noise = torch.randn(rows, probe.max_len, generator=gen) * mask
    entropy = torch.rand(rows, probe.max_len, generator=gen) * mask
    ref_log_prob = old_log_prob - 0.1 * torch.rand(rows, probe.max_len, generator=gen) * mask
    batch = build_batch(scores, mask, group_index, format_valid=format_valid, entropy=entropy,
                        ref_log_prob=ref_log_prob, hparams=hparams)
    return batch, old_log_prob, noise


if __name__ == "__main__":
    main()
