"""The proposer bound to the bus: work.propose → evt.proposed (or evt.failed in phase propose).

It reads the archive through a read-only store view (in-process here, the archive's HTTP API when
distributed) and makes one child of the named parent: with the baseline proposer (proposer/baseline.py, one
random mutation) for the greedy and random selections, or with Phase I (parent_selection "poise": tiered
context, a population of `population_size` proposals, screening by consistency, fingerprint novelty and the
descendant-gain GP; proposer/screening.py). Fingerprints run in the sandbox and are cached under
`fingerprint_dir`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from archive.store import ArchiveStore
from poise.bus import Bus
from poise.contracts import EvtFailed, EvtProposed, Failure, Node, Phase, Proposal, RunConfig, WorkPropose
from poise.metrics import FAILED, observed
from proposer.baseline import description_key, mutate

log = logging.getLogger("poise.proposer")


class ProposerService:
    subject = WorkPropose.subject
    backend = "baseline"

    def __init__(self, bus: Bus, archive: ArchiveStore, fingerprint_dir: Path | None = None) -> None:
        self.bus = bus
        self.archive = archive
        self.fingerprint_dir = fingerprint_dir
        self._fingerprints = None

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
            if config.parent_selection == "poise":
                proposal = self._propose_screened(config, work, parent)
            else:
                proposal = propose_child(config, work, parent.proposal, self.archive)
        except ValueError as err:
            self.bus.publish(EvtFailed(**ids, failure=Failure(phase=Phase.PROPOSE, reason=str(err), detail=str(err))))
            return FAILED
        self.bus.publish(EvtProposed(**ids, proposal=proposal))


    def _propose_screened(self, config: RunConfig, work: WorkPropose, parent: Node) -> Proposal:
        """Phase I for one parent; ValueError (a failed proposal, with the rejections) when nothing passes."""
        from proposer.fingerprint import FingerprintCache
        from proposer.screening import propose_screened
        from proposer.selection import DescendantGP, seed_mean

        if self._fingerprints is None:
            self._fingerprints = FingerprintCache(directory=self.fingerprint_dir)
        nodes = self.archive.nodes(work.run_id)
        gp = DescendantGP(config.weights).fit(nodes)
        rng = random.Random(f"{config.seed}/{work.node_id}/{work.attempt}")
        proposal, report, _ = propose_screened(parent, nodes, config, rng, self._fingerprints, predictor=gp)
        if proposal is None:
            raise ValueError(f"no proposal passed screening: {report.summary()}")
        log.info("%s: %s", work.node_id, report.summary())
        incumbent = seed_mean(parent)
        note = report.summary() + (f"; parent utility {incumbent:.4f}" if incumbent is not None else "")
        return proposal.model_copy(update={"parent_ids": list(work.parent_ids), "directive": config.objective.directive,
                                           "screening": note[:4000]})


def propose_child(config: RunConfig, work: WorkPropose, parent, archive: ArchiveStore):
    """One mutation of the parent's description, new to the archive; deterministic in (run seed, node, attempt)."""
    rng = random.Random(f"{config.seed}/{work.node_id}/{work.attempt}")
    seen = {description_key(n.proposal) for n in archive.nodes(work.run_id)}
    child = mutate(parent, rng, seen)
    return child.model_copy(update={"parent_ids": list(work.parent_ids), "directive": config.objective.directive})
