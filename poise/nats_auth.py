"""Who may do what on NATS: one user per service, each allowed only the subjects of its phase.

The one place that says which subjects a service consumes and publishes (`ROLES`); from it come the
nats-server `authorization` block (`server_config`) that app/cluster.py, docker compose and k8s all use (the
files `poise secrets` writes, poise/credentials.py), so the permissions cannot drift between them
(docs/operations.md, "Authentication").

A service's user may publish its own result events (and `evt.failed`), copy what it consumes to the DLQ, and
use the JetStream API for exactly its own durable consumers: `$JS.API.CONSUMER.CREATE` pinned to the
consumer's name and filter subject, `MSG.NEXT` and `$JS.ACK` of those consumers, the four POISE streams'
INFO/CREATE/UPDATE (every process declares them, poise/nats_bus.py), and `STREAM.MSG.GET` (and, on the work
queue, `MSG.DELETE`) of the stream it consumes, which the MAX_DELIVERIES path needs. Replies come to an inbox
of its own (`inbox_prefix`), the only subjects it may subscribe to: pull consumers deliver into the inbox
of the fetch request, so no service subscribes to a message subject at all. Everything else is denied by
nats-server: the trainer's user cannot publish `evt.reflected` or `work.propose`, nor read another service's
replies. The admin user (`ADMIN_USER`) has no limits; it is for an operator's `nats` CLI and the tests' view
of the streams, never given to a service.

Left open by design: a service may update the POISE streams' configuration (a rolling upgrade declares them
from whichever service starts first) and read any message of the stream it consumes by sequence number.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from poise.contracts import MESSAGE_TYPES
from poise.nats_bus import ADVISORY_STREAM, MAX_DELIVERIES, STREAMS, WORK_STREAM, dlq_subject, durable_name, stream_of

ADMIN_USER = "poise-admin"
JS_API = "$JS.API"
WORK_SUBJECTS = tuple(subject for subject in MESSAGE_TYPES if subject.startswith("work."))
EVENT_SUBJECTS = tuple(subject for subject in MESSAGE_TYPES if subject.startswith("evt."))


@dataclass(frozen=True)
class Role:
    """The message subjects one service consumes (through durable pull consumers) and publishes."""

    consumes: tuple[str, ...]
    publishes: tuple[str, ...]


# Each service of poise/settings.py SERVICES. The archive applies every event and hands out all the work (and
# the root's evt.proposed); a worker takes its phase's work and answers with its event, or evt.failed (its own
# failures and its dead letters, app/serve.py forward_dead_letter).
ROLES: dict[str, Role] = {
    "archive": Role(consumes=EVENT_SUBJECTS, publishes=(*WORK_SUBJECTS, "evt.proposed")),
    "proposer": Role(consumes=("work.propose",), publishes=("evt.proposed", "evt.failed")),
    "implementer": Role(consumes=("work.implement",), publishes=("evt.implemented", "evt.failed")),
    "trainer": Role(consumes=("work.train",), publishes=("evt.trained", "evt.failed")),
    "evaluator": Role(consumes=("work.evaluate",), publishes=("evt.evaluated", "evt.failed")),
    "reflector": Role(consumes=("work.reflect",), publishes=("evt.reflected", "evt.failed")),
}


def user_of(service: str) -> str:
    """The NATS user a service connects as (POISE_NATS_USER overrides it)."""
    return f"poise-{service}"


def inbox_prefix(user: str) -> str:
    """Where `user`'s replies arrive: an inbox no other user may subscribe to."""
    return f"_INBOX.{user}"


def permissions(service: str) -> dict[str, dict[str, list[str]]]:
    """The nats-server `permissions` of `service`'s user: publish and subscribe allow lists (all else denied)."""
    role = ROLES[service]
    publish = [*role.publishes, *(dlq_subject(subject) for subject in role.consumes)]
    publish += [f"{JS_API}.STREAM.{action}.{stream.name}" for stream in STREAMS
                for action in ("INFO", "CREATE", "UPDATE")]
    for subject in role.consumes:
        stream, durable = stream_of(subject), durable_name(subject)
        exhausted = f"{durable}_exhausted"  # its MAX_DELIVERIES advisories (poise/nats_bus.py NatsBus.subscribe)
        for consumer_stream, consumer, filter_subject in (
                (stream, durable, subject),
                (ADVISORY_STREAM, exhausted, f"{MAX_DELIVERIES}.{stream}.{durable}")):
            publish += [f"{JS_API}.CONSUMER.CREATE.{consumer_stream}.{consumer}.{filter_subject}",
                        f"{JS_API}.CONSUMER.MSG.NEXT.{consumer_stream}.{consumer}",
                        f"$JS.ACK.{consumer_stream}.{consumer}.>"]
        publish.append(f"{JS_API}.STREAM.MSG.GET.{stream}")
        if stream == WORK_STREAM:  # an exhausted work message stays in the WorkQueue until deleted
            publish.append(f"{JS_API}.STREAM.MSG.DELETE.{stream}")
    return {"publish": {"allow": list(dict.fromkeys(publish))},
            "subscribe": {"allow": [f"{inbox_prefix(user_of(service))}.>"]}}


def server_config(passwords: Mapping[str, str]) -> str:
    """The nats-server configuration of the users in `passwords` (a service name, or ADMIN_USER, to its
    password): every service limited to its ROLES permissions, the admin unlimited. JetStream and the ports stay
    command-line flags, so one file serves app/cluster.py, compose and k8s."""
    users = []
    for name, password in passwords.items():
        if name == ADMIN_USER:
            users.append({"user": ADMIN_USER, "password": password})
        else:
            users.append({"user": user_of(name), "password": password, "permissions": permissions(name)})
    # JSON is valid nats-server configuration; quoted strings keep `$JS...` from reading as a variable
    body = json.dumps({"authorization": {"users": users}}, indent=2)
    return ("# POISE's NATS users and their permissions, generated by `poise secrets` from poise/nats_auth.py: "
            "do not edit.\n# It holds passwords: keep it as secret as they are.\n" + body + "\n")
