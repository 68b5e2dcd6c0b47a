"""The reflector bound to the bus: work.reflect → evt.reflected.

It reads the node, its first parent and the run's root through a read-only archive view, and passes the
run's seed noise (the root's seed SD) so verdicts are judged against noise, not bootstrap width alone.
"""

from __future__ import annotations

from archive.store import ArchiveStore
from poise.bus import Bus
from poise.contracts import EvtFailed, EvtReflected, Failure, Phase, WorkReflect
from poise.metrics import FAILED, observed
from poise.scoring import seed_scores, summarize
from reflector.core import reflect


class ReflectorService:
    subject = WorkReflect.subject
    backend = "offline"

    def __init__(self, bus: Bus, archive: ArchiveStore) -> None:
        self.bus = bus
        self.archive = archive

    @observed("reflect")
    def handle(self, work: WorkReflect) -> str | None:
        ids = {"run_id": work.run_id, "node_id": work.node_id, "attempt": work.attempt}
        node = self.archive.get_node(work.run_id, work.node_id)
        if node is None:
            self.bus.publish(EvtFailed(**ids, failure=Failure(phase=Phase.REFLECT, reason="node not in the archive")))
            return FAILED
        parent = self.archive.get_node(work.run_id, work.parent_ids[0]) if work.parent_ids else None
        root_id = node.genealogy.ancestors[0] if node.genealogy.ancestors else node.node_id
        root = self.archive.get_node(work.run_id, root_id)
        noise = summarize(seed_scores(root)) if root is not None else None
        reflection = reflect(node, parent, root, noise_sd=noise.sd if noise else None)
        self.bus.publish(EvtReflected(**ids, reflection=reflection))
