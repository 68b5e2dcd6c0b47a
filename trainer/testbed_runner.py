"""Parent side of testbed training: one candidate, one seed, in a sandboxed child process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from poise.contracts import TrainingStep, TrainingTrajectory
from poise.sandbox import SandboxLimits, run_sandboxed
from poise.testbed.protocol import Protocol
from trainer.testbed import CHECKPOINT_NAME

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


def train_candidate(
    source: str,
    protocol: Protocol,
    seed: int,
    base_path: Path,
    workdir: Path,
    limits: SandboxLimits | None = None,
    on_step: Callable[[TrainingStep], None] | None = None,
    name: str = "candidate",
) -> TrainOutcome:
    """Train `source` under `protocol` in the sandbox; the checkpoint lands in workdir/policy."""
    limits = limits or SandboxLimits(wall_s=max(120.0, 10.0 * protocol.steps + 120.0))
    payload = {"protocol": protocol.as_dict(), "seed": seed, "source": source, "name": name,
               "base_path": str(base_path.resolve()), "out_dir": str(workdir.resolve())}

    def forward(event: dict) -> None:
        if on_step and "step" in event:
            on_step(TrainingStep.model_validate(event["step"]))

    run = run_sandboxed(CHILD_MODULE, payload, workdir, limits, threads=protocol.threads, on_event=forward)
    result = run.result or {}
    notes = list(result.get("isolation", []))
    if run.ok and result.get("status") == "ok":
        trajectory = TrainingTrajectory.model_validate(result["trajectory"])
        expected = (workdir / CHECKPOINT_NAME).resolve()
        if Path(trajectory.checkpoint_uri or "").resolve() != expected:
            trajectory.checkpoint_uri = None
            return TrainOutcome(trajectory, "the child reported a checkpoint outside its working directory",
                                isolation_notes=notes, wall_s=run.wall_s)
        return TrainOutcome(trajectory, isolation_notes=notes, wall_s=run.wall_s)
    # Failed: keep the curve up to the failure, without a checkpoint.
    steps = [TrainingStep.model_validate(e["step"]) for e in run.events if "step" in e]
    reason = result["reason"] if result.get("status") in ("candidate_error", "error") else run.failure_reason()
    partial = TrainingTrajectory(protocol=protocol.name, seed=seed, steps=steps, aborted=True, abort_reason=reason,
                                 wall_s=run.wall_s)
    detail = str(result.get("traceback") or run.stderr_tail)[-4000:]
    return TrainOutcome(partial, reason, detail=detail, isolation_notes=notes, wall_s=run.wall_s)
