"""The evaluator bound to the bus: work.evaluate → evt.evaluated (or evt.failed in phase evaluate).

It loads only the checkpoint's weights (safetensors), never candidate code, and scores them on the
protocol's held-out suites.
"""

from __future__ import annotations

from pathlib import Path

from evaluator.testbed import evaluate_checkpoint
from poise.bus import Bus
from poise.contracts import EvtEvaluated, EvtFailed, Failure, Phase, WorkEvaluate
from poise.metrics import FAILED, observed
from poise.testbed.protocol import get_protocol
from poise.timing import PhaseClock


class EvaluatorService:
    subject = WorkEvaluate.subject
    backend = "testbed"

    def __init__(self, bus: Bus, clock: PhaseClock | None = None) -> None:
        self.bus = bus
        self.clock = clock or PhaseClock()

    @observed("evaluate")
    def handle(self, work: WorkEvaluate) -> str | None:
        ids = {"run_id": work.run_id, "node_id": work.node_id, "attempt": work.attempt, "replicate": work.replicate}
        checkpoint = Path(work.checkpoint_uri)
        if not checkpoint.is_dir():
            failure = Failure(phase=Phase.EVALUATE, reason=f"checkpoint {checkpoint} does not exist")
            self.bus.publish(EvtFailed(**ids, failure=failure))
            return FAILED
        try:
            with self.clock.phase("evaluate"):
                evaluation, _ = evaluate_checkpoint(checkpoint, get_protocol(work.protocol), work.seed)
        except (OSError, ValueError) as err:  # an unreadable or corrupt checkpoint is this node's failure
            failure = Failure(phase=Phase.EVALUATE, reason=f"{type(err).__name__}: {err}", detail=repr(err))
            self.bus.publish(EvtFailed(**ids, failure=failure))
            return FAILED
        self.bus.publish(EvtEvaluated(**ids, evaluation=evaluation))
