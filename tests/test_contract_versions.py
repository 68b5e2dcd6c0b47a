"""Contract versions and rolling upgrades (docs/architecture.md, "Contract versions and rolling upgrades").

Two mixed pairs exchange every message with the current contracts:

- the previous version, 1.0: poise/contracts.py as deployed before versions existed, frozen in contracts_v1_0.py.
  The current version reads everything 1.0 sends; 1.0 refuses what the current version sends (schema_version is an
  unknown field to it), which is why 2.0 is a major version. "One ahead" holds from 2.0 on.
- the deployed minor version, 2.0, frozen in contracts_v2_0.py (2.1 added racing, the split and the report, early
  stopping, and GPU-seconds): each side reads what the other writes, and 2.0 keeps the 2.1 fields (a report arm,
  the half an evaluation scored, a node's report runs, a stopped training, a training's plan, GPU-seconds) and
  writes them back unchanged.
- the next version: the current source with a field added to Evaluation, CallRecord and Node, loaded as a
  module of its own. Each side reads what the other writes, and what the current side writes back (the archive
  updating a node, stored in SQLite or MongoDB) still holds the 2.1 fields with their values.

Then the refusals: unknown fields in a document of this version, a major version ahead or two behind, and a store
or stream of such a version, refused when the service starts, naming both versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import contracts_v1_0 as previous
import contracts_v2_0 as deployed
import mongomock
import pytest
from pydantic import ValidationError
from test_contracts import (
    DOCUMENT_FACTORIES,
    MESSAGE_FACTORIES,
    RUN,
    make_call_record,
    make_evaluation,
    make_node,
    make_run_config,
)

from archive.mongo_store import MongoStore
from archive.sqlite_store import DB_FILENAME, SQLiteStore
from archive.update import ArchiveUpdater, Outcome
from poise import contracts
from poise.contracts import (
    CONTRACT_VERSION,
    MESSAGE_TYPES,
    UNVERSIONED,
    ContractError,
    EvtEvaluated,
    EvtReflected,
    Genealogy,
    Node,
    NodeStatus,
    RunConfig,
    decode,
    encode,
    version_key,
)
from poise.store import ArchiveStore, IncompatibleArchive

MAJOR, MINOR = version_key(CONTRACT_VERSION)
NEXT = f"{MAJOR}.{MINOR + 1}"  # one minor version ahead
MAJOR_AHEAD = f"{MAJOR + 1}.0"
TOO_OLD = f"{MAJOR - 2}.9"
SOURCE = Path(contracts.__file__).read_text()


# ------------------------------------------------------------------------------------ the next version


def next_version() -> ModuleType:
    """The current contracts as the next minor version would be: CONTRACT_VERSION one minor up, and one new field,
    with a default, on Evaluation (inside evt.evaluated and the node), CallRecord (inside four events and the node)
    and Node itself."""
    edits = [
        (f'CONTRACT_VERSION = "{CONTRACT_VERSION}"', f'CONTRACT_VERSION = "{NEXT}"'),
        ("    @model_validator(mode=\"after\")\n    def _check_suite_keys",
         "    pass_at_1: float | None = None\n\n    @model_validator(mode=\"after\")\n    def _check_suite_keys"),
        ("    @field_validator(\"error\")\n", "    region: str | None = None\n\n    @field_validator(\"error\")\n"),
        ("    @property\n    def node_id(self) -> str:\n",
         "    tags: list[str] = []\n\n    @property\n    def node_id(self) -> str:\n"),
    ]
    source = SOURCE
    for old, new in edits:
        assert source.count(old) == 1, f"poise/contracts.py changed: cannot place {new.split()[0]!r} in it"
        source = source.replace(old, new)
    name = "contracts_next"
    module = sys.modules.get(name)
    if module is None:
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
        sys.modules[name] = module  # pydantic resolves the annotations through the module
        exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def nxt() -> ModuleType:
    return next_version()


def as_next(nxt: ModuleType, message: contracts.Message) -> Any:
    """`message` as the next version's sender makes it: its own classes, the new fields set."""
    payload = json.loads(encode(message))
    payload.pop("schema_version")
    for call in payload.get("llm_calls", []):
        call["region"] = "eu"
    if "evaluation" in payload:
        payload["evaluation"]["pass_at_1"] = 0.25
    sent = nxt.MESSAGE_TYPES[message.subject].model_validate(payload)  # made from Python values: its version
    assert sent.schema_version == NEXT
    return sent


