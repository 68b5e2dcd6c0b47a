"""Which early-stopping plan a child's training gets (docs/early_stopping.md): the archive's side of
poise/early_stop.py.

A run's setting `early_stop` decides whether its children are stopped early: False never, True and None (the default)
yes, None only when the package holds a rule fitted for the run's protocol (poise/early_stop_rules.json). The rule is
the package's, or the run's own once its archive has as many (child, parent) pairs as the package's fit had (and at
least `MIN_PAIRS`): the archive refits it from its nodes after each new evaluation, when the next child is trained.
With neither, nothing is stopped. Only a child's own training gets a plan; the root and fresh-seed replicates never do.
"""

from __future__ import annotations

from poise.contracts import EarlyStopPlan, EarlyStopRule, Message, Node, RunConfig, WorkTrain
from poise.early_stop import MIN_PAIRS, fit_rule, packaged_rule, pairs_from_nodes, plan_for
from poise.store import ArchiveStore
from poise.testbed.protocol import PROTOCOLS


class StopPlanner:
    """Fits and caches each run's own rule, and builds the plan a child's WorkTrain carries."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store
        self._fits: dict[str, tuple[int, EarlyStopRule | None]] = {}  # run → (evaluations it was fitted at, fit)

    def rule(self, config: RunConfig) -> EarlyStopRule | None:
        """The rule the run's next child is judged by; None when the run does not stop early."""
        protocol = PROTOCOLS.get(config.protocol)
        if config.early_stop is False or protocol is None:
            return None
        packaged = packaged_rule(config.protocol)
        if config.early_stop is None and packaged is None:
            return None
        own = self._own(config, protocol.steps)
        needed = max([MIN_PAIRS, *(c.n for c in packaged.checkpoints)] if packaged else [MIN_PAIRS])
        if own is not None and own.checkpoints and min(c.n for c in own.checkpoints) >= needed:
            return own
        return packaged

    def _own(self, config: RunConfig, steps: int) -> EarlyStopRule | None:
        """The rule fitted on the run's own archive, refitted when it holds more evaluations than at the last fit
        (reading every node then: a cost that grows with the archive, as the proposer's does)."""
        evaluated = self.store.counters(config.run_id).evaluated
        cached = self._fits.get(config.run_id)
        if cached is None or cached[0] != evaluated:
            pairs = pairs_from_nodes(self.store.nodes(config.run_id))
            fit = fit_rule(pairs, config.protocol, steps,
                           source=f"run {config.run_id}'s own archive: {len(pairs)} (child, parent) pairs")
            cached = self._fits[config.run_id] = (evaluated, fit)
        return cached[1]

    def plan(self, node: Node, config: RunConfig) -> EarlyStopPlan | None:
        if not node.genealogy.parent_ids:
            return None
        rule = self.rule(config)
        if rule is None:
            return None
        parent = self.store.get_node(node.run_id, node.genealogy.parent_ids[0])
        root = self.store.get_node(node.run_id, node.genealogy.ancestors[0]) if node.genealogy.ancestors else None
        return plan_for(rule, parent, root)

    def attach(self, work: tuple[Message, ...], node: Node, config: RunConfig) -> tuple[Message, ...]:
        """`work` with the plan put on the child's own WorkTrain (a replicate's gets none)."""
        attached = []
        for message in work:
            if isinstance(message, WorkTrain) and not message.replicate and message.early_stop is None:
                plan = self.plan(node, config)
                if plan is not None:
                    message = message.model_copy(update={"early_stop": plan})
            attached.append(message)
        return tuple(attached)
