"""Sandboxed child process: verify one candidate module.

Started only by implementer.verify through poise.sandbox.run_sandboxed. It receives the candidate's source,
the base checkpoint path and the smoke protocol (a `VerifyPayload`), and reports a `VerifyReport` (both in
poise/contracts.py): the structural check
(poise.algorithm), unit checks on synthetic groups (determinism of advantages and loss, a loss that stays
finite on a group with a single valid token), and a smoke RL run of a few steps on the testbed. Every load of
the candidate goes through a `CandidateGuard` (poise/integrity.py): a `PhaseEvent` says where the child
is, and tampering with its inputs or with trusted code fails the check it happened in.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from poise.contracts import CheckResult, PhaseEvent, VerifyPayload, VerifyReport
from poise.sandbox import emit, emit_result, enter_sandbox
from poise.sandbox_audit import record_attempts

if TYPE_CHECKING:
    from poise.integrity import CandidateGuard

# Trusted modules the fork server (poise.forkserver) imports once, before it forks any child.
PRELOAD = ("poise.algorithm", "poise.contracts", "poise.integrity", "poise.testbed.protocol",
           "poise.testbed.training")


def main() -> None:
    payload, isolation_notes = enter_sandbox(VerifyPayload)
    # Every trusted module the checks use is imported before the candidate is: one imported later could be a
    # module the candidate put into sys.modules.
    import torch  # noqa: F401 - imported for the record of trusted state

    import poise.testbed.protocol  # noqa: F401
    import poise.testbed.training  # noqa: F401
    from poise.algorithm import CandidateError, check_passed, describe_candidate_exception, structural_check
    from poise.integrity import CandidateGuard

    record_attempts(readable=[payload.base_path], imports=PRELOAD)  # what the candidate attempts is blocked
    guard = CandidateGuard(on_phase=lambda phase: emit(PhaseEvent(phase=phase).model_dump(mode="json")))
    checks: list[CheckResult] = []
    try:
        checks = structural_check(payload.source, load=guard.load)
        if check_passed(checks):
            checks += unit_checks(guard, payload.source)
        if check_passed(checks) and payload.smoke_protocol:
            checks.append(smoke_run(guard, payload))
        if check_passed(checks):  # after the last call too: a finalizer or a hook the candidate left
            guard.trusted.check("verifying")
    except CandidateError as err:  # that check's Tampering
        checks.append(CheckResult(name="integrity", passed=False, message=str(err)))
    except Exception as err:  # noqa: BLE001 - the candidate's failure is a result, not a crash
        checks.append(CheckResult(name="harness", passed=False,
                                  message=describe_candidate_exception(err, "<candidate>")))
        emit_result(VerifyReport(checks=checks, isolation=isolation_notes, traceback=traceback.format_exc()[-4000:]))
        return
    emit_result(VerifyReport(checks=checks, isolation=isolation_notes))


def unit_checks(guard: CandidateGuard, source: str) -> list[CheckResult]:
    """Checks beyond the structural ones, on synthetic groups: same input, same output; a short response."""
    import torch

    from poise.algorithm import (
        CandidateError,
        aggregate_loss,
        describe_candidate_exception,
        loss_agg_mode,
        module_hparams,
        run_advantages,
        run_policy_loss,
        synthetic_rollout,
    )
    try:
        module = guard.load(source)
    except CandidateError as err:  # it loaded for the structural check: tampering found at this import
        return [CheckResult(name="unit_checks", passed=False, message=str(err))]
    hparams = module_hparams(module)
    results = []

    def outputs(rollout):
        advantages, _ = run_advantages(module, rollout.batch)
        mask = rollout.batch["response_mask"]
        loss_mat, _ = run_policy_loss(module, rollout.log_prob, rollout.old_log_prob, advantages, mask,
                                      rollout.batch)
        return advantages, loss_mat

    try:
        first, second = (outputs(synthetic_rollout(hparams=hparams, seed=11, groups=3, group_size=5))
                         for _ in range(2))
        same = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        results.append(CheckResult(
            name="determinism", passed=same,
            message="ok" if same else "two calls on the same batch gave different advantages or losses; "
                                      "remove randomness (or seed it from the batch) so runs are reproducible"))
        rollout = synthetic_rollout(hparams=hparams, seed=3, groups=2, group_size=4, max_len=5)
        rollout.batch["response_mask"][:, 1:] = 0.0  # every response one token long
        rollout.batch["response_length"] = rollout.batch["response_mask"].sum(-1)
        advantages, loss_mat = outputs(rollout)
        loss = aggregate_loss(loss_mat, rollout.batch["response_mask"], loss_agg_mode(module))
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(advantages).all())
        results.append(CheckResult(
            name="one_token_responses", passed=finite,
            message="ok" if finite else "advantages or the aggregated loss are not finite when every response "
                                        "is one token long; guard divisions by lengths or stds with an epsilon"))
    except CandidateError as err:
        results.append(CheckResult(name="unit_checks", passed=False, message=str(err)))
    except Exception as err:  # noqa: BLE001 - raised by the candidate's code on these batches
        raised = describe_candidate_exception(err, module.__file__)
        results.append(CheckResult(name="unit_checks", passed=False, message=f"the candidate raised {raised}"))
    return results


def smoke_run(guard: CandidateGuard, payload: VerifyPayload) -> CheckResult:
    """A few RL steps on the testbed: the candidate must train without error or non-finite values."""
    from poise.algorithm import CandidateError, describe_candidate_exception
    from poise.testbed.protocol import protocol_from_dict
    from poise.testbed.training import TrainingAborted, train

    protocol = protocol_from_dict(payload.smoke_protocol or {})
    out_dir = Path.cwd() / "smoke"
    try:
        candidate = guard.load(payload.source, name="candidate")
        trajectory = train(candidate, protocol, payload.seed, payload.base_path, out_dir)
    except (CandidateError, TrainingAborted) as err:
        return CheckResult(name="smoke_run", passed=False, message=str(err))
    except Exception as err:  # noqa: BLE001
        return CheckResult(name="smoke_run", passed=False, message=describe_candidate_exception(err, "<candidate>"))
    if trajectory.aborted:
        return CheckResult(name="smoke_run", passed=False, message=f"training aborted: {trajectory.abort_reason}")
    values = [v for s in trajectory.steps for v in (s.reward_mean, s.grad_norm, s.entropy) if v is not None]
    if not all(math.isfinite(v) for v in values):
        return CheckResult(name="smoke_run", passed=False, message="non-finite reward, entropy or grad norm")
    last = trajectory.steps[-1]
    return CheckResult(name="smoke_run", passed=True,
                       message=f"{len(trajectory.steps)} steps ok (reward {last.reward_mean:.3f}, "
                               f"grad norm {last.grad_norm:.3g})")


if __name__ == "__main__":
    main()
