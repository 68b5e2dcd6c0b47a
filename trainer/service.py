"""The trainer bound to the bus: work.train → evt.trained (a failed run is a trajectory without checkpoint; so is
one stopped early by the plan the work carries, docs/early_stopping.md).

Each node trains in its own directory under the run (`nodes/<id>/train`, `nodes/<id>/train-r<i>` for a
fresh-seed replicate); the checkpoint URI in the trajectory points there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from poise.bus import Bus
from poise.contracts import EvtTrained, SandboxLimits, TrainingStep, WorkTrain
from poise.early_stop import EarlyStopWatch
from poise.faults import fault_point
from poise.metrics import ABORTED, FAILED, METRICS, OK, STOPPED, observed
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import Protocol, get_protocol
from poise.timing import PhaseClock
from trainer.testbed_runner import train_candidate, training_limits


class TrainerService:
    subject = WorkTrain.subject
    backend = "testbed"

    def __init__(self, bus: Bus, workroot: Path, clock: PhaseClock | None = None,
                 on_step: Callable[[WorkTrain, TrainingStep], None] | None = None,
                 wall_s: float | None = None) -> None:
        self.bus = bus
        self.workroot = workroot
        self.wall_s = wall_s  # None: the step-scaled deadline of training_limits
        self.clock = clock or PhaseClock()
        self.on_step = on_step

    def limits(self, protocol: Protocol) -> SandboxLimits:
        """`training_limits(protocol)`, its hard wall deadline replaced by the service's `wall_s` when set (the
        stall deadline stays: a hung candidate still dies without waiting for the wall)."""
        limits = training_limits(protocol)
        return limits if self.wall_s is None else limits.model_copy(update={"wall_s": self.wall_s})

    @observed("train")
    def handle(self, work: WorkTrain) -> str:
        fault_point("trainer.received", f"{work.run_id}/{work.node_id}")
        protocol = get_protocol(work.protocol)
        folder = "train" if not work.replicate else f"train-r{work.replicate}"
        if work.arm:  # a report arm's training (docs/reporting.md): "minus:clip:dual" → report-minus-clip-dual-r2
            folder = f"report-{re.sub(r'[^A-Za-z0-9_.-]', '-', work.arm)}-r{work.replicate}"
        on_step = (lambda step: self.on_step(work, step)) if self.on_step else None
        # The archive sends a plan only for a child's own training (docs/early_stopping.md), never a replicate's.
        watch = EarlyStopWatch(work.early_stop, protocol.steps) if work.early_stop and not work.replicate else None
        with self.clock.phase("train"):
            outcome = train_candidate(work.source, protocol, work.seed, base_checkpoint(protocol.base_checkpoint),
                                      self.workroot / work.node_id / folder, limits=self.limits(protocol),
                                      on_step=on_step, name=work.node_id, early_stop=watch)
        trajectory = outcome.trajectory
        if outcome.failure and not trajectory.abort_reason:
            trajectory = trajectory.model_copy(update={"aborted": True, "abort_reason": outcome.failure})
        fault_point("trainer.publish", f"{work.run_id}/{work.node_id}")
        self.bus.publish(EvtTrained(run_id=work.run_id, node_id=work.node_id, attempt=work.attempt,
                                    replicate=work.replicate, arm=work.arm, trajectory=trajectory))
        METRICS.record_training(self.backend, trajectory)
        if outcome.failure:
            return FAILED
        return STOPPED if trajectory.stopped_early else ABORTED if trajectory.aborted else OK
