"""The archive bound to the bus: the owner of a run.

It applies every `evt.*` with the update operator (archive/update.py), publishes the work that follows, and
keeps the pipeline full: the root (GRPO) first, trained with `root_seeds` seeds to measure the run's noise;
then children of parents chosen by the baseline selection while the budget (evaluated candidates) and
parallelism (candidates in flight) allow; finally, before a node is reported as the best, it is re-trained
with `replicate_seeds` fresh seeds. With `seeding="racing"` (docs/racing.md) the budget counts the children's
trainings, and before any new child is asked for, the racing rule (poise/racing.py) names the node that gets
the next extra seed, so a lucky single seed is checked before it becomes a parent.

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

from archive.status import best_score, children_trainings, report_arms
from archive.update import ArchiveUpdater, Outcome, RunAccounting, UpdateResult
from poise.bus import Bus
from poise.contracts import (
    ROOT_ID,
    SERVICE_ERROR,
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
    RunCounters,
    WorkPropose,
    WorkTrain,
    node_number,
)
from poise.description.proposals import root_proposal
from poise.faults import fault_point
from poise.metrics import DUPLICATE, METRICS, OK, REJECTED, backend_name, observed
from poise.racing import SEED_POLICIES, next_seed
from poise.scoring import confirmation_scores, pooled_sd, replicate_seed, report_seed, seed_scores, summarize
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
    replicates: set[tuple[str, int, str | None]]  # (node, replicate, report arm) trainings pending
    replicate_tries: Counter
    propose_failures: int = 0
    finished: bool = False
    confirming: bool = False  # the end of the run: the best is re-trained with fresh seeds
    race_view: tuple[tuple[int | None, int], list[NodeScore]] | None = None  # (clock, failed) → scores, racing
    stop_reason: str | None = None


def dead_letter_failure(message: Message, reason: str) -> EvtFailed | None:
    """The evt.failed that a dead-lettered work message means for its node; None for an event."""
    phase = PHASE_OF_WORK.get(message.subject)
    if phase is None:
        return None
    failure = Failure(phase=phase, reason=f"{phase} {SERVICE_ERROR}: {reason}", detail=reason)
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
            for work in self.updater.work_for(node, self.config):
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
        if not isinstance(event, EvtEvaluated) or event.arm:  # a report arm's score is not on the clock
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
            key = (event.node_id, replicate, getattr(event, "arm", None))
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
        self._check_stops(accounting, counters)
        policy = SEED_POLICIES[self.config.seeding]
        # The root counts towards nothing: the budget is the number of evaluated children (one seed each), or with
        # racing the children's trainings, extra seeds included.
        evaluated_children = accounting.evaluated - 1
        if policy.racing:
            racing, trainings_left = self._race(counters, in_flight)
        else:
            racing, trainings_left = False, self.config.budget - evaluated_children - in_flight
        next_number = 1 + max([counters.max_number, *map(node_number, self.state.proposals)])
        # A child is asked for only while the budget left can give it its policy's cap of seeds (one, without
        # racing), and with racing never while an extra seed is pending.
        while (self.state.stop_reason is None and in_flight < self.config.parallel and not racing
               and policy.affords_child(trainings_left)):
            node_id = f"n{next_number:03d}"
            # The proposer chooses the parent (lineage prioritization is part of the proposal operator).
            work = WorkPropose(run_id=self.run_id, node_id=node_id, attempt=1 + self.state.propose_failures,
                               as_of=self._evaluations)
            self.state.proposals[node_id] = work
            self.bus.publish(work)
            next_number += 1
            in_flight += 1
            trainings_left -= 1
        METRICS.set_in_flight(self.run_id, in_flight)
        if in_flight or self.state.replicates or racing:
            return
        if not policy.affords_child(trainings_left) or self.state.stop_reason:
            # A node waiting for its reflection is not in flight (it counts towards the budget, not the
            # parallelism) but not done either: the run finishes with its evt.reflected (or evt.failed).
            if (not self._confirm_best() and not self._report()
                    and not counters.counts.get(NodeStatus.EVALUATED, 0)):
                self._finish(self.state.stop_reason or "budget reached")

    def _check_stops(self, accounting: RunAccounting, counters: RunCounters) -> None:
        """Stop proposing after too many failures or once the agent-LLM cost cap is spent (the run goes on with
        what is in flight)."""
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

    # ------------------------------------------------------------------------------------ racing

    def _race_scores(self, counters: RunCounters) -> list[NodeScore]:
        """Every scored node in creation order, read again only when an evaluation landed or a node failed (racing
        reads the whole run's scores, once per change, not once per event)."""
        key = (self._evaluations, counters.counts.get(NodeStatus.FAILED, 0))
        if self.state.race_view is None or self.state.race_view[0] != key:
            scores = sorted(self.store.scores(self.run_id), key=lambda s: node_number(s.node_id))
            self.state.race_view = (key, scores)
        return self.state.race_view[1]

    def _race(self, counters: RunCounters, in_flight: int) -> tuple[bool, int]:
        """Racing (docs/racing.md): publish the extra seed the racing rule names, one at a time. Returns whether a
        children's seed is pending (no new child is asked for meanwhile: a node's next seed comes before its use
        as a parent) and the trainings left of the budget after everything in flight."""
        scores = self._race_scores(counters)
        pending = sum(1 for node_id, _, arm in self.state.replicates if node_id != ROOT_ID and arm is None)
        trainings_left = self.config.budget - children_trainings(counters, scores) - in_flight - pending
        if pending:
            return True, trainings_left
        if any(node_id == ROOT_ID for node_id, _, _ in self.state.replicates):
            return False, trainings_left  # the noise is not measured yet
        policy = SEED_POLICIES[self.config.seeding]
        noise = pooled_sd([seed_scores(s) for s in scores])
        if noise is None:
            return False, trainings_left
        # The root's seeds are not the budget's to give, and a node whose replicate was given up would stop
        # growing: both still rank, neither gets a seed.
        closed = {ROOT_ID} | {s.node_id for s in scores if self._given_up(s)}
        chosen = next_seed({s.node_id: seed_scores(s) for s in scores}, noise, policy.cap, trainings_left, policy.z,
                           closed)
        if chosen is None:
            return False, trainings_left
        node = self.store.get_node(self.run_id, chosen)
        if node is None or not self._replicate(node, len(node.replicates) + 1):
            return False, trainings_left
        log.info("run %s: racing gives %s its seed %d (noise SD %.4f)", self.run_id, chosen,
                 len(node.replicates) + 2, noise)
        return True, trainings_left - 1

    def _confirm_best(self) -> bool:
        """Re-train the best nodes by seed mean (their one seed, unless racing gave them more) with fresh seeds;
        True while such work is pending. Runs only once nothing is in flight at the end of the run, so reading
        every child's score is fine here."""
        children = [s for s in self.store.scores(self.run_id) if s.node_id != ROOT_ID]
        ranked = sorted(children, key=lambda s: -_seed_mean(s))
        confirmed = [s for s in ranked
                     if len(s.replicate_utilities) + self._given_up(s) >= self.config.replicate_seeds]
        confirmed_ids = {s.node_id for s in confirmed}
        best_mean = max((summarize(confirmation_scores(s)).mean for s in confirmed), default=float("-inf"))
        for score in ranked:
            if len(confirmed) >= MAX_CONFIRMED:
                break
            if score.node_id in confirmed_ids:
                continue
            if _seed_mean(score) <= best_mean:
                break  # no unconfirmed node could beat the confirmed best
            node = self.store.get_node(self.run_id, score.node_id)
            self.state.confirming = True
            return node is not None and self._replicate(node, self.config.replicate_seeds)
        return False

    def _given_up(self, node: Node | NodeScore) -> int:
        return sum(1 for (nid, _, arm), tries in self.state.replicate_tries.items()
                   if nid == node.node_id and arm is None and tries >= MAX_REPLICATE_TRIES)

    def _replicate(self, node: Node, wanted: int) -> bool:
        """Publish the missing fresh-seed re-trainings of `node`; True if any is pending."""
        if node.implementation is None:
            return False
        have = {r.seed for r in node.replicates}
        pending = False
        for i in range(1, wanted + 1):
            seed = replicate_seed(self.config.seed, i)
            key = (node.node_id, i, None)
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

    def _report(self) -> bool:
        """The report (docs/reporting.md): once the best is confirmed, it, GRPO and each ablation of the best are
        trained on the same `report_seeds` fresh seeds and scored on the reporting half; True while such work is
        pending. The runs are stored on the best node (`Node.reported`); a training that fails twice is given up
        (fewer seeds)."""
        if not self.config.report_seeds:
            return False
        best = best_score(self.store, self.run_id)
        if best is None or best.node_id == ROOT_ID:
            return False  # GRPO is the best: nothing to report against it
        node = self.store.get_node(self.run_id, best.node_id)
        root = self.store.get_node(self.run_id, ROOT_ID)
        if node is None or node.implementation is None or root is None or root.implementation is None:
            return False
        stored = {(r.arm, r.evaluation.seed) for r in node.reported}
        pending = False
        for arm, source in report_arms(node, root).items():
            for k in range(1, self.config.report_seeds + 1):
                seed = report_seed(self.config.seed, k)
                key = (node.node_id, k, arm)
                if (arm, seed) in stored or self.state.replicate_tries[key] >= MAX_REPLICATE_TRIES:
                    continue
                pending = True
                if key in self.state.replicates:
                    continue
                self.state.replicates.add(key)
                self.bus.publish(WorkTrain(run_id=self.run_id, node_id=node.node_id, replicate=k, arm=arm,
                                           attempt=1 + self.state.replicate_tries[key], source=source,
                                           protocol=self.config.protocol, seed=seed))
        return pending

    def _finish(self, reason: str) -> None:
        self.state.finished = True
        self.state.stop_reason = reason
        log.info("run %s finished: %s", self.run_id, reason)


def _seed_mean(score: NodeScore) -> float:
    """The mean of a node's finite seed scores; -inf when it has none (ranked last)."""
    scores = seed_scores(score)
    return sum(scores) / len(scores) if scores else float("-inf")
