"""Archive store contract suite and the update operator's state machine.

Every test taking `open_store` runs against each backend in STORE_BACKENDS: SQLite, MongoDB on mongomock
(always), and a real MongoDB when MONGO_URL is set (a fresh database per test, dropped afterwards;
skipped with the reason otherwise, so a green run here is never mistaken for a real-server run). A
backend is a context manager over the test's tmp_path yielding an opener, and each call of the opener
is a new store object on the same storage (so durability and cross-connection races are checked the
same way for every backend).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path

import mongomock
import pymongo
import pytest
from pydantic import BaseModel

from archive.mongo_store import MongoStore
from archive.sqlite_store import DB_FILENAME, SCHEMA_VERSION, SQLiteStore
from archive.update import ArchiveUpdater, Outcome, UpdateResult
from poise.contracts import (
    CallRecord,
    CheckResult,
    Effect,
    Evaluation,
    EvtEvaluated,
    EvtFailed,
    EvtImplemented,
    EvtProposed,
    EvtReflected,
    EvtTrained,
    Failure,
    Genealogy,
    Implementation,
    MechanismEffect,
    MechanismSpec,
    MetricKind,
    Node,
    NodeStatus,
    Phase,
    Proposal,
    Reflection,
    RunConfig,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
    VerificationAttempt,
    WorkEvaluate,
    WorkImplement,
    WorkReflect,
    WorkTrain,
)
from poise.store import ArchiveError, ArchiveStore

RUN = "run-vm-av"
SOURCE = """LOSS_AGG_MODE = "token-mean"
HPARAMS = {"clip_eps": 0.2, "var_floor": 1e-4}

def compute_advantages(batch):
    return batch["scores"] - batch["group_mean_score"]

def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    ratio = (log_prob - old_log_prob).exp()
    return -(ratio * advantages[:, None]) * response_mask
"""

Opener = Callable[[], ArchiveStore]


# ------------------------------------------------------------------------------------------- backends


@contextmanager
def sqlite_backend(tmp_path: Path) -> Iterator[Opener]:
    yield lambda: SQLiteStore.in_run_dir(tmp_path / RUN)


@contextmanager
def mongomock_backend(tmp_path: Path) -> Iterator[Opener]:
    client = mongomock.MongoClient()  # one in-memory server per test, shared by the test's stores
    yield lambda: MongoStore(client)


@contextmanager
def mongo_backend(tmp_path: Path) -> Iterator[Opener]:
    url = os.environ.get("MONGO_URL")
    if not url:
        pytest.skip("MONGO_URL is not set: no real MongoDB to test against (mongomock stood in for it)")
    database = f"poise_test_{uuid.uuid4().hex[:16]}"
    try:
        yield lambda: MongoStore(url, database)
    finally:
        with pymongo.MongoClient(url) as client:
            client.drop_database(database)


STORE_BACKENDS: dict[str, Callable[[Path], AbstractContextManager[Opener]]] = {
    "sqlite": sqlite_backend,
    "mongomock": mongomock_backend,
    "mongo": mongo_backend,
}
MONGO_BACKENDS = ["mongomock", "mongo"]


@contextmanager
def opening(backend: str, tmp_path: Path) -> Iterator[Opener]:
    """The backend's opener; every store it opened is closed at the end."""
    opened: list[ArchiveStore] = []
    with STORE_BACKENDS[backend](tmp_path) as open_backend:

        def open_() -> ArchiveStore:
            opened.append(open_backend())
            return opened[-1]

        try:
            yield open_
        finally:
            for store in opened:
                store.close()


@pytest.fixture(params=list(STORE_BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def open_store(backend: str, tmp_path: Path) -> Iterator[Opener]:
    with opening(backend, tmp_path) as open_:
        yield open_


@pytest.fixture(params=MONGO_BACKENDS)
def open_mongo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], MongoStore]]:
    with opening(request.param, tmp_path) as open_:
        yield open_


@pytest.fixture
def store(open_store: Opener) -> ArchiveStore:
    return open_store()


@pytest.fixture
def updater(store: ArchiveStore) -> ArchiveUpdater:
    store.put_run(run_config())
    return ArchiveUpdater(store)


# ------------------------------------------------------------------------------------------ documents


def run_config(run_id: str = RUN, budget: int = 4, parallel: int = 2) -> RunConfig:
    return RunConfig(run_id=run_id, budget=budget, parallel=parallel, seed=7, protocol="testbed-v1")


def proposal(name: str = "VM-AV-GRPO", parent_ids: list[str] | None = None) -> Proposal:
    return Proposal(
        name=name,
        rationale="scale advantages by the analytic group variance; mask format-invalid responses",
        mechanisms=[MechanismSpec(name="analytic_variance_scaling", params={"var_floor": 1e-4})],
        hparams={"clip_eps": 0.2},
        generator="offline",
        parent_ids=parent_ids or [],
    )


def implementation(verified: bool = True) -> Implementation:
    attempt = VerificationAttempt(
        attempt=1, source=SOURCE, passed=verified, checks=[CheckResult(name="shapes", passed=verified)]
    )
    return Implementation.from_source(SOURCE, attempts=[attempt], verified=verified)


def trajectory(checkpoint_uri: str | None = "file:///runs/run-vm-av/ckpt/n1") -> TrainingTrajectory:
    steps = [TrainingStep(step=0, reward_mean=0.2, kl=0.0), TrainingStep(step=1, reward_mean=0.31, kl=float("nan"))]
    return TrainingTrajectory(
        protocol="testbed-v1", seed=7, steps=steps, checkpoint_uri=checkpoint_uri, aborted=checkpoint_uri is None
    )


