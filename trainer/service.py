"""The trainer bound to the bus: work.train → evt.trained (a failed run is a trajectory without checkpoint; so is
one stopped early by the plan the work carries, docs/early_stopping.md).

Two backends (POISE_TRAINER_BACKEND): `TrainerService` trains on the CPU testbed in the sandbox;
`VerlTrainerService` trains with VERL on GPUs under a GPU protocol (docs/verl.md).

Each node trains in its own directory under the run (`nodes/<id>/train`, `nodes/<id>/train-r<i>` for a
fresh-seed replicate); the checkpoint URI in the trajectory points there.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from poise.bus import Bus
from poise.contracts import EvtTrained, SandboxLimits, TrainingStep, WorkTrain
from poise.early_stop import EarlyStopWatch
from poise.faults import fault_point
from poise.metrics import ABORTED, FAILED, METRICS, OK, STOPPED, observed
from poise.settings import ServiceSettings
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import Protocol, get_protocol
from poise.timing import PhaseClock
from trainer.testbed_runner import train_candidate, training_limits
from trainer.verl.launch import Launcher, RunOutcome, hf_checkpoint
from trainer.verl.protocol import (
    CANDIDATE_DIR,
    GpuProtocol,
    ProtocolError,
    TrainInputs,
    hydra_overrides,
    validate_overrides,
)

log = logging.getLogger("trainer")


def training_folder(work: WorkTrain) -> str:
    """The node's directory a training writes in: `train`, `train-r<i>` for a fresh-seed replicate, or for a report
    arm (docs/reporting.md) `report-<arm>-r<k>` ("minus:clip:dual" → report-minus-clip-dual-r2)."""
    if work.arm:
        return f"report-{re.sub(r'[^A-Za-z0-9_.-]', '-', work.arm)}-r{work.replicate}"
    return "train" if not work.replicate else f"train-r{work.replicate}"


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
        folder = training_folder(work)
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


CANDIDATE_MODULE = "poise_candidate"  # the candidate's source as a module in the run's candidate/ directory


class VerlTrainerService:
    """work.train -> evt.trained with VERL on GPUs under a GPU protocol (docs/verl.md).

    Each node trains in `nodes/<id>/train` (or `train-r<i>`): the candidate module, VERL's metrics and log, the
    checkpoint and its Hugging Face weights (the URI in the trajectory). A node whose run cannot start (no GPU, no
    model or data, a protocol VERL refuses) or does not complete (a crash, its deadline, a deleted Job) fails with
    the reason; a run the early-abort rules stop is an aborted trajectory without checkpoint, as on the testbed."""

    subject = WorkTrain.subject
    backend = "verl"

    def __init__(self, bus: Bus, workroot: Path, protocol: GpuProtocol, launcher: Launcher, model_path: str,
                 train_files: tuple[str, ...], val_files: tuple[str, ...], clock: PhaseClock | None = None,
                 on_step: Callable[[WorkTrain, TrainingStep], None] | None = None, python: str | None = None) -> None:
        self.bus = bus
        self.workroot = workroot
        self.protocol = protocol
        self.launcher = launcher
        self.model_path = model_path
        self.train_files = train_files
        self.val_files = val_files
        self.clock = clock or PhaseClock()
        self.on_step = on_step
        self.python = python

    def inputs(self, work: WorkTrain) -> TrainInputs:
        run_dir = (self.workroot / work.node_id / training_folder(work)).resolve()
        return TrainInputs(model_path=self.model_path, train_files=self.train_files, val_files=self.val_files,
                           candidate_module=CANDIDATE_MODULE, candidate_dir=run_dir / CANDIDATE_DIR, run_dir=run_dir,
                           experiment_name=f"{work.run_id}-{work.node_id}-r{work.replicate}", seed=work.seed)

    def missing_inputs(self) -> str | None:
        return missing_inputs(self.model_path, self.train_files, self.val_files)

    @observed("train")
    def handle(self, work: WorkTrain) -> str:
        fault_point("trainer.received", f"{work.run_id}/{work.node_id}")
        inputs = self.inputs(work)
        on_step = (lambda step: self.on_step(work, step)) if self.on_step else None
        with self.clock.phase("train"):
            outcome, uri = self._train(work, inputs, on_step)
        trajectory = outcome.trajectory(self.protocol.name, work.seed, uri)
        if outcome.failure:
            log.warning("%s/%s: VERL training failed: %s", work.run_id, work.node_id, outcome.failure)
        fault_point("trainer.publish", f"{work.run_id}/{work.node_id}")
        self.bus.publish(EvtTrained(run_id=work.run_id, node_id=work.node_id, attempt=work.attempt,
                                    replicate=work.replicate, arm=work.arm, trajectory=trajectory,
                                    gpu_seconds=outcome.gpu_seconds))
        METRICS.record_training(self.backend, trajectory)
        return FAILED if outcome.failure else ABORTED if trajectory.aborted else OK

    def _train(self, work: WorkTrain, inputs: TrainInputs,
               on_step: Callable[[TrainingStep], None] | None) -> tuple[RunOutcome, str | None]:
        problem = self.launcher.preflight(self.protocol) or self.missing_inputs()
        if problem is None:
            try:
                validate_overrides(hydra_overrides(self.protocol, inputs))
            except ProtocolError as err:
                problem = str(err)
        if problem is not None:
            return RunOutcome(failure=problem), None
        inputs.candidate_dir.mkdir(parents=True, exist_ok=True)
        (inputs.candidate_dir / f"{CANDIDATE_MODULE}.py").write_text(work.source, encoding="utf-8")
        outcome = self.launcher.run(self.protocol, inputs, on_step=on_step,
                                    ids=(work.run_id, work.node_id, work.replicate, work.attempt))
        if outcome.failure or outcome.aborted:
            return outcome, None
        hf_dir, problem = hf_checkpoint(inputs.run_dir, inputs.checkpoint_dir, python=self.python or sys.executable)
        if problem is not None:
            outcome.failure = problem
            return outcome, None
        return outcome, str(hf_dir)


class VerlSetupError(ValueError):
    """The settings do not describe a VERL trainer that can start; the message names the setting."""


@dataclass
class VerlTrainerSetup:
    """What every VERL trainer of a process shares: the GPU protocol (loaded once), the launcher, the model and the
    data. `poise serve trainer` and `poise run --trainer verl` both build it from the settings (docs/verl.md)."""

    protocol: GpuProtocol
    launcher: Launcher
    model_path: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    python: str

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> VerlTrainerSetup:
        from trainer.verl.launch import ProcessLauncher
        from trainer.verl.protocol import load_gpu_protocol

        try:
            protocol = load_gpu_protocol(settings.verl_protocol)
        except ProtocolError as err:
            raise VerlSetupError(f"POISE_VERL_PROTOCOL={settings.verl_protocol}: {err}") from err
        python = settings.verl_python or sys.executable
        launcher: Launcher
        if settings.verl_launcher == "kubernetes":
            from trainer.verl.k8s_job import JobError, in_cluster_launcher

            try:
                launcher = in_cluster_launcher(settings.verl_namespace, settings.verl_image,
                                               settings.work_dir.resolve(), settings.verl_work_claim,
                                               settings.verl_model_claim)
            except JobError as err:
                raise VerlSetupError(f"POISE_VERL_LAUNCHER=kubernetes: {err}") from err
        else:
            launcher = ProcessLauncher(python=python)
        train_files, val_files = settings.verl_files()
        return cls(protocol, launcher, settings.base_model, train_files, val_files, python)

    def service(self, bus: Bus, workroot: Path, clock: PhaseClock | None = None,
                on_step: Callable[[WorkTrain, TrainingStep], None] | None = None) -> VerlTrainerService:
        return VerlTrainerService(bus, workroot, self.protocol, self.launcher, self.model_path, self.train_files,
                                  self.val_files, clock=clock, on_step=on_step, python=self.python)

    def describe(self) -> str:
        resources = self.protocol.resources
        return (f"GPU protocol {self.protocol.name} ({resources.gpus} GPU(s), deadline {resources.deadline_s:.0f} s), "
                f"{self.launcher.name} launcher, model {self.model_path}")

    def problem(self) -> str | None:
        """Why no node could train here now (GPUs, image, model or data), or None."""
        return self.launcher.preflight(self.protocol) or missing_inputs(self.model_path, self.train_files,
                                                                         self.val_files)


def missing_inputs(model_path: str, train_files: tuple[str, ...], val_files: tuple[str, ...]) -> str | None:
    """The first data file or local model directory that is not there, with the setting that names it."""
    for setting, paths in (("POISE_VERL_TRAIN_FILES", train_files), ("POISE_VERL_VAL_FILES", val_files)):
        for path in paths:
            if not Path(path).is_file():
                return f"{setting}: {path} does not exist (the parquet files the GPU protocol trains on)"
    if model_path.startswith(("/", ".")) and not Path(model_path).is_dir():
        return f"POISE_BASE_MODEL: {model_path} is not a directory (a local model, or a hub id in the HF cache)"
    return None
