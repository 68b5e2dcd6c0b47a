"""The bus of distributed mode: NATS JetStream through nats-py (docs/operations.md, "NATS JetStream").

`NatsBus` has the interface of `poise.bus.InProcBus` (`publish`, `subscribe`) and the methods `poise serve`
calls: `connect`, `drain_once`, `run_forever`, `healthy`, `stop_fetching`, `close`. nats-py is asyncio; the bus
runs its own event loop in a background thread and every public method is synchronous. Handlers and the
`dead_letter` callback always run on the thread that calls `drain_once` / `run_forever` (the bus thread of
`poise serve`), so a service stays single-threaded exactly as on the in-process bus.

Streams (file storage, so work survives a server restart; declared idempotently by every process):

    POISE_WORK        WorkQueue  work.>   one durable pull consumer per subject (`work_train`, ...)
    POISE_EVENTS      Limits     evt.>    one durable pull consumer per subject, read by the archive
    POISE_DLQ         Limits     dlq.>    dead letters: the original bytes on `dlq.<subject>`, the reason in
                                          the `Poise-Reason` header
    POISE_ADVISORIES  Limits     $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{POISE_WORK,POISE_EVENTS}.*

Delivery: each subscribed consumer has a pull task that fetches one message at a time and fetches the next
only once the caller has settled it. From the moment a message is fetched until it is settled, a heartbeat
sends `in_progress()` every ack_wait/3, so an hours-long training job is not redelivered while its process is
alive; a process that dies stops heartbeating and JetStream redelivers after the ack wait. Settling:

- the handler returns: `ack_sync` (the server confirmed it; a WorkQueue message is then removed);
- the handler raises: `nak` with a delay of `nak_delay_s` (transient failure: retried, possibly elsewhere);
- poison, which retrying cannot fix: bytes that are not a valid message of their subject, or a handler that
  raises `ContractError`: dead-lettered at once, without retries (below), and terminated with
  `+TERM <reason>`; undecodable bytes reach the DLQ but no callback, as there is no message to hand it;
- the handler raises on the last delivery (`num_delivered >= max_deliver`): dead-lettered (below).

Dead letters, one design with two entries. A failure the bus sees (a handler that keeps raising, poison) is
dead-lettered on the spot, because only there is the reason known: the bus copies the message to
`dlq.<subject>`, calls `dead_letter(message, reason)` (a worker's callback publishes the node's evt.failed,
the archive's fails the node), then terminates the message. A failure the bus cannot see — the process was
killed, hung, or let the ack wait pass on the last delivery — makes the server stop redelivering and publish a
MAX_DELIVERIES advisory; POISE_ADVISORIES keeps it (an advisory nobody hears is otherwise lost), and a durable
consumer per subscribed consumer (`<consumer>_exhausted`, read by the same service) fetches the original by stream
sequence, copies it to the DLQ, calls `dead_letter` and deletes it from the WorkQueue, where an exhausted
message would otherwise stay forever. Both paths give the DLQ copy the `Nats-Msg-Id` `dlq/<stream>/<seq>`,
so a message dead-lettered by both (say the callback failed and the advisory retried it) is stored once; the
callback is idempotent downstream (evt.failed has a deterministic msg_id, and the archive ignores a repeat).
A copy that would not fit the server's max payload beside its headers keeps the bytes that fit, and
`Poise-Truncated` gives the original's size.

Publishing sets `Nats-Msg-Id` to `message.msg_id`; the streams' duplicate window (20 min) drops a repeat, so a
service that crashes after publishing and before acking republishes harmlessly. A publish that finds no
server (a NATS restart) is retried until `publish_timeout_s`. One whose bytes and headers exceed the server's max
payload is refused with `ContractError` before it is sent: the server would answer with an error that closes the
connection for good (nats-py does not reconnect after it). The client reconnects forever; a pull task whose
consumer has vanished (a server that lost its store) declares streams and consumers again.

Credentials: with `user` and `password` the bus connects as that NATS user, and its replies come to an inbox
of its own (poise/nats_auth.py: the server allows each service's user only the subjects of its phase). The
server refusing the credentials is named as such (`NatsAuthError`), not as a server that did not answer; a
publish the user is not permitted raises `NatsPermissionError` once the request times out, without retries.

Shutdown (`poise serve` on SIGTERM): `stop_fetching` ends every pull task once its current pull request
expires (within FETCH_S) and makes `drain_once` return after the message in hand; `close` then hands back
at once, with a nak without delay, every message that was fetched and not settled (one nobody handled, and
the one a handler still holds past the grace period), so another replica, or this one restarted, gets it
without waiting for the ack wait. A closed bus publishes nothing, so a handler cut short cannot report the
interrupted work as its result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from poise.bus import Handler, IncompatibleStream, register_handler
from poise.contracts import (
    CONTRACT_VERSION,
    UNVERSIONED,
    VERSION_PATTERN,
    ContractError,
    Message,
    decode,
    encode,
    newest,
    unreadable,
)

log = logging.getLogger("poise.nats_bus")

T = TypeVar("T")

WORK_STREAM = "POISE_WORK"
EVENT_STREAM = "POISE_EVENTS"
DLQ_STREAM = "POISE_DLQ"
ADVISORY_STREAM = "POISE_ADVISORIES"
MAX_DELIVERIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
DUPLICATE_WINDOW_S = 20 * 60.0  # covers a crash and restart between a publish and its ack
DAY_S = 24 * 3600.0
REASON_HEADER = "Poise-Reason"
TRUNCATED_HEADER = "Poise-Truncated"  # on a DLQ copy cut to the server's max payload: the original's size

STREAMS = (
    StreamConfig(name=WORK_STREAM, description="POISE work: one durable consumer per work.* subject",
                 subjects=["work.>"], retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                 duplicate_window=DUPLICATE_WINDOW_S),
    StreamConfig(name=EVENT_STREAM, description="POISE events, applied by the archive", subjects=["evt.>"],
                 retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=30 * DAY_S,
                 duplicate_window=DUPLICATE_WINDOW_S),
    StreamConfig(name=DLQ_STREAM, description="POISE dead letters: the original message, the reason in "
                 f"the {REASON_HEADER} header", subjects=["dlq.>"], retention=RetentionPolicy.LIMITS,
                 storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW_S),
    StreamConfig(name=ADVISORY_STREAM, description="MAX_DELIVERIES advisories of the POISE consumers",
                 subjects=[f"{MAX_DELIVERIES}.{WORK_STREAM}.*", f"{MAX_DELIVERIES}.{EVENT_STREAM}.*"],
                 retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=14 * DAY_S),
)
STREAM_EXISTS = 10058  # JetStream error code: the stream exists with another configuration
# Stream metadata: the newest contract version (poise/contracts.py) that declared the stream; none: UNVERSIONED.
CONTRACT_METADATA = "poise_contract_version"

CONNECT_TIMEOUT_S = 10.0  # connect() gives up after this (serve.connect retries with backoff)
REACH_TIMEOUT_S = 3.0     # of which reaching a server, per server in the URL: a wrong address shows soon
REQUEST_TIMEOUT_S = 5.0   # one JetStream API request, publish or ack
FETCH_S = 2.0             # one pull request's expiry: short, so a closed bus leaves no long pull behind
RETRY_S = 0.5             # pause before retrying after a connection problem
CLOSE_TIMEOUT_S = 10.0
TRANSIENT = (nats.errors.Error, asyncio.TimeoutError, OSError)  # what a reconnect can throw at a request


class BusClosed(RuntimeError):
    """The bus was closed (or never connected); the call cannot reach NATS."""


class NatsAuthError(RuntimeError):
    """The server refused this bus's credentials (or asked for some it was not given)."""