def evaluation(seed: int = 7, overall: float = 0.41) -> Evaluation:
    suite = SuiteResult(
        suite="hard", kind=MetricKind.PASS_AT_K, k=8, value=overall, ci_low=overall - 0.05, ci_high=overall + 0.05,
        n_prompts=32, n_samples=256, mean_length=41.5, format_valid_rate=0.97, weight=1.0,
    )  # fmt: skip
    return Evaluation(suites={"hard": suite}, overall=overall, mean_length=41.5, seed=seed)


def reflection() -> Reflection:
    effect = MechanismEffect(
        mechanism="analytic_variance_scaling", effect=Effect.HELPED, confidence=0.7, evidence="lower KL spikes"
    )
    return Reflection(text="variance scaling steadied the advantage estimate", effects=[effect], generator="offline")


def root_node(node_id: str = "n0", run_id: str = RUN) -> Node:
    return Node(genealogy=Genealogy(run_id=run_id, node_id=node_id), proposal=proposal("GRPO"))


def child_node(node_id: str, *parents: Node) -> Node:
    genealogy = Genealogy.child(node_id, [p.genealogy for p in parents])
    return Node(genealogy=genealogy, proposal=proposal(parent_ids=[p.node_id for p in parents]))


def implemented(node: Node) -> Node:
    return Node(**{**dict(node), "status": NodeStatus.IMPLEMENTED, "implementation": implementation()})


def ids(nodes: list[Node]) -> list[str]:
    return [n.node_id for n in nodes]


def same(a: BaseModel | None, b: BaseModel | None) -> bool:
    """Document equality that holds for nan curves too (nan != nan, so `==` fails after a round trip)."""
    return a is not None and b is not None and a.model_dump_json() == b.model_dump_json()


# ------------------------------------------------------------------------------------- store contract


def test_run_config_round_trips_and_a_second_put_replaces_it(store: ArchiveStore) -> None:
    assert store.get_run(RUN) is None
    store.put_run(run_config(budget=4))
    assert store.get_run(RUN) == run_config(budget=4)
    store.put_run(run_config(budget=64))
    assert store.get_run(RUN).budget == 64


def test_insert_node_is_idempotent_and_never_overwrites(store: ArchiveStore) -> None:
    first = root_node()
    assert store.insert_node(first) is True
    second = Node(genealogy=first.genealogy, proposal=proposal("a different proposal"))
    assert store.insert_node(second) is False
    assert store.get_node(RUN, "n0") == first
    assert len(store.nodes(RUN)) == 1


def test_documents_round_trip_exactly_nan_curves_included(store: ArchiveStore) -> None:
    node = Node(**{**dict(implemented(root_node())), "status": NodeStatus.TRAINED, "trajectory": trajectory()})
    store.insert_node(node)
    assert store.get_node(RUN, "n0").model_dump_json() == node.model_dump_json()
    assert store.get_node(RUN, "missing") is None


def test_nodes_come_in_insertion_order_filtered_by_status_and_run(store: ArchiveStore) -> None:
    root = root_node("n9")
    nodes = [root, child_node("n2", root), child_node("n5", root), child_node("n1", root)]
    for node in nodes:
        store.insert_node(node)
    store.insert_node(root_node("n0", run_id="another-run"))
    store.transition(RUN, "n5", NodeStatus.PROPOSED, implemented(nodes[2]))
    assert ids(store.nodes(RUN)) == ["n9", "n2", "n5", "n1"]
    assert ids(store.nodes(RUN, NodeStatus.PROPOSED)) == ["n9", "n2", "n1"]
    assert ids(store.nodes(RUN, NodeStatus.IMPLEMENTED)) == ["n5"]
    assert ids(store.nodes("another-run")) == ["n0"]


def test_children_are_the_nodes_bred_from_a_parent(store: ArchiveStore) -> None:
    a, b = root_node("a"), root_node("b")
    a1, ab, b1 = child_node("a1", a), child_node("ab", a, b), child_node("b1", b)
    for node in (a, b, a1, ab, b1, child_node("a1x", a1)):
        store.insert_node(node)
    assert ids(store.children(RUN, "a")) == ["a1", "ab"]
    assert ids(store.children(RUN, "b")) == ["ab", "b1"]
    assert ids(store.children(RUN, "a1")) == ["a1x"]
    assert store.children(RUN, "b1") == []


def test_transition_is_compare_and_set_on_status(store: ArchiveStore) -> None:
    node = root_node()
    store.insert_node(node)
    moved = implemented(node)
    assert store.transition(RUN, "n0", NodeStatus.PROPOSED, moved) is True
    failed = Node(**{**dict(node), "status": NodeStatus.FAILED, "failure": Failure(phase=Phase.IMPLEMENT, reason="x")})
    assert store.transition(RUN, "n0", NodeStatus.PROPOSED, failed) is False  # status moved on: the CAS loses
    assert store.get_node(RUN, "n0") == moved
    assert store.transition(RUN, "missing", NodeStatus.PROPOSED, root_node("missing")) is False


def test_transition_refuses_another_nodes_document(store: ArchiveStore) -> None:
    store.insert_node(root_node("n0"))
    with pytest.raises(ArchiveError, match="n1"):
        store.transition(RUN, "n0", NodeStatus.PROPOSED, implemented(root_node("n1")))


def test_counts_cover_every_status(store: ArchiveStore) -> None:
    for node_id in ("n0", "n1", "n2"):
        store.insert_node(root_node(node_id))
    store.transition(RUN, "n1", NodeStatus.PROPOSED, implemented(root_node("n1")))
    counts = store.counts(RUN)
    assert counts == {**{s: 0 for s in NodeStatus}, NodeStatus.PROPOSED: 2, NodeStatus.IMPLEMENTED: 1}
    assert store.counts("empty-run") == {s: 0 for s in NodeStatus}


