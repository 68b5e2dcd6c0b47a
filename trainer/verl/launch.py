"""Launching one VERL training run and following it to its end (docs/verl.md, "Launching").

Two launchers share everything but how the run is started and stopped:

- `ProcessLauncher` (embedded and compose): VERL's entry point as a child in its own process group, on the
  GPUs of this machine. While it runs, the trainer's handler is alive, so the bus keeps heartbeating the
  message (poise/nats_bus.py); on the protocol's deadline, on an early abort, or when the service shuts down,
  the whole group is killed (Ray's workers and vLLM servers included).
- `trainer/verl/k8s_job.py` `KubernetesLauncher` (cluster): one Kubernetes Job per candidate.

Both read VERL's metrics file as it grows (trainer/verl/metrics.py), hand each step on, apply the testbed's
early-abort rules to it (poise/early_abort.py), book GPU-seconds (GPUs held x seconds) and, when the run
succeeded, turn its last checkpoint into Hugging Face weights for the vLLM evaluator (`hf_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from poise.contracts import TrainingStep, TrainingTrajectory
from poise.early_abort import AbortWatch
from poise.sandbox import kill_group
from trainer.verl.metrics import MetricsError, MetricsTail
from trainer.verl.protocol import HF_DIR, GpuProtocol, TrainInputs, launch_command, run_env

log = logging.getLogger("trainer.verl")

POLL_S = 2.0
LOG_FILE = "verl.log"          # the run's stdout and stderr, under its directory
LOG_TAIL_CHARS = 4000
KILL_GRACE_S = 20.0            # SIGTERM to the group, then SIGKILL


@dataclass
class RunOutcome:
    """How one run ended: the steps it logged, why it stopped early (None: it completed), GPU-seconds held."""

    steps: list[TrainingStep] = field(default_factory=list)
    failure: str | None = None     # the run did not complete: the node fails with this reason
    aborted: str | None = None     # the early-abort rules stopped it: a trajectory without checkpoint
    detail: str = ""
    wall_s: float = 0.0
    gpu_seconds: float = 0.0

    def trajectory(self, protocol: str, seed: int, checkpoint_uri: str | None) -> TrainingTrajectory:
        reason = self.failure or self.aborted
        return TrainingTrajectory(protocol=protocol, seed=seed, steps=self.steps, aborted=reason is not None,
                                  abort_reason=reason, checkpoint_uri=None if reason else checkpoint_uri,
                                  wall_s=self.wall_s)


class StepFollower:
    """Reads a run's new steps, hands each on, and says when the early-abort rules stop the run."""

    def __init__(self, metrics_path: Path, watch: AbortWatch, on_step: Callable[[TrainingStep], None] | None) -> None:
        self.tail = MetricsTail(metrics_path)
        self.watch = watch
        self.on_step = on_step
        self.steps: list[TrainingStep] = []

    def poll(self) -> str | None:
        """The abort reason, once a step breaks the rules; None while the curve is fine."""
        try:
            new = self.tail.read_new()
        except MetricsError as err:
            return f"VERL's metrics file is unreadable: {err}"
        for step in new:
            self.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)
            reason = self.watch.observe(step)
            if reason is not None:
                return reason
        return None


class Launcher(Protocol):
    """Starts one VERL run and follows it to its end: `ProcessLauncher` here, trainer/verl/k8s_job.py
    `KubernetesLauncher`."""

    name: str

    def preflight(self, protocol: GpuProtocol) -> str | None:
        """Why this launcher cannot run `protocol` now (no GPUs, no image), or None."""

    def run(self, protocol: GpuProtocol, inputs: TrainInputs, on_step: Callable[[TrainingStep], None] | None = None,
            ids: tuple[str, str, int, int] | None = None) -> RunOutcome:
        """Run to the end; `ids` (run, node, replicate, attempt) name what is trained."""


# ------------------------------------------------------------------------------------------------ GPUs


def visible_gpus() -> int:
    """CUDA devices this process can use (0 without a GPU or without a CUDA build of torch)."""
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
        return 0


def gpu_problem(protocol: GpuProtocol, available: int) -> str | None:
    """Why this machine cannot run `protocol`, or None."""
    needed = protocol.resources.gpus
    if available >= needed:
        return None
    return (f"GPU protocol {protocol.name} needs {needed} GPU(s) and this machine has {available} visible "
            f"(torch.cuda.device_count()); run the trainer on a GPU machine (compose --profile gpu, or the cluster "
            "overlay's Jobs: POISE_VERL_LAUNCHER=kubernetes), or use POISE_TRAINER_BACKEND=testbed")


# ------------------------------------------------------------------------------------- the process launcher

_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()


def stop_runs() -> int:
    """A service's shutdown: kill every VERL process group still running; returns how many."""
    with _running_lock:
        children = list(_running)
    for child in children:
        kill_process_group(child)
    return len(children)


