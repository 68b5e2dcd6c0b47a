"""The production archive store: MongoDB through pymongo (sync; call it via `asyncio.to_thread` from a loop).

Collections (in the given database, "poise" by default):

- `runs`: one document per run, `_id` = run_id: the `RunConfig` fields plus `seq` and `rev`.
- `nodes`: one document per node, `_id` = f"{run_id}/{node_id}": `Node.model_dump(mode="json")` (so
  nan/inf curves and microsecond timestamps round-trip exactly) plus top-level copies that queries and
  indexes use (run_id, node_id, parent_ids, ancestors, depth, utility = evaluation.overall), what the run's
  bookkeeping reads (number, evaluated, llm_usd, score = the NodeScore of an evaluated node that did not fail,
  llm_ops = per-operator agent-LLM spend), and `seq`, `rev`. Documents written before those fields existed
  get them when a store opens the database.
- `counters`: the insertion counters that give `seq`. MongoDB has no autoincrement and a node's
  `created_at` is its maker's clock, not the order it reached the archive, so listings sort by `seq`
  (the order SQLite's `seq` column gives).
- `meta`: `{_id: "contract_version", version}`, the contract version of what the database holds
  (poise/contracts.py). A database this POISE's contracts cannot read is refused when the store opens, before
  anything is written; a database from before it was recorded holds UNVERSIONED documents.

`rev` counts the writes of a document. `transition` is one `find_one_and_update` filtered on the expected
status and, when this store has read or written the node, on the revision it last saw. So two stores
that read a node at the same status cannot both write it, even when neither changes the status (two
replicate evaluations of an evaluated node); SQLite guards on status alone, which a single writer
makes enough. The interface has no place for the caller's revision, so "last seen by this store
object" stands in for it; see `transition`.

`counters` reads only indexed fields (a covered query over `run_tally`: index entries, no documents) and
sums them here; `scores` reads the `score` of the top nodes through `run_score` and `run_seeds`.

Only operations that mongomock also runs are used (no bulk_write, sessions or transactions), so the
contract suite checks this module without a server and against one when MONGO_URL is set.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError
from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError

from poise.contracts import (
    UNVERSIONED,
    LlmOperator,
    Node,
    NodeScore,
    NodeStatus,
    OperatorSpend,
    RunConfig,
    RunCounters,
    Versioned,
    node_number,
)
from poise.scoring import node_score
from poise.store import (
    CONTRACT_KEY,
    ArchiveError,
    ArchiveStore,
    LineageEntry,
    check_contract,
    check_same_node,
    node_spend,
    selection_score,
)

DEFAULT_DATABASE = "poise"
DEFAULT_TIMEOUT_MS = 10_000  # server selection; a URL's own serverSelectionTimeoutMS wins
# Fields the store adds to a node's contract document; stripped before validation.
_DERIVED = ("number", "evaluated", "llm_usd", "score", "llm_ops")  # what the run's bookkeeping reads
_NODE_EXTRAS = ("_id", "seq", "rev", "run_id", "node_id", "parent_ids", "ancestors", "depth", "utility", *_DERIVED)
_TALLY_FIELDS = ("status", "evaluated", "llm_usd", "number", "depth")
_RUN_EXTRAS = ("_id", "seq", "rev")
NODE_INDEXES: dict[str, list[tuple[str, int]]] = {
    "run_seq": [("run_id", ASCENDING), ("seq", ASCENDING)],  # a run's nodes in insertion order
    "run_status": [("run_id", ASCENDING), ("status", ASCENDING), ("seq", ASCENDING)],  # by status, counts
    "run_parent": [("run_id", ASCENDING), ("parent_ids", ASCENDING)],  # children (multikey)
    "run_ancestor": [("run_id", ASCENDING), ("ancestors", ASCENDING)],  # descendants (multikey)
    "run_utility": [("run_id", ASCENDING), ("utility", DESCENDING)],  # top-K
    "run_tally": [("run_id", ASCENDING), *((field, ASCENDING) for field in _TALLY_FIELDS)],  # counters, covered
    "run_score": [("run_id", ASCENDING), ("score.utility", DESCENDING), ("seq", ASCENDING)],  # ranked scores
    "run_seeds": [("run_id", ASCENDING), ("score.seeds", ASCENDING)],  # confirmed nodes (few)
}
RUN_INDEXES: dict[str, list[tuple[str, int]]] = {"seq": [("seq", ASCENDING)]}


def redact(url: str) -> str:
    """The URL without user, password and options (options may carry secrets too), for messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def describe(client: object) -> str:
    """A borrowed client's servers (pymongo knows its seeds without connecting), else its class."""
    if isinstance(client, MongoClient):
        hosts = ",".join(f"{host}:{port}" for host, port in client.topology_description.server_descriptions())
        return f"mongodb://{hosts}/"
    return f"{type(client).__module__}.{type(client).__name__}"