class NatsPermissionError(RuntimeError):
    """The server refused a publish: the subject is not in this user's permissions (poise/nats_auth.py)."""


def durable_name(subject: str) -> str:
    """The durable consumer of `subject` (`work.train` -> `work_train`): names may not contain dots."""
    return subject.replace(".", "_")


def stream_of(subject: str) -> str:
    return WORK_STREAM if subject.startswith("work.") else EVENT_STREAM


def dlq_subject(subject: str) -> str:
    return f"dlq.{subject}"


def _one_line(text: str, limit: int = 1000) -> str:
    """A reason fit for a header or a +TERM payload: one line of ASCII, bounded. A reason quotes the message,
    which may be any text; NATS headers are MIME-style, and nats-py reads a non-ASCII value back as an
    `email.header.Header` instead of a string."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode()[:limit]


def _header_bytes(headers: dict[str, str]) -> int:
    """The size of the header block nats-py sends for `headers`; the server counts it towards its max payload."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{key}: {value}\r\n".encode()) for key, value in headers.items())


@dataclass
class _Consumer:
    """One durable pull consumer this bus reads: a message subject, or the advisories of one."""

    stream: str
    durable: str
    filter_subject: str
    subject: str  # the message subject it serves (its own for messages, the exhausted one for advisories)
    advisory: bool = False
    sub: JetStreamContext.PullSubscription | None = None
    task: asyncio.Task | None = None


