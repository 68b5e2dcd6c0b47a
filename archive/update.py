"""The archive update operator U: every `evt.*` applied to its node as an idempotent state transition.

A node moves proposed → implemented → trained → evaluated → reflected, or to failed from any step
before reflected. Delivery is at-least-once, so `ArchiveUpdater.apply` sorts each event into:

- applied: the node moved (or gained a replicate evaluation); `next_work` is what to publish next;
- duplicate: the node already reached what the event reports; nothing is written. If the node still
  waits at that status, `next_work` repeats the follow-up work (its msg_id is the same, so a bus with
  publish dedupe drops it, and a crash between writing and publishing loses nothing);
- rejected: unknown run or node, out of order, or stale; logged to "poise.archive" with the reason.

`apply` never raises for a bad event; only a storage failure (`ArchiveError`) escapes, so the caller
can leave the message unacknowledged and have it redelivered.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from enum import StrEnum

from pydantic import ValidationError

from archive.early_stop import StopPlanner
from poise import objective
from poise.contracts import (
    EVENT_STATUS,
    PIPELINE,
    STATUS_PART,
    Cost,
    EvtEvaluated,
    EvtFailed,
    EvtImplemented,
    EvtProposed,
    EvtReflected,
    EvtTrained,
    Failure,
    Genealogy,
    Half,
    Implementation,
    Message,
    Node,
    NodeStatus,
    Phase,
    Proposal,
    ReportedRun,
    RunConfig,
    RunCounters,
    WorkEvaluate,
    WorkImplement,
    WorkReflect,
    WorkTrain,
    can_transition,
    utc_now,
)
from poise.llm.cost import llm_cost
from poise.store import ArchiveError, ArchiveStore

log = logging.getLogger("poise.archive")

STOPPED_EARLY = "stopped early"  # how the failure reason of a node the trainer stopped early begins
IN_FLIGHT: frozenset[NodeStatus] = frozenset({NodeStatus.PROPOSED, NodeStatus.IMPLEMENTED, NodeStatus.TRAINED})
# The phase a node at each status is waiting on: the only phase whose failure can fail it now.
PENDING_PHASE: dict[NodeStatus, Phase] = {
    NodeStatus.PROPOSED: Phase.IMPLEMENT,
    NodeStatus.IMPLEMENTED: Phase.TRAIN,
    NodeStatus.TRAINED: Phase.EVALUATE,
    NodeStatus.EVALUATED: Phase.REFLECT,
}


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True)
class UpdateResult:
    """What one event did: the outcome, why, the node's document afterwards, and the work to publish."""

    outcome: Outcome
    reason: str
    node: Node | None = None
    next_work: tuple[Message, ...] = ()


@dataclass(frozen=True)
class RunAccounting:
    """Where a run stands against its budget (evaluated candidates) and parallelism (candidates in flight)."""

    evaluated: int
    in_flight: int
    failed: int
    budget: int
    parallel: int
    can_propose: bool


def next_work(node: Node, config: RunConfig) -> tuple[Message, ...]:
    """The work a node at its current status waits for (empty once it is reflected or failed)."""
    ids = {"run_id": node.run_id, "node_id": node.node_id}
    match node.status:
        case NodeStatus.PROPOSED:
            return (WorkImplement(**ids, proposal=node.proposal),)
        case NodeStatus.IMPLEMENTED if node.implementation is not None:
            return (WorkTrain(**ids, source=node.implementation.source, protocol=config.protocol, seed=config.seed),)
        case NodeStatus.TRAINED if node.trajectory is not None and node.trajectory.checkpoint_uri is not None:
            uri = node.trajectory.checkpoint_uri
            return (WorkEvaluate(**ids, checkpoint_uri=uri, protocol=config.protocol, seed=config.seed,
                                 half=selection_half(config)),)
        case NodeStatus.EVALUATED:
            return (WorkReflect(**ids, parent_ids=node.genealogy.parent_ids),)
    return ()


def _verification_failure(impl: Implementation) -> str:
    """One line: how many attempts, and the first failing check (or coder error) of the last one."""
    if not impl.attempts:
        return "the implementer reported an unverified implementation without attempts"
    last = impl.attempts[-1]
    if last.error and last.passed is False and all(c.passed for c in last.checks):
        # the coder could not go on (no module written, no agent-LLM answer, the spend cap): not a check failure
        return f"implementation ended at attempt {last.attempt}: {last.error}"
    failing = next((c for c in last.checks if not c.passed), None)
    what = f"{failing.name}: {failing.message}" if failing else (last.error or "no check passed")
    return f"verification failed after {len(impl.attempts)} attempt(s): {what}"