def with_calls(subject: str) -> contracts.Message:
    """The test factory's message, with an agent-LLM request where the subject carries them."""
    message = MESSAGE_FACTORIES[subject]()
    if "llm_calls" in type(message).model_fields:
        message = message.model_copy(update={"llm_calls": [make_call_record()]})
    return message


# -------------------------------------------------------------------------------------------- stamps


def test_every_message_and_stored_document_carries_the_contract_version() -> None:
    for subject in MESSAGE_TYPES:
        assert json.loads(encode(MESSAGE_FACTORIES[subject]()))["schema_version"] == CONTRACT_VERSION
    assert json.loads(make_node().model_dump_json())["schema_version"] == CONTRACT_VERSION
    assert make_run_config().model_dump()["schema_version"] == CONTRACT_VERSION
    assert "schema_version" in contracts.RECORDED_SETTINGS  # not a setting: a resume does not compare it


def test_json_without_a_version_was_written_before_versions_and_python_values_are_this_version() -> None:
    payload = json.loads(encode(MESSAGE_FACTORIES["work.train"]()))
    del payload["schema_version"]
    assert decode("work.train", json.dumps(payload).encode()).schema_version == UNVERSIONED
    assert contracts.WorkTrain.model_validate(payload).schema_version == CONTRACT_VERSION
    old = Node.model_validate_json(json.dumps({k: v for k, v in json.loads(make_node().model_dump_json()).items()
                                               if k != "schema_version"}))
    assert old.schema_version == UNVERSIONED
    assert json.loads(old.model_dump_json())["schema_version"] == CONTRACT_VERSION  # written back in this version


# ------------------------------------------------------------------- the previous version (1.0)


@pytest.mark.parametrize("subject", MESSAGE_TYPES)
def test_what_the_previous_version_sends_this_one_reads(subject: str) -> None:
    message = with_calls(subject)
    # What 1.0 held: the fields later versions added have their defaults, and a 1.0 sender never wrote them.
    payload = json.loads(message.model_dump_json(exclude={"schema_version"}, exclude_defaults=True))
    sent = previous.encode(previous.decode(subject, json.dumps(payload).encode()))  # a 1.0 service's bytes
    received = decode(subject, sent)
    assert received.schema_version == UNVERSIONED
    assert received.model_dump(exclude={"schema_version"}) == message.model_dump(exclude={"schema_version"})
    assert received.msg_id == message.msg_id  # a message republished across the upgrade is still deduplicated


@pytest.mark.parametrize("subject", MESSAGE_TYPES)
def test_the_previous_version_refuses_what_this_one_sends_so_the_change_is_a_major_one(subject: str) -> None:
    with pytest.raises(previous.ContractError, match=r"schema_version\n  Extra inputs are not permitted"):
        previous.decode(subject, encode(MESSAGE_FACTORIES[subject]()))
    assert version_key(CONTRACT_VERSION)[0] > version_key(UNVERSIONED)[0]


# ------------------------------------------------------------------- the deployed version (2.0)


def with_new_fields(subject: str) -> contracts.Message:
    """The test factory's message with what 2.1 added set where the subject carries it: a report arm, the half
    an evaluation scored, a node's report runs, a run's seeding, split and report seeds."""
    message = with_calls(subject)
    changes: dict[str, Any] = {}
    if "arm" in type(message).model_fields:
        changes["arm"] = "minus:scale:none"
    if "half" in type(message).model_fields:
        changes["half"] = "reporting"
    if "evaluation" in type(message).model_fields:
        changes["evaluation"] = message.evaluation.model_copy(update={"half": "reporting"})
    return message.model_copy(update=changes)


