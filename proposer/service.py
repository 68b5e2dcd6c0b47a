"""The proposer bound to the bus: work.propose → evt.proposed (or evt.failed in phase propose).

It reads the archive through a read-only store view (in-process here, the archive's HTTP API when
distributed) and makes one child of the named parent with the baseline proposer (proposer/baseline.py).
"""

from __future__ import annotations

import random

from archive.store import ArchiveStore
from poise.bus import Bus
from poise.contracts import EvtFailed, EvtProposed, Failure, Phase, RunConfig, WorkPropose
from poise.metrics import FAILED, observed
from proposer.baseline import description_key, mutate


class ProposerService:
    subject = WorkPropose.subject
    backend = "baseline"

    def __init__(self, bus: Bus, archive: ArchiveStore) -> None:
        self.bus = bus
        self.archive = archive

    @observed("propose")
    def handle(self, work: WorkPropose) -> str | None:
        ids = {"run_id": work.run_id, "node_id": work.node_id, "attempt": work.attempt}
        config = self.archive.get_run(work.run_id)
        parent = self.archive.get_node(work.run_id, work.parent_ids[0])
        if config is None or parent is None:
            failure = Failure(phase=Phase.PROPOSE, reason=f"parent {work.parent_ids[0]} of run {work.run_id} "
                                                          "is not in the archive")
            self.bus.publish(EvtFailed(**ids, failure=failure))
            return FAILED
        try:
            proposal = propose_child(config, work, parent.proposal, self.archive)
        except ValueError as err:
            self.bus.publish(EvtFailed(**ids, failure=Failure(phase=Phase.PROPOSE, reason=str(err), detail=str(err))))
            return FAILED
        self.bus.publish(EvtProposed(**ids, proposal=proposal))


def propose_child(config: RunConfig, work: WorkPropose, parent, archive: ArchiveStore):
    """One mutation of the parent's description, new to the archive; deterministic in (run seed, node, attempt)."""
    rng = random.Random(f"{config.seed}/{work.node_id}/{work.attempt}")
    seen = {description_key(n.proposal) for n in archive.nodes(work.run_id)}
    child = mutate(parent, rng, seen)
    return child.model_copy(update={"parent_ids": list(work.parent_ids), "directive": config.objective.directive})
