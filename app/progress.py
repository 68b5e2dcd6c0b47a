"""What `poise run` tells the person watching it: a line per finished phase and, on a terminal, a live block.

Not a terminal (a pipe, a test, a file): plain lines, one per event, never cut inside a word (a proposal's
rationale is shortened at a word boundary), with a status line after each evaluation. On a terminal the same
event lines scroll above a block redrawn in place (ANSI: carriage return, erase line, cursor up): per phase what
is being worked on now (a training as a step bar), evaluated candidates as a bar, the best so far, elapsed time
and the ETA. Lines are fitted to the terminal's width.

The ETA learns from measured phase times: the mean seconds of verification, training and evaluation so far
(`PhaseClock`), times the phases the run still needs (the unfinished candidates' remaining phases, the root's
missing seeds, the fresh-seed confirmation of the best), scaled by the measured wall seconds per second of phase
work (below 1 when work runs side by side, `--parallel`); a phase's first measurement, which pays one-off
start-up, is left out once there are others. Until every phase has been measured once it says so.
"""

from __future__ import annotations

import math
import os
import shutil
import textwrap
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from archive.status import run_status
from archive.update import IN_FLIGHT, Outcome, UpdateResult
from poise.bus import InProcBus
from poise.contracts import Message, NodeStatus, RunConfig, RunStatus, TrainingStep, WorkTrain
from poise.store import ArchiveStore
from poise.testbed.protocol import PROTOCOLS
from poise.timing import PhaseClock

MEASURED_PHASES = ("implement", "train", "evaluate")  # what PhaseClock measures, per candidate
WORK_PHASES = {"work.implement": "implement", "work.train": "train", "work.evaluate": "evaluate",
               "work.reflect": "reflect", "work.propose": "propose"}
BLOCK_PHASES = ("implement", "train", "evaluate", "reflect")
RATIONALE_CHARS = 160
STEP_LINE_EVERY = 10  # plain output: a line every this many training steps
BAR_CHARS = 20
STAMP = "[0:00:00] "


