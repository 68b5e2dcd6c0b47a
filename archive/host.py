"""The archive of the distributed mode: the `ArchiveService` of every active run behind one set of subscriptions.

`poise serve archive` (app/serve.py) builds one host; the runs it owns come from the store (every stored run
resumes at start-up), from `POISE_RUN_ID`, and from `POST /api/runs` (archive/api.py). Opening a run follows
the one rule of archive/runs.py, as `poise run` does.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Mapping
from typing import Any

from archive.runs import resolve_run
from archive.service import ArchiveService
from poise.bus import Bus
from poise.contracts import Backends, Message, RunConfig, RunRequest
from poise.metrics import METRICS
from poise.store import ArchiveStore

log = logging.getLogger("poise.archive")


class ArchiveHost:
    """The archive service of every active run behind one set of subscriptions (one per evt.* subject).

    Events, start-ups and HTTP requests for new runs all run on the bus loop's thread (`run_pending` between
    fetches), so each `ArchiveService` stays single-threaded, as in embedded mode.
    """

    def __init__(self, bus: Bus, store: ArchiveStore, backends: Backends) -> None:
        self.bus = bus
        self.store = store
        self.backends = backends
        self.runs: dict[str, ArchiveService] = {}
        self._pending: queue.SimpleQueue[RunConfig] = queue.SimpleQueue()

    def request(self, request: RunRequest) -> RunConfig:
        """POST /api/runs: store the run now (refusing conflicts), start it on the loop thread soon."""
        resolved = resolve_run(self.store, request.run_id, request.given(), self.backends)
        self._pending.put(resolved)
        return resolved

    def resume_all(self, run_id: str | None = None, given: Mapping[str, Any] | None = None) -> None:
        """At start-up: the run the environment describes starts (or resumes), and every stored run resumes."""
        if run_id is not None:
            resolve_run(self.store, run_id, given or {}, self.backends)
        for stored_id in self.store.run_ids():
            config = self.store.get_run(stored_id)
            if config is not None:
                self._pending.put(config)

    def run_pending(self) -> None:
        while True:
            try:
                config = self._pending.get_nowait()
            except queue.Empty:
                return
            self._activate(config)

    def _activate(self, config: RunConfig) -> None:
        service = self.runs.get(config.run_id)
        if service is not None:  # a running run whose budget or parallelism changed
            service.config = config
            service.pump()
            return
        service = ArchiveService(self.bus, self.store, config)
        self.runs[config.run_id] = service
        resumed = service.start()
        log.info("run %s %s (budget %d, protocol %s, seed %d)", config.run_id,
                 f"resumed: {resumed} piece(s) of work redone" if resumed else "started", config.budget,
                 config.protocol, config.seed)

    def _service_of(self, message: Message) -> ArchiveService | None:
        service = self.runs.get(message.run_id)
        if service is None:
            config = self.store.get_run(message.run_id)
            if config is None:
                log.warning("%s for %s/%s: no such run in the archive; dropped", message.subject, message.run_id,
                            message.node_id)
                return None
            self._activate(config)
            service = self.runs[message.run_id]
        return service

    def handle(self, event: Message) -> None:
        service = self._service_of(event)
        if service is not None:
            service.handle(event)

    def dead_letter(self, message: Message, reason: str) -> None:
        service = self._service_of(message)
        if service is not None:
            service.dead_letter(message, reason)
        else:
            METRICS.dead_letters.labels(subject=message.subject).inc()
