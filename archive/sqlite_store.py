"""The embedded archive store: one SQLite file in the run directory (`<run_dir>/archive.db`).

Documents are the contracts' JSON exactly as `model_dump_json` writes them; a few columns copy what
queries need (status, depth, parent links, insertion order, and what the run's bookkeeping reads: node
number, evaluated, agent-LLM spend, the node's score, spend per operator in `node_spend`). Triggers keep
`tallies` (per run and status: nodes, evaluated, spend, highest number, depth) current in the same
transaction as the write, so `counters` reads a handful of rows whatever the archive's size. WAL with
`synchronous=FULL` makes every committed write survive a kill -9 or power loss; each write is one transaction.

Schema 2 added those columns and tables; a schema-1 file is migrated when opened (columns added, then
filled from the stored documents). Schema 4 added `meta`, where the file records the contract version of what it
holds (poise/contracts.py CONTRACT_VERSION); a file this POISE's contracts cannot read is refused when it is
opened, before anything is written, and a POISE from before schema 4 refuses a schema-4 file as newer than it.

A damaged file (SQLite's "database disk image is malformed" or "file is not a database", on any read or write, or
found by `check`) raises `ArchiveCorrupt`, whose message names `poise doctor`. `backup_to` writes a consistent copy
of what is committed, checked before it replaces the previous copy (app/rundir.py decides when; app/doctor.py
restores it).
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from poise.contracts import (
    UNVERSIONED,
    LlmOperator,
    Node,
    NodeScore,
    NodeStatus,
    OperatorSpend,
    RunConfig,
    RunCounters,
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
    lineage_entry,
    node_spend,
)

DB_FILENAME = "archive.db"
SCHEMA_VERSION = 4
DERIVED_SCHEMA = 3  # the schema that last added derived columns: an older file has them filled when it opens
# SQLite's primary result codes for a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB.
_DAMAGED_CODES = (11, 26)
# Columns schema 2 added to `nodes` (name, declaration), filled from the documents when an older file opens.
_DERIVED_COLUMNS = (
    ("number", "INTEGER NOT NULL DEFAULT -1"),   # n012 -> 12
    ("evaluated", "INTEGER NOT NULL DEFAULT 0"),  # 1 if the node carries an evaluation (failed ones too)
    ("llm_usd", "REAL NOT NULL DEFAULT 0"),        # cost.llm_usd
    ("utility", "REAL"),                          # the score's utility (NULL for nan), for ranking
    ("seeds", "INTEGER NOT NULL DEFAULT 0"),      # the score's finite seed scores
    ("score", "TEXT"),                            # NodeScore JSON; NULL unless evaluated and not failed
    # schema 3: what the web UI's tree reads of every node (`lineage`), so it never touches the documents
    ("name", "TEXT"),                             # proposal.name
    ("parent_list", "TEXT"),                      # genealogy.parent_ids as JSON, in their order
    ("failed_phase", "TEXT"),                     # failure.phase
    ("selection", "REAL"),                        # poise.store.selection_score
)
_TALLY_ADD = """
    INSERT INTO tallies (run_id, status, nodes, evaluated, llm_usd, max_number, max_depth)
    VALUES (NEW.run_id, NEW.status, 1, NEW.evaluated, NEW.llm_usd, NEW.number, NEW.depth)
    ON CONFLICT (run_id, status) DO UPDATE SET nodes = nodes + 1, evaluated = evaluated + excluded.evaluated,
        llm_usd = llm_usd + excluded.llm_usd, max_number = max(max_number, excluded.max_number),
        max_depth = max(max_depth, excluded.max_depth);
