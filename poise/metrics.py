"""The services' Prometheus metrics, on one registry (`REGISTRY`), and the helpers the services call.

Conventions (docs/operations.md, "Metrics"): names carry base units (`_seconds`, `_usd`), counters end in
`_total` (prometheus-client appends it), and every label value comes from a small closed set — phases,
outcomes, backends, bus subjects, LLM operators, providers and the configured models, token directions.
Node, run and job ids never become labels: a label value per candidate would grow the series without bound.

A service's `handle(message)` is wrapped with `@observed(phase)`: the wrapper times the call into
`poise_phase_duration_seconds{phase, backend}` and counts `poise_phase_outcomes_total{phase, outcome, backend}`.
The outcome is what the handler returns (`OK` when it returns None, e.g. `FAILED` after publishing
evt.failed), or `ERROR` when it raises (the bus redelivers the message). `backend` is the service's
`backend` attribute. Recording costs microseconds, so embedded mode records too; only `poise serve`
exposes the registry over HTTP.

Each phase has its own histogram buckets, because a proposal takes seconds and a training run hours
(one bucket set over both would make every quantile meaningless); the series still share one metric
name, told apart by the `phase` label.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Metric,
    PlatformCollector,
    ProcessCollector,
)

from poise.contracts import CallRecord, TrainingTrajectory

# Outcomes of a phase (the `outcome` label): a closed set.
OK = "ok"                # the phase did its work (the archive: the event was applied)
FAILED = "failed"        # the phase reported the node's failure (evt.failed)
REJECTED = "rejected"    # the implementer could not verify the candidate; the archive refused an event
ABORTED = "aborted"      # training stopped early (divergence, format collapse); the trajectory still counts
STOPPED = "stopped"      # training stopped early because it could not reach its parent (docs/early_stopping.md)
DUPLICATE = "duplicate"  # the archive had already applied this event (a redelivery)
ERROR = "error"          # the handler raised; the bus redelivers the message or dead-letters it
OUTCOMES = frozenset({OK, FAILED, REJECTED, ABORTED, STOPPED, DUPLICATE, ERROR})

_QUICK = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_MINUTES = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
_HOURS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
          57600.0, 86400.0)
PHASE_BUCKETS: dict[str, tuple[float, ...]] = {
    "propose": _QUICK,     # sub-second offline, minutes with an LLM
    "implement": _MINUTES,  # sandboxed verification, with up to a few corrections
    "train": _HOURS,        # seconds on the testbed's tiny protocol, hours on VERL
    "evaluate": _HOURS,
    "reflect": _QUICK,
    "update": _QUICK,       # the archive applying one event (store round trips)
}

H = TypeVar("H", bound=Callable)


class PhaseHistogram:
    """`poise_phase_duration_seconds{phase, backend}` with one bucket set per phase, as one metric family."""

    name = "poise_phase_duration_seconds"
    documentation = "Wall time of one phase's handling of one message"

    def __init__(self) -> None:
        # Unregistered histograms, one per phase; collect() merges them under one name with a phase label.
        self._by_phase = {
            phase: Histogram(self.name, self.documentation, ["backend"], buckets=buckets, registry=None)
            for phase, buckets in PHASE_BUCKETS.items()
        }

    def observe(self, phase: str, backend: str, seconds: float) -> None:
        self._by_phase[phase].labels(backend=backend).observe(seconds)

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "histogram")]

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, "histogram")
        for phase, histogram in self._by_phase.items():
            for metric in histogram.collect():
                for sample in metric.samples:
                    family.add_sample(sample.name, {"phase": phase, **sample.labels}, sample.value,
                                      sample.timestamp, sample.exemplar)
        yield family


class Metrics:
    """Every POISE metric, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.phase_duration = PhaseHistogram()
        registry.register(self.phase_duration)
        self.phase_outcomes = Counter("poise_phase_outcomes", "Messages handled, by phase and outcome",
                                      ["phase", "outcome", "backend"], registry=registry)
        self.candidates_in_flight = Gauge("poise_candidates_in_flight",
                                          "Candidates proposed but not yet evaluated or failed, over active runs",
                                          registry=registry)
        self.bus_redeliveries = Counter("poise_bus_redeliveries", "Messages delivered again after a nak or an "
                                        "ack timeout", ["subject"], registry=registry)
        self.dead_letters = Counter("poise_dead_letters", "Messages given up after max_deliver attempts",
                                    ["subject"], registry=registry)
        self.llm_tokens = Counter("poise_llm_tokens", "Agent-LLM tokens, by operator, model and direction (input, "
                                  "output, cache_read, cache_write)", ["operator", "provider", "model", "direction"],
                                  registry=registry)
        self.llm_cost_usd = Counter("poise_llm_cost_usd", "Agent-LLM spend in US dollars",
                                    ["operator", "provider", "model"], registry=registry)
        self.trainer_tokens_per_second = Gauge("poise_trainer_tokens_per_second", "Response tokens sampled per "
                                               "second of training step time, last finished run", ["backend"],
                                               registry=registry)
        self.evaluated_candidates = Counter("poise_evaluated_candidates", "Candidates evaluated (fresh-seed "
                                            "replicates excluded)", registry=registry)
        self.best_utility = Gauge("poise_best_utility", "Utility of the best node of the run updated last "
                                  "(seed mean once confirmed); NaN before the first evaluation", registry=registry)
        self.best_utility.set(math.nan)
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    def observe_phase(self, phase: str, backend: str, seconds: float, outcome: str) -> None:
        """One handled message: its wall time and outcome."""
        if phase not in PHASE_BUCKETS:
            raise ValueError(f"unknown phase {phase!r} for metrics; known: {', '.join(PHASE_BUCKETS)}")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r} for metrics; known: {', '.join(sorted(OUTCOMES))}")
        self.phase_duration.observe(phase, backend, seconds)
        self.phase_outcomes.labels(phase=phase, outcome=outcome, backend=backend).inc()

    def set_in_flight(self, run_id: str, count: int) -> None:
        """A run's candidates in flight; the gauge shows the sum over runs (the run id is no label)."""
        with self._lock:
            self._in_flight[run_id] = count
            self.candidates_in_flight.set(sum(self._in_flight.values()))

    def record_llm_call(self, call: CallRecord) -> None:
        """One agent-LLM request: its tokens by direction and its cost (operator checked by CallRecord)."""
        labels = {"operator": call.operator, "provider": call.provider, "model": call.model}
        for direction, tokens in (("input", call.input_tokens), ("output", call.output_tokens),
                                  ("cache_read", call.cache_read_tokens), ("cache_write", call.cache_write_tokens)):
            self.llm_tokens.labels(**labels, direction=direction).inc(tokens)
        self.llm_cost_usd.labels(**labels).inc(call.cost_usd)

    def record_training(self, backend: str, trajectory: TrainingTrajectory) -> None:
        rate = tokens_per_second(trajectory)
        if rate is not None:
            self.trainer_tokens_per_second.labels(backend=backend).set(rate)


