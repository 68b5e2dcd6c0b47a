"""The embedded archive store: one SQLite file in the run directory (`<run_dir>/archive.db`).

Documents are the contracts' JSON exactly as `model_dump_json` writes them; a few columns copy what
queries need (status, depth, parent links, insertion order). WAL with `synchronous=FULL` makes every
committed write survive a kill -9 or power loss; each write is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from poise.contracts import Node, NodeStatus, RunConfig
from poise.store import ArchiveError, ArchiveStore, check_same_node

DB_FILENAME = "archive.db"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    doc    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order
    run_id  TEXT NOT NULL,
    node_id TEXT NOT NULL,
    status  TEXT NOT NULL,
    depth   INTEGER NOT NULL,
    doc     TEXT NOT NULL,
    UNIQUE (run_id, node_id)
);
CREATE INDEX IF NOT EXISTS nodes_by_status ON nodes (run_id, status, seq);
CREATE TABLE IF NOT EXISTS parents (
    run_id    TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    node_id   TEXT NOT NULL,
    PRIMARY KEY (run_id, parent_id, node_id)
) WITHOUT ROWID;
"""


class SQLiteStore(ArchiveStore):
    """An `ArchiveStore` in one SQLite file, safe to share between the threads of one process."""

    def __init__(self, path: str | Path, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; _write opens them explicitly.
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise ArchiveError(f"cannot open the archive at {self.path}: {err}") from err
        try:
            self._configure()
        except BaseException:
            self._db.close()
            raise

    def _configure(self) -> None:
        with self._errors("open"):
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")  # a committed write survives kill -9 and power loss
        if mode.lower() != "wal":
            raise ArchiveError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); use a local filesystem")
        self._create_schema()

    def _create_schema(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ArchiveError(
                    f"{self.path} has archive schema {version}, newer than this POISE ({SCHEMA_VERSION}); upgrade POISE"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def in_run_dir(cls, run_dir: str | Path) -> SQLiteStore:
        """The archive of the run kept in `run_dir`, created if new."""
        return cls(Path(run_dir) / DB_FILENAME)

    # ------------------------------------------------------------------------------------ plumbing

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction; IMMEDIATE takes the write lock up front so a CAS cannot interleave."""
        with self._lock, self._errors("write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple[object, ...]) -> list[tuple]:
        with self._lock, self._errors("read"):
            return self._db.execute(sql, params).fetchall()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            raise ArchiveError(f"archive {what} failed on {self.path}: {err}") from err

    def _node(self, doc: str) -> Node:
        try:
            return Node.model_validate_json(doc)
        except ValidationError as err:
            raise ArchiveError(f"{self.path} holds a node document this POISE cannot read: {err}") from err

    # ---------------------------------------------------------------------------------------- runs

    def put_run(self, config: RunConfig) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (run_id, doc) VALUES (?, ?) ON CONFLICT (run_id) DO UPDATE SET doc = excluded.doc",
                (config.run_id, config.model_dump_json()),
            )

    def get_run(self, run_id: str) -> RunConfig | None:
        rows = self._read("SELECT doc FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            return None
        try:
            return RunConfig.model_validate_json(rows[0][0])
        except ValidationError as err:
            raise ArchiveError(f"{self.path} holds a run config for {run_id} this POISE cannot read: {err}") from err

    def run_ids(self) -> list[str]:
        return [row[0] for row in self._read("SELECT run_id FROM runs ORDER BY rowid", ())]

    # --------------------------------------------------------------------------------------- nodes

    def insert_node(self, node: Node) -> bool:
        g = node.genealogy
        with self._write() as db:
            inserted = db.execute(
                "INSERT INTO nodes (run_id, node_id, status, depth, doc) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, node_id) DO NOTHING",
                (g.run_id, g.node_id, node.status.value, g.depth, node.model_dump_json()),
            ).rowcount
            if inserted:
                db.executemany(
                    "INSERT OR IGNORE INTO parents (run_id, parent_id, node_id) VALUES (?, ?, ?)",
                    [(g.run_id, parent, g.node_id) for parent in g.parent_ids],
                )
        return inserted == 1

    def get_node(self, run_id: str, node_id: str) -> Node | None:
        rows = self._read("SELECT doc FROM nodes WHERE run_id = ? AND node_id = ?", (run_id, node_id))
        return self._node(rows[0][0]) if rows else None

    def nodes(self, run_id: str, status: NodeStatus | None = None) -> list[Node]:
        if status is None:
            rows = self._read("SELECT doc FROM nodes WHERE run_id = ? ORDER BY seq", (run_id,))
        else:
            rows = self._read(
                "SELECT doc FROM nodes WHERE run_id = ? AND status = ? ORDER BY seq", (run_id, NodeStatus(status).value)
            )
        return [self._node(doc) for (doc,) in rows]

    def children(self, run_id: str, node_id: str) -> list[Node]:
        rows = self._read(
            "SELECT n.doc FROM parents p JOIN nodes n ON n.run_id = p.run_id AND n.node_id = p.node_id "
            "WHERE p.run_id = ? AND p.parent_id = ? ORDER BY n.seq",
            (run_id, node_id),
        )
        return [self._node(doc) for (doc,) in rows]

    def transition(self, run_id: str, node_id: str, expected: NodeStatus, node: Node) -> bool:
        check_same_node(run_id, node_id, node)
        with self._write() as db:
            written = db.execute(
                "UPDATE nodes SET status = ?, doc = ? WHERE run_id = ? AND node_id = ? AND status = ?",
                (node.status.value, node.model_dump_json(), run_id, node_id, NodeStatus(expected).value),
            ).rowcount
        return written == 1

    def counts(self, run_id: str) -> dict[NodeStatus, int]:
        rows = self._read("SELECT status, COUNT(*) FROM nodes WHERE run_id = ? GROUP BY status", (run_id,))
        found = {NodeStatus(status): n for status, n in rows}
        return {status: found.get(status, 0) for status in NodeStatus}

    def close(self) -> None:
        with self._lock:
            self._db.close()