def test_listings_follow_arrival_not_creation_time(store: ArchiveStore) -> None:
    late = root_node("late")
    early = Node(**{**dict(root_node("early")), "created_at": late.created_at - timedelta(hours=1)})
    store.insert_node(late)
    store.insert_node(early)
    assert ids(store.nodes(RUN)) == ["late", "early"]


def test_run_ids_are_oldest_first_and_a_replaced_run_keeps_its_place(store: ArchiveStore) -> None:
    assert store.run_ids() == []
    for run_id in ("zeta", "alpha", "mid"):
        store.put_run(run_config(run_id))
    store.put_run(run_config("zeta", budget=9))
    assert store.run_ids() == ["zeta", "alpha", "mid"]


def test_a_second_store_on_the_same_storage_reads_everything_back(open_store: Opener) -> None:
    writer = open_store()
    writer.put_run(run_config())
    root = root_node()
    writer.insert_node(root)
    writer.insert_node(child_node("n1", root))
    writer.transition(RUN, "n0", NodeStatus.PROPOSED, implemented(root))
    writer.close()
    reader = open_store()
    assert reader.get_run(RUN) == run_config()
    assert ids(reader.nodes(RUN)) == ["n0", "n1"]
    assert reader.get_node(RUN, "n0") == implemented(root)
    assert ids(reader.children(RUN, "n0")) == ["n1"]


