"""Parent side of testbed training: one candidate, one seed, in a sandboxed child process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from poise.contracts import (
    SandboxLimits,
    TrainingStep,
    TrainingTrajectory,
    TrainPayload,
    TrainReport,
    TrainStepEvent,
)
from poise.early_stop import EarlyStopWatch
from poise.sandbox import StopChild, run_sandboxed
from poise.sandbox_audit import attempts_in, describe_attempts
from poise.testbed.model import WEIGHTS_FILE
from poise.testbed.protocol import Protocol
from poise.testbed.training import CHECKPOINT_NAME

CHILD_MODULE = "trainer.testbed_child"


@dataclass
class TrainOutcome:
    trajectory: TrainingTrajectory              # on failure: the steps up to it, no checkpoint
    failure: str | None = None                  # why, in one line, when it failed
    detail: str = ""
    isolation_notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def checkpoint(self) -> Path | None:
        uri = self.trajectory.checkpoint_uri
        return Path(uri) if uri and self.failure is None else None


STEP_WALL_S = 30.0  # hard deadline per step: ~14x the default protocol's 2.2 s on 2 idle cores
START_WALL_S = 300.0  # plus this for start-up and saving
STALL_S = 180.0  # killed sooner when no step was reported for this long (a hung candidate)


def training_limits(protocol: Protocol) -> SandboxLimits:
    """The sandbox limits of a training run. Budgets are steps, so the wall deadline is generous (STEP_WALL_S
    per step + START_WALL_S): on a loaded machine two OpenMP threads sharing one core ran the default protocol at
    ~24 s per step, and the former deadline of 10 s per step + 120 s killed healthy runs. A hung or stuck
    candidate is caught by the stall deadline instead: no step event for STALL_S."""
    return SandboxLimits(wall_s=STEP_WALL_S * protocol.steps + START_WALL_S, stall_s=STALL_S)


def train_candidate(
    source: str,
    protocol: Protocol,
    seed: int,
    base_path: Path,
    workdir: Path,
    limits: SandboxLimits | None = None,
    on_step: Callable[[TrainingStep], None] | None = None,
    name: str = "candidate",
    early_stop: EarlyStopWatch | None = None,
) -> TrainOutcome:
    """Train `source` under `protocol` in the sandbox; the checkpoint lands in workdir/policy. Default limits:
    `training_limits`. `early_stop`: the child is killed when the watch says stop at a checkpoint; the trajectory
    then holds the steps run and `stopped_early`, no checkpoint, and it is not a failure (docs/early_stopping.md)."""
    limits = limits or training_limits(protocol)
    payload = TrainPayload(protocol=protocol.as_dict(), seed=seed, source=source, name=name,
                           base_path=base_path.resolve(), out_dir=workdir.resolve())

    def forward(event: dict) -> None:
        step = _step_of(event)
        if step is None:
            return
        if on_step:
            on_step(step)
        if early_stop is not None and early_stop.observe(step) is not None:
            raise StopChild(early_stop.stop.reason)

    run = run_sandboxed(CHILD_MODULE, payload, workdir, limits, threads=protocol.threads, on_event=forward,
                        report_type=TrainReport, fault="trainer.train")
    report = run.result
    notes = list(report.isolation) if report is not None else []
    attempts = attempts_in(run.events)  # blocked in the child: the run fails, however it went on
    if run.ok and not attempts and report is not None and report.trajectory is not None:
        trajectory = report.trajectory
        expected = (workdir / CHECKPOINT_NAME).resolve()
        streamed = [step for step in map(_step_of, run.events) if step is not None]
        problem = None
        if Path(trajectory.checkpoint_uri or "").resolve() != expected:
            problem = "the child reported a checkpoint outside its working directory"
        elif not (expected / WEIGHTS_FILE).is_file():
            problem = "the child reported a checkpoint it did not write (no weights in its working directory)"
        elif trajectory.steps != streamed:
            problem = (f"the child's report does not match its run: it names {len(trajectory.steps)} step(s), "
                       f"{len(streamed)} were reported as they ran")
        if problem is not None:  # a report the candidate wrote on the harness's channel (docs/sandbox.md)
            trajectory.checkpoint_uri = None
            return TrainOutcome(trajectory, problem, isolation_notes=notes, wall_s=run.wall_s)
        return TrainOutcome(trajectory, isolation_notes=notes, wall_s=run.wall_s)
    # Failed or stopped early: keep the curve up to the end, without a checkpoint.
    steps = [step for step in map(_step_of, run.events) if step is not None]
    if run.stopped is not None and not attempts and early_stop is not None and early_stop.stop is not None:
        stopped = TrainingTrajectory(protocol=protocol.name, seed=seed, steps=steps, stopped_early=early_stop.stop,
                                     wall_s=run.wall_s)
        return TrainOutcome(stopped, isolation_notes=notes, wall_s=run.wall_s)
    # The report's reason only when the child ended cleanly after it: a report followed by an exit, a kill or a
    # deadline may be a line the candidate printed, and then how the child ended is the reason.
    if attempts:
        reason = describe_attempts(attempts)
    elif run.ok and report is not None and report.reason:
        reason = report.reason
    else:
        reason = run.failure_reason()
    partial = TrainingTrajectory(protocol=protocol.name, seed=seed, steps=steps, aborted=True, abort_reason=reason,
                                 wall_s=run.wall_s)
    detail = ((report.traceback if report is not None else None) or run.stderr_tail)[-4000:]
    return TrainOutcome(partial, reason, detail=detail, isolation_notes=notes, wall_s=run.wall_s)


def _step_of(event: dict) -> TrainingStep | None:
    """The step a progress line of the child reports; None for any other line (the candidate shares the child's
    process, so a line that does not validate is ignored, never trusted)."""
    try:
        return TrainStepEvent.model_validate(event).step
    except ValidationError:
        return None