@pytest.mark.parametrize("subject", MESSAGE_TYPES)
def test_the_deployed_version_and_this_one_read_each_other_and_nothing_of_this_one_is_lost(subject: str) -> None:
    assert deployed.CONTRACT_VERSION == "2.0" and version_key(CONTRACT_VERSION) == (2, 1)
    message = with_new_fields(subject)
    received = deployed.decode(subject, encode(message))  # a 2.0 service reads a 2.1 message ...
    assert received.schema_version == CONTRACT_VERSION
    assert decode(subject, deployed.encode(received)) == message  # ... and passes it on with every 2.1 field
    # what 2.1 added is at its defaults in the factory's message, and a 2.0 sender never wrote it
    payload = json.loads(MESSAGE_FACTORIES[subject]().model_dump_json(exclude={"schema_version"},
                                                                       exclude_defaults=True))
    old = deployed.MESSAGE_TYPES[subject].model_validate(payload)  # as a 2.0 sender makes it
    assert old.schema_version == "2.0"
    back = decode(subject, deployed.encode(old))  # what 2.0 sends, 2.1 reads, the new fields at their defaults
    assert back.schema_version == "2.0" and getattr(back, "arm", None) is None


def test_a_run_and_a_reported_node_of_this_version_survive_a_deployed_archive() -> None:
    config = make_run_config().model_copy(update={"seeding": "racing", "split": True, "report_seeds": 5})
    kept = deployed.RunConfig.model_validate_json(config.model_dump_json())
    assert RunConfig.model_validate_json(kept.model_dump_json()) == config
    node = make_node()
    reported = node.model_copy(update={"reported": [contracts.ReportedRun(arm="best", evaluation=make_evaluation())]})
    kept_node = deployed.Node.model_validate_json(reported.model_dump_json())
    assert Node.model_validate_json(kept_node.model_dump_json()) == reported


# ---------------------------------------------------------------- the deployed minor version (2.0, one behind)


def stopped_trained() -> contracts.EvtTrained:
    trajectory = MESSAGE_FACTORIES["evt.trained"]().trajectory.model_copy(
        update={"checkpoint_uri": None, "stopped_early": DOCUMENT_FACTORIES["early_stop"]()})
    return contracts.EvtTrained(run_id=RUN, node_id="n0007", trajectory=trajectory)


def planned_train() -> contracts.WorkTrain:
    return MESSAGE_FACTORIES["work.train"]().model_copy(update={"early_stop": DOCUMENT_FACTORIES["stop_plan"]()})


@pytest.mark.parametrize("subject", MESSAGE_TYPES)
def test_the_deployed_minor_version_and_this_one_read_each_other(subject: str) -> None:
    assert deployed.CONTRACT_VERSION == "2.0" and version_key(deployed.CONTRACT_VERSION) < version_key(CONTRACT_VERSION)
    message = with_calls(subject)
    received = deployed.decode(subject, encode(message))  # 2.0 reads what 2.1 sends
    assert json.loads(deployed.encode(received)) == json.loads(encode(message))  # and passes it on unchanged
    old = decode(subject, deployed.encode(deployed.decode(subject, deployed.encode(received))))
    assert old.model_dump(exclude={"schema_version"}) == message.model_dump(exclude={"schema_version"})


@pytest.mark.parametrize("make", [stopped_trained, planned_train])
def test_the_deployed_minor_version_keeps_what_early_stopping_added(make: Callable[[], contracts.Message]) -> None:
    message = make()
    received = deployed.decode(message.subject, encode(message))
    assert received.schema_version == CONTRACT_VERSION
    echoed = deployed.encode(received)
    assert decode(message.subject, echoed) == message
    if isinstance(message, contracts.EvtTrained):  # a 2.0 archive stores the node with the stop kept in it
        node = deployed.Node.model_validate_json(make_node().model_dump_json())
        kept = node.model_copy(update={"trajectory": received.trajectory, "evaluation": None, "reflection": None,
                                       "replicates": [], "status": deployed.NodeStatus.TRAINED})
        assert Node.model_validate_json(kept.model_dump_json()).trajectory.stopped_early == \
            message.trajectory.stopped_early


# --------------------------------------------------------------------------- the next version (one ahead)


@pytest.mark.parametrize("subject", MESSAGE_TYPES)
def test_the_next_version_and_this_one_read_each_other_and_nothing_of_the_next_is_lost(
        nxt: ModuleType, subject: str) -> None:
    sent = as_next(nxt, with_calls(subject))
    received = decode(subject, nxt.encode(sent))
    assert received.schema_version == NEXT
    echoed = json.loads(encode(received))  # the current side passes it on (the archive keeps what it stores)
    assert echoed == json.loads(nxt.encode(sent))
    assert nxt.decode(subject, json.dumps(echoed).encode()) == sent
    back = nxt.decode(subject, encode(MESSAGE_FACTORIES[subject]()))  # one behind, for the next version
    assert back.schema_version == CONTRACT_VERSION


