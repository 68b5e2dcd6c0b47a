"""The evaluator bound to the bus: work.evaluate → evt.evaluated (or evt.failed in phase evaluate).

It loads only the checkpoint's weights (safetensors), never candidate code, and scores them on the
protocol's held-out suites with its backend: the testbed sampler in this process, or a vLLM server
(evaluator/backends.py, docs/evaluation.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

from evaluator.backends import EvaluatorBackend
from poise.bus import Bus
from poise.contracts import EvtEvaluated, EvtFailed, Failure, Phase, WorkEvaluate
from poise.faults import fault_point
from poise.metrics import FAILED, observed
from poise.timing import PhaseClock

log = logging.getLogger("poise." + __name__)


class EvaluatorService:
    subject = WorkEvaluate.subject

    def __init__(self, bus: Bus, clock: PhaseClock | None = None, backend: EvaluatorBackend | None = None) -> None:
        if backend is None:
            from evaluator.testbed import TestbedEvaluator

            backend = TestbedEvaluator()
        self.bus = bus
        self.clock = clock or PhaseClock()
        self.backend = backend

    @observed("evaluate")
    def handle(self, work: WorkEvaluate) -> str | None:
        fault_point("evaluator.received", f"{work.run_id}/{work.node_id}")
        ids = {"run_id": work.run_id, "node_id": work.node_id, "attempt": work.attempt, "replicate": work.replicate,
               "arm": work.arm}
        checkpoint = Path(work.checkpoint_uri)
        if not checkpoint.is_dir():
            failure = Failure(phase=Phase.EVALUATE, reason=f"checkpoint {checkpoint} does not exist")
            self.bus.publish(EvtFailed(**ids, failure=failure))
            return FAILED
        try:
            with self.clock.phase("evaluate"):
                evaluation = self.backend.evaluate(checkpoint, work.protocol, work.seed, work.half)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            # an unreadable or corrupt checkpoint, a vLLM server that cannot start or answer, missing benchmark
            # data: this node's failure, with the reason; the run goes on
            log.warning("evaluation of %s failed: %s", work.node_id, err)
            failure = Failure(phase=Phase.EVALUATE, reason=f"{type(err).__name__}: {err}", detail=str(err)[:8000])
            self.bus.publish(EvtFailed(**ids, failure=failure))
            return FAILED
        fault_point("evaluator.publish", f"{work.run_id}/{work.node_id}")
        self.bus.publish(EvtEvaluated(**ids, evaluation=evaluation))