def kill_process_group(child: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to the child's whole group (Ray shuts its workers down), then SIGKILL to what is left of the group
    once the leader has gone or after grace_s (`kill_group`, as for a sandboxed child)."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    kill_group(child.pid)
    try:
        child.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        log.error("VERL's process %d survived SIGKILL (stuck in the kernel?)", child.pid)


@dataclass
class ProcessLauncher:
    """Runs VERL as a local process group on this machine's GPUs."""

    python: str = sys.executable
    poll_s: float = POLL_S
    gpus_available: Callable[[], int] = visible_gpus
    command: Callable[[GpuProtocol, TrainInputs], list[str]] | None = None  # tests: a stand-in for VERL

    name = "process"

    def preflight(self, protocol: GpuProtocol) -> str | None:
        return gpu_problem(protocol, self.gpus_available())

    def run(self, protocol: GpuProtocol, inputs: TrainInputs, on_step: Callable[[TrainingStep], None] | None = None,
            ids: tuple[str, str, int, int] | None = None) -> RunOutcome:
        """Run VERL to its end, its deadline, or an early abort. `ids` (run, node, replicate, attempt): unused here."""
        deadline_s = protocol.resources.deadline_s
        argv = (self.command or (lambda p, i: launch_command(p, i, self.python)))(protocol, inputs)
        inputs.run_dir.mkdir(parents=True, exist_ok=True)
        inputs.metrics_path.unlink(missing_ok=True)  # an earlier attempt's steps are not this run's
        env = {**child_env(os.environ), **run_env(inputs), "PYTHONUNBUFFERED": "1"}
        follower = StepFollower(inputs.metrics_path, AbortWatch(protocol.abort_rules()), on_step)
        log_path = inputs.run_dir / LOG_FILE
        started = time.monotonic()
        with log_path.open("wb") as log_file:
            try:
                child = subprocess.Popen(argv, cwd=inputs.run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as err:
                return RunOutcome(failure=f"cannot start VERL ({argv[0]}: {err}); set POISE_VERL_PYTHON to the "
                                          "interpreter that has verl")
            with _running_lock:
                _running.add(child)
            try:
                outcome = self._follow(child, follower, started, deadline_s)
            finally:
                if child.poll() is None:
                    kill_process_group(child)
                with _running_lock:
                    _running.discard(child)
        outcome.steps = follower.steps
        outcome.wall_s = time.monotonic() - started
        outcome.gpu_seconds = outcome.wall_s * protocol.resources.gpus
        if outcome.failure:
            outcome.detail = log_tail(log_path)
        return outcome

    def _follow(self, child: subprocess.Popen, follower: StepFollower, started: float, deadline_s: float) -> RunOutcome:
        while True:
            returncode = child.poll()
            reason = follower.poll()  # before the exit status: the last steps a finished run wrote count
            if reason is not None:
                kill_process_group(child)
                return RunOutcome(aborted=reason)
            if returncode is not None:
                if returncode != 0:
                    return RunOutcome(failure=exit_reason(returncode))
                return RunOutcome()
            if time.monotonic() - started > deadline_s:
                kill_process_group(child)
                return RunOutcome(failure=f"the VERL run passed its deadline of {deadline_s:.0f} s (the protocol's "
                                  "resources.deadline_s) and was killed with its process group")
            time.sleep(self.poll_s)


_SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL", re.IGNORECASE)


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The service's environment without its own settings and credentials: candidate code runs in VERL's
    processes (CUDA, HF and Ray variables pass)."""
    return {name: value for name, value in environ.items()
            if not name.startswith("POISE_") and not _SECRET_NAME.search(name)}


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the VERL run was killed by {name} (out of memory, or stopped from outside); see {LOG_FILE}"
    return f"the VERL run exited with status {returncode}; the end of {LOG_FILE} says why"


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - chars))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ the checkpoint


def latest_actor_dir(checkpoint_dir: Path) -> Path | None:
    """`<ckpt>/global_step_<N>/actor` of the last saved step (VERL writes N to latest_checkpointed_iteration.txt)."""
    marker = checkpoint_dir / "latest_checkpointed_iteration.txt"
    try:
        step = int(marker.read_text().strip())
    except (OSError, ValueError):
        steps = sorted(int(p.name.removeprefix("global_step_")) for p in checkpoint_dir.glob("global_step_*")
                       if p.name.removeprefix("global_step_").isdigit())
        if not steps:
            return None
        step = steps[-1]
    actor = checkpoint_dir / f"global_step_{step}" / "actor"
    return actor if actor.is_dir() else None


def has_hf_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def merge_command(actor_dir: Path, target_dir: Path, python: str = sys.executable) -> list[str]:
    """VERL's model merger: FSDP shards -> a Hugging Face model directory (weights, config, tokenizer)."""
    return [python, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(actor_dir),
            "--target_dir", str(target_dir)]


def hf_checkpoint(run_dir: Path, checkpoint_dir: Path, python: str = sys.executable,
                  runner: Callable[[list[str]], subprocess.CompletedProcess] | None = None,
                  timeout_s: float = 3600.0) -> tuple[Path | None, str | None]:
    """(the HF weights' directory the evaluator serves, None) or (None, why there is none).

    VERL saves full HF weights beside the shards (`hf_model` in save_contents: `actor/huggingface`); when they are
    missing, the shards are merged into run_dir/hf with VERL's model merger."""
    actor = latest_actor_dir(checkpoint_dir)
    if actor is None:
        return None, (f"the VERL run ended without a checkpoint under {checkpoint_dir} (no global_step_<N>/actor); "
                      "check trainer.save_freq in the rendered overrides")
    if has_hf_weights(actor / "huggingface"):
        return actor / "huggingface", None
    target = run_dir / HF_DIR
    shutil.rmtree(target, ignore_errors=True)  # an earlier attempt's merge
    command = merge_command(actor, target, python)
    run = runner or (lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s))
    try:
        done = run(command)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"merging the checkpoint to Hugging Face weights failed: {err}"
    if done.returncode != 0 or not has_hf_weights(target):
        tail = ((done.stderr or "") + (done.stdout or ""))[-500:].strip()
        return None, f"VERL's model merger did not write HF weights to {target} (status {done.returncode}): {tail}"
    return target, None
