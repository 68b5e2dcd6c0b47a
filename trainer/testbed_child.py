"""Sandboxed child process: train one candidate on the testbed.

Started only by trainer.testbed_runner through poise.sandbox.run_sandboxed. It receives the protocol, the
seed, the candidate's source, the base checkpoint path and its output directory - nothing else (a
`TrainPayload`) - and reports each training step as a `TrainStepEvent` and how it ended as a `TrainReport`
(poise/contracts.py). The candidate is loaded and called under a `CandidateGuard` (poise/integrity.py): a
`PhaseEvent` says where the child is, and tampering with trusted code fails the run.
"""

from __future__ import annotations

import traceback

from poise.contracts import PhaseEvent, TrainingStep, TrainPayload, TrainReport, TrainStepEvent
from poise.sandbox import emit, emit_result, enter_sandbox
from poise.sandbox_audit import record_attempts

# Trusted modules the fork server (poise.forkserver) imports once, before it forks any child.
PRELOAD = ("poise.algorithm", "poise.contracts", "poise.integrity", "poise.testbed.protocol",
           "poise.testbed.training")


def main() -> None:
    payload, isolation_notes = enter_sandbox(TrainPayload)
    # Trusted imports first: the candidate is loaded only after the harness is fully in place.
    from poise.algorithm import CandidateError, describe_candidate_exception
    from poise.integrity import CandidateGuard
    from poise.testbed.protocol import protocol_from_dict
    from poise.testbed.training import train

    record_attempts(readable=[payload.base_path], imports=PRELOAD)  # what the candidate attempts is blocked
    protocol = protocol_from_dict(payload.protocol)
    steps: list[TrainingStep] = []

    def on_step(record: TrainingStep) -> None:
        steps.append(record)
        emit(TrainStepEvent(step=record).model_dump(mode="json"))

    guard = CandidateGuard(on_phase=lambda phase: emit(PhaseEvent(phase=phase).model_dump(mode="json")))
    try:
        candidate = guard.load(payload.source, name=payload.name)
        trajectory = train(candidate, protocol, payload.seed, payload.base_path, payload.out_dir, on_step=on_step)
        guard.trusted.check("training")  # after the last call too: a finalizer or a hook the candidate left
    except CandidateError as err:
        emit_result(TrainReport(status="candidate_error", reason=str(err) or type(err).__name__, steps=steps,
                                isolation=isolation_notes))
        return
    except Exception as err:  # noqa: BLE001 - the candidate's failure is a result, not a crash
        emit_result(TrainReport(status="error", reason=describe_candidate_exception(err, f"<{payload.name}>"),
                                steps=steps, isolation=isolation_notes, traceback=traceback.format_exc()[-4000:]))
        return
    emit_result(TrainReport(status="ok", trajectory=trajectory, isolation=isolation_notes))


if __name__ == "__main__":
    main()
