"""Run directories: one `poise run` at a time, no foreign directory taken over, a last good copy of the archive.

The lock. `RUN_DIR/run.lock` is held with `flock(LOCK_EX | LOCK_NB)` for the life of `poise run` (and of
`poise doctor --repair`) and holds its holder's JSON record (pid, host, start time, command). A second run is
refused with that record. The kernel drops an flock when its process ends, however it ends, so a lock that can
be taken is free by construction: a record left in it is a crash's or a kill -9's, and the next run takes it over
and says so. The file is never deleted (a process that opened it before the deletion would lock an orphaned
file beside the next run's new one); a clean exit empties it. Readers (`status`, `show`, `report`, `ui`) never
take it: the archive's WAL lets them read beside the writer. flock, like SQLite's WAL, needs a local filesystem.

Foreign directories. `poise run` takes a directory that does not exist, is empty, holds `archive.db`, or holds
nothing but what POISE writes (`archive.db*` and `POISE_NAMES`); anything else is refused with a few of the names
found, unless `--force`. A directory with the backup `archive.db.bak` but no `archive.db` is refused even with
--force: a new run would replace the backup; `poise doctor --repair` restores it.

Backups. `RUN_DIR/archive.db.bak` is a copy of what the archive had committed (SQLiteStore.backup_to: checked,
synced, renamed into place, so it is always whole). `Backups` takes one when a run opens a sound archive (after
`PRAGMA quick_check`), after a node finishes a phase that ends its costly work (evaluated, reflected, failed) once
`max(BACKUP_MIN_INTERVAL_S, last backup's duration / BACKUP_SHARE)` has passed, and when the run ends. On two busy
shared cores a synthetic 1,000-node archive (43 MB, app/bench_archive.py) takes ~0.1-0.2 s to copy and check and
~10-25 ms to quick_check; 10,000 nodes (424 MB) take ~1-1.3 s and ~0.2-0.3 s. So a backup comes at most every
30 s, and at most 2% of the run's wall time goes to backups however large the archive grows.

What a damaged archive can lose: `poise doctor --repair` restores the backup, then adds from the damaged file
every node SQLite can still read that is newer than the backup's copy. Nothing the backup holds is lost. What
neither holds is what the run committed after the last backup (at most one interval's worth of finished nodes)
in pages too damaged to read: a node the backup holds at an earlier status has that work redone when the run
resumes, as after a kill; a node it lacks is proposed afresh under the same id.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from archive.sqlite_store import DB_FILENAME, SQLiteStore
from archive.update import Outcome, UpdateResult
from poise.contracts import Message, NodeStatus
from poise.store import ArchiveError

LOCK_FILENAME = "run.lock"
BACKUP_FILENAME = f"{DB_FILENAME}.bak"
DAMAGED_PREFIX = f"{DB_FILENAME}.damaged-"  # where `poise doctor --repair` moves a damaged archive
# What POISE writes in a run directory besides `archive.db*` (the archive, its -wal, backups, damaged copies): a
# directory holding nothing else is a run's.
POISE_NAMES = frozenset({LOCK_FILENAME, "run.log", "summary.json", "report.html", "nodes", "fingerprints", "vllm"})
BACKUP_MIN_INTERVAL_S = 30.0
BACKUP_SHARE = 0.02  # the most of a run's wall time its backups may take
FINISHING_EVENTS = ("evt.evaluated", "evt.reflected", "evt.failed")

log = logging.getLogger("poise.rundir")


class RunDirError(Exception):
    """The run directory cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a run directory's lock: the JSON record in `run.lock`."""

    pid: int
    host: str
    started: str  # ISO 8601 with the time zone
    command: str

    def describe(self) -> str:
        try:
            when = datetime.fromisoformat(self.started).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            when = self.started
        return f"{self.command} (pid {self.pid} on {self.host}, started {when})"


class RunDirLock:
    """The exclusive lock of a run directory, held until `release` or the process's end; RunDirError when another
    process holds it. `taken_over`: the record a dead holder left in the lock, if any."""

    def __init__(self, run_dir: Path, command: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = holder.describe() if holder else "another process (it has not written its record yet)"
            raise RunDirError(f"{run_dir} is in use by {who}; stop it first or use another --run-dir") from None
        except BaseException:
            os.close(fd)
            raise
        self.taken_over = _holder(fd)
        self.holder = LockHolder(pid=os.getpid(), host=socket.gethostname(),
                                 started=datetime.now().astimezone().isoformat(timespec="seconds"), command=command)
        record = json.dumps(asdict(self.holder)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._fd: int | None = fd

    def release(self) -> None:
        """Empty the record (a clean exit leaves nothing to take over) and drop the lock; idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> LockHolder | None:
    """The record in the open lock file; None when it is empty or unreadable (a holder mid-write, a clean exit)."""
    try:
        return LockHolder(**json.loads(os.pread(fd, 4096, 0)))
    except (OSError, ValueError, TypeError):
        return None


def lock_state(run_dir: Path) -> tuple[bool, LockHolder | None]:
    """Whether a live process holds the run directory's lock, and the record in it (the holder's, or the one a
    dead holder left). Probes with a shared lock, released at once, so it never keeps a run from starting."""
    path = run_dir / LOCK_FILENAME
    if not path.is_file():
        return False, None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, _holder(fd)
    finally:
        os.close(fd)


def check_run_dir(run_dir: Path, force: bool = False) -> None:
    """RunDirError unless `run_dir` is new, empty or a run's (module docstring); `force` takes a foreign one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a directory; choose another --run-dir")
    if not run_dir.exists() or (run_dir / DB_FILENAME).exists():
        return
    names = sorted(entry.name for entry in run_dir.iterdir())
    if BACKUP_FILENAME in names:
        raise RunDirError(f"{run_dir} holds a backup of an archive ({BACKUP_FILENAME}) but no {DB_FILENAME}: "
                          f"`poise doctor --run-dir {run_dir} --repair` restores it (a new run here would replace "
                          f"the backup; move {BACKUP_FILENAME} away first to start afresh)")
    foreign = [name for name in names if name not in POISE_NAMES and not name.startswith(DB_FILENAME)]
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(f"{run_dir} is not empty and holds no POISE run ({shown}); choose another --run-dir, "
                          "or add --force to start a run in it anyway")


class Backups:
    """When the run copies its archive to `archive.db.bak` (module docstring). A backup that fails is reported
    with `say` and the run goes on: the previous backup stays in place."""

    def __init__(self, store: SQLiteStore, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.path = store.path.with_name(BACKUP_FILENAME)
        self.say = say
        self.clock = clock
        self.last_at = -math.inf
        self.last_s = 0.0

    def take(self) -> bool:
        started = self.clock()
        try:
            self.store.backup_to(self.path)
        except ArchiveError as err:
            log.warning("no backup taken: %s", err)
            self.say(f"warning: no backup of the archive taken ({err}); the previous one is kept")
            return False
        self.last_at = self.clock()
        self.last_s = self.last_at - started
        return True

    def due(self) -> bool:
        return self.clock() - self.last_at >= max(BACKUP_MIN_INTERVAL_S, self.last_s / BACKUP_SHARE)

    def on_result(self, event: Message, result: UpdateResult) -> None:
        """After the archive applied `event`: a backup if it finished a node's costly work and one is due."""
        finished = (result.outcome == Outcome.APPLIED and result.node is not None
                    and (event.subject in FINISHING_EVENTS or result.node.status == NodeStatus.FAILED))
        if finished and self.due():
            self.take()
