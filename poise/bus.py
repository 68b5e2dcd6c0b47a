"""The message bus the six services talk over: one subject per phase (docs/architecture.md, "Message flow").

`Bus` is the interface: `publish` a message, `subscribe` a handler to a subject. `InProcBus` is the embedded
implementation behind `poise run`: every message goes through `encode`/`decode` exactly as on NATS (so size
limits and contracts are checked the same way), is deduplicated by its deterministic `msg_id`, and waits in a
queue until `step()` hands it to its subscriber. The bus is single-threaded and deterministic: `step()`
delivers the oldest message of the most advanced phase first, so candidates already in the pipeline finish
before new ones start.

Delivery is at-least-once, like JetStream: a handler that raises gets the message again, up to
`max_deliver` times; after that the bus calls its `dead_letter` callback (the archive marks the node
failed with the error, as it does for NATS's dead-letter stream) and goes on.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Callable
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


class Bus(Protocol):
    def publish(self, message: Message) -> None: ...

    def subscribe(self, subject: str, handler: Handler) -> None: ...


class InProcBus:
    """In-process bus: queues per subject, publish dedupe by msg_id, bounded redelivery."""

    def __init__(self, max_deliver: int = 3, dead_letter: Callable[[Message, str], None] | None = None) -> None:
        self.max_deliver = max_deliver
        self.dead_letter = dead_letter
        self._queues: dict[str, deque[tuple[bytes, int]]] = {subject: deque() for subject in DELIVERY_ORDER}
        self._handlers: dict[str, Handler] = {}
        self._seen: set[str] = set()
        self.published = 0
        self.delivered = 0

    def subscribe(self, subject: str, handler: Handler) -> None:
        register_handler(self._handlers, subject, handler)

    def publish(self, message: Message) -> None:
        """Queue `message`; a message whose msg_id was already published is dropped (publish dedupe)."""
        if message.msg_id in self._seen:
            log.debug("duplicate %s dropped", message.msg_id)
            return
        data = encode(message)  # the same size limit and serialization as on NATS
        self._seen.add(message.msg_id)
        self._queues[message.subject].append((data, 1))
        self.published += 1

    def pending(self, subject: str | None = None) -> int:
        if subject is not None:
            return len(self._queues[subject])
        return sum(len(q) for q in self._queues.values())

    def step(self) -> bool:
        """Deliver one message; False when every queue with a subscriber is empty."""
        for subject in DELIVERY_ORDER:
            queue = self._queues[subject]
            if queue and subject in self._handlers:
                data, delivery = queue.popleft()
                self._deliver(subject, data, delivery)
                return True
        return False

    def _deliver(self, subject: str, data: bytes, delivery: int) -> None:
        message = decode(subject, data)
        self.delivered += 1
        try:
            self._handlers[subject](message)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - a handler bug must not stop the loop; the message is retried
            reason = f"{type(err).__name__}: {err}"
            if delivery < self.max_deliver:
                log.warning("%s for %s failed on delivery %d (%s); redelivering", subject, message.node_id,
                            delivery, reason)
                self._queues[subject].append((data, delivery + 1))
                return
            log.error("%s for %s failed %d times; giving up: %s\n%s", subject, message.node_id, delivery, reason,
                      traceback.format_exc())
            if self.dead_letter is not None:
                self.dead_letter(message, reason)
