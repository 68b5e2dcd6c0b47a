"""Sandboxed child process: verify one candidate module.

Started only by implementer.verify through poise.sandbox.run_sandboxed. It receives the candidate's source,
the base checkpoint path and the smoke protocol (a `VerifyPayload`), and reports a `VerifyReport` (both in
poise/contracts.py): the structural check
(poise.algorithm), unit checks on synthetic groups (determinism of advantages and loss, a loss that stays
finite on a group with a single valid token), and a smoke RL run of a few steps on the testbed.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

from poise.contracts import CheckResult, VerifyPayload, VerifyReport
from poise.sandbox import emit_result, enter_sandbox
from poise.sandbox_audit import record_attempts

# Trusted modules the fork server (poise.forkserver) imports once, before it forks any child.
PRELOAD = ("poise.algorithm", "poise.contracts", "poise.testbed.protocol", "poise.testbed.training")


def main() -> None:
    payload, isolation_notes = enter_sandbox(VerifyPayload)
    from poise.algorithm import check_passed, structural_check

    record_attempts(readable=[payload.base_path], imports=PRELOAD)  # what the candidate attempts is blocked
    checks: list[CheckResult] = []
    try:
        checks = structural_check(payload.source)
        if check_passed(checks):
            checks += unit_checks(payload.source)
        if check_passed(checks) and payload.smoke_protocol:
            checks.append(smoke_run(payload))
    except Exception as err:  # noqa: BLE001 - the candidate's failure is a result, not a crash
        checks.append(CheckResult(name="harness", passed=False, message=f"{type(err).__name__}: {err}"))
        emit_result(VerifyReport(checks=checks, isolation=isolation_notes, traceback=traceback.format_exc()[-4000:]))
        return
    emit_result(VerifyReport(checks=checks, isolation=isolation_notes))


def unit_checks(source: str) -> list[CheckResult]:
    """Checks beyond the structural ones, on synthetic groups: same input, same output; a short response."""
    import torch

    from poise.algorithm import (
        CandidateError,
        aggregate_loss,
        load_candidate,
        loss_agg_mode,
        module_hparams,
        run_advantages,
        run_policy_loss,
        synthetic_rollout,
    )
    module = load_candidate(source)
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
    return results


def smoke_run(payload: VerifyPayload) -> CheckResult:
    """A few RL steps on the testbed: the candidate must train without error or non-finite values."""
    from poise.algorithm import CandidateError, load_candidate
    from poise.testbed.protocol import protocol_from_dict
    from poise.testbed.training import TrainingAborted, train

    protocol = protocol_from_dict(payload.smoke_protocol or {})
    out_dir = Path.cwd() / "smoke"
    try:
        candidate = load_candidate(payload.source, name="candidate")
        trajectory = train(candidate, protocol, payload.seed, payload.base_path, out_dir)
    except (CandidateError, TrainingAborted) as err:
        return CheckResult(name="smoke_run", passed=False, message=str(err))
    except Exception as err:  # noqa: BLE001
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith("<")]
        where = f" at line {frames[-1].lineno} of the candidate" if frames else ""
        return CheckResult(name="smoke_run", passed=False, message=f"{type(err).__name__}: {err}{where}")
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