def race(barrier: threading.Barrier, store: ArchiveStore, node: Node, wins: list[bool], i: int) -> None:
    barrier.wait()
    wins[i] = store.transition(RUN, node.node_id, NodeStatus.PROPOSED, node)


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "two-stores"])
def test_concurrent_transitions_of_one_node_have_exactly_one_winner(
    open_store: Opener, backend: str, shared: bool
) -> None:
    if backend == "mongomock":
        pytest.skip("mongomock is not thread-safe; test_a_stale_revision_loses_* races two Mongo stores in turn")
    stores = [open_store()] * 2 if shared else [open_store(), open_store()]
    failure = Failure(phase=Phase.IMPLEMENT, reason="verification failed")
    for round_ in range(10):
        node = root_node(f"n{round_}")
        stores[0].insert_node(node)
        candidates = [implemented(node), Node(**{**dict(node), "status": NodeStatus.FAILED, "failure": failure})]
        barrier, wins = threading.Barrier(2), [False, False]
        threads = [threading.Thread(target=race, args=(barrier, stores[i], candidates[i], wins, i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(wins) == 1
        assert stores[0].get_node(RUN, node.node_id) == candidates[wins.index(True)]


# ----------------------------------------------------------------------------------- SQLite specifics


def test_sqlite_archive_lives_in_the_run_directory_in_wal_with_full_sync(tmp_path: Path) -> None:
    with SQLiteStore.in_run_dir(tmp_path / "runs" / RUN) as store:
        store.put_run(run_config())
    db = sqlite3.connect(tmp_path / "runs" / RUN / DB_FILENAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert json.loads(db.execute("SELECT doc FROM runs").fetchone()[0])["run_id"] == RUN
    db.close()
    store = SQLiteStore(tmp_path / "runs" / RUN / DB_FILENAME)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_sqlite_refuses_a_newer_schema_and_a_closed_store(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILENAME)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ArchiveError, match="upgrade POISE"):
        SQLiteStore(tmp_path / DB_FILENAME)
    store = SQLiteStore(tmp_path / "other.db")
    store.close()
    with pytest.raises(ArchiveError):
        store.get_run(RUN)


# ------------------------------------------------------------------------------------ Mongo specifics


def evaluated(node: Node, replicate_seeds: tuple[int, ...] = ()) -> Node:
    replicates = [evaluation(seed=seed) for seed in replicate_seeds]
    return Node(
        **{
            **dict(implemented(node)),
            "status": NodeStatus.EVALUATED,
            "trajectory": trajectory(),
            "evaluation": evaluation(),
            "replicates": replicates,
        }
    )


def test_mongo_indexes_exist_with_their_keys_and_a_reopen_keeps_them(open_mongo: Callable[[], MongoStore]) -> None:
    open_mongo()
    store = open_mongo()  # creating the same indexes again is a no-op
    nodes = {name: info["key"] for name, info in store.database["nodes"].index_information().items()}
    assert nodes == {
        "_id_": [("_id", 1)],
        "run_seq": [("run_id", 1), ("seq", 1)],
        "run_status": [("run_id", 1), ("status", 1), ("seq", 1)],
        "run_parent": [("run_id", 1), ("parent_ids", 1)],
        "run_ancestor": [("run_id", 1), ("ancestors", 1)],
        "run_utility": [("run_id", 1), ("utility", -1)],
        "run_tally": [("run_id", 1), ("status", 1), ("evaluated", 1), ("llm_usd", 1), ("number", 1), ("depth", 1)],
        "run_score": [("run_id", 1), ("score.utility", -1), ("seq", 1)],
        "run_seeds": [("run_id", 1), ("score.seeds", 1)],
    }
    runs = {name: info["key"] for name, info in store.database["runs"].index_information().items()}
    assert runs == {"_id_": [("_id", 1)], "seq": [("seq", 1)]}


def test_mongo_documents_are_the_contract_plus_query_fields(open_mongo: Callable[[], MongoStore]) -> None:
    store = open_mongo()
    root = root_node("a")
    child = evaluated(child_node("a1", root))
    store.insert_node(root)
    store.insert_node(child)
    doc = store.database["nodes"].find_one({"_id": f"{RUN}/a1"})
    contract = {
        k: v
        for k, v in doc.items()
        if k not in ("_id", "seq", "rev", "run_id", "node_id", "parent_ids", "ancestors", "depth", "utility",
                     "number", "evaluated", "llm_usd", "score", "llm_ops")
    }
    assert json.dumps(contract, sort_keys=True) == json.dumps(child.model_dump(mode="json"), sort_keys=True)
    assert (doc["run_id"], doc["node_id"], doc["parent_ids"], doc["ancestors"], doc["depth"]) == (
        RUN,
        "a1",
        ["a"],
        ["a"],
        1,
    )
    assert (doc["status"], doc["utility"], doc["rev"]) == ("evaluated", 0.41, 1)
    assert store.database["nodes"].find_one({"_id": f"{RUN}/a"})["utility"] is None
    top = store.database["nodes"].find({"run_id": RUN, "ancestors": "a"}).sort("utility", -1)
    assert [d["node_id"] for d in top] == ["a1"]


def test_a_stale_revision_loses_even_when_the_status_still_matches(open_mongo: Callable[[], MongoStore]) -> None:
    first, second = open_mongo(), open_mongo()
    root = root_node()
    first.insert_node(evaluated(root))
    assert first.get_node(RUN, "n0") == second.get_node(RUN, "n0")  # both read revision 1
    assert first.transition(RUN, "n0", NodeStatus.EVALUATED, evaluated(root, (8,))) is True
    # The second store's document was built from what it read before the first wrote; on status alone
    # (SQLite's guard) it would win too and drop replicate 8.
    assert second.transition(RUN, "n0", NodeStatus.EVALUATED, evaluated(root, (9,))) is False
    assert [r.seed for r in second.get_node(RUN, "n0").replicates] == [8]
    # Having read again, it builds on the first's write and wins.
    assert second.transition(RUN, "n0", NodeStatus.EVALUATED, evaluated(root, (8, 9))) is True
    assert [r.seed for r in first.get_node(RUN, "n0").replicates] == [8, 9]
    assert first.database["nodes"].find_one({"_id": f"{RUN}/n0"})["rev"] == 3


def test_an_updater_that_loses_to_another_store_retries_on_fresh_state(
    open_mongo: Callable[[], MongoStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = open_mongo(), open_mongo()
    first.put_run(run_config())
    first.insert_node(evaluated(root_node()))
    seed8 = EvtEvaluated(run_id=RUN, node_id="n0", replicate=1, evaluation=evaluation(seed=8))
    seed9 = EvtEvaluated(run_id=RUN, node_id="n0", replicate=2, evaluation=evaluation(seed=9))
    read, interleaved = second.get_node, []

    def read_then_the_other_writes(run_id: str, node_id: str) -> Node | None:
        node = read(run_id, node_id)
        if not interleaved:  # the first archive replica applies its event between our read and our write
            interleaved.append(ArchiveUpdater(first).apply(seed8))
        return node

    monkeypatch.setattr(second, "get_node", read_then_the_other_writes)
    result = ArchiveUpdater(second).apply(seed9)
    assert interleaved[0].outcome == result.outcome == Outcome.APPLIED
    assert [r.seed for r in first.get_node(RUN, "n0").replicates] == [8, 9]


def test_mongo_a_corrupted_document_raises_naming_it(open_mongo: Callable[[], MongoStore]) -> None:
    store = open_mongo()
    store.put_run(run_config())
    intact = root_node("n0")
    store.insert_node(intact)
    store.insert_node(root_node("n1"))
    store.database["nodes"].update_one({"_id": f"{RUN}/n1"}, {"$set": {"proposal": 42}})
    store.database["runs"].update_one({"_id": RUN}, {"$set": {"budget": "plenty"}})
    assert store.get_node(RUN, "n0") == intact
    with pytest.raises(ArchiveError, match=f"node {RUN}/n1 .* does not validate as a Node"):
        store.get_node(RUN, "n1")
    with pytest.raises(ArchiveError, match=f"{RUN}/n1"):
        store.nodes(RUN)
    with pytest.raises(ArchiveError, match=f"run config {RUN} .* does not validate as a RunConfig"):
        store.get_run(RUN)


def test_mongo_counters_name_a_status_this_poise_does_not_know(open_mongo: Callable[[], MongoStore]) -> None:
    store = open_mongo()
    store.put_run(run_config())
    store.insert_node(root_node("n0"))
    store.database["nodes"].update_one({"_id": f"{RUN}/n0"}, {"$set": {"status": "archived"}})
    with pytest.raises(ArchiveError, match=r"unknown statuses \['archived'\]"):
        store.counters(RUN)
    with pytest.raises(ArchiveError, match="unknown statuses"):
        store.counts(RUN)


def test_mongo_ping_answers_until_the_store_is_closed(open_mongo: Callable[[], MongoStore]) -> None:
    store = open_mongo()
    assert store.ping() is True
    store.close()
    assert store.ping() is False
    with pytest.raises(ArchiveError, match="closed"):
        store.get_run(RUN)


def test_mongo_an_unreachable_server_is_an_archive_error_without_credentials() -> None:
    url = "mongodb://poise:s3cret@127.0.0.1:9/?serverSelectionTimeoutMS=200"
    with pytest.raises(ArchiveError, match="127.0.0.1:9") as caught:
        MongoStore(url)
    assert "s3cret" not in str(caught.value) and "poise:" not in str(caught.value)


# ------------------------------------------------------------------------------------ update operator


def happy_events(node_id: str = "n0", parent_ids: list[str] | None = None) -> list:
    ids_ = {"run_id": RUN, "node_id": node_id}
    return [
        EvtProposed(**ids_, proposal=proposal(parent_ids=parent_ids)),
        EvtImplemented(**ids_, implementation=implementation()),
        EvtTrained(**ids_, trajectory=trajectory()),
        EvtEvaluated(**ids_, evaluation=evaluation()),
        EvtReflected(**ids_, reflection=reflection()),
    ]


def drive(updater: ArchiveUpdater, node_id: str, steps: int, parent_ids: list[str] | None = None) -> UpdateResult:
    """Apply the first `steps` happy-path events of a node, asserting each applies."""
    for event in happy_events(node_id, parent_ids)[:steps]:
        result = updater.apply(event)
        assert result.outcome == Outcome.APPLIED, result.reason
    return result


def test_happy_path_moves_the_node_and_names_the_next_work(updater: ArchiveUpdater) -> None:
    results = [updater.apply(event) for event in happy_events("n0")]
    assert [r.outcome for r in results] == [Outcome.APPLIED] * 5
    assert [r.node.status for r in results] == [s for s in NodeStatus if s != NodeStatus.FAILED]
    ids_ = {"run_id": RUN, "node_id": "n0"}
    assert [r.next_work for r in results] == [
        (WorkImplement(**ids_, proposal=proposal()),),
        (WorkTrain(**ids_, source=SOURCE, protocol="testbed-v1", seed=7),),
        (WorkEvaluate(**ids_, checkpoint_uri="file:///runs/run-vm-av/ckpt/n1", protocol="testbed-v1", seed=7),),
        (WorkReflect(**ids_, parent_ids=[]),),
        (),
    ]
    stored = updater.store.get_node(RUN, "n0")
    assert same(stored, results[-1].node)
    assert (stored.implementation, stored.evaluation) == (implementation(), evaluation())
    assert stored.reflection == reflection()


def test_a_proposal_takes_its_lineage_from_its_parents(updater: ArchiveUpdater) -> None:
    drive(updater, "a", 4)
    drive(updater, "b", 1)
    drive(updater, "a1", 1, parent_ids=["a"])
    result = drive(updater, "a1b", 4, parent_ids=["a1", "b"])
    assert result.next_work == (WorkReflect(run_id=RUN, node_id="a1b", parent_ids=["a1", "b"]),)
    genealogy = updater.store.get_node(RUN, "a1b").genealogy
    assert (genealogy.depth, genealogy.parent_ids, genealogy.ancestors) == (2, ["a1", "b"], ["a", "a1", "b"])
    assert ids(updater.store.children(RUN, "b")) == ["a1b"]


def test_a_repeated_event_changes_nothing(updater: ArchiveUpdater) -> None:
    events = happy_events("n0")
    for done, event in enumerate(events, start=1):
        first = updater.apply(event)
        before = updater.store.get_node(RUN, "n0").model_dump_json()
        for earlier in events[:done]:
            again = updater.apply(earlier)
            assert again.outcome == Outcome.DUPLICATE, again.reason
            # The latest event's follow-up work is named again (a crash may have lost its publish).
            assert again.next_work == (first.next_work if earlier is event else ())
        assert updater.store.get_node(RUN, "n0").model_dump_json() == before


def test_a_second_proposal_for_the_same_node_keeps_the_first(updater: ArchiveUpdater) -> None:
    drive(updater, "n0", 1)
    other = EvtProposed(run_id=RUN, node_id="n0", attempt=2, proposal=proposal("another idea"))
    assert updater.apply(other).outcome == Outcome.DUPLICATE
    assert updater.store.get_node(RUN, "n0").proposal == proposal()


def llm_call(operator: str, usd: float, ok: bool = True) -> CallRecord:
    return CallRecord(provider="anthropic", model="claude-sonnet-4-5", operator=operator, mode="tool",
                      input_tokens=1000, output_tokens=200, cache_read_tokens=50, cost_usd=usd, ok=ok,
                      error=None if ok else "The answer is not valid JSON")


def test_agent_llm_requests_are_booked_on_the_node_once_each(updater: ArchiveUpdater) -> None:
    events = happy_events("n0")
    events[0] = events[0].model_copy(update={"llm_calls": [llm_call("propose", 0.02), llm_call("screen", 0.001)]})
    events[1] = events[1].model_copy(update={"llm_calls": [llm_call("implement", 0.03, ok=False),
                                                           llm_call("implement", 0.04)]})
    events[4] = events[4].model_copy(update={"llm_calls": [llm_call("reflect", 0.005)]})
    for event in events:
        assert updater.apply(event).outcome == Outcome.APPLIED
    for event in events:  # redelivered events book nothing twice
        assert updater.apply(event).outcome == Outcome.DUPLICATE
    node = updater.store.get_node(RUN, "n0")
    assert [c.operator for c in node.llm_calls] == ["propose", "screen", "implement", "implement", "reflect"]
    assert node.cost.llm_usd == pytest.approx(0.096)
    assert (node.cost.llm_input_tokens, node.cost.llm_output_tokens) == (5 * 1050, 5 * 200)


def test_an_implementation_the_coder_could_not_finish_fails_with_the_coders_reason(updater: ArchiveUpdater) -> None:
    drive(updater, "n0", 1)
    ended = VerificationAttempt(attempt=1, source="", passed=False,
                                error="llm coder: anthropic:claude-sonnet-4-5 (implement): rate limited (HTTP 429)")
    event = EvtImplemented(run_id=RUN, node_id="n0",
                           implementation=Implementation.from_source("", [ended], verified=False))
    node = updater.apply(event).node
    assert node.status == NodeStatus.FAILED and node.failure.phase == Phase.IMPLEMENT
    assert node.failure.reason == ("implementation ended at attempt 1: llm coder: anthropic:claude-sonnet-4-5 "
                                   "(implement): rate limited (HTTP 429)")


def test_a_failed_proposal_that_cost_requests_is_kept_as_a_failed_node(updater: ArchiveUpdater) -> None:
    drive(updater, "n0", 4)
    failure = Failure(phase=Phase.PROPOSE, reason="propose LLM gave no valid ProposalSet after 3 answers")
    paid = EvtFailed(run_id=RUN, node_id="n1", failure=failure, parent_ids=["n0"],
                     llm_calls=[llm_call("propose", 0.01, ok=False)] * 3)
    free = EvtFailed(run_id=RUN, node_id="n2", failure=failure, parent_ids=["n0"])
    assert updater.apply(paid).outcome == Outcome.APPLIED
    assert updater.apply(free).outcome == Outcome.APPLIED
    assert updater.apply(paid).outcome == Outcome.DUPLICATE
    node = updater.store.get_node(RUN, "n1")
    assert node.status == NodeStatus.FAILED and node.failure == failure
    assert node.genealogy.parent_ids == ["n0"] and node.proposal.generator == "anthropic:claude-sonnet-4-5"
    assert len(node.llm_calls) == 3 and node.cost.llm_usd == pytest.approx(0.03)
    assert updater.store.get_node(RUN, "n2") is None  # nothing was spent: nothing to keep
    assert updater.accounting(RUN).failed == 1


def test_out_of_order_and_unknown_events_are_rejected_with_a_logged_reason(
    updater: ArchiveUpdater, caplog: pytest.LogCaptureFixture
) -> None:
    drive(updater, "n0", 2)
    before = updater.store.get_node(RUN, "n0")
    early = EvtEvaluated(run_id=RUN, node_id="n0", evaluation=evaluation())
    orphan = EvtProposed(run_id=RUN, node_id="n1", proposal=proposal(parent_ids=["ghost"]))
    stranger = EvtTrained(run_id=RUN, node_id="ghost", trajectory=trajectory())
    lost_run = EvtProposed(run_id="no-such-run", node_id="n0", proposal=proposal())
    not_an_event = WorkTrain(run_id=RUN, node_id="n0", source=SOURCE, protocol="testbed-v1", seed=7)
    with caplog.at_level(logging.WARNING, logger="poise.archive"):
        results = {e.subject + e.node_id: updater.apply(e) for e in (early, orphan, stranger, lost_run, not_an_event)}
    assert all(r.outcome == Outcome.REJECTED and r.next_work == () for r in results.values())
    assert "is implemented" in results["evt.evaluatedn0"].reason
    assert "ghost" in results["evt.proposedn1"].reason
    assert "unknown node" in results["evt.trainedghost"].reason
    assert "unknown run" in results["evt.proposedn0"].reason
    assert "not an event" in results["work.trainn0"].reason
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 5
    assert updater.store.get_node(RUN, "n0") == before
    assert ids(updater.store.nodes(RUN)) == ["n0"]


def test_a_failure_fails_the_node_once_and_later_news_is_ignored(updater: ArchiveUpdater) -> None:
    drive(updater, "n0", 2)
    failed = EvtFailed(run_id=RUN, node_id="n0", failure=Failure(phase=Phase.TRAIN, reason="loss went nan\ntrace"))
    result = updater.apply(failed)
    assert (result.outcome, result.next_work) == (Outcome.APPLIED, ())
    node = updater.store.get_node(RUN, "n0")
    assert (node.status, node.failure.reason) == (NodeStatus.FAILED, "loss went nan")
    assert node.implementation == implementation()
    assert updater.apply(failed).outcome == Outcome.DUPLICATE
    late = updater.apply(EvtTrained(run_id=RUN, node_id="n0", trajectory=trajectory()))
    assert late.outcome == Outcome.REJECTED and "failed in train" in late.reason
    assert updater.store.get_node(RUN, "n0") == node


def test_a_failure_of_a_phase_the_node_is_not_waiting_on_is_stale(updater: ArchiveUpdater) -> None:
    drive(updater, "n0", 3)
    stale = EvtFailed(run_id=RUN, node_id="n0", failure=Failure(phase=Phase.IMPLEMENT, reason="timeout"))
    result = updater.apply(stale)
    assert result.outcome == Outcome.REJECTED and "waits for evaluate" in result.reason
    assert updater.store.get_node(RUN, "n0").status == NodeStatus.TRAINED


def test_results_that_cannot_go_on_fail_the_node_and_keep_the_result(updater: ArchiveUpdater) -> None:
    drive(updater, "n0", 1)
    unverified = EvtImplemented(run_id=RUN, node_id="n0", implementation=implementation(verified=False))
    assert updater.apply(unverified).node.failure.phase == Phase.IMPLEMENT
    drive(updater, "n1", 2)
    no_checkpoint = EvtTrained(run_id=RUN, node_id="n1", trajectory=trajectory(checkpoint_uri=None))
    result = updater.apply(no_checkpoint)
    assert (result.outcome, result.next_work) == (Outcome.APPLIED, ())
    assert "no checkpoint" in result.node.failure.reason
    assert same(result.node.trajectory, trajectory(checkpoint_uri=None))
    assert updater.apply(no_checkpoint).outcome == Outcome.DUPLICATE


def test_replicate_evaluations_accumulate_once_per_seed(updater: ArchiveUpdater) -> None:
    drive(updater, "n0", 3)
    replicate = EvtEvaluated(run_id=RUN, node_id="n0", replicate=1, evaluation=evaluation(seed=8))
    assert updater.apply(replicate).outcome == Outcome.REJECTED  # the node has no evaluation of its own yet
    assert updater.apply(happy_events("n0")[3]).outcome == Outcome.APPLIED
    result = updater.apply(replicate)
    assert (result.outcome, result.next_work, result.node.status) == (Outcome.APPLIED, (), NodeStatus.EVALUATED)
    assert updater.apply(replicate).outcome == Outcome.DUPLICATE
    lost = EvtFailed(run_id=RUN, node_id="n0", replicate=2, failure=Failure(phase=Phase.EVALUATE, reason="oom"))
    assert updater.apply(lost).outcome == Outcome.APPLIED
    assert updater.store.get_node(RUN, "n0").replicates == [evaluation(seed=8)]
    assert updater.store.get_node(RUN, "n0").status == NodeStatus.EVALUATED


def test_a_failed_proposal_creates_no_node(updater: ArchiveUpdater) -> None:
    failed = EvtFailed(run_id=RUN, node_id="n7", failure=Failure(phase=Phase.PROPOSE, reason="screening kept none"))
    assert updater.apply(failed).outcome == Outcome.APPLIED
    assert updater.store.nodes(RUN) == []


def test_accounting_counts_evaluated_against_budget_and_in_flight_against_parallel(updater: ArchiveUpdater) -> None:
    def account() -> tuple[int, int, int, bool]:
        a = updater.accounting(RUN)
        assert (a.budget, a.parallel) == (4, 2)
        return a.evaluated, a.in_flight, a.failed, a.can_propose

    assert account() == (0, 0, 0, True)
    drive(updater, "n0", 1)
    drive(updater, "n1", 3)
    assert account() == (0, 2, 0, False)  # parallelism full
    for event in happy_events("n0")[1:]:
        assert updater.apply(event).outcome == Outcome.APPLIED
    assert account() == (1, 1, 0, True)
    updater.apply(happy_events("n1")[3])
    fail_reflect = Failure(phase=Phase.REFLECT, reason="reflector timed out")
    updater.apply(EvtFailed(run_id=RUN, node_id="n1", failure=fail_reflect))
    assert account() == (2, 0, 1, True)  # an evaluated node that failed to reflect still spent budget
    drive(updater, "n2", 1)
    drive(updater, "n3", 2)
    assert account() == (2, 2, 1, False)  # 2 evaluated + 2 in flight = budget 4
    with pytest.raises(ArchiveError, match="no run"):
        updater.accounting("no-such-run")


def test_an_event_that_breaks_a_contract_invariant_is_rejected_not_raised(updater: ArchiveUpdater) -> None:
    # "p" claims an ancestor "x" that was never stored; proposing "x" as p's child would close a cycle.
    updater.store.insert_node(
        Node(
            genealogy=Genealogy(run_id=RUN, node_id="p", parent_ids=["x"], depth=1, ancestors=["x"]),
            proposal=proposal(),
        )
    )
    result = updater.apply(EvtProposed(run_id=RUN, node_id="x", proposal=proposal(parent_ids=["p"])))
    assert result.outcome == Outcome.REJECTED and "own parents or ancestors" in result.reason
    assert updater.store.get_node(RUN, "x") is None


# ------------------------------------------------------------------------------ counters, scores, spend


def reference_matches(store: ArchiveStore, run_id: str = RUN) -> None:
    """The store's fast counters, scores and spend equal the reference computed from every document."""
    assert store.counters(run_id) == ArchiveStore.counters(store, run_id)
    for min_seeds, limit in ((0, None), (2, None), (0, 1), (0, 2)):
        fast = store.scores(run_id, min_seeds=min_seeds, limit=limit)
        slow = ArchiveStore.scores(store, run_id, min_seeds=min_seeds, limit=limit)
        assert [s.model_dump_json() for s in fast] == [s.model_dump_json() for s in slow], (min_seeds, limit)
    assert store.llm_spend(run_id) == ArchiveStore.llm_spend(store, run_id)
    assert store.lineage(run_id) == ArchiveStore.lineage(store, run_id)


def evaluate(updater: ArchiveUpdater, node_id: str, overall: float, parent_ids: list[str] | None = None,
             calls: list[CallRecord] | None = None) -> None:
    events = happy_events(node_id, parent_ids)[:4]
    measured = evaluation(overall=0.5 if math.isnan(overall) else overall)
    events[3] = events[3].model_copy(update={"evaluation": measured.model_copy(update={"overall": overall})})
    events[1] = events[1].model_copy(update={"llm_calls": calls or []})
    for event in events:
        assert updater.apply(event).outcome == Outcome.APPLIED


def test_counters_scores_and_spend_follow_every_write(updater: ArchiveUpdater) -> None:
    store = updater.store
    reference_matches(store)
    assert store.counters(RUN).counts == {s: 0 for s in NodeStatus} and store.scores(RUN) == []
    evaluate(updater, "n000", 0.40)
    for i, seed in enumerate((1007, 2007), start=1):
        replicate = EvtEvaluated(run_id=RUN, node_id="n000", replicate=i, evaluation=evaluation(seed, 0.38 + i / 100))
        assert updater.apply(replicate).outcome == Outcome.APPLIED
    evaluate(updater, "n001", 0.55, ["n000"], [llm_call("implement", 0.03, ok=False), llm_call("implement", 0.04)])
    evaluate(updater, "n002", 0.55, ["n001"])  # ties n001: insertion order
    evaluate(updater, "n003", float("nan"), ["n000"])  # a nan utility ranks last
    evaluate(updater, "n004", 0.70, ["n002"])
    updater.apply(EvtFailed(run_id=RUN, node_id="n004", failure=Failure(phase=Phase.REFLECT, reason="timed out")))
    assert updater.apply(happy_events("n001")[4]).outcome == Outcome.APPLIED
    drive(updater, "n005", 2, ["n001"])
    paid = EvtFailed(run_id=RUN, node_id="n007", failure=Failure(phase=Phase.PROPOSE, reason="no answer"),
                     parent_ids=["n000"], llm_calls=[llm_call("propose", 0.01, ok=False)])
    assert updater.apply(paid).outcome == Outcome.APPLIED
    reference_matches(store)

    counters = store.counters(RUN)
    assert counters.counts == {**{s: 0 for s in NodeStatus}, NodeStatus.EVALUATED: 3, NodeStatus.REFLECTED: 1,
                               NodeStatus.IMPLEMENTED: 1, NodeStatus.FAILED: 2}
    assert (counters.evaluated, counters.max_number, counters.depth) == (5, 7, 3)  # n004 failed after evaluation
    assert counters.llm_usd == pytest.approx(0.08)
    assert [s.node_id for s in store.scores(RUN)] == ["n001", "n002", "n000", "n003"]
    assert [(s.node_id, s.seeds) for s in store.scores(RUN, min_seeds=2)] == [("n000", 3)]
    assert [s.node_id for s in store.scores(RUN, limit=1)] == ["n001"]
    spend = store.llm_spend(RUN)
    assert list(spend) == ["propose", "implement"]
    assert (spend["implement"].calls, spend["implement"].failed, spend["propose"].usd) == (2, 1, pytest.approx(0.01))
    assert store.counters("other-run").counts == {s: 0 for s in NodeStatus}
    lineage = {entry.id: entry for entry in store.lineage(RUN)}
    assert list(lineage) == ["n000", "n001", "n002", "n003", "n004", "n005", "n007"]
    n004 = lineage["n004"]
    assert (n004.status, n004.failed_phase, n004.utility) == ("failed", "reflect", None)
    assert (lineage["n002"].parents, lineage["n002"].depth, lineage["n002"].utility) == (("n001",), 2, 0.55)
    assert lineage["n003"].utility is None and lineage["n007"].failed_phase == "propose"


def test_a_schema_1_sqlite_archive_is_migrated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
        CREATE TABLE nodes (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, node_id TEXT NOT NULL,
                            status TEXT NOT NULL, depth INTEGER NOT NULL, doc TEXT NOT NULL, UNIQUE (run_id, node_id));
        CREATE INDEX nodes_by_status ON nodes (run_id, status, seq);
        CREATE TABLE parents (run_id TEXT NOT NULL, parent_id TEXT NOT NULL, node_id TEXT NOT NULL,
                              PRIMARY KEY (run_id, parent_id, node_id)) WITHOUT ROWID;
        PRAGMA user_version=1;
    """)
    root = evaluated(root_node("n000"), replicate_seeds=(1007, 2007))
    child = Node(**{**dict(evaluated(child_node("n001", root))), "llm_calls": [llm_call("implement", 0.02)],
                    "cost": {"llm_usd": 0.02}})
    for node in (root, child):
        db.execute("INSERT INTO nodes (run_id, node_id, status, depth, doc) VALUES (?, ?, ?, ?, ?)",
                   (RUN, node.node_id, node.status.value, node.genealogy.depth, node.model_dump_json()))
    db.commit()
    db.close()
    with SQLiteStore(path) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        reference_matches(store)
        assert store.counters(RUN).evaluated == 2 and store.counters(RUN).llm_usd == pytest.approx(0.02)
        assert [s.node_id for s in store.scores(RUN, min_seeds=2)] == ["n000"]
        store.transition(RUN, "n001", NodeStatus.EVALUATED, Node(**{**dict(child), "status": NodeStatus.REFLECTED,
                                                                   "reflection": reflection()}))
        reference_matches(store)
    with SQLiteStore(path) as store:  # a second open migrates nothing again
        reference_matches(store)


def test_mongo_documents_without_bookkeeping_fields_get_them_when_opened(open_mongo: Callable[[], MongoStore]) -> None:
    store = open_mongo()
    root = evaluated(root_node("n000"), replicate_seeds=(1007, 2007))
    store.insert_node(root)
    store.insert_node(child_node("n001", root))
    store.database["nodes"].update_many({}, {"$unset": dict.fromkeys(("number", "evaluated", "llm_usd", "score",
                                                                      "llm_ops"), "")})
    reopened = open_mongo()
    reference_matches(reopened)
    assert reopened.counters(RUN).max_number == 1 and reopened.scores(RUN)[0].node_id == "n000"
    assert reopened.database["nodes"].find_one({"_id": f"{RUN}/n000"})["rev"] == 1  # not a write of the node


def test_mongo_counters_grouped_by_the_server_equal_those_grouped_here(open_mongo: Callable[[], MongoStore]) -> None:
    store = open_mongo()
    root = evaluated(root_node("n000"), replicate_seeds=(1007, 2007))
    store.insert_node(root)
    store.insert_node(Node(**{**dict(child_node("n001", root)), "llm_calls": [llm_call("propose", 0.02)],
                              "cost": {"llm_usd": 0.02}}))
    store.insert_node(child_node("n002", root))
    first = store.counters(RUN)
    store._mock = not store._mock  # the other path: $group under a real server, a projection under mongomock
    assert store.counters(RUN) == first == ArchiveStore.counters(store, RUN)
    assert (first.counts[NodeStatus.PROPOSED], first.evaluated, first.max_number) == (2, 1, 2)
