"""Per-service NATS users against a real nats-server configured by `poise secrets` (poise/nats_auth.py).

The server runs with the generated users and permissions, as compose and k8s run it: a service's user can do
its phase's work end to end (declare the streams, create and read its durable consumers, ack, publish its
event), and the server refuses it everything else: another phase's subject, another service's consumer or
inbox, and a connection without the right password.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import ConsumerConfig
from test_nats_bus import drain_until, jetstream, work_train

from app.cluster import Credentials, NatsServer
from app.serve import build_runtime
from poise.bus import InProcBus
from poise.contracts import (
    MESSAGE_TYPES,
    EvtReflected,
    EvtTrained,
    Message,
    Reflection,
    TrainingTrajectory,
    WorkPropose,
)
from poise.credentials import nats_password_file
from poise.nats_auth import ROLES, inbox_prefix, permissions, user_of
from poise.nats_bus import EVENT_STREAM, WORK_STREAM, NatsAuthError, NatsBus, NatsPermissionError
from poise.settings import SERVICES, ServiceSettings

pytestmark = pytest.mark.nats


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    """nats-server with the users and permissions `poise secrets` writes."""
    server = NatsServer(tmp_path / "jetstream", tmp_path / "nats-server.log", Credentials(tmp_path / "secrets"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bus_of(secured: NatsServer) -> Iterator:
    """Buses connected as a service's user (or with the credentials given), closed at teardown."""
    buses: list[NatsBus] = []

    def make(service: str, connect: bool = True, **credentials: str | None) -> NatsBus:
        password = (secured.credentials.directory / nats_password_file(service)).read_text().strip()
        options = {"user": user_of(service), "password": password, **credentials}
        bus = NatsBus(secured.url, ack_wait_s=5.0, nak_delay_s=0.2, publish_timeout_s=10.0, connect_timeout_s=5.0,
                      name=f"test-{service}", **options)
        buses.append(bus)
        if connect:
            bus.connect()
        return bus

    yield make
    for bus in buses:
        bus.close()


def subjects_stored(server: NatsServer, stream: str) -> dict[str, int]:
    async def count(js):
        return (await js.stream_info(stream, subjects_filter=">")).state.subjects or {}

    return jetstream(server.admin_url, count)


def trained() -> EvtTrained:
    return EvtTrained(run_id="run-auth", node_id="n001", trajectory=TrainingTrajectory(protocol="tiny", seed=3))


def reflected() -> EvtReflected:
    return EvtReflected(run_id="run-auth", node_id="n001", reflection=Reflection(text="steadier", generator="offline"))


# ------------------------------------------------------------------------------------- what is allowed


def test_each_service_user_does_its_phase_end_to_end_the_archive_hands_work_to_the_trainer_and_hears_back(bus_of,
                                                                                                       secured):
    archive, trainer = bus_of("archive", connect=False), bus_of("trainer", connect=False)
    events: list[Message] = []
    archive.subscribe("evt.trained", events.append)

    def train(work: Message) -> None:
        trainer.publish(trained())

    trainer.subscribe("work.train", train)
    archive.connect()
    trainer.connect()
    archive.publish(work_train())
    drain_until(trainer, lambda: trainer.acked == 1)
    drain_until(archive, lambda: events)
    assert [event.subject for event in events] == ["evt.trained"] and archive.acked == 1
    assert subjects_stored(secured, WORK_STREAM) == {}  # the trainer's ack removed the work
    assert not secured.violations()


def test_every_service_user_connects_declares_the_streams_and_binds_its_consumers(bus_of, secured):
    for service, role in ROLES.items():
        bus = bus_of(service, connect=False)
        for subject in role.consumes:
            bus.subscribe(subject, print)
        bus.connect()  # raises if any JetStream request it makes is refused (the request times out)
        assert bus.healthy(), service
    assert not secured.violations()


def test_a_failing_worker_dead_letters_under_its_own_permissions(bus_of, secured):
    """The dead-letter path (DLQ copy, evt.failed, +TERM) needs only the trainer's permissions."""
    archive, trainer = bus_of("archive"), bus_of("trainer", connect=False, )
    failures: list[str] = []

    def refuse(work: Message) -> None:
        raise ValueError("a broken candidate")

    trainer.max_deliver = 1
    trainer.dead_letter = lambda message, reason: failures.append(reason)
    trainer.subscribe("work.train", refuse)
    trainer.connect()
    archive.publish(work_train())
    drain_until(trainer, lambda: trainer.dead_lettered == 1)
    assert failures and "a broken candidate" in failures[0]
    assert subjects_stored(secured, "POISE_DLQ") == {"dlq.work.train": 1}
    assert not secured.violations()


# ---------------------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("message", [reflected(), WorkPropose(run_id="run-auth", node_id="n002")],
                         ids=["evt.reflected", "work.propose"])