"""
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        doc    TEXT NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS nodes (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order
        run_id  TEXT NOT NULL,
        node_id TEXT NOT NULL,
        status  TEXT NOT NULL,
        depth   INTEGER NOT NULL,
        doc     TEXT NOT NULL,
        {", ".join(f"{name} {declaration}" for name, declaration in _DERIVED_COLUMNS)},
        UNIQUE (run_id, node_id)
    )""",
    "CREATE INDEX IF NOT EXISTS nodes_by_status ON nodes (run_id, status, seq)",
    # Covering indexes: the derived columns lie after the document, past its overflow pages, in a migrated file.
    "CREATE INDEX IF NOT EXISTS nodes_by_utility ON nodes (run_id, utility DESC, seq, seeds, score) "
    "WHERE score IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS nodes_by_seeds ON nodes (run_id, seeds, utility DESC, seq, score) "
    "WHERE score IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS nodes_lineage ON nodes (run_id, seq, node_id, status, depth, utility, name, "
    "parent_list, failed_phase, selection)",
    """CREATE TABLE IF NOT EXISTS parents (
        run_id    TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        node_id   TEXT NOT NULL,
        PRIMARY KEY (run_id, parent_id, node_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS node_spend (
        run_id   TEXT NOT NULL,
        operator TEXT NOT NULL,
        node_id  TEXT NOT NULL,
        calls    INTEGER NOT NULL,
        failed   INTEGER NOT NULL,
        unpriced INTEGER NOT NULL,
        usd      REAL NOT NULL,
        PRIMARY KEY (run_id, operator, node_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tallies (
        run_id     TEXT NOT NULL,
        status     TEXT NOT NULL,
        nodes      INTEGER NOT NULL,
        evaluated  INTEGER NOT NULL,
        llm_usd    REAL NOT NULL,
        max_number INTEGER NOT NULL,  -- never lowered: a node's number and depth never change
        max_depth  INTEGER NOT NULL,
        PRIMARY KEY (run_id, status)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",  # schema 4
    f"CREATE TRIGGER IF NOT EXISTS tally_insert AFTER INSERT ON nodes BEGIN {_TALLY_ADD} END",
    f"""CREATE TRIGGER IF NOT EXISTS tally_update AFTER UPDATE ON nodes
    WHEN OLD.status IS NOT NEW.status OR OLD.evaluated IS NOT NEW.evaluated OR OLD.llm_usd IS NOT NEW.llm_usd
    BEGIN
        UPDATE tallies SET nodes = nodes - 1, evaluated = evaluated - OLD.evaluated, llm_usd = llm_usd - OLD.llm_usd
            WHERE run_id = OLD.run_id AND status = OLD.status;
        {_TALLY_ADD}
    END""",
)


class ArchiveCorrupt(ArchiveError):
    """The archive file is damaged; the message says how `poise doctor` restores the last good copy."""


def damaged(path: Path, detail: object) -> ArchiveCorrupt:
    """The error for a damaged archive at `path` (in its run directory), with SQLite's own words in `detail`."""
    return ArchiveCorrupt(f"{path} is damaged ({detail}); run `poise doctor --run-dir {path.parent}` to check it "
                          "and restore the last good copy")


def is_damage(err: sqlite3.Error) -> bool:
    """Whether SQLite's error means a damaged file (not a busy, full or missing one)."""
    return (getattr(err, "sqlite_errorcode", 0) & 0xFF) in _DAMAGED_CODES


def sync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def derived_columns(node: Node) -> tuple:
    """The values of `_DERIVED_COLUMNS` for `node`, in that order."""
    score = node_score(node)
    entry = lineage_entry(node)
    return (node_number(node.node_id), int(node.evaluation is not None), node.cost.llm_usd,
            score.utility if score else None, score.seeds if score else 0, score.model_dump_json() if score else None,
            entry.name, json.dumps(list(entry.parents)), entry.failed_phase, entry.selection_score)


