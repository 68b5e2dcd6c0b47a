"""Fuzzing the bus boundary (issue 23): random and malformed payloads on every `work.*` and `evt.*` subject of a
real nats-server, consumed by the six services as `poise serve` runs them (`serve()` with its real `NatsBus`,
one thread each in this process: starting six interpreters that each import torch would cost minutes).

Every payload must end one of three ways: refused by the server at publish (larger than its max payload, or a
repeated msg id inside the duplicate window); copied to the dead-letter stream with a reason (bytes that are
not a valid message of their subject, or a valid message whose handler kept failing); or, a valid message,
handled and logged (a worker answers the node's evt.failed, the archive drops an event of a run it does not
hold, naming the node). After each batch every service still answers /healthz, and a good message published
behind the junk (a work.reflect of the stored root) is still reflected by the reflector, and its event
settled by the archive. Hypothesis runs derandomized with a bounded number of examples; inputs that once
broke the bus stay below as `@example`s.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import Phase as Stage
from hypothesis import strategies as st
from test_nats_bus import NatsServer, jetstream
from test_services import RUN, archive_nodes, diverging_trajectory, evaluation, proposal

from app.serve import HttpServer, serve
from archive.sqlite_store import SQLiteStore
from poise.contracts import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    ContractError,
    EvtEvaluated,
    EvtFailed,
    EvtImplemented,
    EvtProposed,
    EvtReflected,
    EvtTrained,
    Failure,
    Implementation,
    Message,
    Phase,
    Reflection,
    RunConfig,
    WorkEvaluate,
    WorkImplement,
    WorkPropose,
    WorkReflect,
    WorkTrain,
    decode,
    encode,
)
from poise.nats_bus import (
    ADVISORY_STREAM,
    DLQ_STREAM,
    EVENT_STREAM,
    REASON_HEADER,
    TRUNCATED_HEADER,
    WORK_STREAM,
    NatsBus,
    durable_name,
)
from poise.settings import ServiceSettings

pytestmark = pytest.mark.nats

EXAMPLES = 40  # batches of 11 or 12 payloads, ~20 s; CI runs exactly these (derandomized)
SETTLE_TIMEOUT_S = 60.0
WORKERS = ("proposer", "implementer", "trainer", "evaluator", "reflector")
ROOT = "n000"
SOURCE = "LOSS_AGG_MODE = 'token-mean'\n"
NOT_A_PROTOCOL = "fuzz-protocol"  # a valid work.train or work.evaluate must fail fast, never train or evaluate
NATS_MAX_PAYLOAD = MAX_MESSAGE_BYTES  # nats-server's default max_payload, which the contracts' limit matches

# One valid message per subject; the fuzzer gives each a run the archive does not hold, so a valid one is
# handled without starting real work.
TEMPLATES: dict[str, Message] = {message.subject: message for message in (
    WorkPropose(run_id="t", node_id="t"),
    WorkImplement(run_id="t", node_id="t", proposal=proposal("fuzz", [])),
    WorkTrain(run_id="t", node_id="t", source=SOURCE, protocol=NOT_A_PROTOCOL, seed=1),
    WorkEvaluate(run_id="t", node_id="t", checkpoint_uri="/nonexistent/fuzz-checkpoint", protocol=NOT_A_PROTOCOL,
                 seed=1),
    WorkReflect(run_id="t", node_id="t"),
    EvtProposed(run_id="t", node_id="t", proposal=proposal("fuzz", [])),
    EvtImplemented(run_id="t", node_id="t", implementation=Implementation.from_source(SOURCE, verified=True)),
    EvtTrained(run_id="t", node_id="t", trajectory=diverging_trajectory()),
    EvtEvaluated(run_id="t", node_id="t", evaluation=evaluation(0.5)),
    EvtReflected(run_id="t", node_id="t", reflection=Reflection(text="fuzz", generator="offline")),
    EvtFailed(run_id="t", node_id="t", failure=Failure(phase=Phase.TRAIN, reason="fuzz")),
)}
SUBJECTS = tuple(MESSAGE_TYPES)
KINDS = ("random bytes", "truncated", "wrong type", "other subject", "unknown field", "bad field", "missing field",
         "hostile", "valid")
HOSTILE = (b"", b"\x00" * 64, b"\xff\xfe\xfd", b"\xef\xbb\xbf{}", b"[" * 100_000, b'{"run_id": NaN}', b"null",
           b'"a string"', b"{" + b'"k": 1, ' * 20_000 + b'"z": 2}', b'{"run_id": "\\ud800", "node_id": "a"}',
           b"x" * (NATS_MAX_PAYLOAD - 64),  # stored; too large to copy to the DLQ with its headers
           b"x" * (NATS_MAX_PAYLOAD + 1))   # refused at publish (nats-py checks the server's max payload)
JUNK = ("", "\ud800", "x" * 10_000, -1, 0, 2**64, 1e308, True, None, [], {}, [[[]]], {"a": [1, "2", None]})

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
junk = st.sampled_from(JUNK) | json_values
ids = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,12}", fullmatch=True)


@dataclass(frozen=True)
class Letter:
    """One payload to publish on `subject`; `msg_id` is set for a valid message, as NatsBus.publish sets it."""

    subject: str
    payload: bytes
    msg_id: str | None = None
    kind: str = ""

    def __repr__(self) -> str:  # a near-max payload would flood the report
        shown = self.payload if len(self.payload) <= 200 else self.payload[:200] + b"..."
        return f"Letter({self.subject!r}, {self.kind}, {len(self.payload)} bytes: {shown!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how Hypothesis prints a failing example
        printer.text(repr(self))


@st.composite
def valid_messages(draw: st.DrawFn, subject: str) -> Message:
    return TEMPLATES[subject].model_copy(update={"run_id": f"fuzz-{draw(ids)}", "node_id": draw(ids),
                                                 "attempt": draw(st.integers(1, 5))})


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def letters(draw: st.DrawFn, subject: str, kind: str) -> Letter:
    """A payload for `subject`, damaged as `kind` says (one of KINDS)."""
    message = draw(valid_messages(subject))
    fields = message.model_dump(mode="json")
    match kind:
        case "valid":
            return Letter(subject, encode(message), message.msg_id, kind)
        case "random bytes":
            payload = draw(st.binary(max_size=300))
        case "truncated":
            whole = encode(message)
            payload = whole[:draw(st.integers(0, len(whole) - 1))]
        case "wrong type":
            payload = as_json(draw(json_values))
        case "other subject":
            other = draw(st.sampled_from([s for s in SUBJECTS if s != subject]))
            payload = encode(draw(valid_messages(other)))
        case "unknown field":
            payload = as_json({**fields, draw(st.text(min_size=1, max_size=12)): draw(junk)})
        case "bad field":
            payload = as_json({**fields, draw(st.sampled_from(sorted(fields))): draw(junk)})
        case "missing field":
            dropped = draw(st.sampled_from(sorted(fields)))
            payload = as_json({k: v for k, v in fields.items() if k != dropped})
        case _:
            payload = draw(st.sampled_from(HOSTILE))
    return Letter(subject, payload, kind=kind)


@st.composite
def batches(draw: st.DrawFn) -> list[Letter]:
    """A payload on every subject, and every kind of damage in each batch (a drawn permutation of KINDS, dealt
    to the subjects in turn): left to chance, a bounded derandomized run mostly draws the first subject and kind."""
    kinds = draw(st.permutations(KINDS))
    batch = [draw(letters(subject, kinds[i % len(kinds)])) for i, subject in enumerate(SUBJECTS)]
    repeat = next((letter for letter in batch if letter.msg_id), None)
    if repeat is not None and draw(st.booleans()):  # published again: its msg_id is a repeat the stream drops
        batch.append(repeat)
    return batch


# ----------------------------------------------------------------------------------------- the services


class Warnings(logging.Handler):
    """Every WARNING and above any service logs, in order."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Running:
    name: str
    url: str
    thread: threading.Thread
    stop: threading.Event
    result: list[int]


