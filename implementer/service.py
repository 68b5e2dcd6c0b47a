"""The implementer bound to the bus: work.implement → evt.implemented (verified or not).

An unverified implementation is still reported with evt.implemented, so every attempt and its report is
stored on the node; the archive fails the node with the summary of the last report.
"""

from __future__ import annotations

from pathlib import Path

from implementer.core import Coder, OfflineCoder, implement, sandbox_verifier
from poise.bus import Bus
from poise.contracts import EvtImplemented, WorkImplement
from poise.metrics import OK, REJECTED, observed
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol
from poise.timing import PhaseClock


class ImplementerService:
    subject = WorkImplement.subject

    def __init__(self, bus: Bus, workroot: Path, protocol: str, max_attempts: int = 3, coder: Coder | None = None,
                 verify_wall_s: float = 120.0, clock: PhaseClock | None = None) -> None:
        self.bus = bus
        self.workroot = workroot
        self.protocol = get_protocol(protocol)
        self.max_attempts = max_attempts
        self.coder = coder or OfflineCoder()
        self.verify_wall_s = verify_wall_s
        self.clock = clock or PhaseClock()
        self.backend = self.coder.name

    @observed("implement")
    def handle(self, work: WorkImplement) -> str:
        base = base_checkpoint(self.protocol.base_checkpoint)
        verifier = sandbox_verifier(base, self.workroot / work.node_id, self.protocol, wall_s=self.verify_wall_s)
        with self.clock.phase("implement"):
            implementation, summary = implement(work.proposal, self.coder, verifier, self.max_attempts)
        self.bus.publish(EvtImplemented(run_id=work.run_id, node_id=work.node_id, attempt=work.attempt,
                                        implementation=implementation))
        return OK if implementation.verified else REJECTED