def tokens_per_second(trajectory: TrainingTrajectory) -> float | None:
    """Response tokens sampled per second of step time (steps' `sample_tokens` extra); None if not logged."""
    tokens = [s.extra.get("sample_tokens") for s in trajectory.steps]
    seconds = [s.step_time_s for s in trajectory.steps]
    if not tokens or any(t is None for t in tokens) or any(s is None for s in seconds) or sum(seconds) <= 0:
        return None
    return sum(tokens) / sum(seconds)


def backend_name(component: object) -> str:
    """A component's backend label from its class: SQLiteStore -> sqlite, MongoStore -> mongo."""
    return type(component).__name__.removesuffix("Store").lower()


def _new_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, open fds (Linux)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


REGISTRY = _new_registry()
METRICS = Metrics(REGISTRY)


def observed(phase: str) -> Callable[[H], H]:
    """Decorate a service's `handle(self, message)`: record its duration and outcome under `phase`."""
    if phase not in PHASE_BUCKETS:
        raise ValueError(f"unknown phase {phase!r} for metrics; known: {', '.join(PHASE_BUCKETS)}")

    def decorate(handle: H) -> H:
        @functools.wraps(handle)
        def wrapper(self, message):
            started = time.perf_counter()
            outcome = ERROR
            try:
                outcome = handle(self, message) or OK
                return outcome
            finally:
                METRICS.observe_phase(phase, self.backend, time.perf_counter() - started, outcome)

        return wrapper  # type: ignore[return-value]

    return decorate
