"""`poise doctor`: check a run directory and, with --repair, restore its archive.

One line per check: `ok`, `note` (worth knowing, nothing to do) or `PROBLEM` (with what to do). Exit status 0
when no check finds a problem, 1 otherwise, 2 when there is no such directory or a run holds it during --repair.

- lock: free, held by a running `poise run` (pid, host, start), or left behind by a process that died;
- archive: `PRAGMA integrity_check` of archive.db, read-only (beside a running run too), its schema version, runs
  and nodes;
- backup: the same for archive.db.bak, and when it was taken;
- node directories: `nodes/<id>/` of nodes the archive does not hold: work lost with the archive; the run
  proposes those ids again and trains into the same directories.

--repair takes the run directory's lock (refused while a run holds it) and, when archive.db is damaged or missing,
builds a new archive: the backup if it is sound, plus every run config and node document SQLite can still read in
the damaged file that the backup lacks or holds at an older `updated_at`; then it moves the damaged file (and its
-wal) aside to `archive.db.damaged-<time>` and puts the new one in its place. Nothing is deleted. The damaged file is
read from a scratch copy, padded with zeros to the length its header records when it was truncated (SQLite then
reads the pages that remain), row by row in key order, skipping rows it cannot read. The nodes go in through
SQLiteStore, so every derived column, tally and index is rebuilt from the documents. What can still be lost:
app/rundir.py.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from app.rundir import BACKUP_FILENAME, DAMAGED_PREFIX, RunDirError, RunDirLock, lock_state
from archive.sqlite_store import DB_FILENAME, SCHEMA_VERSION, SQLiteStore, integrity_problems, sync_path
from poise.contracts import Node, RunConfig

OK, NOTE, PROBLEM = "ok", "note", "PROBLEM"
SIDE_FILES = ("-wal", "-shm")  # SQLite's files beside a database, named after it
# Salvage steps over unreadable keys one at a time (~5 µs each) and gives up after this many in a row.
MAX_UNREADABLE_RUN = 100_000


@dataclass(frozen=True)
class Finding:
    level: str  # OK, NOTE or PROBLEM
    check: str
    text: str

    def line(self) -> str:
        return f"{self.level:<8} {self.check}: {self.text}"


@dataclass(frozen=True)
class ArchiveFile:
    """What a read-only look at one archive file found."""

    path: Path
    problems: tuple[str, ...]  # integrity_check's complaints, or the error that stopped it; empty when sound
    schema: int | None
    runs: tuple[str, ...]
    node_ids: frozenset[str]

    @property
    def sound(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        runs = ", ".join(self.runs) or "none"
        return f"schema {self.schema}, run {runs}, {len(self.node_ids)} nodes"


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)


def inspect(path: Path) -> ArchiveFile | None:
    """integrity_check, schema version, runs and nodes of the archive file at `path`; None when there is none."""
    if not path.is_file():
        return None
    db = _read_only(path)
    try:
        problems = integrity_problems(db, full=True)
        schema, runs, nodes = None, (), frozenset()
        try:
            schema = db.execute("PRAGMA user_version").fetchone()[0]
            runs = tuple(row[0] for row in db.execute("SELECT run_id FROM runs ORDER BY rowid"))
            nodes = frozenset(row[0] for row in db.execute("SELECT node_id FROM nodes"))
        except sqlite3.Error as err:
            problems = problems or [str(err)]
        return ArchiveFile(path, tuple(problems), schema, runs, nodes)
    finally:
        db.close()


# ------------------------------------------------------------------------------------------------- checks


def diagnose(run_dir: Path) -> list[Finding]:
    """Every check of `run_dir`, in the order printed."""
    archive, backup = inspect(run_dir / DB_FILENAME), inspect(run_dir / BACKUP_FILENAME)
    findings = [lock_finding(run_dir), archive_finding(run_dir, archive, backup), backup_finding(run_dir, backup)]
    if (run_dir / "nodes").is_dir() and archive is not None and archive.sound:
        findings.append(node_dirs_finding(run_dir, archive))
    return findings


def lock_finding(run_dir: Path) -> Finding:
    held, holder = lock_state(run_dir)
    if held:
        who = holder.describe() if holder else "a process that has not written its record yet"
        return Finding(OK, "lock", f"held by {who}")
    if holder is not None:
        return Finding(NOTE, "lock", f"left by pid {holder.pid} on {holder.host}, which is no longer running (a crash "
                                     "or a kill); the next `poise run` takes it over")
    return Finding(OK, "lock", "free")


def archive_finding(run_dir: Path, archive: ArchiveFile | None, backup: ArchiveFile | None) -> Finding:
    repair = f"`poise doctor --run-dir {run_dir} --repair`"
    usable = backup is not None and backup.sound
    if archive is None:
        if usable:
            return Finding(PROBLEM, "archive", f"no {DB_FILENAME}, but a sound backup ({backup.describe()}): "
                                               f"{repair} restores it")
        return Finding(NOTE, "archive", f"no {DB_FILENAME}: no run has started here")
    if not archive.sound:
        more = f" and {len(archive.problems) - 1} more complaints" if len(archive.problems) > 1 else ""
        remedy = (f"{repair} moves it aside, restores the backup ({backup.describe()}) and adds the newer work it "
                  "can still read" if usable else
                  f"{repair} moves it aside and rebuilds an archive from what it can still read (no sound backup)")
        return Finding(PROBLEM, "archive", f"{archive.path} is damaged ({archive.problems[0]}{more}); {remedy}")
    if archive.schema is not None and archive.schema > SCHEMA_VERSION:
        return Finding(PROBLEM, "archive", f"schema {archive.schema} is newer than this POISE reads "
                                           f"({SCHEMA_VERSION}); upgrade POISE")
    if archive.schema != SCHEMA_VERSION:
        return Finding(NOTE, "archive", f"sound, {archive.describe()}; migrated to schema {SCHEMA_VERSION} when "
                                        "`poise run` or `poise status` opens it")
    return Finding(OK, "archive", f"sound, {archive.describe()}")


def backup_finding(run_dir: Path, backup: ArchiveFile | None) -> Finding:
    if backup is None:
        return Finding(NOTE, "backup", f"no {BACKUP_FILENAME} yet: `poise run` takes one when it starts and as "
                                       "nodes finish")
    if not backup.sound:
        return Finding(PROBLEM, "backup", f"{backup.path} is damaged ({backup.problems[0]}); the next `poise run` "
                                          "on a sound archive replaces it")
    taken = datetime.fromtimestamp(backup.path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    return Finding(OK, "backup", f"sound, {backup.describe()}, taken {taken}")


def node_dirs_finding(run_dir: Path, archive: ArchiveFile) -> Finding:
    orphans = sorted(entry.name for entry in (run_dir / "nodes").iterdir()
                     if entry.is_dir() and entry.name not in archive.node_ids)
    if not orphans:
        return Finding(OK, "node directories", "each belongs to a node of the archive")
    shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    return Finding(NOTE, "node directories", f"{len(orphans)} belong to no node of the archive ({shown}): work "
                                             "lost with it; the run proposes those ids again and trains into the "
                                             "same directories")


# ------------------------------------------------------------------------------------------------- repair


@dataclass
class Salvage:
    """What a repair took from where."""

    from_backup: int = 0  # nodes
    added: int = 0  # nodes the backup lacked, read from the damaged file
    updated: int = 0  # nodes the damaged file held at a later update than the backup
    runs: int = 0  # run configs read from the damaged file
    unreadable: int = 0  # rows SQLite could not read between readable ones, or documents that did not validate
    cut_off: list[str] = field(default_factory=list)  # "nodes seq 481": where a scan ended in damage


def repair(run_dir: Path, say: Callable[[str], None]) -> None:
    """Restore `run_dir`'s archive if it is damaged or missing (module docstring), saying what it did; RunDirError
    while a run holds the directory."""
    with RunDirLock(run_dir, "poise doctor --repair"):
        path = run_dir / DB_FILENAME
        archive, backup = inspect(path), inspect(run_dir / BACKUP_FILENAME)
        if archive is not None and archive.sound:
            say(f"nothing to repair: {path} is sound")
            return
        usable = backup is not None and backup.sound
        if archive is None and not usable:
            say(f"nothing to restore: no {DB_FILENAME} and no sound backup in {run_dir}")
            return
        rebuilt = run_dir / f"{DB_FILENAME}.repairing"
        for leftover in _with_side_files(rebuilt):
            leftover.unlink(missing_ok=True)
        if usable:
            shutil.copyfile(backup.path, rebuilt)  # a backup is one self-contained file
        salvage = Salvage()
        with SQLiteStore(rebuilt) as store:  # migrates an older backup, creates the schema when there is none
            salvage.from_backup = sum(sum(store.counters(run_id).counts.values()) for run_id in store.run_ids())
            if archive is not None:
                salvage_into(store, path, salvage)
            runs = store.run_ids()
        _fold_wal(rebuilt)
        # a -wal left beside a missing archive.db belongs to another file: it goes aside too, never onto the new one
        moved = _move_aside(path) if any(p.exists() for p in _with_side_files(path)) else None
        os.replace(rebuilt, path)
        sync_path(run_dir)
        what = [f"{salvage.from_backup} nodes from the backup" if usable else "no backup",
                f"{salvage.added} more and {salvage.updated} newer ones read from the damaged file"]
        if salvage.unreadable:
            what.append(f"{salvage.unreadable} of its rows unreadable")
        if salvage.cut_off:
            what.append(f"the damaged file unreadable after {' and '.join(salvage.cut_off)}")
        say(f"restored {path}: {', '.join(what)}")
        if not runs:
            say("no run config could be read: the nodes are kept, but `poise run` cannot resume them")
        if moved is not None:
            say(f"the damaged file is kept as {moved}")


def salvage_into(store: SQLiteStore, damaged: Path, salvage: Salvage) -> None:
    """Add to `store` the run configs and node documents still readable in the damaged archive `damaged` that
    `store` lacks or holds at an older update."""
    with tempfile.TemporaryDirectory(prefix=".doctor-", dir=damaged.parent) as scratch:
        copy = Path(scratch) / DB_FILENAME
        for source, target in zip(_with_side_files(damaged), _with_side_files(copy), strict=True):
            if source.exists() and not source.name.endswith("-shm"):
                shutil.copyfile(source, target)
        _pad_to_recorded_length(copy)
        db = _read_only(copy)
        try:
            for doc in _readable(db, "runs", "rowid", salvage):
                try:
                    store.put_run(RunConfig.model_validate_json(doc))
                    salvage.runs += 1
                except ValidationError:
                    salvage.unreadable += 1
            for doc in _readable(db, "nodes", "seq", salvage):
                try:
                    node = Node.model_validate_json(doc)
                except ValidationError:
                    salvage.unreadable += 1
                    continue
                held = store.get_node(node.run_id, node.node_id)
                if held is None:
                    salvage.added += store.insert_node(node)
                elif node.updated_at > held.updated_at:
                    salvage.updated += store.transition(node.run_id, node.node_id, held.status, node)
        finally:
            db.close()


def _readable(db: sqlite3.Connection, table: str, key: str, salvage: Salvage) -> Iterator[str]:
    """The `doc` of every row of `table` SQLite can read, in `key` order: on an error the scan starts again after
    the next key, until MAX_UNREADABLE_RUN keys in a row failed (past the end, or a lost tail)."""
    last, failed = 0, 0  # the last key read, and the keys after it that failed
    while failed < MAX_UNREADABLE_RUN:
        try:
            for row_key, doc in db.execute(f"SELECT {key}, doc FROM {table} WHERE {key} > ? ORDER BY {key}",
                                           (last + failed,)):
                salvage.unreadable += row_key - last - 1 if failed else 0  # the keys skipped were rows
                last, failed = row_key, 0
                yield doc
            return
        except sqlite3.DatabaseError:
            failed += 1
    salvage.cut_off.append(f"{table} {key} {last}")


def _pad_to_recorded_length(path: Path) -> None:
    """Extend a truncated SQLite file with zeros to the size its header records, so that SQLite opens it and reads
    the pages that remain (a truncated file is otherwise "malformed" as a whole)."""
    with path.open("r+b") as file:
        header = file.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            return
        page_size = struct.unpack(">H", header[16:18])[0]
        page_size = 65536 if page_size == 1 else page_size
        recorded = page_size * struct.unpack(">I", header[28:32])[0]
        if recorded > path.stat().st_size:
            file.truncate(recorded)


def _with_side_files(path: Path) -> list[Path]:
    return [path, *(path.with_name(path.name + suffix) for suffix in SIDE_FILES)]


def _fold_wal(path: Path) -> None:
    """Checkpoint the SQLite file at `path` into one file with no -wal beside it, so that it can be renamed alone
    (the next writer to open it turns WAL on again)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
    finally:
        db.close()


def _move_aside(path: Path) -> Path:
    """Rename the damaged archive and its -wal/-shm to `archive.db.damaged-<time>` (names SQLite pairs again), never
    over an earlier one."""
    stamp = DAMAGED_PREFIX + datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(stamp)
    for n in itertools.count(2):
        if not any(p.exists() for p in _with_side_files(aside)):
            break
        aside = path.with_name(f"{stamp}-{n}")
    for source, target in zip(_with_side_files(path), _with_side_files(aside), strict=True):
        if source.exists():
            os.replace(source, target)
    return aside


# ---------------------------------------------------------------------------------------------- the command


def doctor(run_dir: Path, repair_archive: bool = False, out: Callable[[str], None] = print) -> int:
    """`poise doctor`: print the checks (and repair first with `repair_archive`); the exit status."""
    if not run_dir.is_dir():
        out(f"no run directory at {run_dir}")
        return 2
    if repair_archive:
        try:
            repair(run_dir, out)
        except RunDirError as err:
            out(f"not repaired: {err}")
            return 2
    findings = diagnose(run_dir)
    for finding in findings:
        out(finding.line())
    return 1 if any(finding.level == PROBLEM for finding in findings) else 0
