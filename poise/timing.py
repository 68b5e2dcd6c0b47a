"""Wall time spent inside each phase's real work, so orchestration overhead can be measured."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.first: dict[str, float] = {}  # each phase's first measurement, which pays start-up costs
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds[name] += elapsed
                self.counts[name] += 1
                self.first.setdefault(name, elapsed)

    def total(self) -> float:
        return sum(self.seconds.values())