def test_a_kept_field_moved_into_a_document_of_this_version_makes_it_the_newer_one(nxt: ModuleType) -> None:
    event = decode("evt.evaluated", nxt.encode(as_next(nxt, MESSAGE_FACTORIES["evt.evaluated"]())))
    work = contracts.WorkEvaluate(run_id=RUN, node_id="n0007", checkpoint_uri="file:///c", protocol="p", seed=1)
    node = make_node().model_copy(update={"evaluation": event.evaluation})
    assert node.schema_version == CONTRACT_VERSION
    written = json.loads(node.model_dump_json())
    assert written["schema_version"] == NEXT and written["evaluation"]["pass_at_1"] == 0.25
    assert Node.model_validate_json(node.model_dump_json()).evaluation == event.evaluation
    assert json.loads(encode(work))["schema_version"] == CONTRACT_VERSION  # only what holds kept fields


# ------------------------------------------------------------------------------------- the stores


@pytest.fixture(params=["sqlite", "mongomock"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], ArchiveStore]]:
    client = mongomock.MongoClient()
    opened: list[ArchiveStore] = []

    def open_() -> ArchiveStore:
        store = SQLiteStore(tmp_path / DB_FILENAME) if request.param == "sqlite" else MongoStore(client)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def stored_document(store: ArchiveStore, node_id: str) -> dict:
    """The node's document as the store holds it, not as this POISE reads it."""
    if isinstance(store, SQLiteStore):
        return json.loads(store._db.execute("SELECT doc FROM nodes WHERE node_id = ?", (node_id,)).fetchone()[0])
    return store.database["nodes"].find_one({"node_id": node_id})


def test_the_archive_keeps_a_newer_nodes_fields_through_its_updates(nxt: ModuleType, open_store) -> None:
    store = open_store()
    store.put_run(RunConfig(run_id=RUN))
    root = make_node().model_copy(update={"genealogy": Genealogy(run_id=RUN, node_id="n000"), "reflection": None,
                                          "status": NodeStatus.EVALUATED})
    newer = json.loads(root.model_dump_json()) | {"tags": ["from-2.1"]}
    newer["schema_version"] = NEXT
    newer["llm_calls"] = [json.loads(make_call_record().model_dump_json()) | {"region": "eu"}]
    assert store.insert_node(Node.model_validate_json(json.dumps(newer)))  # a 2.1 node, as a 2.1 archive left it
    reflected = EvtReflected(run_id=RUN, node_id="n000", reflection=make_node().reflection,
                             llm_calls=[make_call_record()])
    assert ArchiveUpdater(store).apply(reflected).outcome == Outcome.APPLIED
    doc = stored_document(store, "n000")
    assert (doc["status"], doc["schema_version"], doc["tags"]) == ("reflected", NEXT, ["from-2.1"])
    assert [call.get("region") for call in doc["llm_calls"]] == ["eu", None]
    node = nxt.Node.model_validate_json(store.get_node(RUN, "n000").model_dump_json())  # the 2.1 archive again
    assert node.tags == ["from-2.1"] and [c.region for c in node.llm_calls] == ["eu", None]


def test_a_newer_events_result_stored_on_a_node_of_this_version_keeps_its_fields(nxt: ModuleType, open_store) -> None:
    store = open_store()
    store.put_run(RunConfig(run_id=RUN))
    trained = make_node().model_copy(update={"genealogy": Genealogy(run_id=RUN, node_id="n000"), "evaluation": None,
                                             "reflection": None, "replicates": [], "status": NodeStatus.TRAINED})
    store.insert_node(trained)
    event = decode("evt.evaluated", nxt.encode(as_next(nxt, EvtEvaluated(run_id=RUN, node_id="n000",
                                                                         evaluation=make_evaluation()))))
    result = ArchiveUpdater(store).apply(event)
    assert result.outcome == Outcome.APPLIED
    doc = stored_document(store, "n000")
    assert doc["schema_version"] == NEXT and doc["evaluation"]["pass_at_1"] == 0.25
    work = result.next_work[0]  # the reflector's work names the node only: this version's
    assert json.loads(encode(work))["schema_version"] == CONTRACT_VERSION
    assert store.get_node(RUN, "n000").evaluation == event.evaluation


