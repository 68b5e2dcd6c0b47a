"""The embedded runner behind `poise run`: the six services in one process on the in-process bus.

The run directory holds everything: `archive.db` (the SQLite genealogical archive, the run's config included),
`nodes/<id>/` (verification attempts, training directories and checkpoints), `run.log`, and the lock `run.lock` and
the backup `archive.db.bak` (app/rundir.py: one run at a time, foreign directories refused). Starting a run
in a directory that already holds one resumes it: the stored config is used (a different protocol or seed
is refused; a larger budget extends the run), and the work of every unfinished node is redone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from app.progress import Progress, clock_text
from app.rundir import Backups, RunDirError, RunDirLock, check_run_dir
from archive.runs import RunRefused, resolve_run
from archive.service import ArchiveService
from archive.sqlite_store import SQLiteStore, damaged
from archive.status import run_status
from archive.update import UpdateResult
from evaluator.backends import EvaluatorBackend, build_evaluator
from evaluator.service import EvaluatorService
from implementer.service import ImplementerService
from poise.agents import OPERATORS, Agents, default_agents, describe_agents
from poise.bus import InProcBus
from poise.contracts import (
    RECORDED_SETTINGS,
    Message,
    RunConfig,
    RunStatus,
)
from poise.objective import describe as describe_objective
from poise.sandbox import MAX_THREADS_ENV, boundary_problem, make_undumpable
from poise.testbed.protocol import get_protocol
from poise.timing import PhaseClock
from proposer.service import ProposerService
from reflector.service import ReflectorService
from trainer.service import TrainerService, VerlTrainerSetup
from trainer.verl.launch import stop_runs


class RunError(Exception):
    """A run that cannot start as asked; the message says what to do."""


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    wall_s: float
    work_s: float
    phase_seconds: dict[str, float]
    status: RunStatus
    stop_reason: str | None
    resumed_nodes: int

    @property
    def overhead_fraction(self) -> float:
        return max(0.0, self.wall_s - self.work_s) / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        """This process's share of the run (a resumed run counts from its restart)."""
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "wall_s": self.wall_s, "work_s": self.work_s,
                "overhead_s": self.wall_s - self.work_s, "overhead_fraction": self.overhead_fraction,
                "phase_seconds": self.phase_seconds, "stop_reason": self.stop_reason,
                "resumed_nodes": self.resumed_nodes, "status": self.status.model_dump()}


def open_run(run_dir: Path, config: RunConfig) -> tuple[SQLiteStore, RunConfig]:
    """The run's store and its config: new, or the stored one resumed (archive/runs.py, the rule both modes
    share). A run directory holds one run; `config.run_id` names it only when the directory is new."""
    run_dir.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore.in_run_dir(run_dir)
    try:
        problems = store.check()  # quick_check: ~10 ms per 1,000 nodes; a damaged file is never written to
        if problems:
            raise damaged(store.path, problems[0])
        stored = store.run_ids()
        run_id = config.run_id if not stored or config.run_id in stored else stored[0]
        given = config.model_dump(mode="json", exclude={"run_id", *RECORDED_SETTINGS})
        return store, resolve_run(store, run_id, given, config.backends, where=str(run_dir),
                                  elsewhere="another --run-dir")
    except RunRefused as err:
        store.close()
        raise RunError(str(err)) from err
    except BaseException:
        store.close()
        raise


def check_agents(config: RunConfig, agents: Agents) -> None:
    """Build every operator's agent-LLM client before anything starts: RunError (and nothing written) for a
    spec the process cannot serve, such as a missing API key."""
    for operator in OPERATORS:
        try:
            agents.client(config, operator)
        except ValueError as err:
            raise RunError(f"the {operator} agent ({config.backends.llm_for(operator)}) cannot start: {err}") from err