def node_key(run_id: str, node_id: str) -> str:
    return f"{run_id}/{node_id}"  # ids never contain "/" (contracts.Id), so keys cannot collide


def node_fields(node: Node) -> dict[str, Any]:
    """The node's stored fields (all but _id, seq and rev)."""
    g = node.genealogy
    utility = node.evaluation.overall if node.evaluation is not None else None
    return {
        **node.model_dump(mode="json"),
        "run_id": g.run_id,
        "node_id": g.node_id,
        "parent_ids": g.parent_ids,
        "ancestors": g.ancestors,
        "depth": g.depth,
        "utility": utility,
        **derived_fields(node),
    }


def derived_fields(node: Node) -> dict[str, Any]:
    """The fields of `_DERIVED` for `node`."""
    score = node_score(node)
    return {
        "number": node_number(node.node_id),
        "evaluated": int(node.evaluation is not None),
        "llm_usd": node.cost.llm_usd,
        "score": None if score is None else score.model_dump(mode="json"),
        "llm_ops": [{"operator": op, **spend.model_dump()} for op, spend in node_spend(node).items()],
    }


class MongoStore(ArchiveStore):
    """An `ArchiveStore` in MongoDB, safe to share between threads (as a pymongo client is).

    `url_or_client` is a mongodb:// URL (the store opens and closes its own client) or a client it
    borrows (pymongo's or mongomock's; `close` then leaves the client open).
    """

    def __init__(self, url_or_client: str | MongoClient, database: str = DEFAULT_DATABASE) -> None:
        if isinstance(url_or_client, str):
            self.where = f"{redact(url_or_client)} (database {database})"
            options: dict[str, Any] = {}
            if "serverselectiontimeoutms" not in url_or_client.lower():
                options["serverSelectionTimeoutMS"] = DEFAULT_TIMEOUT_MS
            try:
                self._client = MongoClient(url_or_client, **options)
            except (PyMongoError, ValueError, TypeError) as err:  # a malformed URL or option
                raise ArchiveError(f"cannot open the archive at {self.where}: {err}") from err
            self._owns_client = True
        else:
            self._client = url_or_client
            self._owns_client = False
            self.where = f"{describe(url_or_client)} (database {database})"
        self.database = self._client[database]  # holds runs, nodes and counters; public for maintenance and tests
        self._runs, self._nodes, self._counters, self._meta = (
            self.database[name] for name in ("runs", "nodes", "counters", "meta"))
        self.contract_version: str | None = None  # what the database records, once opened (check_contract)
        self._closed = False
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}  # node key -> the latest revision this store read or wrote
        self._mock = type(self._client).__module__.startswith("mongomock")  # see _tally_groups
        try:
            self._check_contract()
            self._create_indexes()
            self._fill_derived()
        except BaseException:
            self.close()
            raise

    def _check_contract(self) -> None:
        """Refuse a database of a contract version this POISE cannot read, before anything is written to it; record
        this POISE's version when it is newer than the one recorded."""
        with self._op("contract version check"):
            recorded = self._meta.find_one({"_id": CONTRACT_KEY})
            if recorded is not None:
                stored = recorded.get("version")
            elif self._runs.find_one({}, {"_id": True}) or self._nodes.find_one({}, {"_id": True}):
                stored = UNVERSIONED
            else:
                stored = None
        self.contract_version = check_contract(stored, self.where)
        if self.contract_version != stored:
            with self._op("contract version record"):
                self._meta.update_one({"_id": CONTRACT_KEY}, {"$set": {"version": self.contract_version}}, upsert=True)

    def _create_indexes(self) -> None:
        """Idempotent: create_index with the same name and keys is a no-op; other keys under a name fail."""
        with self._op("index creation"):
            for collection, indexes in ((self._nodes, NODE_INDEXES), (self._runs, RUN_INDEXES)):
                for name, keys in indexes.items():
                    collection.create_index(keys, name=name)

    def _fill_derived(self) -> None:
        """Give documents stored before the bookkeeping fields existed those fields (not a write of the node: its
        revision stays)."""
        with self._op("migration of node documents"):
            for doc in self._nodes.find({"number": {"$exists": False}}):
                self._nodes.update_one({"_id": doc["_id"]}, {"$set": derived_fields(self._node(doc))})

    # ------------------------------------------------------------------------------------ plumbing

    @contextmanager
    def _op(self, what: str) -> Iterator[None]:
        if self._closed:
            raise ArchiveError(f"archive {what} on {self.where}: the store is closed")
        try:
            yield
        except ConnectionFailure as err:  # includes server selection timeouts: nothing answered in time
            raise ArchiveError(f"archive {what} failed: cannot reach MongoDB at {self.where}: {err}") from err
        except PyMongoError as err:
            raise ArchiveError(f"archive {what} failed on {self.where}: {err}") from err

    def _next_seq(self, counter: str) -> int:
        done = self._counters.find_one_and_update(
            {"_id": counter}, {"$inc": {"seq": 1}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        return done["seq"]

    def _saw(self, key: str, rev: object) -> None:
        if isinstance(rev, int):
            with self._lock:
                self._seen[key] = max(rev, self._seen.get(key, rev))

    def _contract(self, model: type[BaseModel], doc: dict[str, Any], extras: tuple[str, ...], what: str) -> Any:
        fields = {k: v for k, v in doc.items() if k not in extras}
        if issubclass(model, Versioned):  # a dict without a version reads as made by this code; stored, it is older
            fields.setdefault("schema_version", UNVERSIONED)
        try:
            return model.model_validate(fields)
        except ValidationError as err:
            raise ArchiveError(f"{what} in {self.where} does not validate as a {model.__name__}: {err}") from err

    def _node(self, doc: dict[str, Any]) -> Node:
        self._saw(doc["_id"], doc.get("rev"))
        return self._contract(Node, doc, _NODE_EXTRAS, f"node {doc['_id']}")

    def _find_nodes(self, query: dict[str, Any], what: str) -> list[Node]:
        with self._op(what):
            docs = list(self._nodes.find(query).sort("seq", ASCENDING))
        return [self._node(doc) for doc in docs]

    # ---------------------------------------------------------------------------------------- runs

    def put_run(self, config: RunConfig) -> None:
        with self._op(f"put_run {config.run_id}"):
            self._runs.update_one(
                {"_id": config.run_id},
                {
                    "$set": config.model_dump(mode="json"),
                    "$inc": {"rev": 1},
                    "$setOnInsert": {"seq": self._next_seq("runs")},
                },
                upsert=True,
            )

    def get_run(self, run_id: str) -> RunConfig | None:
        with self._op(f"get_run {run_id}"):
            doc = self._runs.find_one({"_id": run_id})
        return None if doc is None else self._contract(RunConfig, doc, _RUN_EXTRAS, f"run config {run_id}")

    def run_ids(self) -> list[str]:
        with self._op("run_ids"):
            return [doc["_id"] for doc in self._runs.find({}, {"_id": True}).sort("seq", ASCENDING)]

    # --------------------------------------------------------------------------------------- nodes

    def insert_node(self, node: Node) -> bool:
        key = node_key(node.run_id, node.node_id)
        with self._op(f"insert of node {key}"):
            try:
                self._nodes.insert_one({"_id": key, **node_fields(node), "seq": self._next_seq("nodes"), "rev": 1})
            except DuplicateKeyError:
                return False
        self._saw(key, 1)
        return True

    def get_node(self, run_id: str, node_id: str) -> Node | None:
        key = node_key(run_id, node_id)
        with self._op(f"read of node {key}"):
            doc = self._nodes.find_one({"_id": key})
        return None if doc is None else self._node(doc)

    def nodes(self, run_id: str, status: NodeStatus | None = None) -> list[Node]:
        query: dict[str, Any] = {"run_id": run_id}
        if status is not None:
            query["status"] = NodeStatus(status).value
        return self._find_nodes(query, f"listing of run {run_id}")

    def lineage(self, run_id: str) -> list[LineageEntry]:
        projection = {"_id": 0, "node_id": 1, "parent_ids": 1, "status": 1, "depth": 1, "score.utility": 1,
                      "failure.phase": 1, "proposal.name": 1, "proposal.screening.winner": 1}
        with self._op(f"lineage of run {run_id}"):
            docs = list(self._nodes.find({"run_id": run_id}, projection).sort("seq", ASCENDING))
        entries = []
        for doc in docs:
            utility = (doc.get("score") or {}).get("utility")
            winner = ((doc.get("proposal") or {}).get("screening") or {}).get("winner")
            entries.append(LineageEntry(
                id=doc["node_id"], parents=tuple(doc.get("parent_ids") or ()), status=doc["status"],
                depth=doc.get("depth", 0),
                utility=utility if isinstance(utility, (int, float)) and math.isfinite(utility) else None,
                failed_phase=(doc.get("failure") or {}).get("phase"),
                selection_score=selection_score(winner), name=doc["proposal"]["name"]))
        return entries

    def children(self, run_id: str, node_id: str) -> list[Node]:
        return self._find_nodes({"run_id": run_id, "parent_ids": node_id}, f"children of {node_key(run_id, node_id)}")

    def transition(self, run_id: str, node_id: str, expected: NodeStatus, node: Node) -> bool:
        """Compare-and-set on status and, if this store has seen the node, on the revision it last saw.

        A stale revision (another store wrote since this one read) loses even when the status still
        matches; the caller reads again and retries, as `ArchiveUpdater` does. A lost compare-and-set
        forgets the revision, so a caller that retries without reading is guarded by status alone.
        The guard is per store object, not per caller: a read by another thread of this store between
        the caller's read and its write refreshes the revision. Exposing the revision in the interface
        (a `rev` returned by reads and passed to `transition`) would close that gap.
        """
        check_same_node(run_id, node_id, node)
        key = node_key(run_id, node_id)
        expect: dict[str, Any] = {"_id": key, "status": NodeStatus(expected).value}
        with self._lock:
            seen = self._seen.get(key)
        if seen is not None:
            expect["rev"] = seen
        with self._op(f"transition of node {key}"):
            written = self._nodes.find_one_and_update(
                expect,
                {"$set": node_fields(node), "$inc": {"rev": 1}},
                projection={"rev": True},
                return_document=ReturnDocument.AFTER,
            )
        if written is None:
            with self._lock:
                self._seen.pop(key, None)
            return False
        self._saw(key, written["rev"])
        return True

    def counters(self, run_id: str) -> RunCounters:
        with self._op(f"counters of run {run_id}"):
            groups = self._tally_groups(run_id)
        unknown = sorted({group["_id"] for group in groups} - set(NodeStatus), key=str)
        if unknown:
            raise ArchiveError(f"run {run_id} in {self.where} has nodes at unknown statuses {unknown}")
        counts = dict.fromkeys(NodeStatus, 0)
        for group in groups:
            counts[NodeStatus(group["_id"])] = group["nodes"]
        return RunCounters(
            counts=counts,
            evaluated=sum(group["evaluated"] for group in groups),
            llm_usd=sum(group["llm_usd"] for group in groups),
            max_number=max((group["number"] for group in groups), default=-1),
            depth=max((group["depth"] for group in groups), default=0),
        )

    def _tally_groups(self, run_id: str) -> list[dict[str, Any]]:
        """Per status: nodes, evaluated, spend, highest number and depth. MongoDB groups them server-side over
        the covering `run_tally` index (a handful of documents come back); mongomock's aggregate copies every
        document of the collection first, so under it the same fields are read with a projection and grouped
        here."""
        if not self._mock:
            fields = {"evaluated": {"$sum": "$evaluated"}, "llm_usd": {"$sum": "$llm_usd"},
                      "number": {"$max": "$number"}, "depth": {"$max": "$depth"}}
            pipeline = [{"$match": {"run_id": run_id}}, {"$group": {"_id": "$status", "nodes": {"$sum": 1}, **fields}}]
            return list(self._nodes.aggregate(pipeline))
        groups: dict[str, dict[str, Any]] = {}
        for row in self._nodes.find({"run_id": run_id}, {"_id": False, **dict.fromkeys(_TALLY_FIELDS, True)}):
            group = groups.setdefault(row["status"], {"_id": row["status"], "nodes": 0, "evaluated": 0,
                                                      "llm_usd": 0.0, "number": -1, "depth": 0})
            group["nodes"] += 1
            group["evaluated"] += row["evaluated"]
            group["llm_usd"] += row["llm_usd"]
            group["number"] = max(group["number"], row["number"])
            group["depth"] = max(group["depth"], row["depth"])
        return list(groups.values())

    def scores(self, run_id: str, *, min_seeds: int = 0, limit: int | None = None) -> list[NodeScore]:
        query = {"run_id": run_id, "score": {"$ne": None}, "score.seeds": {"$gte": min_seeds}}
        with self._op(f"scores of run {run_id}"):
            cursor = self._nodes.find(query, {"_id": False, "score": True})
            rows = list(cursor.sort([("score.utility", DESCENDING), ("seq", ASCENDING)]).limit(limit or 0))
        return [self._contract(NodeScore, row["score"], (), f"a score in run {run_id}") for row in rows]

    def llm_spend(self, run_id: str) -> dict[LlmOperator, OperatorSpend]:
        with self._op(f"agent-LLM spend of run {run_id}"):
            rows = list(self._nodes.find({"run_id": run_id, "llm_ops": {"$ne": []}}, {"_id": False, "llm_ops": True}))
        totals: dict[str, dict[str, float]] = {}
        for entry in (entry for row in rows for entry in row.get("llm_ops") or []):
            total = totals.setdefault(entry["operator"], dict.fromkeys(OperatorSpend.model_fields, 0))
            for field in OperatorSpend.model_fields:
                total[field] += entry[field]
        return {op: OperatorSpend(**totals[op]) for op in get_args(LlmOperator) if op in totals}

    # ------------------------------------------------------------------------------------- health

    def ping(self) -> bool:
        """Whether the server answers (a health check; never raises)."""
        if self._closed:
            return False
        try:
            self._client.admin.command("ping")
        except PyMongoError:
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()