def test_a_store_records_the_contract_version_and_keeps_a_newer_minor_one(open_store) -> None:
    store = open_store()
    assert store.contract_version == CONTRACT_VERSION
    set_recorded(store, NEXT)
    assert open_store().contract_version == NEXT


def set_recorded(store: ArchiveStore, version: str) -> None:
    if isinstance(store, SQLiteStore):
        with store._write() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'contract_version'", (version,))
    else:
        store.database["meta"].update_one({"_id": "contract_version"}, {"$set": {"version": version}})


@pytest.mark.parametrize("version", [MAJOR_AHEAD, TOO_OLD])
def test_a_store_of_a_major_version_this_poise_cannot_read_is_refused_when_it_opens(open_store, version: str) -> None:
    store = open_store()
    store.put_run(RunConfig(run_id=RUN))
    set_recorded(store, version)
    with pytest.raises(IncompatibleArchive, match=rf"holds documents of contracts {version}, .*{CONTRACT_VERSION}"):
        open_store()
    assert store.get_run(RUN) is not None  # nothing was changed by the refused open
    if isinstance(store, SQLiteStore):
        store.close()
        with pytest.raises(IncompatibleArchive, match=f"contracts {version}"):
            SQLiteStore(store.path, read_only=True)
        db = sqlite3.connect(store.path)
        assert db.execute("SELECT value FROM meta").fetchall() == [(version,)]
        db.close()


def test_an_archive_from_before_versions_is_read_as_such_and_recorded(tmp_path: Path) -> None:
    node = make_node().model_copy(update={"genealogy": Genealogy(run_id=RUN, node_id="n000"), "status":
                                          NodeStatus.PROPOSED, "implementation": None, "trajectory": None,
                                          "evaluation": None, "replicates": [], "reflection": None})
    with SQLiteStore(tmp_path / DB_FILENAME) as store:
        store.insert_node(node)
        store.put_run(RunConfig(run_id=RUN))
    db = sqlite3.connect(tmp_path / DB_FILENAME)  # as a schema-3 file, written by 1.0, holds it
    for table in ("nodes", "runs"):
        for rowid, doc in db.execute(f"SELECT rowid, doc FROM {table}").fetchall():
            unversioned = {k: v for k, v in json.loads(doc).items() if k != "schema_version"}
            db.execute(f"UPDATE {table} SET doc = ? WHERE rowid = ?", (json.dumps(unversioned), rowid))
    db.executescript("DROP TABLE meta; PRAGMA user_version=3;")
    db.close()
    with SQLiteStore(tmp_path / DB_FILENAME) as store:
        assert store.contract_version == CONTRACT_VERSION
        assert store.get_node(RUN, "n000").schema_version == UNVERSIONED
        assert store.get_run(RUN).schema_version == UNVERSIONED
    client = mongomock.MongoClient()
    with MongoStore(client) as store:
        store.insert_node(node)
    client["poise"]["nodes"].update_many({}, {"$unset": {"schema_version": ""}})
    client["poise"]["meta"].delete_many({})
    with MongoStore(client) as store:
        assert store.contract_version == CONTRACT_VERSION
        assert store.get_node(RUN, "n000").schema_version == UNVERSIONED


def test_serve_archive_and_poise_run_refuse_a_store_they_cannot_read_saying_why(tmp_path: Path) -> None:
    from app.runner import open_run
    from app.serve import ServeError, open_store
    from poise.settings import ServiceSettings

    with SQLiteStore(tmp_path / DB_FILENAME) as store:
        set_recorded(store, MAJOR_AHEAD)
    with pytest.raises(ServeError) as refused:
        open_store(ServiceSettings(work_dir=tmp_path, mongo_url=None))
    assert str(refused.value).startswith("the archive's store (POISE_WORK_DIR): ")
    assert f"contracts {MAJOR_AHEAD}, a major version this POISE (contracts {CONTRACT_VERSION}) cannot read: run a " \
           f"POISE with contracts {MAJOR + 1}.x" in str(refused.value)
    assert "answers" not in str(refused.value)  # not the hint for a store that cannot be reached
    with pytest.raises(IncompatibleArchive, match=f"contracts {MAJOR_AHEAD}"):
        open_run(tmp_path, RunConfig(run_id=RUN))