@dataclass(eq=False)
class _Delivery:
    """A fetched message: heartbeated from fetch until settled; `done` lets its pull task fetch again."""

    consumer: _Consumer
    msg: Msg
    heartbeat: asyncio.Task
    done: asyncio.Event = field(default_factory=asyncio.Event)


class NatsBus:
    """JetStream bus: publish with dedupe, one durable pull consumer per subscribed subject, dead letters."""

    def __init__(self, url: str, *, ack_wait_s: float = 60.0, max_deliver: int = 3, nak_delay_s: float = 5.0,
                 dead_letter: Callable[[Message, str], None] | None = None, name: str | None = None,
                 publish_timeout_s: float = 30.0, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 user: str | None = None, password: str | None = None) -> None:
        self.url = url
        self.user = user
        self._password = password
        self.servers = [server.strip() for server in url.split(",")]
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.nak_delay_s = nak_delay_s
        self.dead_letter = dead_letter
        self.name = name
        self.publish_timeout_s = publish_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_s = ack_wait_s / 3
        # Counters (read by app.serve.BusCounters and the tests); changed only on the caller's thread.
        self.published = 0
        self.delivered = 0
        self.redelivered = 0
        self.acked = 0
        self.naked = 0
        self.termed = 0
        self.dead_lettered = 0
        self.handed_back = 0  # naked without delay by close(), fetched and never settled (set on the loop)
        self._handlers: dict[str, Handler] = {}
        self._consumers: list[_Consumer] = []
        self._ready: queue.Queue[_Delivery] = queue.Queue()  # fetched, waiting for the caller
        self._held: set[_Delivery] = set()  # fetched and not yet settled (loop thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closing = False
        self._stopping = False  # stop_fetching(): no new fetches
        self._refused: str | None = None  # the server's last word on the credentials, while connecting
        self._denied: set[str] = set()  # subjects the server refused this user to publish

    # ---------------------------------------------------------------------------------- the public API

    def connect(self) -> None:
        """Connect, declare the streams and start the subscribed consumers; raises if NATS cannot be reached."""
        if self._closing:
            raise BusClosed("this bus was closed; make a new NatsBus")
        if self._nc is not None:
            return
        self._start_loop()
        try:
            self._call(self._connect(), self.connect_timeout_s)
        except TimeoutError as err:
            self._call(self._drop_connection(), CLOSE_TIMEOUT_S)
            raise self._refusal() or ConnectionError(self._unanswered(self.connect_timeout_s)) from err
        except ConnectionError as err:
            self._call(self._drop_connection(), CLOSE_TIMEOUT_S)
            refusal = self._refusal()
            if refusal is None:
                raise
            raise refusal from err
        except BaseException:
            self._call(self._drop_connection(), CLOSE_TIMEOUT_S)
            raise

    def subscribe(self, subject: str, handler: Handler) -> None:
        """Handle `subject` with `handler` through its durable consumer (started now, or at connect())."""
        register_handler(self._handlers, subject, handler)
        stream, durable = stream_of(subject), durable_name(subject)
        consumers = [_Consumer(stream, durable, subject, subject),
                     _Consumer(ADVISORY_STREAM, f"{durable}_exhausted", f"{MAX_DELIVERIES}.{stream}.{durable}",
                               subject, advisory=True)]
        self._consumers.extend(consumers)
        if self._nc is not None:
            self._call(self._start_consumers(consumers), self.connect_timeout_s)

    def publish(self, message: Message) -> None:
        """Publish `message` with `Nats-Msg-Id` = its msg_id; a repeat within the duplicate window is dropped."""
        data = encode(message)
        ack = self._call(self._publish(message.subject, data, {"Nats-Msg-Id": message.msg_id}),
                         self.publish_timeout_s + REQUEST_TIMEOUT_S)
        if ack.duplicate:
            log.debug("duplicate %s dropped by the stream", message.msg_id)
        else:
            self.published += 1

    def drain_once(self, timeout_s: float = 1.0) -> int:
        """Wait up to `timeout_s` for a message, then handle it and whatever else was fetched meanwhile (at
        most one round over the consumers, so the caller gets its thread back soon); returns how many."""
        try:
            delivery = self._ready.get(timeout=timeout_s)
        except queue.Empty:
            return 0
        handled = 0
        while True:
            if delivery.consumer.advisory:
                self._move_exhausted(delivery)
            else:
                self._deliver(delivery)
            handled += 1
            if handled >= len(self._consumers) or self._stopping:
                return handled
            try:
                delivery = self._ready.get_nowait()
            except queue.Empty:
                return handled

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Handle messages until `stop` is set (or the bus is closed)."""
        while not self._closing and (stop is None or not stop.is_set()):
            self.drain_once(1.0)

    def stop_fetching(self) -> None:
        """SIGTERM: fetch no more messages, and return from drain_once after the message in hand; what was
        fetched and is not settled goes back to JetStream at close()."""
        self._stopping = True

    def healthy(self) -> bool:
        nc = self._nc
        return (not self._closing and nc is not None and nc.is_connected and self._thread is not None
                and self._thread.is_alive())

    def close(self) -> None:
        """Stop fetching, hand back fetched messages nobody handled, close the connection and the loop."""
        if self._closing:
            return
        self._closing = True
        if self._loop is None:
            return
        try:
            self._call(self._shutdown(), CLOSE_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - closing must finish; unacked messages are redelivered anyway
            log.warning("closing the NATS connection to %s: %s: %s", self.url, type(err).__name__, err)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread is None or not self._thread.is_alive():
            self._loop.close()

    # ------------------------------------------------------------------------------ the caller's side

    def _deliver(self, delivery: _Delivery) -> None:
        """Decode and handle one message, then settle it: ack, nak, or dead-letter."""
        msg, subject = delivery.msg, delivery.consumer.subject
        deliveries = msg.metadata.num_delivered
        self.delivered += 1
        if deliveries > 1:
            self.redelivered += 1
        try:
            message = decode(subject, msg.data)
        except ContractError as err:
            log.error("%s #%d is not a valid message: %s; dead-lettered", subject, msg.metadata.sequence.stream, err)
            self._dead_letter(delivery, None, f"undecodable: {err}")
            return
        try:
            self._handlers[subject](message)
        except ContractError as err:  # deterministic: the same message fails the same way every time
            log.error("%s for %s broke a contract: %s; dead-lettered, not retried", subject, message.node_id, err)
            self._dead_letter(delivery, message, f"ContractError: {err}")
            return
        except Exception as err:  # noqa: BLE001 - a handler bug must not stop the loop; the message is retried
            reason = f"{type(err).__name__}: {err}"
            if deliveries >= self.max_deliver:
                log.exception("%s for %s failed on all %d deliveries; dead-lettered: %s", subject, message.node_id,
                              deliveries, reason)
                self._dead_letter(delivery, message, reason)
                return
            log.warning("%s for %s failed on delivery %d of %d (%s); redelivered in %.1f s", subject,
                        message.node_id, deliveries, self.max_deliver, reason, self.nak_delay_s)
            self._settle(delivery, self._nak(delivery.msg))
            self.naked += 1
            return
        except BaseException:
            self._settle(delivery, None)  # left unacknowledged: JetStream redelivers it after the ack wait
            raise
        if self._settle(delivery, self._ack(delivery.msg)):
            self.acked += 1

    def _dead_letter(self, delivery: _Delivery, message: Message | None, reason: str) -> None:
        """Copy to the DLQ, tell the service, terminate. On failure the message is naked; if that was its last
        delivery, the MAX_DELIVERIES advisory brings it back through `_move_exhausted`."""
        msg = delivery.msg
        meta = msg.metadata
        try:
            self._call(self._copy_to_dlq(delivery.consumer.subject, msg.data, meta.stream, meta.sequence.stream,
                                         meta.num_delivered, reason), self.publish_timeout_s + REQUEST_TIMEOUT_S)
            if message is not None and self.dead_letter is not None:
                self.dead_letter(message, reason)
        except Exception as err:  # noqa: BLE001 - retried through nak / the advisory
            log.error("could not dead-letter %s #%d (%s: %s); it will be retried", delivery.consumer.subject,
                      meta.sequence.stream, type(err).__name__, err)
            self._settle(delivery, self._nak(msg))
            self.naked += 1
            return
        self.dead_lettered += 1
        if self._settle(delivery, self._term(msg, reason)):
            self.termed += 1

    def _move_exhausted(self, delivery: _Delivery) -> None:
        """A MAX_DELIVERIES advisory: dead-letter the message the consumer gave up on."""
        subject = delivery.consumer.subject
        try:
            advisory = json.loads(delivery.msg.data)
            stream, seq, deliveries = advisory["stream"], int(advisory["stream_seq"]), int(advisory["deliveries"])
        except (ValueError, KeyError, TypeError) as err:  # not a max_deliver advisory: nothing to move
            log.error("ignored a malformed MAX_DELIVERIES advisory for %s: %s: %s", subject, type(err).__name__, err)
            self._settle(delivery, self._term(delivery.msg, f"malformed advisory: {err}"))
            return
        try:
            raw = self._call(self._get_msg(stream, seq), REQUEST_TIMEOUT_S * 2)
            if raw is None:  # already moved (a repeated advisory)
                self._settle(delivery, self._ack(delivery.msg))
                return
            reason = (f"{subject} was delivered {deliveries} times and never acknowledged: its handler crashed, "
                      f"hung or ran past the ack wait of {self.ack_wait_s:.0f} s")
            try:
                message: Message | None = decode(subject, raw.data or b"")
            except ContractError as err:
                message, reason = None, f"undecodable: {err}"
            self._call(self._copy_to_dlq(subject, raw.data or b"", stream, seq, deliveries, reason),
                       self.publish_timeout_s + REQUEST_TIMEOUT_S)
            log.error("%s #%d dead-lettered: %s", subject, seq, reason)
            if message is not None and self.dead_letter is not None:
                self.dead_letter(message, reason)
            if stream == WORK_STREAM:  # the WorkQueue keeps an exhausted message until it is deleted
                self._call(self._delete_msg(stream, seq), REQUEST_TIMEOUT_S * 2)
        except Exception as err:  # noqa: BLE001 - the advisory is retried after the nak delay
            log.error("could not dead-letter %s #%d after its MAX_DELIVERIES advisory (%s: %s); retrying", subject,
                      seq, type(err).__name__, err)
            self._settle(delivery, self._nak(delivery.msg))
            return
        self.dead_lettered += 1
        self._settle(delivery, self._ack(delivery.msg))

    def _settle(self, delivery: _Delivery, verdict: Coroutine[Any, Any, bool] | None) -> bool:
        """Stop the heartbeat, send the verdict (None: none), let the pull task fetch again; True if sent."""
        try:
            return self._call(self._finish(delivery, verdict), self.publish_timeout_s + REQUEST_TIMEOUT_S)
        except BusClosed:
            if verdict is not None:
                verdict.close()
            log.warning("the bus closed before %s #%d was settled; close() handed it back to JetStream",
                        delivery.consumer.subject, delivery.msg.metadata.sequence.stream)
            return False

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the bus's loop and wait for its result."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            coro.close()
            raise BusClosed(f"the NATS bus for {self.url} is closed or not connected")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("NatsBus methods are synchronous; call them from a handler, not from its event loop")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def _unanswered(self, waited_s: float) -> str:
        return f"no NATS server answered at {self.url} within {waited_s:g} s"

    def _refusal(self) -> NatsAuthError | None:
        """What the server said of the credentials while connecting, if it refused them."""
        if self._refused is None:
            return None
        who = (f"the credentials of NATS user {self.user}" if self.user
               else "a connection without credentials (it requires a user and password)")
        return NatsAuthError(f"NATS at {self.url} refused {who}: {self._refused}")

    def _start_loop(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"nats-{self.name or 'bus'}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- the loop's side

    async def _connect(self) -> None:
        async def disconnected() -> None:
            if not self._closing and self._nc is not None:  # not a connect() that failed and is being undone
                log.warning("disconnected from NATS at %s; reconnecting", self.url)

        async def reconnected() -> None:
            log.info("reconnected to NATS at %s", self.url)

        async def error(err: Exception) -> None:
            text = str(err)
            if "authorization violation" in text.lower():  # the credentials (or their absence)
                self._refused = text.removeprefix("nats: ").strip("'")
            if "permissions violation" in text.lower():  # a subject this user may not use: a bug, never quiet
                if denied := re.search(r'for publish to "([^"]+)"', text, re.IGNORECASE):
                    self._denied.add(denied.group(1))
                log.error("NATS at %s refused user %s: %s (its permissions: poise/nats_auth.py)", self.url, self.user,
                          text.removeprefix("nats: "))
            elif not self._closing:  # failed (re)connect attempts repeat every second: keep them quiet
                level = logging.DEBUG if isinstance(err, TRANSIENT) else logging.WARNING
                log.log(level, "NATS at %s: %s: %s", self.url, type(err).__name__, err)

        # nats-py retries an unreachable server every second, forever (max_reconnect_attempts=-1 covers the first
        # connect too): give up sooner, so that the caller can say which setting holds the address
        reach_s = min(REACH_TIMEOUT_S * len(self.servers), self.connect_timeout_s)
        credentials: dict[str, Any] = {}
        if self.user is not None:
            from poise.nats_auth import inbox_prefix

            credentials = {"user": self.user, "password": self._password, "inbox_prefix": inbox_prefix(self.user)}
        self._refused = None
        try:
            self._nc = await asyncio.wait_for(nats.connect(
                self.servers, name=self.name, connect_timeout=2, reconnect_time_wait=1, max_reconnect_attempts=-1,
                ping_interval=20, max_outstanding_pings=3, disconnected_cb=disconnected, reconnected_cb=reconnected,
                error_cb=error, **credentials), reach_s)
        except TimeoutError as err:
            raise ConnectionError(self._unanswered(reach_s)) from err
        self._js = self._nc.jetstream(timeout=REQUEST_TIMEOUT_S)
        try:
            await self._declare_streams()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as err:
            raise RuntimeError(f"NATS at {self.url} answered but has no JetStream ({type(err).__name__}); start "
                               "nats-server with JetStream on (-js)") from err
        await self._start_consumers(self._consumers)
        log.info("connected to NATS JetStream at %s", self.url)

    async def _drop_connection(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        for consumer in self._consumers:
            if consumer.task is not None:
                consumer.task.cancel()
            consumer.task, consumer.sub = None, None
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def _declare_streams(self) -> None:
        """Create the streams, or update them if another version declared them differently. A stream records the
        newest contract version that declared it (CONTRACT_METADATA); one this POISE cannot read, or whose
        configuration it cannot change, raises IncompatibleStream."""
        for config in STREAMS:
            config = dataclasses.replace(config, metadata={CONTRACT_METADATA: await self._stream_contract(config.name)})
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as err:
                if err.err_code != STREAM_EXISTS:
                    raise
                try:
                    await self._js.update_stream(config)
                except nats.js.errors.APIError as update_err:
                    raise IncompatibleStream(f"stream {config.name} exists with a configuration this version cannot "
                                             f"change ({update_err.description}); delete the stream or migrate it"
                                             ) from update_err

    async def _stream_contract(self, name: str) -> str:
        """The contract version stream `name` is to record: this POISE's, or the newer one it records."""
        try:
            info = await self._js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return CONTRACT_VERSION
        stored = (info.config.metadata or {}).get(CONTRACT_METADATA, UNVERSIONED)
        problem = (unreadable(stored) if re.match(VERSION_PATTERN, stored)
                   else f"the contract version {stored!r}, which is not one")
        if problem is not None:
            raise IncompatibleStream(f"stream {name} at {self.url} holds messages of {problem}; a major version "
                                     "is not a rolling upgrade (docs/architecture.md, \"Contract versions and "
                                     "rolling upgrades\")")
        return newest(stored, CONTRACT_VERSION)

    def _consumer_config(self, consumer: _Consumer) -> ConsumerConfig:
        # `name` beside `durable_name`: nats-py then creates it on $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>,
        # a subject that names the filter, so a user's permission can pin both (poise/nats_auth.py)
        if consumer.advisory:
            return ConsumerConfig(name=consumer.durable, durable_name=consumer.durable,
                                  filter_subject=consumer.filter_subject, ack_policy=AckPolicy.EXPLICIT,
                                  deliver_policy=DeliverPolicy.ALL, ack_wait=max(self.ack_wait_s, 30.0))
        return ConsumerConfig(name=consumer.durable, durable_name=consumer.durable,
                              filter_subject=consumer.filter_subject, ack_policy=AckPolicy.EXPLICIT,
                              deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait_s, max_deliver=self.max_deliver)

    async def _bind(self, consumer: _Consumer) -> None:
        await self._js.add_consumer(consumer.stream, self._consumer_config(consumer))  # idempotent
        consumer.sub = await self._js.pull_subscribe_bind(consumer.durable, consumer.stream)

    async def _start_consumers(self, consumers: list[_Consumer]) -> None:
        for consumer in consumers:
            await self._bind(consumer)
            consumer.task = asyncio.create_task(self._pull(consumer), name=f"pull-{consumer.durable}")

    async def _pull(self, consumer: _Consumer) -> None:
        """Fetch one message at a time for the caller; fetch the next once it is settled."""
        while not self._closing and not self._stopping:
            nc = self._nc
            if nc is None or not nc.is_connected:
                await asyncio.sleep(RETRY_S)  # no pull requests piled up while reconnecting
                continue
            try:
                if consumer.sub is None:
                    await self._declare_streams()
                    await self._bind(consumer)
                msgs = await consumer.sub.fetch(1, timeout=FETCH_S)
            except nats.errors.TimeoutError:
                continue
            except nats.js.errors.NotFoundError:
                log.warning("consumer %s of %s is gone (did NATS lose its store?); declaring it again",
                            consumer.durable, consumer.stream)
                await self._unbind(consumer)
                await asyncio.sleep(RETRY_S)
                continue
            except TRANSIENT as err:  # an API error is unexpected; a connection error is a reconnect in progress
                level = logging.WARNING if isinstance(err, nats.js.errors.APIError) else logging.DEBUG
                log.log(level, "fetching from %s: %s: %s", consumer.durable, type(err).__name__, err)
                await asyncio.sleep(RETRY_S)
                continue
            for msg in msgs:
                delivery = _Delivery(consumer, msg, asyncio.create_task(self._heartbeat(msg)))
                self._held.add(delivery)
                self._ready.put(delivery)
                await delivery.done.wait()

    async def _unbind(self, consumer: _Consumer) -> None:
        sub, consumer.sub = consumer.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except TRANSIENT:
                pass

    async def _heartbeat(self, msg: Msg) -> None:
        """Tell JetStream the message is still being worked on, well within each ack wait."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await msg.in_progress()
            except TRANSIENT as err:  # while reconnecting; the next beat may get through
                log.debug("heartbeat: %s: %s", type(err).__name__, err)

    async def _finish(self, delivery: _Delivery, verdict: Coroutine[Any, Any, bool] | None) -> bool:
        try:
            return await verdict if verdict is not None else False
        except Exception as err:  # noqa: BLE001 - an unsettled message is redelivered; never stop the caller
            log.warning("%s #%d could not be settled (%s: %s); JetStream redelivers it after the ack wait",
                        delivery.consumer.subject, delivery.msg.metadata.sequence.stream, type(err).__name__, err)
            return False
        finally:
            delivery.heartbeat.cancel()
            self._held.discard(delivery)
            delivery.done.set()

    async def _ack(self, msg: Msg) -> bool:
        """ack_sync, retried through a reconnect; False if the server never confirmed it."""
        deadline = time.monotonic() + self.publish_timeout_s
        while True:
            try:
                await msg.ack_sync(timeout=REQUEST_TIMEOUT_S)
                return True
            except TRANSIENT as err:
                if time.monotonic() > deadline:
                    log.warning("ack of %s not confirmed (%s: %s); it may be redelivered, which handlers ignore",
                                msg.subject, type(err).__name__, err)
                    return False
                await asyncio.sleep(RETRY_S)

    async def _nak(self, msg: Msg) -> bool:
        await msg.nak(delay=self.nak_delay_s or None)
        return True

    async def _term(self, msg: Msg, reason: str) -> bool:
        # nats-py's term() takes no reason; the protocol does, and the MSG_TERMINATED advisory carries it.
        await self._nc.publish(msg.reply, b"+TERM " + _one_line(reason).encode())
        return True

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> Any:
        """js.publish, retried while the server is unreachable (same Nats-Msg-Id, so never stored twice)."""
        deadline = time.monotonic() + self.publish_timeout_s
        while True:
            if self._js is None or self._closing:
                raise BusClosed(f"not connected to NATS at {self.url}; call connect() first")
            size, limit = len(data) + _header_bytes(headers), self._nc.max_payload
            if size > limit:  # deterministic, and the server's answer to it would close this connection for good
                raise ContractError(f"{subject}: {size} bytes with headers exceed the NATS server's max payload of "
                                    f"{limit} bytes; put large artifacts in storage and send their URI")
            try:
                return await self._js.publish(subject, data, timeout=REQUEST_TIMEOUT_S, headers=headers)
            except TRANSIENT as err:
                if subject in self._denied:  # the server said so while the request waited: retrying won't help
                    raise NatsPermissionError(f"NATS at {self.url} does not permit user {self.user} to publish "
                                              f"{subject} (its permissions: poise/nats_auth.py)") from err
                if time.monotonic() > deadline:
                    raise ConnectionError(f"NATS at {self.url} did not store {subject} within "
                                          f"{self.publish_timeout_s:.0f} s: {type(err).__name__}: {err}") from err
                if isinstance(err, nats.js.errors.NoStreamResponseError) and self._nc.is_connected:
                    try:  # a server that lost its store: declare the streams again
                        await self._declare_streams()
                    except TRANSIENT:
                        pass
                await asyncio.sleep(RETRY_S)

    async def _copy_to_dlq(self, subject: str, data: bytes, stream: str, seq: int, deliveries: int,
                           reason: str) -> None:
        headers = {"Nats-Msg-Id": f"dlq/{stream}/{seq}", REASON_HEADER: _one_line(reason),
                   "Poise-Stream": stream, "Poise-Stream-Seq": str(seq), "Poise-Deliveries": str(deliveries)}
        if self._nc is not None:  # junk as large as the server allows leaves no room for the headers
            room = self._nc.max_payload - _header_bytes({**headers, TRUNCATED_HEADER: str(len(data))})
            if len(data) > room:
                headers[TRUNCATED_HEADER] = str(len(data))
                data = data[:room]
        await self._publish(dlq_subject(subject), data, headers)

    async def _get_msg(self, stream: str, seq: int) -> Any:
        try:
            return await self._js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            return None

    async def _delete_msg(self, stream: str, seq: int) -> None:
        try:
            await self._js.delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            pass

    async def _shutdown(self) -> None:
        tasks = [consumer.task for consumer in self._consumers if consumer.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Fetched and not settled (never handled, or a handler still running past the grace period): back to
        # the stream now, for another replica or this one restarted, not after the ack wait.
        for delivery in list(self._held):
            delivery.heartbeat.cancel()
            self._held.discard(delivery)
            try:
                await delivery.msg.nak()
                self.handed_back += 1
            except TRANSIENT as err:  # redelivered after the ack wait instead
                log.debug("handing back %s: %s: %s", delivery.consumer.subject, type(err).__name__, err)
        nc = self._nc
        if nc is not None and not nc.is_closed:
            try:
                await nc.flush(timeout=2)
            except TRANSIENT:
                pass
            await nc.close()