def _verification_detail(impl: Implementation) -> str:
    lines = []
    for attempt in impl.attempts:
        lines.append(f"attempt {attempt.attempt}: {'passed' if attempt.passed else 'failed'}"
                     + (f" — {attempt.error}" if attempt.error else ""))
        lines += [f"  {c.name}: {c.message}" for c in attempt.checks if not c.passed]
    return "\n".join(lines)[-4000:]


def _advance(node: Node, event: Message | None = None, **changes: object) -> Node:
    """A validated copy of `node` with `changes` (model_copy would skip the status/parts invariants), and the
    agent-LLM requests `event` made booked on it."""
    calls = list(getattr(event, "llm_calls", None) or [])
    if calls:
        changes["llm_calls"] = [*node.llm_calls, *calls]
        changes["cost"] = node.cost.add(llm_cost(calls))
    return Node(**{**dict(node), **changes, "updated_at": utc_now()})


def _with_gpu_seconds(node: Node, event: EvtTrained) -> Cost:
    """The node's cost with the GPU-seconds its training held booked on it."""
    return node.cost.add(Cost(gpu_seconds=event.gpu_seconds)) if event.gpu_seconds else node.cost


def _reached(node: Node, status: NodeStatus) -> bool:
    """True if the node already holds what an event announcing pipeline `status` would bring.

    A failed node has reached a status if it kept that phase's part (e.g. training without a checkpoint).
    """
    if node.status == NodeStatus.FAILED:
        return getattr(node, STATUS_PART[status]) is not None
    return PIPELINE.index(node.status) >= PIPELINE.index(status)


def selection_half(config: RunConfig) -> Half:
    """The problems a run's selection scores (docs/reporting.md): the selection half when the run is split."""
    return "selection" if config.split else "all"


def reporting_half(config: RunConfig) -> Half:
    """The problems a run's report scores: the reporting half when the run is split (else all, on fresh seeds)."""
    return "reporting" if config.split else "all"