def start_service(name: str, settings: ServiceSettings) -> Running:
    """`serve(name)` in a thread, with its real NatsBus, until its HTTP server is up."""
    stop, result = threading.Event(), []
    ready: list[HttpServer] = []
    thread = threading.Thread(target=lambda: result.append(serve(name, settings, stop, on_ready=ready.append)),
                              name=f"serve-{name}", daemon=True)
    thread.start()
    wait_until(lambda: bool(ready) or not thread.is_alive(), f"{name} to serve HTTP", 120)
    assert ready, f"{name} did not start"
    return Running(name, f"http://127.0.0.1:{ready[0].port}", thread, stop, result)


def wait_until(done: Callable[[], bool], what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Cluster:
    nats_url: str
    services: dict[str, Running]
    warnings: Warnings
    http: httpx.Client
    attempts: Iterator[int] = field(default_factory=lambda: itertools.count(1000))

    @property
    def archive_url(self) -> str:
        return self.services["archive"].url

    def publish(self, batch: list[Letter]) -> list[Any]:
        """Publish every letter as is; each result is the PubAck, or the error the server refused it with."""
        async def publish_all(js) -> list[Any]:
            results: list[Any] = []
            for letter in batch:
                headers = {"Nats-Msg-Id": letter.msg_id} if letter.msg_id else None
                try:
                    results.append(await js.publish(letter.subject, letter.payload, headers=headers))
                except nats.errors.MaxPayloadError as err:
                    results.append(err)
            return results

        return jetstream(self.nats_url, publish_all)

    def idle(self) -> bool:
        """No consumer of the POISE streams has a message pending or unacknowledged."""
        async def check(js) -> bool:
            for stream in (WORK_STREAM, EVENT_STREAM, ADVISORY_STREAM):
                for info in await js.consumers_info(stream):
                    if info.num_pending or info.num_ack_pending:
                        return False
            return True

        return jetstream(self.nats_url, check)

    def wait_settled(self) -> None:
        """Until every consumer is idle twice in a row (a handler publishes follow-ups before its ack)."""
        quiet = 0
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while quiet < 2:
            assert time.monotonic() < deadline, f"messages still pending after {SETTLE_TIMEOUT_S:.0f} s"
            quiet = quiet + 1 if self.idle() else 0
            time.sleep(0.1)

    def dlq_last_seq(self) -> int:
        async def last(js) -> int:
            return (await js.stream_info(DLQ_STREAM)).state.last_seq

        return jetstream(self.nats_url, last)

    def dead_letters_after(self, seq: int) -> dict[tuple[str, int], dict[str, str]]:
        """(stream, stream sequence) of each original dead-lettered after DLQ sequence `seq` -> its headers."""
        async def read(js) -> dict[tuple[str, int], dict[str, str]]:
            last = (await js.stream_info(DLQ_STREAM)).state.last_seq
            letters: dict[tuple[str, int], dict[str, str]] = {}
            for n in range(seq + 1, last + 1):
                headers = (await js.get_msg(DLQ_STREAM, n)).headers or {}
                letters[(headers["Poise-Stream"], int(headers["Poise-Stream-Seq"]))] = headers
            return letters

        return jetstream(self.nats_url, read)

    def last_event(self, subject: str) -> tuple[int, Message]:
        async def last(js) -> Any:
            return await js.get_last_msg(EVENT_STREAM, subject)

        raw = jetstream(self.nats_url, last)
        return raw.seq, decode(subject, raw.data)

    def ack_floor(self, stream: str, subject: str) -> int:
        async def floor(js) -> int:
            return (await js.consumer_info(stream, durable_name(subject))).ack_floor.stream_seq

        return jetstream(self.nats_url, floor)

    def assert_all_up(self, after: object) -> None:
        for service in self.services.values():
            assert service.thread.is_alive(), f"{service.name} stopped after {after}"
            health = self.http.get(f"{service.url}/healthz")
            assert health.status_code == 200, f"{service.name} after {after}: {health.text}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """nats-server, the archive over an SQLite store holding one finished run (its evaluated root waits only
    for its reflection, its spend cap of 0 stops proposals), and the five workers."""
    root: Path = tmp_path_factory.mktemp("fuzz-bus")
    server = NatsServer(root / "jetstream", root / "nats-server.log").start()
    work_dir = root / "work"
    work_dir.mkdir()
    store = SQLiteStore(work_dir / "archive.db")
    store.put_run(RunConfig(run_id=RUN, protocol="tiny", budget=1, parallel=1, root_seeds=1, replicate_seeds=1,
                            llm_budget_usd=0.0))
    for node in archive_nodes()[:2]:  # the evaluated root and a failed child; a proposed node would be implemented
        store.insert_node(node)
    store.close()
    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    common = {"nats_url": server.url, "work_dir": work_dir, "http_host": "127.0.0.1", "http_port": 0,
              "ack_wait_s": 10.0, "max_deliver": 2, "nak_delay_s": 0.1, "shutdown_grace_s": 2.0}
    services: dict[str, Running] = {}
    try:
        services["archive"] = start_service("archive", ServiceSettings(**common))
        archive_url = services["archive"].url
        for name in WORKERS:
            services[name] = start_service(name, ServiceSettings(**common, archive_url=archive_url))
        with httpx.Client(timeout=30) as http:
            cluster = Cluster(server.url, services, warnings, http)
            wait_until(lambda: all(http.get(f"{s.url}/healthz").status_code == 200 for s in services.values()),
                       "every service to be healthy", 120)
            # the resumed run's one piece of work: the root's reflection, through the reflector and back
            wait_until(lambda: http.get(f"{archive_url}/api/runs/{RUN}/nodes/{ROOT}").json()["status"]
                       == "reflected", "the root to be reflected")
            cluster.wait_settled()
            yield cluster
    finally:
        for name in (*WORKERS, "archive"):
            if name in services:
                services[name].stop.set()
                services[name].thread.join(30)
        logging.getLogger().removeHandler(warnings)
        server.stop()
    assert {name: s.result for name, s in services.items()} == {name: [0] for name in services}


# ------------------------------------------------------------------------------------------------ fuzz


def assert_ended_well(letter: Letter, outcome: Any, dead: dict[tuple[str, int], dict[str, str]],
                      warned: list[str]) -> None:
    """Refused at publish, dead-lettered with a reason, or handled and logged naming its node."""
    if isinstance(outcome, Exception):
        assert len(letter.payload) > NATS_MAX_PAYLOAD, f"{letter} refused at publish: {outcome!r}"
        return
    if outcome.duplicate:
        assert letter.msg_id is not None, f"{letter} dropped as a duplicate without a msg id"
        return
    key = (outcome.stream, outcome.seq)
    try:
        message = decode(letter.subject, letter.payload)
    except ContractError:
        assert key in dead, f"{letter} (#{outcome.seq}) is not a valid message but is not in the DLQ"
        reason = dead[key][REASON_HEADER]
        assert isinstance(reason, str) and reason.startswith(f"undecodable: invalid {letter.subject} message"), reason
        assert int(dead[key].get(TRUNCATED_HEADER, len(letter.payload))) == len(letter.payload), dead[key]
        return
    if key in dead:
        reason = dead[key].get(REASON_HEADER)
        assert isinstance(reason, str) and reason.strip(), f"{letter} dead-lettered without a reason: {reason!r}"
        return
    # The archive names run/node when it drops an event of a run it does not hold; a worker's answer to a valid
    # work message is such an event. A valid message seen before gets no new line: the answer repeats an earlier
    # msg id, which the stream drops, hence every warning so far.
    named = re.compile(rf"(?<![\w.-]){re.escape(message.run_id)}/{re.escape(message.node_id)}(?![\w.-])")
    assert any(named.search(line) for line in warned), f"{letter} handled but nothing logged about it"


@settings(derandomize=True, database=None, max_examples=EXAMPLES, deadline=None,
          phases=(Stage.explicit, Stage.generate),  # no shrinking: each replay waits on six live services
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=batches())
# Junk just under the server's max payload: its copy to the DLQ, with the reason and the stream position in
# headers, went over the limit; the server's error closed the trainer's connection for good (nats-py does not
# reconnect after it), so the trainer stopped consuming. Now the copy keeps what fits (Poise-Truncated).
@example(batch=[Letter("work.train", b"x" * (NATS_MAX_PAYLOAD - 64), kind="hostile")])
# A field name that is not ASCII: the reason quotes it, and the DLQ copy's Poise-Reason header came back from
# nats-py as an email.header.Header object, not text. Reasons in headers are now ASCII (escaped).
@example(batch=[Letter("evt.implemented", '{"\u00b6": 1}'.encode(), kind="wrong type")])
def test_every_malformed_message_ends_in_the_dlq_or_is_logged_and_the_services_keep_serving(
        cluster: Cluster, batch: list[Letter]):
    dlq_before = cluster.dlq_last_seq()
    outcomes = cluster.publish(batch)
    good = WorkReflect(run_id=RUN, node_id=ROOT, attempt=next(cluster.attempts))
    cluster.publish([Letter(good.subject, encode(good), good.msg_id)])
    cluster.wait_settled()
    dead = cluster.dead_letters_after(dlq_before)
    for letter, outcome in zip(batch, outcomes, strict=True):
        assert_ended_well(letter, outcome, dead, cluster.warnings.messages)
    # the good message behind the junk: reflected by the reflector, and its event handled by the archive
    seq, reflected = cluster.last_event("evt.reflected")
    assert reflected.attempt == good.attempt, f"the reflector did not answer {good.msg_id}"
    assert cluster.ack_floor(EVENT_STREAM, "evt.reflected") >= seq and (EVENT_STREAM, seq) not in dead
    cluster.assert_all_up(batch)


def test_a_message_too_large_for_the_server_with_its_headers_is_refused_before_it_is_sent(cluster: Cluster):
    """Within the contracts' size limit but over the server's max payload once Nats-Msg-Id is added: sending it
    would make the server close the connection for good; publish refuses it, and the bus stays connected."""
    bus = NatsBus(cluster.nats_url)
    bus.connect()
    try:
        source = "#" * (MAX_MESSAGE_BYTES - len(encode(TEMPLATES["work.train"])) + len(SOURCE))
        too_large = TEMPLATES["work.train"].model_copy(update={"source": source})
        assert len(encode(too_large)) <= MAX_MESSAGE_BYTES
        with pytest.raises(ContractError, match="exceed the NATS server's max payload"):
            bus.publish(too_large)
        assert bus.healthy()
        bus.publish(TEMPLATES["work.reflect"].model_copy(update={"run_id": "fuzz-after", "node_id": "n1"}))
        assert bus.published == 1
    finally:
        bus.close()
