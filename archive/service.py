"""The archive bound to the bus: the owner of a run.

It applies every `evt.*` with the update operator (archive/update.py), publishes the work that follows, and
keeps the pipeline full: the root (GRPO) first, trained with `root_seeds` seeds to measure the run's noise;
then children of parents chosen by the baseline selection while the budget (evaluated candidates) and
parallelism (candidates in flight) allow; finally, before a node is reported as the best, it is re-trained
with `replicate_seeds` fresh seeds.

Resume: nothing about a run lives only in memory. `start()` rebuilds the pending work from the stored
nodes — every node not yet reflected or failed gets its next work again (in-flight work is redone), and
proposals that never reached the archive are asked for again under the same node id, which the
deterministic proposer turns into the same proposal.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from archive.status import best_score
from archive.update import ArchiveUpdater, Outcome, UpdateResult, next_work
from poise.bus import Bus
from poise.contracts import (
    ROOT_ID,
    EvtEvaluated,
    EvtFailed,
    EvtProposed,
    EvtTrained,
    Failure,
    Message,
    Node,
    NodeScore,
    NodeStatus,
    Phase,
    RunConfig,
    WorkPropose,
    WorkTrain,
    node_number,
)
from poise.description.proposals import root_proposal
from poise.faults import fault_point
from poise.metrics import DUPLICATE, METRICS, OK, REJECTED, backend_name, observed
from poise.scoring import confirmation_scores, replicate_seed, summarize
from poise.store import ArchiveError, ArchiveStore

log = logging.getLogger("poise.archive")

MAX_CONFIRMED = 2          # nodes re-trained with fresh seeds at the end of a run, best single-seed first
MAX_REPLICATE_TRIES = 2    # a replicate that fails this often is given up (the node keeps fewer seeds)
PHASE_OF_WORK = {"work.propose": Phase.PROPOSE, "work.implement": Phase.IMPLEMENT, "work.train": Phase.TRAIN,
                 "work.evaluate": Phase.EVALUATE, "work.reflect": Phase.REFLECT}
METRIC_OUTCOME = {Outcome.APPLIED: OK, Outcome.DUPLICATE: DUPLICATE, Outcome.REJECTED: REJECTED}


@dataclass
class RunState:
    """What the archive service is waiting for, beyond what the stored nodes say."""

    proposals: dict[str, WorkPropose]
    replicates: set[tuple[str, int]]
    replicate_tries: Counter
    propose_failures: int = 0
    finished: bool = False
    stop_reason: str | None = None


def dead_letter_failure(message: Message, reason: str) -> EvtFailed | None:
    """The evt.failed that a dead-lettered work message means for its node; None for an event."""
    phase = PHASE_OF_WORK.get(message.subject)
    if phase is None:
        return None
    failure = Failure(phase=phase, reason=f"{phase} service error: {reason}", detail=reason)
    return EvtFailed(run_id=message.run_id, node_id=message.node_id, attempt=message.attempt,
                     replicate=getattr(message, "replicate", 0), failure=failure)


def evaluation_clock(nodes: list[Node]) -> int:
    """The run's evaluation clock from its stored nodes: the highest `archive_seq`, or the number of evaluations
    when some were stored before stamps existed (their stamp-less evaluations stay visible to every request)."""
    evaluations = [e for n in nodes for e in ((n.evaluation,) if n.evaluation else ()) + tuple(n.replicates)]
    return max([len(evaluations), *(e.archive_seq or 0 for e in evaluations)])


class ArchiveService:
    def __init__(self, bus: Bus, store: ArchiveStore, config: RunConfig,
                 on_result: Callable[[Message, UpdateResult], None] | None = None) -> None:
        self.bus = bus
        self.store = store
        self.config = config
        self.updater = ArchiveUpdater(store)
        self._evaluations: int | None = None  # the run's stored evaluations, the clock of `Evaluation.archive_seq`
        self._gpu_seconds: float | None = None  # held by the run's trainings (nodes' cost + replicates since start)
        self.state = RunState(proposals={}, replicates=set(), replicate_tries=Counter())
        self.on_result = on_result
        self.backend = backend_name(store)

    @property
    def run_id(self) -> str:
        return self.config.run_id

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Publish the root or the work every stored node waits for; returns how many nodes are resumed."""
        nodes = self.store.nodes(self.run_id)
        self._evaluations = evaluation_clock(nodes)
        self._gpu_seconds = sum(node.cost.gpu_seconds for node in nodes)
        if not nodes:
            proposal = root_proposal().model_copy(update={"directive": self.config.objective.directive})
            self.bus.publish(EvtProposed(run_id=self.run_id, node_id=ROOT_ID, proposal=proposal))
            return 0
        resumed = 0
        for node in nodes:
            for work in next_work(node, self.config):
                self.bus.publish(work)
                resumed += 1
        self.pump()
        return resumed

    def gpu_seconds(self) -> float:
        """GPU-seconds the run's trainings held: booked on its nodes (read once), plus replicates since start."""
        if self._gpu_seconds is None:
            self._gpu_seconds = sum(node.cost.gpu_seconds for node in self.store.nodes(self.run_id))
        return self._gpu_seconds

    @observed("update")
    def handle(self, event: Message) -> str:
        """Apply one event, publish what follows, and refill the pipeline."""
        event = self._stamped(event)
        result = self.updater.apply(event)
        if result.outcome == Outcome.APPLIED:
            fault_point("archive.publish", f"{event.subject} {event.run_id}/{event.node_id}")
        if isinstance(event, EvtEvaluated) and result.outcome == Outcome.APPLIED:
            self._evaluations = event.evaluation.archive_seq
        if isinstance(event, EvtTrained) and result.outcome == Outcome.APPLIED:
            counted = self._gpu_seconds is not None
            total = self.gpu_seconds()  # read now, it holds this booking (a replicate's is on no node)
            if counted or event.replicate:
                self._gpu_seconds = total + event.gpu_seconds
        self._settle(event, result)
        for work in result.next_work:
            self.bus.publish(work)
        if self.on_result:
            self.on_result(event, result)
        self.pump()
        self._observe(event, result)
        return METRIC_OUTCOME[result.outcome]

    def _stamped(self, event: Message) -> Message:
        """An evaluation gets the next tick of the run's evaluation clock (kept only if the event applies)."""
        if not isinstance(event, EvtEvaluated):
            return event
        if self._evaluations is None:  # handle() before start(): read the clock once
            self._evaluations = evaluation_clock(self.store.nodes(self.run_id))
        evaluation = event.evaluation.model_copy(update={"archive_seq": self._evaluations + 1})
        return event.model_copy(update={"evaluation": evaluation})

    def dead_letter(self, message: Message, reason: str) -> None:
        """A message no handler could process: its node fails in that phase (NATS dead-letter equivalent)."""
        METRICS.dead_letters.labels(subject=message.subject).inc()
        failed = dead_letter_failure(message, reason)
        if failed is None:
            log.error("event %s for %s could not be applied: %s", message.subject, message.node_id, reason)
            return
        self.handle(failed)

    def _settle(self, event: Message, result: UpdateResult) -> None:
        """Forget the pending proposal or replicate this event answers."""
        if event.subject in ("evt.proposed", "evt.failed") and not getattr(event, "replicate", 0):
            if event.node_id in self.state.proposals:
                if isinstance(event, EvtFailed) and event.failure.phase == Phase.PROPOSE:
                    self.state.propose_failures += 1
                del self.state.proposals[event.node_id]
        replicate = getattr(event, "replicate", 0)
        if replicate:
            key = (event.node_id, replicate)
            ended = event.subject in ("evt.evaluated", "evt.failed") or (
                event.subject == "evt.trained" and not result.next_work)
            if ended and key in self.state.replicates:
                self.state.replicates.discard(key)
                if event.subject != "evt.evaluated" or result.outcome == Outcome.REJECTED:
                    self.state.replicate_tries[key] += 1

    def _observe(self, event: Message, result: UpdateResult) -> None:
        """The run-level metrics an applied evaluation changes: candidates evaluated, best utility."""
        if event.subject != "evt.evaluated" or result.outcome != Outcome.APPLIED:
            return
        if not getattr(event, "replicate", 0):
            METRICS.evaluated_candidates.inc()
        try:
            best = best_score(self.store, event.run_id)
        except ArchiveError as err:  # a metric must never fail the event it describes
            log.warning("best utility of run %s not updated: %s", event.run_id, err)
            return
        summary = summarize(confirmation_scores(best, best.node_id == ROOT_ID)) if best is not None else None
        if summary is not None:
            METRICS.best_utility.set(summary.mean)

    # ------------------------------------------------------------------------------------ scheduling

    def pump(self) -> None:
        """Publish the proposals and replicates the run needs now; mark the run finished when it is done."""
        if self.state.finished:
            return
        # One document (the root) and the run's counters: the work per event does not grow with the archive.
        root = self.store.get_node(self.run_id, ROOT_ID)
        if root is None:
            return
        if root.status == NodeStatus.FAILED:
            self._finish(f"the root (GRPO) failed in {root.failure.phase}: {root.failure.reason}")
            return
        if root.evaluation is None:
            return
        self._replicate(root, self.config.root_seeds - 1)
        counters = self.store.counters(self.run_id)
        accounting = self.updater.accounting_of(self.config, counters)
        pending = len(self.state.proposals)
        in_flight = accounting.in_flight + pending
        if accounting.failed >= max(8, 2 * self.config.budget):
            self.state.stop_reason = f"{accounting.failed} candidates failed; stopped proposing"
        if self.state.propose_failures >= 5:
            self.state.stop_reason = f"the proposer failed {self.state.propose_failures} times; stopped proposing"
        cap = self.config.llm_budget_usd
        if cap is not None and self.state.stop_reason is None:
            spent = counters.llm_usd  # a failed proposal that cost requests is a node too
            if spent >= cap:
                self.state.stop_reason = (f"the agent-LLM cost cap is reached (${spent:.4f} of ${cap:.2f}); "
                                          "stopped proposing")
        gpu_cap = self.config.gpu_hours_budget
        if gpu_cap is not None and self.state.stop_reason is None and self.gpu_seconds() / 3600 >= gpu_cap:
            self.state.stop_reason = (f"the GPU-hours budget is reached ({self.gpu_seconds() / 3600:.2f} of "
                                      f"{gpu_cap:g} GPU-hours of training); stopped proposing")
        # The root counts towards nothing: the budget is the number of evaluated children.
        evaluated_children = accounting.evaluated - 1
        next_number = 1 + max([counters.max_number, *map(node_number, self.state.proposals)])
        while (self.state.stop_reason is None and evaluated_children + in_flight < self.config.budget
               and in_flight < self.config.parallel):
            node_id = f"n{next_number:03d}"
            # The proposer chooses the parent (lineage prioritization is part of the proposal operator).
            work = WorkPropose(run_id=self.run_id, node_id=node_id, attempt=1 + self.state.propose_failures,
                               as_of=self._evaluations)
            self.state.proposals[node_id] = work
            self.bus.publish(work)
            next_number += 1
            in_flight += 1
        METRICS.set_in_flight(self.run_id, in_flight)
        if in_flight or self.state.replicates:
            return
        if evaluated_children >= self.config.budget or self.state.stop_reason:
            # A node waiting for its reflection is not in flight (it counts towards the budget, not the
            # parallelism) but not done either: the run finishes with its evt.reflected (or evt.failed).
            if not self._confirm_best() and not counters.counts.get(NodeStatus.EVALUATED, 0):
                self._finish(self.state.stop_reason or "budget reached")

    def _confirm_best(self) -> bool:
        """Re-train the best single-seed nodes with fresh seeds; True while such work is pending. Runs only once
        nothing is in flight at the end of the run, so reading every child's score is fine here."""
        children = [s for s in self.store.scores(self.run_id) if s.node_id != ROOT_ID]
        ranked = sorted(children, key=lambda s: -(s.utility or float("-inf")))
        confirmed = [s for s in ranked
                     if len(s.replicate_utilities) + self._given_up(s) >= self.config.replicate_seeds]
        confirmed_ids = {s.node_id for s in confirmed}
        best_mean = max((summarize(confirmation_scores(s)).mean for s in confirmed), default=float("-inf"))
        for score in ranked:
            if len(confirmed) >= MAX_CONFIRMED:
                break
            if score.node_id in confirmed_ids:
                continue
            if (score.utility or float("-inf")) <= best_mean:
                break  # no unconfirmed node could beat the confirmed best
            node = self.store.get_node(self.run_id, score.node_id)
            return node is not None and self._replicate(node, self.config.replicate_seeds)
        return False

    def _given_up(self, node: Node | NodeScore) -> int:
        return sum(1 for (nid, _), tries in self.state.replicate_tries.items()
                   if nid == node.node_id and tries >= MAX_REPLICATE_TRIES)

    def _replicate(self, node: Node, wanted: int) -> bool:
        """Publish the missing fresh-seed re-trainings of `node`; True if any is pending."""
        if node.implementation is None:
            return False
        have = {r.seed for r in node.replicates}
        pending = False
        for i in range(1, wanted + 1):
            seed = replicate_seed(self.config.seed, i)
            key = (node.node_id, i)
            if seed in have or self.state.replicate_tries[key] >= MAX_REPLICATE_TRIES:
                continue
            pending = True
            if key in self.state.replicates:
                continue
            self.state.replicates.add(key)
            self.bus.publish(WorkTrain(run_id=self.run_id, node_id=node.node_id, replicate=i,
                                       attempt=1 + self.state.replicate_tries[key], source=node.implementation.source,
                                       protocol=self.config.protocol, seed=seed))
        return pending

    def _finish(self, reason: str) -> None:
        self.state.finished = True
        self.state.stop_reason = reason
        log.info("run %s finished: %s", self.run_id, reason)
