"""The proposer bound to the bus: work.propose → evt.proposed (or evt.failed in phase propose).

It reads the archive through a read-only store view (in-process here, the archive's HTTP API when
distributed) and makes one child of the named parent. Offline (the default): with the baseline proposer
(proposer/baseline.py, one random mutation) for the greedy and random selections, or with Phase I
(parent_selection "poise": tiered context, a population of `population_size` proposals, screening by
consistency, fingerprint novelty and the UtilityGP's expected improvement over the parent;
proposer/screening.py `phase_one`). When the run names an
agent LLM for "propose", every selection mode goes through the LLM's Phase I instead (proposer/llm_agent.py):
the same context, the population from the model, the offline gates, and the "screen" LLM's verdicts when
the run has one. Fingerprints run in the sandbox and are cached under `fingerprint_dir`.

Every agent-LLM request made while handling a message rides on the event (`llm_calls`), a failed one too, so
the archive books its cost on the node. A model that gives no usable answer, an unreachable endpoint or the
run's spend cap fails the node in phase propose with a one-line reason; nothing raises out of `handle`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from poise.agents import Agents, default_agents
from poise.bus import Bus
from poise.contracts import EvtFailed, EvtProposed, Failure, Node, Phase, Proposal, RunConfig, WorkPropose
from poise.description.proposals import description_key
from poise.faults import fault_point
from poise.llm import LLMError, collect_calls
from poise.metrics import FAILED, observed
from poise.store import ArchiveStore
from proposer.baseline import mutate
from proposer.parents import choose_parent

if TYPE_CHECKING:  # the offline baseline path needs neither numpy nor scikit-learn
    from proposer.screening import Fingerprinter, ScreeningReport

log = logging.getLogger("poise.proposer")


class ProposerService:
    subject = WorkPropose.subject
    backend = "baseline"

    def __init__(self, bus: Bus, archive: ArchiveStore, fingerprint_dir: Path | None = None,
                 agents: Agents | None = None, fingerprinter: Fingerprinter | None = None) -> None:
        """`agents`: the LLM clients (this process's by default). `fingerprinter`: a FingerprintCache under
        `fingerprint_dir` by default, built on first use; tests pass one without a sandbox."""
        self.bus = bus
        self.archive = archive
        self.fingerprint_dir = fingerprint_dir
        self.agents = agents or default_agents()
        self._fingerprints = fingerprinter

    @observed("propose")
    def handle(self, work: WorkPropose) -> str | None:
        fault_point("proposer.received", f"{work.run_id}/{work.node_id}")
        ids = {"run_id": work.run_id, "node_id": work.node_id, "attempt": work.attempt}
        config = self.archive.get_run(work.run_id)
        # The whole archive, read once per proposal: parent choice, context, screening and duplicate keys share it.
        nodes = self.archive.nodes(work.run_id) if config is not None else []
        parent = self._parent(config, work, nodes) if config is not None else None
        if parent is None:
            named = f"parent {work.parent_ids[0]}" if work.parent_ids else "an evaluated parent"
            failure = Failure(phase=Phase.PROPOSE, reason=f"{named} of run {work.run_id} is not in the archive")
            self.bus.publish(EvtFailed(**ids, failure=failure))
            return FAILED
        work = work.model_copy(update={"parent_ids": [parent.node_id]})
        failure = None
        with collect_calls() as calls:
            try:
                if config.backends.llm_for("propose") != "offline":
                    proposal = self._propose_with_llm(config, work, parent, nodes)
                elif config.parent_selection == "poise":
                    proposal = self._propose_screened(config, work, parent, nodes)
                else:
                    proposal = propose_child(config, work, parent.proposal, nodes)
            except LLMError as err:
                from proposer.llm_agent import failure_reason

                failure = Failure(phase=Phase.PROPOSE, reason=failure_reason(err), detail=str(err))
                log.warning("%s: %s", work.node_id, failure.reason)
            except ValueError as err:
                failure = Failure(phase=Phase.PROPOSE, reason=str(err), detail=str(err))
        if failure is not None:
            self.bus.publish(EvtFailed(**ids, failure=failure, llm_calls=calls, parent_ids=list(work.parent_ids)))
            return FAILED
        fault_point("proposer.publish", f"{work.run_id}/{work.node_id}")
        self.bus.publish(EvtProposed(**ids, proposal=proposal, llm_calls=calls))

    @staticmethod
    def _parent(config: RunConfig, work: WorkPropose, nodes: list[Node]) -> Node | None:
        """The parent `work` names, or the one lineage prioritization chooses (proposer/parents.py)."""
        if work.parent_ids:
            return next((n for n in nodes if n.node_id == work.parent_ids[0]), None)
        try:
            return choose_parent(nodes, config, work.node_id, work.as_of)
        except ValueError as err:
            log.warning("%s: no parent: %s", work.node_id, err)
            return None

    def _propose_screened(self, config: RunConfig, work: WorkPropose, parent: Node, nodes: list[Node]) -> Proposal:
        """Phase I for one parent; ValueError (a failed proposal, with the rejections) when nothing passes."""
        from proposer.screening import phase_one

        rng = random.Random(f"{config.seed}/{work.node_id}/{work.attempt}")
        proposal, report, _ = phase_one(parent, nodes, config, rng, self._fingerprinter())
        return self._screened(proposal, report, config, work, parent)

    def _propose_with_llm(self, config: RunConfig, work: WorkPropose, parent: Node, nodes: list[Node]) -> Proposal:
        """Phase I with the run's propose LLM (and screen LLM, if any); LLMError or ValueError as above."""
        from proposer.context import build_context
        from proposer.llm_agent import llm_population, llm_screen
        from proposer.selection import UtilityGP

        spent = self.archive.counters(work.run_id).llm_usd  # kept by the archive: no pass over the nodes
        proposer = self.agents.client(config, "propose", spent_usd=spent)
        screener = self.agents.client(config, "screen", spent_usd=spent)
        context = build_context(parent, nodes, config)
        library_only = config.backends.llm_for("implement") == "offline"
        population = llm_population(proposer, context, config, library_only=library_only, node_id=work.node_id)
        gp = UtilityGP().fit(nodes)
        report = llm_screen(parent, population, nodes, context, config, self._fingerprinter(), screener=screener,
                            predictor=gp, incumbent=gp.incumbent(parent), node_id=work.node_id)
        by = f"screened by {screener.name} and the offline gates" if screener else "screened by the offline gates"
        return self._screened(report.best.proposal if report.best else None, report, config, work, parent, by)

    def _fingerprinter(self) -> Fingerprinter:
        if self._fingerprints is None:
            from proposer.fingerprint import FingerprintCache

            self._fingerprints = FingerprintCache(directory=self.fingerprint_dir)
        return self._fingerprints

    def _screened(self, proposal: Proposal | None, report: ScreeningReport, config: RunConfig, work: WorkPropose,
                  parent: Node, by: str | None = None) -> Proposal:
        """The winner with its screening summary; ValueError naming every rejection when there is none."""
        from proposer.selection import seed_mean

        if proposal is None:
            raise ValueError(f"no proposal passed screening: {report.summary()}")
        log.info("%s: %s", work.node_id, report.summary())
        screening = report.digest(screened_by=by, parent_utility=seed_mean(parent))
        return proposal.model_copy(update={"parent_ids": list(work.parent_ids), "directive": config.objective.directive,
                                           "screening": screening})


def propose_child(config: RunConfig, work: WorkPropose, parent: Proposal, nodes: list[Node]) -> Proposal:
    """One mutation of the parent's description, new to the archive's `nodes`; deterministic in (run seed, node,
    attempt)."""
    rng = random.Random(f"{config.seed}/{work.node_id}/{work.attempt}")
    seen = {description_key(n.proposal) for n in nodes}
    child = mutate(parent, rng, seen)
    return child.model_copy(update={"parent_ids": list(work.parent_ids), "directive": config.objective.directive})