def clock_text(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def shorten(text: str, limit: int = RATIONALE_CHARS) -> str:
    """`text` on one line, at most `limit` characters, cut at a word boundary with "…" when it is longer."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    if " " in cut and not text[limit - 1].isspace():
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:—-") + "…"


def bar(done: int, total: int, width: int = BAR_CHARS) -> str:
    filled = 0 if total <= 0 else round(width * min(done, total) / total)
    return "█" * filled + "░" * (width - filled)


# ------------------------------------------------------------------------------------------------ ETA


def phases_left(counts: Mapping[NodeStatus, int], budget: int, evaluated: int, root_in_flight: bool,
                extra_trainings: int) -> dict[str, int]:
    """How many verifications, trainings and evaluations the run still needs: each unfinished candidate's
    remaining phases (counts of nodes at each status, the root's included; `evaluated`: children evaluated), the
    candidates not yet proposed, and `extra_trainings` (root seeds still to train, fresh-seed confirmation
    replicates), each a training and an evaluation. Failures are not foreseen."""
    left = {phase: 0 for phase in MEASURED_PHASES}
    remaining = {NodeStatus.PROPOSED: MEASURED_PHASES, NodeStatus.IMPLEMENTED: ("train", "evaluate"),
                 NodeStatus.TRAINED: ("evaluate",)}
    for status, phases in remaining.items():
        for phase in phases:
            left[phase] += counts.get(status, 0)
    children_in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT) - int(root_in_flight)
    new = max(0, budget - evaluated - children_in_flight)
    for phase in MEASURED_PHASES:
        left[phase] += new
    left["train"] += extra_trainings
    left["evaluate"] += extra_trainings
    return left


def phase_means(seconds: Mapping[str, float], counts: Mapping[str, int],
                first: Mapping[str, float] | None = None) -> dict[str, float] | None:
    """Mean measured seconds of each phase (`seconds` and `counts` per phase, as PhaseClock keeps them), leaving out
    a phase's `first` measurement once there are others: it pays one-off start-up (a sandbox's fork server imports
    torch for 10-15 s). None until every phase has been measured once."""
    if any(counts.get(phase, 0) == 0 for phase in MEASURED_PHASES):
        return None
    first = first or {}
    means = {}
    for phase in MEASURED_PHASES:
        total, n = seconds[phase], counts[phase]
        if n > 1 and phase in first:
            total, n = total - first[phase], n - 1
        means[phase] = total / n
    return means


def eta_seconds(left: Mapping[str, int], means: Mapping[str, float] | None,
                wall_per_work_s: float = 1.0) -> float | None:
    """Seconds until the run is done: the phases `left` times the mean seconds of each, times the wall seconds one
    second of phase work takes (1.0 one at a time, less when phases run side by side). None without means."""
    if means is None:
        return None
    return sum(left.get(phase, 0) * means[phase] for phase in MEASURED_PHASES) * wall_per_work_s


def extra_trainings(status: RunStatus, config: RunConfig) -> int:
    """Trainings beyond one per candidate still to come: the root's missing seeds and the fresh-seed replicates
    that confirm the best at the end (one node; more when the first confirmed falls behind)."""
    root_done = len(status.root.scores) if status.root is not None else 0
    root_left = max(0, config.root_seeds - max(1, root_done))
    best = status.best
    confirmed = best.seeds - 1 if best is not None and status.root and best.node_id != status.root.node_id else 0
    return root_left + max(0, config.replicate_seeds - confirmed)


def run_eta(status: RunStatus, config: RunConfig, clock: PhaseClock, elapsed_s: float, workers: int) -> float | None:
    root_in_flight = status.root is not None and status.root.status in IN_FLIGHT
    # With racing an extra seed is counted as a whole candidate's phases: an over-estimate of the proposals left.
    left = phases_left(status.counts, config.budget, status.budget.used, root_in_flight,
                       extra_trainings(status, config))
    work_s = clock.total()
    # wall seconds per second of phase work so far: the time between phases, and work side by side
    ratio = max(elapsed_s / work_s, 1.0 / workers) if work_s > 0 else 1.0
    return eta_seconds(left, phase_means(dict(clock.seconds), dict(clock.counts), dict(clock.first)), ratio)


def eta_text(eta_s: float | None, finished: bool = False) -> str:
    if finished:
        return ""
    return "ETA after the first candidate" if eta_s is None else f"ETA ~{clock_text(eta_s)}"


def best_text(status: RunStatus) -> str:
    """The best so far: a seed mean where there is more than one seed, else "1 seed", against GRPO's mean."""
    root, best, leader = status.root, status.best, status.leader
    grpo = ""
    if root is not None and root.mean is not None:
        grpo = f"GRPO {root.mean:.4f} ({_seeds(len(root.scores))})"
    if best is not None and root is not None and best.node_id != root.node_id and best.seeds > 1:
        return f"best {best.node_id} {best.utility:.4f} ({_seeds(best.seeds)}) — {best.verdict}"
    if leader is not None:
        gain = f", {leader.utility - root.mean:+.4f} vs {grpo}" if grpo else ""
        return f"leader {leader.node_id} {leader.utility:.4f} (1 seed){gain}"
    return grpo


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"mean of {n} seeds"


# ----------------------------------------------------------------------------------------- the block


@dataclass
class Running:
    """A piece of work being handled now, as the block shows it."""

    phase: str
    node_id: str
    replicate: int = 0
    step: int | None = None
    steps: int | None = None

    def text(self) -> str:
        name = self.node_id + (f" r{self.replicate}" if self.replicate else "")
        if self.steps:
            return f"{name} {bar(self.step or 0, self.steps, BAR_CHARS // 2)} {self.step or 0}/{self.steps}"
        return name


def render_block(running: list[Running], queued: Mapping[str, int], evaluated: int, budget: int, timing: str,
                 best: str, width: int) -> list[str]:
    """The live block's lines, each at most `width` - 1 characters (a full line would wrap on some terminals):
    a line per phase, evaluated candidates with `timing` (elapsed, ETA), and the `best` so far when there is one."""
    lines = []
    for phase in BLOCK_PHASES:
        now = [r.text() for r in running if r.phase == phase]
        waiting = queued.get(phase, 0)
        text = " · ".join(now) or "—"
        lines.append(f"  {phase:<10}{text}" + (f"  (+{waiting} waiting)" if waiting else ""))
    counted = f" {evaluated}/{budget} · {timing}"
    lines.append(f"  {'evaluated':<10}{bar(evaluated, budget, max(5, min(BAR_CHARS, width - 13 - len(counted))))}"
                 + counted)
    if best:
        lines.append(f"  {'best':<10}{best}")
    return [_fit(line, width - 1) for line in lines]


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[:max(0, width - 1)] + "…"


def terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """Event lines and status for a run's stream (None: silent). `bus`: where the work in flight is read."""

    def __init__(self, stream: TextIO | None, store: ArchiveStore, config: RunConfig, clock: PhaseClock,
                 bus: InProcBus | None = None, workers: int = 1) -> None:
        self.stream = stream
        self.store = store
        self.config = config
        self.clock = clock
        self.bus = bus
        self.workers = workers
        self.started = time.monotonic()
        self.live = stream is not None and _isatty(stream)
        self.finished = False
        self._lock = threading.RLock()  # trainings report steps from worker threads
        self._steps: dict[tuple[str, int], int] = {}
        self._drawn = 0  # lines of the block on screen
        self._status: RunStatus | None = None
        self._eta: tuple[float | None, float] = (None, self.started)  # estimate, and when it was made
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.live:
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()

    # ----------------------------------------------------------------------------------- output

    def say(self, text: str) -> None:
        if self.stream is None:
            return
        line = f"[{clock_text(time.monotonic() - self.started)}] {text}"
        with self._lock:
            if self.live:
                width = terminal_width(self.stream) - 1
                line = "\n".join(textwrap.wrap(line, width=max(20, width), subsequent_indent=" " * len(STAMP),
                                               break_long_words=False, break_on_hyphens=False))
                self.stream.write(self._erase() + line + "\n" + self._block())
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def close(self, erase: bool = True) -> None:
        """Stop redrawing; `erase` the block (a finished run) or leave its last state on screen (interrupted)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        if self.live and self.stream is not None:
            with self._lock:
                self.stream.write(self._erase() if erase else ("\n" if self._drawn else ""))
                self.stream.flush()
                self._drawn = 0
                self.live = False

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.redraw()

    def redraw(self) -> None:
        if not self.live or self.stream is None:
            return
        with self._lock:
            self.stream.write(self._erase() + self._block())
            self.stream.flush()

    def _erase(self) -> str:
        """Back to the first line of the block, erasing it (the cursor sits at the end of its last line)."""
        if not self._drawn:
            return ""
        erase = "\r\x1b[2K" + "\x1b[1A\x1b[2K" * (self._drawn - 1)
        self._drawn = 0
        return erase

    def _block(self) -> str:
        if not self.live or self.stream is None:
            return ""
        lines = render_block(self._running(), self._queued(), self._evaluated(), self.config.budget, self._timing(),
                             self._best(), terminal_width(self.stream))
        self._drawn = len(lines)
        return "\n".join(lines)

    def _running(self) -> list[Running]:
        running = []
        for message in self.bus.active() if self.bus is not None else []:
            phase = WORK_PHASES.get(message.subject)
            if phase is None:
                continue
            item = Running(phase, message.node_id, getattr(message, "replicate", 0))
            if isinstance(message, WorkTrain):
                item.step = self._steps.get((message.node_id, message.replicate), 0)
                protocol = PROTOCOLS.get(message.protocol)
                item.steps = protocol.steps if protocol is not None else None
            running.append(item)
        return running

    def _queued(self) -> dict[str, int]:
        if self.bus is None:
            return {}
        return {phase: self.bus.pending(subject) for subject, phase in WORK_PHASES.items()}

    def _evaluated(self) -> int:
        return self._status.budget.evaluated if self._status is not None else 0

    def _best(self) -> str:
        if self._status is None:
            return ""
        failed = self._status.counts.get(NodeStatus.FAILED, 0)
        return " · ".join(p for p in (best_text(self._status), f"failed {failed}" if failed else "") if p)

    def _timing(self) -> str:
        now = time.monotonic()
        eta, at = self._eta
        eta = eta_text(None if eta is None else max(0.0, eta - (now - at)), self.finished)
        return f"elapsed {clock_text(now - self.started)}" + (f" · {eta}" if eta else "")

    # ----------------------------------------------------------------------------------- events

    def on_result(self, event: Message, result: UpdateResult) -> None:
        """Tell an event the archive applied (or rejected); after a candidate's evaluation, where the run stands
        (a status line, or on a terminal the block, which is brought up to date after every event)."""
        applied = result.outcome == Outcome.APPLIED and result.node is not None
        if applied and event.subject == "evt.trained":
            with self._lock:
                self._steps.pop((event.node_id, getattr(event, "replicate", 0)), None)
        if applied and self.live:
            self.refresh()
        for line in event_lines(event, result):
            self.say(line)
        if applied and not self.live and event.subject == "evt.evaluated" and not getattr(event, "replicate", 0):
            self.status_line()

    def on_step(self, work: WorkTrain, step: TrainingStep) -> None:
        with self._lock:
            self._steps[(work.node_id, work.replicate)] = step.step + 1
        if self.live:
            self.redraw()
        elif step.step % STEP_LINE_EVERY == STEP_LINE_EVERY - 1:
            reward = f"{step.reward_mean:.3f}" if step.reward_mean is not None else "-"
            tag = f" r{work.replicate}" if work.replicate else ""
            self.say(f"{work.node_id}{tag} step {step.step + 1}: reward {reward}")

    def refresh(self) -> RunStatus:
        """Read the run's status again and re-estimate the ETA."""
        status = run_status(self.store, self.config.run_id)
        now = time.monotonic()
        eta = run_eta(status, self.config, self.clock, now - self.started, self.workers)
        with self._lock:
            self._status, self._eta = status, (eta, now)
        return status

    def status_line(self) -> None:
        """One line: evaluated, the work in flight, failures, the best so far, agent-LLM spend, elapsed and ETA."""
        status = self.refresh()
        parts = [status.budget.text(), self._in_flight(status),
                 f"failed {status.counts.get(NodeStatus.FAILED, 0)}"]
        best = best_text(status)
        if best:
            parts.append(best)
        llm = status.llm
        if llm.calls:
            cap = f" of ${llm.cap_usd:.2f}" if llm.cap_usd is not None else ""
            parts.append(f"agent LLM ${llm.usd:.4f}{cap} ({llm.calls} requests)")
        parts.append(f"elapsed {clock_text(time.monotonic() - self.started)}")
        eta = eta_text(self._eta[0], self.finished)
        if eta:
            parts.append(eta)
        self.say(" · ".join(parts))

    def _in_flight(self, status: RunStatus) -> str:
        """The candidates in the pipeline (proposals asked for included), and the work being done and waiting per
        phase (fresh-seed trainings included)."""
        running = self._running()
        queued = self._queued()
        candidates = sum(status.counts.get(s, 0) for s in IN_FLIGHT)
        parts = []
        for phase in ("propose", *BLOCK_PHASES):
            now = sum(1 for r in running if r.phase == phase)
            waiting = queued.get(phase, 0)
            if phase == "propose":
                candidates += now + waiting
            if now or waiting:
                parts.append(f"{phase} {now}" + (f" (+{waiting} waiting)" if waiting else ""))
        return f"in flight: {candidates} candidate(s)" + (f" — {', '.join(parts)}" if parts else "")


def event_lines(event: Message, result: UpdateResult) -> list[str]:
    """The lines an applied (or rejected) event is told with."""
    if result.outcome != Outcome.APPLIED or result.node is None:
        if result.outcome == Outcome.REJECTED:
            return [f"{event.node_id}: {event.subject} rejected: {result.reason}"]
        return []
    node = result.node
    name = node.proposal.name
    replicate = getattr(event, "replicate", 0)
    if replicate:
        if event.subject == "evt.evaluated":
            evaluation = event.evaluation
            return [f"{node.node_id} {name}: fresh-seed replicate {replicate} (seed {evaluation.seed}): "
                    f"Overall {evaluation.overall:.4f}"]
        if event.subject != "evt.trained" or not result.next_work:
            return [f"{node.node_id} {name}: replicate {replicate}: {result.reason}"]
        return []
    lines = []
    match event.subject:
        case "evt.proposed":
            parents = ",".join(node.genealogy.parent_ids) or "none (root)"
            lines.append(f"{node.node_id} proposed: {name} (parent {parents}, depth {node.genealogy.depth}, by "
                         f"{node.proposal.generator}) — {shorten(node.proposal.rationale)}")
        case "evt.implemented" if node.implementation is not None:
            impl = node.implementation
            verdict = "verified" if impl.verified else "NOT verified"
            lines.append(f"{node.node_id} {verdict} after {len(impl.attempts)} attempt(s)")
        case "evt.trained" if node.trajectory is not None:
            t = node.trajectory
            last = t.steps[-1] if t.steps else None
            reward = f", reward {last.reward_mean:.3f}" if last and last.reward_mean is not None else ""
            lines.append(f"{node.node_id} trained {len(t.steps)} steps in {t.wall_s:.0f} s{reward}"
                         + (f" — aborted: {t.abort_reason}" if t.aborted else "")
                         + (f" — {t.stopped_early.reason}" if t.stopped_early else ""))
        case "evt.evaluated" if node.evaluation is not None:
            lines.append(f"{node.node_id} evaluated: Overall {node.evaluation.overall:.4f}, "
                         f"mean length {node.evaluation.mean_length:.1f}")
        case "evt.reflected" if node.reflection is not None:
            tags = ", ".join(node.reflection.diagnoses) or "no issues"
            lines.append(f"{node.node_id} reflected: {tags}")
    calls = getattr(event, "llm_calls", [])
    if calls:
        lines.append(f"{node.node_id} {event.subject}: {len(calls)} agent-LLM request(s), "
                     f"${sum(c.cost_usd for c in calls):.4f}; node total ${node.cost.llm_usd:.4f}")
    if node.status == NodeStatus.FAILED and node.failure is not None:
        lines.append(f"{node.node_id} FAILED in {node.failure.phase}: {node.failure.reason}")
    return lines


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