class ArchiveUpdater:
    """The single writer of a store's nodes: applies events, and accounts for each run's budget."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store
        self._lock = threading.Lock()  # one event at a time: read-modify-write of a node is not split
        self.planner = StopPlanner(store)

    def work_for(self, node: Node, config: RunConfig) -> tuple[Message, ...]:
        """`next_work`, a child's training with its early-stopping plan (archive/early_stop.py)."""
        return self.planner.attach(next_work(node, config), node, config)

    def apply(self, event: Message) -> UpdateResult:
        """Apply one event to its node; never raises for a bad event (see the module docstring)."""
        with self._lock:
            try:
                result = self._apply(event)
                if result is None:  # lost a compare-and-set to another writer: judge again on fresh state
                    result = self._apply(event) or self._reject(event, "the node kept changing under this update")
            except ValueError as err:  # the event's content breaks a contract invariant (pydantic or Genealogy)
                why = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
                result = self._reject(event, f"the result does not fit the node: {why}")
            if result.outcome == Outcome.APPLIED and isinstance(event, EvtEvaluated) and result.node is not None:
                result = replace(result, node=self._stamp(result.node))
        level = logging.WARNING if result.outcome == Outcome.REJECTED else logging.INFO
        log.log(level, "%s %s/%s: %s — %s", event.subject, event.run_id, event.node_id, result.outcome, result.reason)
        return result

    def _stamp(self, changed: Node) -> Node:
        """Stamp the objective's utility on `changed` after it gained an evaluation; when `changed` is the root,
        the yardstick moved, so every evaluated node of the run is stamped again (poise/objective.py)."""
        config = self.store.get_run(changed.run_id)
        if config is None or config.objective.kind == "overall":
            return changed
        is_root = not changed.genealogy.parent_ids
        root = changed if is_root else self.store.get_node(changed.run_id, changed.genealogy.ancestors[0])
        stick = objective.yardstick(root)
        targets = [n for n in self.store.nodes(changed.run_id) if n.evaluation is not None] if is_root else [changed]
        result = changed
        for node in targets:
            for _ in range(3):  # a compare-and-set lost to another writer: read the node again
                new = objective.stamped_node(node, config.objective, stick)
                if new is node or self.store.transition(node.run_id, node.node_id, node.status, new):
                    break
                node = self.store.get_node(node.run_id, node.node_id) or node
            if node.node_id == changed.node_id:
                result = new
        return result

    def accounting(self, run_id: str) -> RunAccounting:
        """Budget counts nodes that carry an evaluation; in flight are those not yet evaluated nor failed."""
        config = self.store.get_run(run_id)
        if config is None:
            raise ArchiveError(f"no run {run_id!r} in the archive; start it before asking for its accounting")
        return self.accounting_of(config, self.store.counters(run_id))

    @staticmethod
    def accounting_of(config: RunConfig, counters: RunCounters) -> RunAccounting:
        """The accounting of a run whose counters the caller has already read."""
        evaluated = counters.evaluated
        in_flight = sum(counters.counts[s] for s in IN_FLIGHT)
        return RunAccounting(
            evaluated=evaluated,
            in_flight=in_flight,
            failed=counters.counts[NodeStatus.FAILED],
            budget=config.budget,
            parallel=config.parallel,
            can_propose=evaluated + in_flight < config.budget and in_flight < config.parallel,
        )

    # ------------------------------------------------------------------------------------- events

    def _apply(self, event: Message) -> UpdateResult | None:
        """The event's result, or None if a compare-and-set lost a race."""
        status = EVENT_STATUS.get(event.subject)
        if status is None:
            return self._reject(event, f"{event.subject} is not an event; the archive applies only evt.* messages")
        config = self.store.get_run(event.run_id)
        if config is None:
            return self._reject(event, f"unknown run {event.run_id!r}")
        node = self.store.get_node(event.run_id, event.node_id)
        if isinstance(event, EvtProposed):
            return self._proposed(event, config, node)
        if node is None:
            if isinstance(event, EvtFailed) and event.failure.phase == Phase.PROPOSE:
                return self._failed_proposal(event)
            return self._reject(event, f"unknown node {event.node_id!r} in run {event.run_id!r}")
        if isinstance(event, EvtFailed):
            return self._failed(event, node)
        if isinstance(event, EvtEvaluated) and event.arm:
            return self._reported(event, node)
        if isinstance(event, EvtTrained) and event.arm:
            return self._report_trained(event, node, config)
        if isinstance(event, EvtEvaluated) and event.replicate:
            return self._replicate(event, node)
        if isinstance(event, EvtTrained) and event.replicate:
            return self._replicate_trained(event, node, config)
        if _reached(node, status):
            work = self.work_for(node, config) if node.status == status else ()
            reason = f"node is {node.status} and holds its {STATUS_PART[status]}"
            return UpdateResult(Outcome.DUPLICATE, reason, node, work)
        if node.failure is not None:
            return self._reject(event, f"node failed in {node.failure.phase} ({node.failure.reason}); too late", node)
        if not can_transition(node.status, status):
            needed = PIPELINE[PIPELINE.index(status) - 1]
            return self._reject(event, f"node is {node.status}; {event.subject} applies to a {needed} node", node)
        return self._write(node, self._advanced(event, node, status), config)

    def _advanced(self, event: Message, node: Node, status: NodeStatus) -> Node:
        """The node after a pipeline event; a result that cannot go on fails the node instead."""
        match event:
            case EvtImplemented(implementation=impl) if not impl.verified:
                failure = Failure(phase=Phase.IMPLEMENT, reason=_verification_failure(impl),
                                  detail=_verification_detail(impl))
                return _advance(node, event, status=NodeStatus.FAILED, implementation=impl, failure=failure)
            case EvtImplemented(implementation=impl):
                return _advance(node, event, status=status, implementation=impl)
            case EvtTrained(trajectory=trajectory) if trajectory.stopped_early is not None:
                # Not evaluated as if complete: failed in train, its curve and the stop kept (docs/early_stopping.md).
                stop = trajectory.stopped_early
                reason = (f"{STOPPED_EARLY} after {stop.steps_run} of {stop.steps_planned} steps: P(reach parent "
                          f"{stop.parent_id}) {stop.probability:.3f}, predicted utility {stop.predicted:.4f} vs "
                          f"{stop.parent_utility:.4f}")
                failure = Failure(phase=Phase.TRAIN, reason=reason, detail=stop.reason)
                return _advance(node, status=NodeStatus.FAILED, trajectory=trajectory, failure=failure)
            case EvtTrained(trajectory=trajectory) if trajectory.checkpoint_uri is None:
                why = f" (aborted: {trajectory.abort_reason})" if trajectory.abort_reason else ""
                failure = Failure(phase=Phase.TRAIN, reason=f"training left no checkpoint to evaluate{why}")
                return _advance(node, status=NodeStatus.FAILED, trajectory=trajectory, failure=failure,
                                cost=_with_gpu_seconds(node, event))
            case EvtTrained(trajectory=trajectory):
                return _advance(node, status=status, trajectory=trajectory, cost=_with_gpu_seconds(node, event))
            case EvtEvaluated(evaluation=evaluation):
                return _advance(node, status=status, evaluation=evaluation)
            case EvtReflected(reflection=reflection):
                return _advance(node, event, status=status, reflection=reflection)
        raise AssertionError(f"unhandled event {event.subject}")  # EVENT_STATUS lists only the cases above

    def _proposed(self, event: EvtProposed, config: RunConfig, node: Node | None) -> UpdateResult | None:
        """Create the pre-assigned node, its lineage taken from the proposal's parents (none: a root)."""
        if node is not None:
            work = next_work(node, config) if node.status == NodeStatus.PROPOSED else ()
            return UpdateResult(Outcome.DUPLICATE, f"node is already {node.status}", node, work)
        parents = [self.store.get_node(event.run_id, p) for p in event.proposal.parent_ids]
        missing = [p for p, parent in zip(event.proposal.parent_ids, parents, strict=True) if parent is None]
        if missing:
            return self._reject(event, f"parents {missing} are not in run {event.run_id!r}")
        if parents:
            genealogy = Genealogy.child(event.node_id, [p.genealogy for p in parents if p is not None])
        else:
            genealogy = Genealogy(run_id=event.run_id, node_id=event.node_id)
        new = _advance(Node(genealogy=genealogy, proposal=event.proposal), event)
        if not self.store.insert_node(new):
            return None
        return UpdateResult(Outcome.APPLIED, f"proposed at depth {genealogy.depth}", new, next_work(new, config))

    def _failed_proposal(self, event: EvtFailed) -> UpdateResult | None:
        """A proposal that made no node. One that cost agent-LLM requests is kept as a failed node under its
        parents, so its spend stays on the record (and counts towards the run's cap) like any node's."""
        reason = f"no proposal was made: {event.failure.reason}"
        parents = [self.store.get_node(event.run_id, p) for p in event.parent_ids]
        if not event.llm_calls or not parents or any(p is None for p in parents):
            return UpdateResult(Outcome.APPLIED, reason)
        model = event.llm_calls[-1]
        proposal = Proposal(name=f"failed proposal {event.node_id}", rationale=event.failure.reason,
                            generator=f"{model.provider}:{model.model}", parent_ids=event.parent_ids)
        genealogy = Genealogy.child(event.node_id, [p.genealogy for p in parents if p is not None])
        new = _advance(Node(genealogy=genealogy, proposal=proposal), event, status=NodeStatus.FAILED,
                       failure=event.failure)
        if not self.store.insert_node(new):
            return None
        return UpdateResult(Outcome.APPLIED, f"{reason}; kept as a failed node with its {len(event.llm_calls)} "
                                             "agent-LLM request(s)", new)

    def _failed(self, event: EvtFailed, node: Node) -> UpdateResult | None:
        failure = event.failure
        if event.replicate:
            return UpdateResult(
                Outcome.APPLIED, f"replicate {event.replicate} failed ({failure.reason}); the node is unchanged", node
            )
        if node.failure is not None:
            return UpdateResult(Outcome.DUPLICATE, f"node already failed in {node.failure.phase}", node)
        pending = PENDING_PHASE.get(node.status)
        if failure.phase != pending:
            waiting = f"waits for {pending}" if pending else "is done"
            return self._reject(event, f"node is {node.status}, {waiting}; a failure in {failure.phase} is stale", node)
        return self._write(node, _advance(node, event, status=NodeStatus.FAILED, failure=failure), None)

    def _replicate_trained(self, event: EvtTrained, node: Node, config: RunConfig) -> UpdateResult:
        """A fresh-seed re-training of an evaluated node: nothing is stored; its checkpoint goes to evaluation."""
        trajectory = event.trajectory
        if node.evaluation is None or node.status == NodeStatus.FAILED:
            why = f"node is {node.status}; replicate {event.replicate} needs an evaluated node"
            return self._reject(event, why, node)
        if any(r.seed == trajectory.seed for r in node.replicates):
            return UpdateResult(Outcome.DUPLICATE, f"a replicate with seed {trajectory.seed} is stored", node)
        if trajectory.checkpoint_uri is None:
            why = trajectory.abort_reason or "no checkpoint"
            return UpdateResult(Outcome.APPLIED, f"replicate {event.replicate} training failed ({why})", node)
        work = WorkEvaluate(run_id=node.run_id, node_id=node.node_id, replicate=event.replicate,
                            checkpoint_uri=trajectory.checkpoint_uri, protocol=config.protocol, seed=trajectory.seed,
                            half=selection_half(config))
        reason = f"replicate {event.replicate} trained (seed {trajectory.seed})"
        return UpdateResult(Outcome.APPLIED, reason, node, (work,))

    def _replicate(self, event: EvtEvaluated, node: Node) -> UpdateResult | None:
        """A fresh-seed re-evaluation of an evaluated node; one per seed."""
        if node.evaluation is None or node.status == NodeStatus.FAILED:
            reason = f"node is {node.status}; replicate {event.replicate} needs an evaluated node"
            return self._reject(event, reason, node)
        if any(r.seed == event.evaluation.seed for r in node.replicates):
            return UpdateResult(Outcome.DUPLICATE, f"a replicate with seed {event.evaluation.seed} is stored", node)
        return self._write(node, _advance(node, replicates=[*node.replicates, event.evaluation]), None)

    def _report_trained(self, event: EvtTrained, node: Node, config: RunConfig) -> UpdateResult:
        """A report arm's training on a fresh seed (docs/reporting.md): nothing is stored; its checkpoint is scored
        on the reporting half."""
        trajectory = event.trajectory
        if node.evaluation is None or node.status == NodeStatus.FAILED:
            return self._reject(event, f"node is {node.status}; the report needs an evaluated node", node)
        if any(r.arm == event.arm and r.evaluation.seed == trajectory.seed for r in node.reported):
            return UpdateResult(Outcome.DUPLICATE, f"report arm {event.arm} seed {trajectory.seed} is stored", node)
        if trajectory.checkpoint_uri is None:
            why = trajectory.abort_reason or "no checkpoint"
            return UpdateResult(Outcome.APPLIED, f"report arm {event.arm} training failed ({why})", node)
        work = WorkEvaluate(run_id=node.run_id, node_id=node.node_id, replicate=event.replicate, arm=event.arm,
                            checkpoint_uri=trajectory.checkpoint_uri, protocol=config.protocol, seed=trajectory.seed,
                            half=reporting_half(config))
        return UpdateResult(Outcome.APPLIED, f"report arm {event.arm} trained (seed {trajectory.seed})", node, (work,))

    def _reported(self, event: EvtEvaluated, node: Node) -> UpdateResult | None:
        """A report arm's score on the reporting half; one per (arm, seed)."""
        if node.evaluation is None or node.status == NodeStatus.FAILED:
            return self._reject(event, f"node is {node.status}; the report needs an evaluated node", node)
        seed = event.evaluation.seed
        if any(r.arm == event.arm and r.evaluation.seed == seed for r in node.reported):
            return UpdateResult(Outcome.DUPLICATE, f"report arm {event.arm} seed {seed} is stored", node)
        run = ReportedRun(arm=event.arm, evaluation=event.evaluation)
        return self._write(node, _advance(node, reported=[*node.reported, run]), None)

    def _write(self, old: Node, new: Node, config: RunConfig | None) -> UpdateResult | None:
        """Compare-and-set `old` → `new` (None if another writer moved the node first).

        `config` is given when the new status has follow-up work to publish (not for a replicate).
        """
        if not self.store.transition(old.run_id, old.node_id, old.status, new):
            return None
        change = f"{old.status} → {new.status}" if old.status != new.status else f"{new.status}, updated"
        if new.failure is not None:
            change += f" ({new.failure.phase}: {new.failure.reason})"
        return UpdateResult(Outcome.APPLIED, change, new, self.work_for(new, config) if config else ())

    @staticmethod
    def _reject(event: Message, reason: str, node: Node | None = None) -> UpdateResult:
        return UpdateResult(Outcome.REJECTED, reason, node)
