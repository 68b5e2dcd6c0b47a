"""The message bus the six services talk over: one subject per phase (docs/architecture.md, "Message flow").

`Bus` is the interface: `publish` a message, `subscribe` a handler to a subject. `InProcBus` is the embedded
implementation behind `poise run`: every message goes through `encode`/`decode` exactly as on NATS (so size
limits and contracts are checked the same way), is deduplicated by its deterministic `msg_id`, and waits in a
queue until `step()` hands it to its subscriber. `step()` takes the oldest message of the most advanced phase
first, so candidates already in the pipeline finish before new ones start.

By default the bus is single-threaded and deterministic: `step()` runs the handler and returns. With
`workers` > 1, the subjects named in `concurrent` (the heavy work: verification, training and evaluation,
whose time is spent in sandboxed children or in torch, outside the GIL) are handled on worker threads, at
most `workers` messages at once and at most `concurrent[subject]` of one subject, as the deployed services
would handle them side by side. Every other subject (the events, which the archive applies, and the light
work) is still handled by the thread that calls `step()`, one message at a time, and so are the retries and
dead letters of the threaded ones: a worker thread only runs its handler, which publishes the outcome. The
order in which threaded work finishes then depends on timing, so such a run is not reproducible message for
message. Worker threads are daemons: Ctrl-C ends the process without waiting for them (the sandboxed
children they wait on die with it, poise/forkserver.py), and the stored run resumes as after any stop.

Delivery is at-least-once, like JetStream: a handler that raises gets the message again, up to
`max_deliver` times; after that the bus calls its `dead_letter` callback (the archive marks the node
failed with the error, as it does for NATS's dead-letter stream) and goes on.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from poise.contracts import MESSAGE_TYPES, Message, decode, encode

log = logging.getLogger("poise.bus")

Handler = Callable[[Message], None]

# Delivery order of step(): events first (the archive turns them into work), then work of later phases.
DELIVERY_ORDER: tuple[str, ...] = (
    "evt.failed", "evt.reflected", "evt.evaluated", "evt.trained", "evt.implemented", "evt.proposed",
    "work.reflect", "work.evaluate", "work.train", "work.implement", "work.propose",
)


def register_handler(handlers: dict[str, Handler], subject: str, handler: Handler) -> None:
    """Add the one subscriber of `subject` (a bus's subscribe): ValueError for an unknown subject or a second
    subscriber."""
    if subject not in MESSAGE_TYPES:
        raise ValueError(f"unknown subject {subject!r}; known: {', '.join(MESSAGE_TYPES)}")
    if subject in handlers:
        raise ValueError(f"{subject} already has a subscriber; one consumer per subject")
    handlers[subject] = handler


class IncompatibleStream(RuntimeError):
    """The bus's server holds streams this service cannot use: written by contracts it cannot read, or declared
    with a configuration it cannot change. Retrying does not help, so `poise serve` stops with the message."""


class Bus(Protocol):
    def publish(self, message: Message) -> None: ...

    def subscribe(self, subject: str, handler: Handler) -> None: ...


@dataclass
class _Delivery:
    """A message taken from its queue: being handled, and how that ended (`error` from a worker thread)."""

    subject: str
    data: bytes
    delivery: int
    message: Message
    error: str | None = None
    trace: str = ""


class InProcBus:
    """In-process bus: queues per subject, publish dedupe by msg_id, bounded redelivery; optionally worker threads
    for the `concurrent` subjects (module docstring)."""

    def __init__(self, max_deliver: int = 3, dead_letter: Callable[[Message, str], None] | None = None,
                 workers: int = 1, concurrent: Mapping[str, int] | None = None) -> None:
        self.max_deliver = max_deliver
        self.dead_letter = dead_letter
        self.workers = workers
        self.concurrent = dict(concurrent or {}) if workers > 1 else {}
        self._queues: dict[str, deque[tuple[bytes, int]]] = {subject: deque() for subject in DELIVERY_ORDER}
        self._handlers: dict[str, Handler] = {}
        self._seen: set[str] = set()
        self._changed = threading.Condition()  # guards the queues, `_seen`, `_running`, `_finished`
        self._running: list[_Delivery] = []    # being handled now, on this thread or a worker's
        self._finished: list[_Delivery] = []   # handled on a worker thread, not yet settled by step()
        self.published = 0
        self.delivered = 0

    def subscribe(self, subject: str, handler: Handler) -> None:
        register_handler(self._handlers, subject, handler)

    def publish(self, message: Message) -> None:
        """Queue `message`; a message whose msg_id was already published is dropped (publish dedupe). Safe to call
        from any thread."""
        data = encode(message)  # the same size limit and serialization as on NATS
        with self._changed:
            if message.msg_id in self._seen:
                log.debug("duplicate %s dropped", message.msg_id)
                return
            self._seen.add(message.msg_id)
            self._queues[message.subject].append((data, 1))
            self.published += 1
            self._changed.notify_all()

    def pending(self, subject: str | None = None) -> int:
        with self._changed:
            if subject is not None:
                return len(self._queues[subject])
            return sum(len(q) for q in self._queues.values())

    def active(self) -> list[Message]:
        """The messages being handled right now, oldest first."""
        with self._changed:
            return [d.message for d in self._running]

    def step(self) -> bool:
        """Deliver one message, or start it on a worker thread; False when no queue with a subscriber holds a
        message and no worker is busy. With workers busy and nothing to start, it waits for one to finish (and
        settles its retry or dead letter) first."""
        while True:
            with self._changed:
                finished, self._finished = self._finished, []
            for done in finished:
                self._settle(done)
            with self._changed:
                taken = self._take()
                if taken is None:
                    if not self._running and not self._finished:
                        return False
                    if not self._finished:
                        self._changed.wait(timeout=1.0)  # a timeout keeps Ctrl-C prompt
                    continue
                self._running.append(taken)
                self.delivered += 1
            if taken.subject in self.concurrent:
                threading.Thread(target=self._work, args=(taken,), daemon=True,
                                 name=f"{taken.subject} {taken.message.node_id}").start()
                return True
            try:
                self._handle(taken)
            finally:
                with self._changed:
                    self._running.remove(taken)
            self._settle(taken)
            return True

    def join(self) -> None:
        """Wait until no worker thread is handling a message (what they publish stays queued)."""
        with self._changed:
            while any(d.subject in self.concurrent for d in self._running):
                self._changed.wait(timeout=1.0)

    def _take(self) -> _Delivery | None:
        """The next message to handle, in DELIVERY_ORDER, skipping subjects whose worker share is in use."""
        busy = [d.subject for d in self._running if d.subject in self.concurrent]
        for subject in DELIVERY_ORDER:
            queue = self._queues[subject]
            if not queue or subject not in self._handlers:
                continue
            if subject in self.concurrent and (len(busy) >= self.workers
                                               or busy.count(subject) >= self.concurrent[subject]):
                continue
            data, delivery = queue.popleft()
            return _Delivery(subject, data, delivery, decode(subject, data))
        return None

    def _work(self, taken: _Delivery) -> None:
        """A worker thread: handle one message and hand the outcome back to step()."""
        try:
            self._handle(taken)
        finally:
            with self._changed:
                self._running.remove(taken)
                self._finished.append(taken)
                self._changed.notify_all()

    def _handle(self, taken: _Delivery) -> None:
        try:
            self._handlers[taken.subject](taken.message)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - a handler bug must not stop the loop; the message is retried
            taken.error, taken.trace = f"{type(err).__name__}: {err}", traceback.format_exc()

    def _settle(self, taken: _Delivery) -> None:
        """A failed handler: redeliver the message later, or give up on it after `max_deliver` deliveries."""
        if taken.error is None:
            return
        node_id = taken.message.node_id
        if taken.delivery < self.max_deliver:
            log.warning("%s for %s failed on delivery %d (%s); redelivering", taken.subject, node_id,
                        taken.delivery, taken.error)
            with self._changed:
                self._queues[taken.subject].append((taken.data, taken.delivery + 1))
            return
        log.error("%s for %s failed %d times; giving up: %s\n%s", taken.subject, node_id, taken.delivery,
                  taken.error, taken.trace)
        if self.dead_letter is not None:
            self.dead_letter(taken.message, taken.error)