def concurrent_work(parallel: int, training_threads: int) -> dict[str, int]:
    """The work the bus handles on worker threads when `parallel` > 1, and how much of each at once: its time is
    spent in sandboxed children or in torch, outside the GIL. The trainer keeps nothing between messages, so up to
    `parallel` trainings run side by side, but no more than the cores hold at the protocol's `training_threads`
    each: the thread count is part of the protocol (40 default-protocol steps on 1 thread and on 2 logged different
    rewards), and two 2-thread trainings on 2 cores spun against each other, 491 s for 40 steps instead of 46 s
    (bench/results/parallel/). The implementer (whose coder may keep state) and the evaluator (whose backend holds
    one model: vLLM reloads its server's weights per checkpoint) take one message at a time, as one replica of
    their deployed service does."""
    trainings = max(1, min(parallel, _cores() // max(1, training_threads)))
    return {"work.implement": 1, "work.train": trainings, "work.evaluate": 1}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def thread_share(workers: int) -> Iterator[None]:
    """Each of `workers` pieces of work side by side gets its share of the cores: POISE_MAX_THREADS (read by
    poise/sandbox.py's thread_cap, for the evaluator and the sandboxed children's OpenMP) is lowered to
    cores // workers while the run goes on, unless it is lower already. A training keeps its protocol's threads
    (they are part of its numbers; concurrent_work bounds how many run at once); an evaluation's scores did not
    change with its threads (the root's Overall was 0.6147 evaluated on 1 thread and on 2)."""
    before = os.environ.get(MAX_THREADS_ENV)
    share = max(1, _cores() // workers)
    if workers > 1 and not (before is not None and before.isdigit() and 0 < int(before) <= share):
        os.environ[MAX_THREADS_ENV] = str(share)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MAX_THREADS_ENV, None)
        else:
            os.environ[MAX_THREADS_ENV] = before


def run(config: RunConfig, run_dir: Path, stream: TextIO | None = None, verify_wall_s: float = 120.0,
        coder=None, max_messages: int | None = None, agents: Agents | None = None,
        evaluator: EvaluatorBackend | None = None, force: bool = False,
        verl: VerlTrainerSetup | None = None) -> RunSummary:
    """Run (or resume) the search in `run_dir` until its budget is evaluated; returns the summary. `agents`:
    the agent-LLM clients of the run's operators (this process's by default); `evaluator`: the backend that
    scores checkpoints (default: the run's `backends.evaluator` with default settings). The run closes it.
    `verl`: the VERL trainer a run with `backends.trainer` verl trains with (docs/verl.md).
    The run holds `run_dir`'s lock and backs its archive up (app/rundir.py); `force`: start in a foreign directory."""
    run_dir = run_dir.resolve()
    agents = agents or default_agents()
    check_agents(config, agents)
    make_undumpable()  # keys in this process's environment stay out of reach of same-uid processes
    problem = boundary_problem()
    if problem is not None:
        raise RunError(f"candidate code will not run here: {problem}")
    try:
        check_run_dir(run_dir, force)
        lock = RunDirLock(run_dir, "poise run")
    except RunDirError as err:
        raise RunError(str(err)) from err
    try:
        store, config = open_run(run_dir, config)
    except BaseException:
        lock.release()
        raise
    if config.backends.trainer == "verl" and verl is None:
        store.close()
        lock.release()
        raise RunError(f"run {config.run_id} trains with VERL (backends.trainer verl), but no VERL trainer was set "
                       "up; run it with `poise run --trainer verl` on a GPU machine (docs/verl.md)")
    if evaluator is None:
        evaluator = build_evaluator(config.backends.evaluator, run_dir)
    elif evaluator.name != config.backends.evaluator:
        store.close()
        lock.release()
        raise RunError(f"run {config.run_id} records evaluator {config.backends.evaluator!r}, but a {evaluator.name!r} "
                       f"evaluator was given; its nodes would not be comparable")
    clock = PhaseClock()
    started = time.monotonic()
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("poise")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    progress: Progress | None = None
    try:
        workers = config.parallel
        bus = InProcBus(workers=workers, concurrent=concurrent_work(workers, get_protocol(config.protocol).threads))
        progress = Progress(stream, store, config, clock, bus=bus, workers=workers)
        if lock.taken_over is not None:
            progress.say(f"taking over the lock of pid {lock.taken_over.pid} (no longer running)")
        backups = Backups(store, progress.say)
        backups.take()  # the archive as opened, checked sound

        def on_result(event: Message, result: UpdateResult) -> None:
            progress.on_result(event, result)
            backups.on_result(event, result)

        archive = ArchiveService(bus, store, config, on_result=on_result)
        bus.dead_letter = archive.dead_letter
        workroot = run_dir / "nodes"
        services = [
            ProposerService(bus, store, fingerprint_dir=run_dir / "fingerprints", agents=agents),
            ImplementerService(bus, workroot, config.protocol, config.max_correction_attempts, coder=coder,
                               verify_wall_s=verify_wall_s, clock=clock, config=config, archive=store, agents=agents),
            verl.service(bus, workroot, clock=clock, on_step=progress.on_step) if config.backends.trainer == "verl"
            else TrainerService(bus, workroot, clock=clock, on_step=progress.on_step),
            EvaluatorService(bus, clock=clock, backend=evaluator),
            ReflectorService(bus, store, agents=agents),
        ]
        for service in services:
            bus.subscribe(service.subject, service.handle)
        for subject in ("evt.proposed", "evt.implemented", "evt.trained", "evt.evaluated", "evt.reflected",
                        "evt.failed"):
            bus.subscribe(subject, archive.handle)
        resumed = archive.start()
        if resumed:
            progress.say(f"resuming run {config.run_id} in {run_dir}: {resumed} unfinished piece(s) of work redone")
        else:
            progress.say(f"run {config.run_id} in {run_dir}: budget {config.budget}, protocol {config.protocol}, "
                         f"seed {config.seed}, parent selection {config.parent_selection}; objective: "
                         f"{describe_objective(config.objective)}; agents: {describe_agents(config)}")
        delivered = 0
        with thread_share(workers):
            while bus.step():
                delivered += 1
                if max_messages is not None and delivered >= max_messages:
                    bus.join()  # work on worker threads ends before the caller resumes the run
                    break
        if not archive.state.finished and max_messages is None:
            archive.pump()
        wall = time.monotonic() - started
        status = run_status(store, config.run_id)
        summary = RunSummary(config.run_id, run_dir, wall, clock.total(), dict(clock.seconds), status,
                             archive.state.stop_reason, resumed)
        if archive.state.finished:
            progress.finished = True
            progress.say(f"run finished ({archive.state.stop_reason}) in {clock_text(wall)}")
            progress.status_line()
        (run_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=1))
        backups.take()
        progress.close()
        return summary
    finally:
        stop_runs()  # an interrupted run leaves no VERL process group behind (its own session survives Ctrl-C)
        if progress is not None:
            progress.close(erase=False)  # interrupted: its last state stays on screen
        evaluator.close()
        logger.removeHandler(handler)
        handler.close()
        store.close()
        lock.release()
