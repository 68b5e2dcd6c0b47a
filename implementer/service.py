"""The implementer bound to the bus: work.implement → evt.implemented (verified or not).

An unverified implementation is still reported with evt.implemented, so every attempt and its report is
stored on the node; the archive fails the node with the summary of the last report.

The coder is the offline one unless the run names an agent LLM for "implement": then each node gets an
`LLMCoder` (implementer/llm_coder.py) that starts from the parent's verified module, read from the archive
(a read-only view: the store in-process, the archive's HTTP API when distributed). Every agent-LLM request
made for a node rides on its event (`llm_calls`), failed ones too, so the archive books the cost on the node.
"""

from __future__ import annotations

import logging
from pathlib import Path

from implementer.core import Coder, OfflineCoder, implement, sandbox_verifier
from implementer.llm_coder import LLMCoder
from poise.agents import Agents, default_agents
from poise.bus import Bus
from poise.contracts import EvtImplemented, RunConfig, WorkImplement
from poise.faults import fault_point
from poise.llm import collect_calls
from poise.metrics import OK, REJECTED, observed
from poise.store import ArchiveStore
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol
from poise.timing import PhaseClock

log = logging.getLogger("poise.implementer")


class ImplementerService:
    subject = WorkImplement.subject

    def __init__(self, bus: Bus, workroot: Path, protocol: str, max_attempts: int = 3, coder: Coder | None = None,
                 verify_wall_s: float = 120.0, clock: PhaseClock | None = None, config: RunConfig | None = None,
                 archive: ArchiveStore | None = None, agents: Agents | None = None) -> None:
        """`config`: the run, whose `implement` agent LLM (if any) writes the code; `archive`: where the parents'
        modules are read; `agents`: the LLM clients (this process's by default)."""
        self.bus = bus
        self.workroot = workroot
        self.protocol = get_protocol(protocol)
        self.max_attempts = max_attempts
        self.coder = coder or OfflineCoder()
        self.verify_wall_s = verify_wall_s
        self.clock = clock or PhaseClock()
        self.archive = archive
        self.llm = None
        if config is not None:
            # Seed the meter with what the run's nodes already spent, so a resumed run keeps to its cap.
            spent = (archive.counters(config.run_id).llm_usd
                     if archive is not None and config.llm_budget_usd is not None else None)
            self.llm = (agents or default_agents()).client(config, "implement", spent_usd=spent)
        self.backend = "llm" if self.llm is not None else self.coder.name

    def coder_for(self, work: WorkImplement) -> Coder:
        """The node's coder: the LLM coder when the run has one, except for the root, which is compiled offline
        (the yardstick must be GRPO exactly, not a model's rendering of it)."""
        if self.llm is None or not work.proposal.parent_ids:
            return self.coder
        return LLMCoder(self.llm, run_id=work.run_id, node_id=work.node_id, parent_source=self.parent_source(work))

    def parent_source(self, work: WorkImplement) -> str | None:
        """The verified module of the proposal's first parent, if the archive has one."""
        if self.archive is None or not work.proposal.parent_ids:
            return None
        parent = self.archive.get_node(work.run_id, work.proposal.parent_ids[0])
        implementation = parent.implementation if parent is not None else None
        return implementation.source if implementation is not None and implementation.verified else None

    @observed("implement")
    def handle(self, work: WorkImplement) -> str:
        fault_point("implementer.received", f"{work.run_id}/{work.node_id}")
        base = base_checkpoint(self.protocol.base_checkpoint)
        verifier = sandbox_verifier(base, self.workroot / work.node_id, self.protocol, wall_s=self.verify_wall_s)
        with collect_calls() as calls, self.clock.phase("implement"):
            implementation, summary = implement(work.proposal, self.coder_for(work), verifier, self.max_attempts)
        log.info("%s: %s", work.node_id, summary)
        fault_point("implementer.publish", f"{work.run_id}/{work.node_id}")
        self.bus.publish(EvtImplemented(run_id=work.run_id, node_id=work.node_id, attempt=work.attempt,
                                        implementation=implementation, llm_calls=list(calls)))
        return OK if implementation.verified else REJECTED