def test_a_resumed_run_keeps_the_settings_a_newer_version_added(open_store) -> None:
    from archive.runs import resolve_run

    store = open_store()
    config = json.loads(RunConfig(run_id=RUN, budget=4).model_dump_json()) | {"schema_version": NEXT,
                                                                             "novelty_floor": 0.2}
    store.put_run(RunConfig.model_validate_json(json.dumps(config)))
    resumed = resolve_run(store, RUN, {"budget": 8, "parallel": 3}, contracts.Backends())
    stored = json.loads(store.get_run(RUN).model_dump_json())
    assert resumed.budget == 8 and stored["novelty_floor"] == 0.2 and stored["schema_version"] == NEXT


# ---------------------------------------------------------------------------------------- refusals


def test_unknown_fields_in_a_message_of_this_version_are_refused_where_they_are() -> None:
    payload = json.loads(encode(EvtEvaluated(run_id=RUN, node_id="n0007", evaluation=make_evaluation())))
    payload["evaluation"]["pass_at_1"] = 0.25
    payload["priority"] = "high"
    with pytest.raises(ContractError, match="evaluation.pass_at_1\n  Extra inputs are not permitted"):
        decode("evt.evaluated", json.dumps(payload).encode())
    del payload["schema_version"]  # 1.0: older versions have no unknown fields either
    with pytest.raises(ContractError, match="Extra inputs are not permitted"):
        decode("evt.evaluated", json.dumps(payload).encode())
    with pytest.raises(ValidationError, match="pass_at_1"):  # made here: never kept
        contracts.Evaluation(**{**make_evaluation().model_dump(), "pass_at_1": 0.25})


@pytest.mark.parametrize(("version", "why"), [
    (MAJOR_AHEAD, f"a major version this POISE \\(contracts {CONTRACT_VERSION}\\) cannot read: run a POISE with "
                  f"contracts {MAJOR + 1}.x"),
    (TOO_OLD, f"older than this POISE \\(contracts {CONTRACT_VERSION}\\) reads"),
])
def test_a_message_or_document_of_a_major_version_this_poise_cannot_read_is_refused_saying_why(
        version: str, why: str) -> None:
    payload = json.loads(encode(MESSAGE_FACTORIES["work.reflect"]())) | {"schema_version": version}
    with pytest.raises(ContractError, match=f"a WorkReflect of contracts {version}, {why}"):
        decode("work.reflect", json.dumps(payload).encode())
    document = json.loads(make_node().model_dump_json()) | {"schema_version": version}
    with pytest.raises(ValidationError, match=f"a Node of contracts {version}"):
        Node.model_validate_json(json.dumps(document))


@pytest.mark.parametrize("version", ["2", "two", "2.0.1", ""])
def test_a_malformed_version_is_refused(version: str) -> None:
    payload = json.loads(encode(MESSAGE_FACTORIES["work.reflect"]())) | {"schema_version": version}
    with pytest.raises(ContractError, match="schema_version"):
        decode("work.reflect", json.dumps(payload).encode())


def test_a_type_adapter_reads_a_list_of_documents_each_by_its_own_version() -> None:
    from pydantic import TypeAdapter

    nodes = TypeAdapter(list[Node])
    current = json.loads(make_node().model_dump_json())
    newer = current | {"schema_version": NEXT, "tags": ["x"]}
    newer["proposal"] = current["proposal"] | {"origin": "library"}
    with contracts.reading():  # as archive/client.py reads the archive's API
        read = nodes.validate_json(json.dumps([current, newer]))
    assert [n.schema_version for n in read] == [CONTRACT_VERSION, NEXT]
    assert read[1].proposal.model_dump()["origin"] == "library"
    bad = current | {"tags": ["x"]}
    with pytest.raises(ValidationError, match=r"1\.tags\n  Extra inputs are not permitted"), contracts.reading():
        nodes.validate_json(json.dumps([newer, bad]))
    with pytest.raises(ContractError, match="outside any versioned document"), contracts.reading():
        TypeAdapter(list[contracts.Proposal]).validate_json(json.dumps([newer["proposal"]]))


