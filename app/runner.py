"""The embedded runner behind `poise run`: the six services in one process on the in-process bus.

The run directory holds everything: `archive.db` (the SQLite genealogical archive, the run's config included),
`nodes/<id>/` (verification attempts, training directories and checkpoints) and `run.log`. Starting a run
in a directory that already holds one resumes it: the stored config is used (a different protocol or seed
is refused; a larger budget extends the run), and the work of every unfinished node is redone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from archive.runs import RunRefused, resolve_run
from archive.service import ArchiveService
from archive.sqlite_store import SQLiteStore
from archive.status import run_status
from archive.update import Outcome, UpdateResult
from evaluator.backends import EvaluatorBackend, build_evaluator
from evaluator.service import EvaluatorService
from implementer.service import ImplementerService
from poise.agents import OPERATORS, Agents, default_agents, describe_agents
from poise.bus import InProcBus
from poise.contracts import (
    RECORDED_SETTINGS,
    Message,
    NodeStatus,
    RunConfig,
    RunStatus,
    TrainingStep,
    WorkTrain,
)
from poise.objective import describe as describe_objective
from poise.timing import PhaseClock
from proposer.service import ProposerService
from reflector.service import ReflectorService
from trainer.service import TrainerService


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


class Progress:
    """Line-oriented progress: one line per finished phase, a status line after each evaluation."""

    def __init__(self, stream: TextIO | None, store: SQLiteStore, config: RunConfig, clock: PhaseClock) -> None:
        self.stream = stream
        self.store = store
        self.config = config
        self.clock = clock
        self.started = time.monotonic()
        self.evaluated_at_start: int | None = None

    def say(self, text: str) -> None:
        if self.stream is not None:
            elapsed = time.monotonic() - self.started
            print(f"[{_clock(elapsed)}] {text}", file=self.stream, flush=True)

    def on_result(self, event: Message, result: UpdateResult) -> None:
        if result.outcome != Outcome.APPLIED or result.node is None:
            if result.outcome == Outcome.REJECTED:
                self.say(f"{event.node_id}: {event.subject} rejected: {result.reason}")
            return
        node = result.node
        name = node.proposal.name
        replicate = getattr(event, "replicate", 0)
        if replicate:
            if event.subject == "evt.evaluated":
                evaluation = event.evaluation
                self.say(f"{node.node_id} {name}: fresh-seed replicate {replicate} (seed {evaluation.seed}): "
                         f"Overall {evaluation.overall:.4f}")
            elif event.subject != "evt.trained" or not result.next_work:
                self.say(f"{node.node_id} {name}: replicate {replicate}: {result.reason}")
            return
        match event.subject:
            case "evt.proposed":
                parents = ",".join(node.genealogy.parent_ids) or "none (root)"
                self.say(f"{node.node_id} proposed: {name} (parent {parents}, depth {node.genealogy.depth}, by "
                         f"{node.proposal.generator}) — {node.proposal.rationale[:160]}")
            case "evt.implemented" if node.implementation is not None:
                impl = node.implementation
                verdict = "verified" if impl.verified else "NOT verified"
                self.say(f"{node.node_id} {verdict} after {len(impl.attempts)} attempt(s)")
            case "evt.trained" if node.trajectory is not None:
                t = node.trajectory
                last = t.steps[-1] if t.steps else None
                reward = f", reward {last.reward_mean:.3f}" if last and last.reward_mean is not None else ""
                self.say(f"{node.node_id} trained {len(t.steps)} steps in {t.wall_s:.0f} s{reward}"
                         + (f" — aborted: {t.abort_reason}" if t.aborted else ""))
            case "evt.evaluated" if node.evaluation is not None:
                self.say(f"{node.node_id} evaluated: Overall {node.evaluation.overall:.4f}, "
                         f"mean length {node.evaluation.mean_length:.1f}")
                self.status_line()
            case "evt.reflected" if node.reflection is not None:
                tags = ", ".join(node.reflection.diagnoses) or "no issues"
                self.say(f"{node.node_id} reflected: {tags}")
        calls = getattr(event, "llm_calls", [])
        if calls:
            self.say(f"{node.node_id} {event.subject}: {len(calls)} agent-LLM request(s), "
                     f"${sum(c.cost_usd for c in calls):.4f}; node total ${node.cost.llm_usd:.4f}")
        if node.status == NodeStatus.FAILED and node.failure is not None:
            self.say(f"{node.node_id} FAILED in {node.failure.phase}: {node.failure.reason}")

    def on_step(self, work: WorkTrain, step: TrainingStep) -> None:
        every = 10
        if step.step % every == every - 1:
            reward = f"{step.reward_mean:.3f}" if step.reward_mean is not None else "-"
            tag = f" r{work.replicate}" if work.replicate else ""
            self.say(f"{work.node_id}{tag} step {step.step + 1}: reward {reward}")

    def status_line(self) -> None:
        status = run_status(self.store, self.config.run_id)
        counts = status.counts
        done = status.budget.evaluated
        if self.evaluated_at_start is None:
            self.evaluated_at_start = done
        elapsed = time.monotonic() - self.started
        new = done - self.evaluated_at_start
        eta = ""
        if new > 0 and done < self.config.budget:  # fresh-seed confirmation of the best comes on top
            eta = f", ETA ~{_clock(elapsed / new * (self.config.budget - done))} + confirmation"
        best = status.best
        leader = status.leader
        in_pipeline = (NodeStatus.PROPOSED, NodeStatus.IMPLEMENTED, NodeStatus.TRAINED)
        parts = [f"evaluated {done}/{self.config.budget}",
                 "in pipeline " + " ".join(f"{s} {counts[s]}" for s in in_pipeline),
                 f"failed {counts[NodeStatus.FAILED]}"]
        if leader:
            root_mean = status.root.mean if status.root else None
            gain = f" ({leader.utility - root_mean:+.4f} vs GRPO)" if root_mean is not None else ""
            parts.append(f"leader {leader.node_id} {leader.utility:.4f}{gain} (1 seed)")
        if best and best.confirmed:
            parts.append(f"best {best.node_id} {best.utility:.4f} — {best.verdict}")
        llm = status.llm
        if llm.calls:
            cap = f" of ${llm.cap_usd:.2f}" if llm.cap_usd is not None else ""
            parts.append(f"agent LLM ${llm.usd:.4f}{cap} ({llm.calls} requests)")
        self.say(" · ".join(parts) + f" · elapsed {_clock(elapsed)}{eta}")


def check_agents(config: RunConfig, agents: Agents) -> None:
    """Build every operator's agent-LLM client before anything starts: RunError (and nothing written) for a
    spec the process cannot serve, such as a missing API key."""
    for operator in OPERATORS:
        try:
            agents.client(config, operator)
        except ValueError as err:
            raise RunError(f"the {operator} agent ({config.backends.llm_for(operator)}) cannot start: {err}") from err


def _clock(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run(config: RunConfig, run_dir: Path, stream: TextIO | None = None, verify_wall_s: float = 120.0,
        coder=None, max_messages: int | None = None, agents: Agents | None = None,
        evaluator: EvaluatorBackend | None = None) -> RunSummary:
    """Run (or resume) the search in `run_dir` until its budget is evaluated; returns the summary. `agents`:
    the agent-LLM clients of the run's operators (this process's by default); `evaluator`: the backend that
    scores checkpoints (default: the run's `backends.evaluator` with default settings). The run closes it."""
    run_dir = run_dir.resolve()
    agents = agents or default_agents()
    check_agents(config, agents)
    store, config = open_run(run_dir, config)
    if evaluator is None:
        evaluator = build_evaluator(config.backends.evaluator, run_dir)
    elif evaluator.name != config.backends.evaluator:
        store.close()
        raise RunError(f"run {config.run_id} records evaluator {config.backends.evaluator!r}, but a {evaluator.name!r} "
                       f"evaluator was given; its nodes would not be comparable")
    clock = PhaseClock()
    started = time.monotonic()
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("poise")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        progress = Progress(stream, store, config, clock)
        bus = InProcBus()
        archive = ArchiveService(bus, store, config, on_result=progress.on_result)
        bus.dead_letter = archive.dead_letter
        workroot = run_dir / "nodes"
        services = [
            ProposerService(bus, store, fingerprint_dir=run_dir / "fingerprints", agents=agents),
            ImplementerService(bus, workroot, config.protocol, config.max_correction_attempts, coder=coder,
                               verify_wall_s=verify_wall_s, clock=clock, config=config, archive=store, agents=agents),
            TrainerService(bus, workroot, clock=clock, on_step=progress.on_step),
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
        while bus.step():
            delivered += 1
            if max_messages is not None and delivered >= max_messages:
                break
        if not archive.state.finished and max_messages is None:
            archive.pump()
        wall = time.monotonic() - started
        status = run_status(store, config.run_id)
        summary = RunSummary(config.run_id, run_dir, wall, clock.total(), dict(clock.seconds), status,
                             archive.state.stop_reason, resumed)
        if archive.state.finished:
            progress.say(f"run finished ({archive.state.stop_reason}) in {_clock(wall)}")
            progress.status_line()
        (run_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=1))
        return summary
    finally:
        evaluator.close()
        logger.removeHandler(handler)
        handler.close()
        store.close()