def test_the_trainer_user_cannot_publish_another_phase_subject(bus_of, secured, message):
    trainer = bus_of("trainer")
    with pytest.raises(NatsPermissionError, match=f"user poise-trainer to publish {message.subject}"):
        trainer.publish(message)
    trainer.publish(trained())  # its own subject still goes through on the same connection
    stored = {**subjects_stored(secured, EVENT_STREAM), **subjects_stored(secured, WORK_STREAM)}
    assert stored == {"evt.trained": 1}


def test_the_server_refuses_a_plain_publish_a_subscription_and_a_consumer_outside_the_trainer_permissions(
        secured, bus_of):
    bus_of("trainer")  # the streams, declared as a service does
    password = (secured.credentials.directory / nats_password_file("trainer")).read_text().strip()

    async def main() -> list[str]:
        errors: list[str] = []

        async def error(err: Exception) -> None:
            errors.append(str(err))

        nc = await nats.connect(secured.url, user=user_of("trainer"), password=password,
                                inbox_prefix=inbox_prefix(user_of("trainer")), error_cb=error)
        try:
            await nc.publish("evt.reflected", b"{}")
            await nc.subscribe(f"{inbox_prefix(user_of('archive'))}.>")  # another service's replies
            await nc.subscribe("work.>")
            js = nc.jetstream(timeout=1.0)
            for name in ("work_propose", "work_train"):  # the proposer's consumer, or its own name on that filter
                with pytest.raises(nats.errors.TimeoutError):  # the request is dropped: no answer comes
                    await js.add_consumer(WORK_STREAM, ConsumerConfig(name=name, durable_name=name,
                                                                      filter_subject="work.propose"))
            await nc.flush()
            await asyncio.sleep(0.2)
        finally:
            await nc.close()
        return errors

    errors = " | ".join(asyncio.run(main())).lower()
    assert 'permissions violation for publish to "evt.reflected"' in errors
    assert 'permissions violation for subscription to "_inbox.poise-archive.>"' in errors
    assert 'permissions violation for subscription to "work.>"' in errors
    assert 'permissions violation for publish to "$js.api.consumer.create.poise_work.work_propose.work.propose"' \
        in errors
    assert 'permissions violation for publish to "$js.api.consumer.create.poise_work.work_train.work.propose"' \
        in errors
    assert "evt.reflected" not in subjects_stored(secured, EVENT_STREAM)
    assert any('"$G/user:poise-trainer" - Publish Violation - Subject "evt.reflected"' in line
               for line in secured.violations())


@pytest.mark.parametrize(("credentials", "refused"), [
    ({"password": "not-the-password"}, "refused the credentials of NATS user poise-trainer"),
    ({"user": None, "password": None}, "refused a connection without credentials"),
    ({"user": "poise-admin"}, "refused the credentials of NATS user poise-admin"),  # the trainer's password
], ids=["wrong-password", "none", "another-user"])
def test_a_connection_without_the_right_password_is_refused_and_says_so(bus_of, credentials, refused):
    bus = bus_of("trainer", connect=False, **credentials)
    with pytest.raises(NatsAuthError, match=refused):
        bus.connect()
    assert not bus.healthy()


# --------------------------------------------------------------------------------- one place for the lists


def test_every_subject_has_one_consumer_and_a_publisher_and_every_service_a_role():
    assert set(ROLES) == set(SERVICES)
    consumers = [subject for role in ROLES.values() for subject in role.consumes]
    assert sorted(consumers) == sorted(MESSAGE_TYPES), "each subject is consumed by exactly one service"
    published = {subject for role in ROLES.values() for subject in role.publishes}
    assert published == set(MESSAGE_TYPES)
    for service, role in ROLES.items():  # a worker never publishes its own work, nor another's dead letters
        assert service == "archive" or not set(role.consumes) & set(role.publishes), service
        allowed = permissions(service)["publish"]["allow"]
        assert {s for s in allowed if s.startswith("dlq.")} == {f"dlq.{s}" for s in role.consumes}
        assert not any(s in allowed for s in MESSAGE_TYPES if s not in role.publishes), service
        assert not any(">" in s or "*" in s for s in allowed if not s.startswith("$JS.ACK.")), service


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_subscribes_to_exactly_what_its_role_consumes(service, tmp_path):
    """The runtime `poise serve` builds (app/serve.py) against the permission lists: they cannot drift."""
    settings = ServiceSettings(work_dir=tmp_path, http_port=0, archive_url="http://127.0.0.1:9")
    runtime = build_runtime(service, InProcBus(), settings)
    try:
        assert set(runtime.subscriptions) == set(ROLES[service].consumes)
    finally:
        for close in runtime.closers:
            close()