def test_a_body_without_a_version_never_keeps_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="schema_version"):
        contracts.RunRequest.model_validate({"run_id": RUN, "schema_version": NEXT, "novelty_floor": 0.2})


# ------------------------------------------------------------------------------------- the streams


@pytest.mark.nats
def test_a_stream_records_its_version_and_one_of_a_major_version_this_poise_cannot_read_stops_serve(
        tmp_path: Path) -> None:
    import nats

    from app.cluster import NatsServer
    from app.serve import ServeError, connect
    from poise.bus import IncompatibleStream
    from poise.nats_bus import CONTRACT_METADATA, STREAMS, WORK_STREAM, NatsBus

    def metadata_of(url: str, stream: str, version: str | None = None) -> dict:
        async def main() -> dict:
            nc = await nats.connect(url)
            try:
                js = nc.jetstream()
                config = (await js.stream_info(stream)).config
                if version is not None:
                    await js.update_stream(dataclasses.replace(config, metadata={CONTRACT_METADATA: version}))
                return (await js.stream_info(stream)).config.metadata or {}
            finally:
                await nc.close()

        return asyncio.run(main())

    server = NatsServer(tmp_path / "jetstream", tmp_path / "nats-server.log").start()
    try:
        bus = NatsBus(server.url, name="versions")
        bus.connect()
        bus.close()
        assert all(metadata_of(server.url, c.name)[CONTRACT_METADATA] == CONTRACT_VERSION for c in STREAMS)
        metadata_of(server.url, WORK_STREAM, NEXT)
        bus = NatsBus(server.url, name="versions")
        bus.connect()  # one minor version ahead: used, and left recording the newer version
        bus.close()
        assert metadata_of(server.url, WORK_STREAM)[CONTRACT_METADATA] == NEXT
        metadata_of(server.url, WORK_STREAM, MAJOR_AHEAD)
        bus = NatsBus(server.url, name="versions")
        with pytest.raises(IncompatibleStream, match=f"stream {WORK_STREAM} at .* holds messages of contracts "
                                                     f"{MAJOR_AHEAD}, a major version"):
            bus.connect()
        with pytest.raises(ServeError, match=f"cannot use NATS at .*contracts {MAJOR_AHEAD}"):
            connect(bus, threading.Event(), server.url)  # not retried: waiting would not help
        bus.close()
    finally:
        server.stop()


# ------------------------------------------------------------- the deployed minor version (2.0) and 2.1


def test_the_deployed_2_0_and_this_version_read_each_others_gpu_seconds() -> None:
    # 2.1 added GPU-seconds (EvtTrained.gpu_seconds, Cost.gpu_seconds) and RunSettings.gpu_hours_budget: a 2.0
    # service keeps them as fields of a newer minor version and passes them on; 2.1 reads 2.0's without them
    import contracts_v2_0 as deployed

    assert deployed.CONTRACT_VERSION == "2.0" and version_key(CONTRACT_VERSION) > (2, 0)
    event = MESSAGE_FACTORIES["evt.trained"]().model_copy(update={"gpu_seconds": 7200.0})
    old = deployed.decode("evt.trained", encode(event))
    assert json.loads(deployed.encode(old))["gpu_seconds"] == 7200.0  # what a 2.0 service republishes
    assert decode("evt.trained", deployed.encode(old)).gpu_seconds == 7200.0
    from_old = deployed.decode("evt.trained", encode(MESSAGE_FACTORIES["evt.trained"]()))
    payload = json.loads(deployed.encode(from_old))
    payload.pop("gpu_seconds", None)
    payload["schema_version"] = "2.0"
    assert decode("evt.trained", json.dumps(payload).encode()).gpu_seconds == 0.0
    node = make_node()
    node = node.model_copy(update={"cost": node.cost.model_copy(update={"gpu_seconds": 3600.0})})
    kept = deployed.Node.model_validate_json(node.model_dump_json())
    assert json.loads(kept.model_dump_json())["cost"]["gpu_seconds"] == 3600.0
    config = make_run_config().model_copy(update={"gpu_hours_budget": 64.0})
    assert json.loads(deployed.RunConfig.model_validate_json(config.model_dump_json()).model_dump_json())[
        "gpu_hours_budget"] == 64.0