class SQLiteStore(ArchiveStore):
    """An `ArchiveStore` in one SQLite file, safe to share between the threads of one process."""

    def __init__(self, path: str | Path, timeout_s: float = 30.0, read_only: bool = False) -> None:
        """`read_only`: a reader beside the process that writes (`poise ui` beside `poise run`): the file must
        exist with this POISE's schema; nothing is created, migrated or written, and writes raise ArchiveError."""
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        try:
            if read_only:
                if not self.path.is_file():
                    raise ArchiveError(f"no archive at {self.path}")
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s,
                                           isolation_level=None, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: no implicit transactions; _write opens them explicitly.
                self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None,
                                           check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            if isinstance(err, sqlite3.Error) and is_damage(err):
                raise damaged(self.path, err) from err
            raise ArchiveError(f"cannot open the archive at {self.path}: {err}") from err
        self.contract_version: str | None = None  # what the file records, once opened (check_contract)
        try:
            self._check_schema() if read_only else self._configure()
        except BaseException:
            self._db.close()
            raise

    def _check_schema(self) -> None:
        with self._errors("open"):
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            stored = self._stored_contract(self._db, old_file=True) if version == SCHEMA_VERSION else None
        if version != SCHEMA_VERSION:
            raise ArchiveError(f"{self.path} has archive schema {version}, this POISE reads {SCHEMA_VERSION}: "
                               "open it once with `poise status` (which migrates it), or use the POISE that wrote it")
        check_contract(stored, str(self.path))
        self.contract_version = stored

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
            old_file = bool(db.execute("SELECT 1 FROM sqlite_master WHERE name = 'nodes'").fetchall())
            # refused before anything changes (the transaction is rolled back); recorded at the end
            self.contract_version = check_contract(self._stored_contract(db, old_file), str(self.path))
            if old_file:
                have = {row[1] for row in db.execute("PRAGMA table_info(nodes)")}
                for name, declaration in _DERIVED_COLUMNS:
                    if name not in have:
                        db.execute(f"ALTER TABLE nodes ADD COLUMN {name} {declaration}")
            for statement in _SCHEMA:
                db.execute(statement)
            if old_file and version < DERIVED_SCHEMA:
                self._fill_derived(db)
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                       "value = excluded.value", (CONTRACT_KEY, self.contract_version))
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @staticmethod
    def _stored_contract(db: sqlite3.Connection, old_file: bool) -> str | None:
        """The contract version the file records: UNVERSIONED for a file from before files recorded one (schema 3
        and older), None for a new file."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchall():
            row = db.execute("SELECT value FROM meta WHERE key = ?", (CONTRACT_KEY,)).fetchone()
            if row is not None:
                return row[0]
        return UNVERSIONED if old_file else None

    def _fill_derived(self, db: sqlite3.Connection) -> None:
        """Migration from schema 1: fill the derived columns and per-operator spend from every document, then
        count the tallies afresh (the triggers saw the fill as updates of rows they had never counted)."""
        for seq, doc in db.execute("SELECT seq, doc FROM nodes").fetchall():
            node = self._node(doc)
            db.execute(f"UPDATE nodes SET {', '.join(f'{name} = ?' for name, _ in _DERIVED_COLUMNS)} WHERE seq = ?",
                       (*derived_columns(node), seq))
            self._write_spend(db, node)
        db.execute("DELETE FROM tallies")
        db.execute("INSERT INTO tallies (run_id, status, nodes, evaluated, llm_usd, max_number, max_depth) "
                   "SELECT run_id, status, COUNT(*), SUM(evaluated), SUM(llm_usd), MAX(number), MAX(depth) "
                   "FROM nodes GROUP BY run_id, status")

    @staticmethod
    def _write_spend(db: sqlite3.Connection, node: Node) -> None:
        """Replace the node's rows of per-operator agent-LLM spend (requests only accumulate on a node)."""
        db.execute("DELETE FROM node_spend WHERE run_id = ? AND node_id = ?", (node.run_id, node.node_id))
        rows = [(node.run_id, op, node.node_id, s.calls, s.failed, s.unpriced, s.usd)
                for op, s in node_spend(node).items()]
        db.executemany("INSERT INTO node_spend (run_id, operator, node_id, calls, failed, unpriced, usd) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    @classmethod
    def in_run_dir(cls, run_dir: str | Path) -> SQLiteStore:
        """The archive of the run kept in `run_dir`, created if new."""
        return cls(Path(run_dir) / DB_FILENAME)

    # ------------------------------------------------------------------------------------ plumbing

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction; IMMEDIATE takes the write lock up front so a CAS cannot interleave."""
        if self.read_only:
            raise ArchiveError(f"{self.path} is open read-only")
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
            if is_damage(err):
                raise damaged(self.path, err) from err
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
        with self._write() as db:
            return self._insert(db, node)

    def insert_nodes(self, nodes: Iterable[Node], batch: int = 500) -> int:
        """Many nodes, `batch` to a transaction (one fsync each, not one per node)."""
        inserted = 0
        pending = iter(nodes)
        while chunk := list(itertools.islice(pending, batch)):
            with self._write() as db:
                inserted += sum(self._insert(db, node) for node in chunk)
        return inserted

    def _insert(self, db: sqlite3.Connection, node: Node) -> bool:
        g = node.genealogy
        names = ", ".join(name for name, _ in _DERIVED_COLUMNS)
        inserted = db.execute(
            f"INSERT INTO nodes (run_id, node_id, status, depth, doc, {names}) "
            f"VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(_DERIVED_COLUMNS))}) "
            "ON CONFLICT (run_id, node_id) DO NOTHING",
            (g.run_id, g.node_id, node.status.value, g.depth, node.model_dump_json(), *derived_columns(node)),
        ).rowcount
        if inserted:
            db.executemany(
                "INSERT OR IGNORE INTO parents (run_id, parent_id, node_id) VALUES (?, ?, ?)",
                [(g.run_id, parent, g.node_id) for parent in g.parent_ids],
            )
            self._write_spend(db, node)
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

    def lineage(self, run_id: str) -> list[LineageEntry]:
        # one covering index holds every field: the documents (and their overflow pages) are never read
        rows = self._read(
            "SELECT node_id, status, depth, utility, name, parent_list, failed_phase, selection "
            "FROM nodes INDEXED BY nodes_lineage WHERE run_id = ? ORDER BY seq", (run_id,))
        return [LineageEntry(id=node_id, parents=tuple(json.loads(parents)), status=status, depth=depth,
                             utility=utility, failed_phase=phase,
                             selection_score=selection, name=name)
                for node_id, status, depth, utility, name, parents, phase, selection in rows]

    def children(self, run_id: str, node_id: str) -> list[Node]:
        rows = self._read(
            "SELECT n.doc FROM parents p JOIN nodes n ON n.run_id = p.run_id AND n.node_id = p.node_id "
            "WHERE p.run_id = ? AND p.parent_id = ? ORDER BY n.seq",
            (run_id, node_id),
        )
        return [self._node(doc) for (doc,) in rows]

    def transition(self, run_id: str, node_id: str, expected: NodeStatus, node: Node) -> bool:
        check_same_node(run_id, node_id, node)
        derived = ", ".join(f"{name} = ?" for name, _ in _DERIVED_COLUMNS)
        with self._write() as db:
            written = db.execute(
                f"UPDATE nodes SET status = ?, doc = ?, {derived} WHERE run_id = ? AND node_id = ? AND status = ?",
                (node.status.value, node.model_dump_json(), *derived_columns(node), run_id, node_id,
                 NodeStatus(expected).value),
            ).rowcount
            if written and node.llm_calls:
                self._write_spend(db, node)
        return written == 1

    def counters(self, run_id: str) -> RunCounters:
        rows = self._read("SELECT status, nodes, evaluated, llm_usd, max_number, max_depth FROM tallies "
                          "WHERE run_id = ?", (run_id,))
        counts = dict.fromkeys(NodeStatus, 0)
        for status, n, *_ in rows:
            counts[NodeStatus(status)] = n
        return RunCounters(
            counts=counts,
            evaluated=sum(row[2] for row in rows),
            llm_usd=max(0.0, sum(row[3] for row in rows)),  # a sum of differences may round a hair below zero
            max_number=max((row[4] for row in rows), default=-1),
            depth=max((row[5] for row in rows), default=0),
        )

    def scores(self, run_id: str, *, min_seeds: int = 0, limit: int | None = None) -> list[NodeScore]:
        index = "nodes_by_seeds" if min_seeds > 1 else "nodes_by_utility"  # few nodes have replicates
        rows = self._read(
            f"SELECT score FROM nodes INDEXED BY {index} WHERE run_id = ? AND score IS NOT NULL AND seeds >= ? "
            "ORDER BY utility DESC, seq LIMIT ?",  # NULL (a nan utility) sorts last in descending order
            (run_id, min_seeds, -1 if limit is None else limit),
        )
        return [NodeScore.model_validate_json(score) for (score,) in rows]

    def llm_spend(self, run_id: str) -> dict[LlmOperator, OperatorSpend]:
        rows = self._read("SELECT operator, SUM(calls), SUM(failed), SUM(unpriced), SUM(usd) FROM node_spend "
                          "WHERE run_id = ? GROUP BY operator", (run_id,))
        found = {op: OperatorSpend(calls=c, failed=f, unpriced=u, usd=usd) for op, c, f, u, usd in rows}
        return {op: found[op] for op in get_args(LlmOperator) if op in found}

    # ---------------------------------------------------------------------------- integrity, backups

    def check(self, full: bool = False) -> list[str]:
        """What SQLite finds wrong with the file, nothing when it is sound: `PRAGMA quick_check` (every page and
        record; ~10-25 ms per 1,000 nodes), or with `full` `integrity_check`, which also matches every index to its
        table (~1.5x that)."""
        with self._lock:
            return integrity_problems(self._db, full)

    def backup_to(self, dest: Path) -> None:
        """Copy what is committed to `dest`, as one self-contained file (rollback-journal mode, no -wal beside it).
        The copy is written beside `dest`, checked (quick_check), synced and renamed over it: `dest` is always a
        whole, sound copy, the previous one if this fails (ArchiveCorrupt when the copy is damaged, ArchiveError
        otherwise). The archive's writes wait for the copy (~0.1 s per 1,000 nodes); readers do not (WAL)."""
        partial = dest.with_name(dest.name + ".partial")
        try:
            partial.unlink(missing_ok=True)
            copy = sqlite3.connect(partial, isolation_level=None)
            try:
                with self._lock, self._errors("backup"):
                    self._db.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
                problems = integrity_problems(copy, full=False)
            finally:
                copy.close()
            if problems:
                raise damaged(self.path, f"its copy fails the check: {problems[0]}")
            sync_path(partial)
            os.replace(partial, dest)
            sync_path(dest.parent)
        except (OSError, sqlite3.Error) as err:
            raise ArchiveError(f"cannot back up {self.path} to {dest}: {err}") from err
        finally:
            partial.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def integrity_problems(db: sqlite3.Connection, full: bool = False) -> list[str]:
    """`PRAGMA quick_check` (or `integrity_check` with `full`) of an open SQLite file: its complaints, none when it is
    sound. A file too damaged to check at all gives SQLite's error as the one complaint."""
    try:
        rows = db.execute(f"PRAGMA {'integrity_check' if full else 'quick_check'}").fetchall()
    except sqlite3.DatabaseError as err:
        return [str(err)]
    return [] if rows == [("ok",)] else [row[0] for row in rows]
