"""Sandboxed child process: structural check and behavioural fingerprint of one candidate module.

Started only by proposer.fingerprint.fingerprint_in_sandbox through poise.sandbox.run_sandboxed. It receives
the candidate's source (a `FingerprintPayload`) and reports a `FingerprintReport` (both in poise/contracts.py):
the structural checks (poise.algorithm) and, when they pass, the fingerprint vector on the probes of
proposer/fingerprint.py, with the module's LOSS_AGG_MODE and HPARAMS. The candidate is loaded and called under a
`CandidateGuard` (poise/integrity.py), as in the other harnesses.
"""

from __future__ import annotations

import traceback

from poise.contracts import FingerprintPayload, FingerprintReport, PhaseEvent
from poise.sandbox import emit, emit_result, enter_sandbox
from poise.sandbox_audit import record_attempts

# Trusted modules the fork server (poise.forkserver) imports once, before it forks any child.
PRELOAD = ("torch", "poise.algorithm", "poise.integrity", "proposer.fingerprint")


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
    return torch.cat([p.reshape(-1).double() for p in parts]).tolist(), None


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
