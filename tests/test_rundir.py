"""Run-directory safety: the lock of `poise run`, foreign directories, backups, and `poise doctor` on a damaged
archive. Archives are filled directly with synthetic nodes (app/bench_archive.py); the runs stop after their first
message, so nothing here trains."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.bench_archive import RUN_ID, SyntheticRun
from app.cli import build_parser, main
from app.doctor import diagnose
from app.rundir import BACKUP_FILENAME, LOCK_FILENAME, Backups, RunDirError, RunDirLock, check_run_dir
from app.runner import RunError, run
from archive.sqlite_store import SCHEMA_VERSION, ArchiveCorrupt, SQLiteStore
from archive.update import Outcome
from poise.contracts import Node, NodeStatus, RunConfig

REPO = Path(__file__).resolve().parents[1]
HOLD_THE_LOCK = ("import sys, time; from pathlib import Path; from app.rundir import RunDirLock; "
                 "lock = RunDirLock(Path(sys.argv[1]), 'poise run'); print('locked', flush=True); time.sleep(600)")
PAGE = 4096


def tiny(run_id: str = "r") -> RunConfig:
    return RunConfig(run_id=run_id, protocol="tiny", budget=1, parallel=1, root_seeds=1, replicate_seeds=1)


@pytest.fixture
def holder():
    """Start a process that takes a run directory's lock and keeps it until killed."""
    children: list[subprocess.Popen] = []

    def start(run_dir: Path) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run_dir)], cwd=REPO,
                                 stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout.readline().strip() == "locked"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()
        child.stdout.close()


def archive_with_backup(run_dir: Path, nodes: int = 30, backed_up: int = 20) -> list[Node]:
    """A run of `nodes` synthetic nodes whose backup was taken after the first `backed_up`."""
    synthetic = SyntheticRun(nodes, 2)
    built = list(synthetic.nodes())
    with SQLiteStore.in_run_dir(run_dir) as store:
        store.put_run(synthetic.config)
        store.insert_nodes(built[:backed_up])
        store.backup_to(run_dir / BACKUP_FILENAME)
        store.insert_nodes(built[backed_up:])
    return built


def zero_pages(path: Path, start: int, count: int) -> None:
    with path.open("r+b") as file:
        file.seek(start * PAGE)
        file.write(bytes(count * PAGE))


# ------------------------------------------------------------------------------------------------ the lock


def test_a_second_run_is_refused_with_the_holders_pid_and_start(tmp_path, holder, capsys):
    run_dir = tmp_path / "run"
    first = holder(run_dir)
    assert main(["run", "--protocol", "tiny", "--budget", "1", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by poise run (pid {first.pid} on " in err and ", started 20" in err
    assert "stop it first or use another --run-dir" in err
    assert not (run_dir / "archive.db").exists(), "the refused run wrote to the directory"


def test_a_lock_left_by_a_killed_run_is_taken_over_and_emptied_at_the_end(tmp_path, holder):
    run_dir = tmp_path / "run"
    first = holder(run_dir)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert f'"pid": {first.pid}' in (run_dir / LOCK_FILENAME).read_text()
    progress = io.StringIO()
    run(tiny(), run_dir, stream=progress, max_messages=1)
    assert f"taking over the lock of pid {first.pid} (no longer running)" in progress.getvalue()
    assert (run_dir / LOCK_FILENAME).read_text() == ""


def test_readers_and_doctor_work_beside_a_run_that_holds_the_lock(tmp_path, holder, capsys):
    archive_with_backup(tmp_path, nodes=12, backed_up=12)
    running = holder(tmp_path)
    assert main(["status", "--run-dir", str(tmp_path)]) == 0
    assert f"run {RUN_ID}:" in capsys.readouterr().out
    assert main(["doctor", "--run-dir", str(tmp_path)]) == 0
    assert f"ok       lock: held by poise run (pid {running.pid}" in capsys.readouterr().out
    assert main(["doctor", "--run-dir", str(tmp_path), "--repair"]) == 2
    assert f"not repaired: {tmp_path} is in use by poise run (pid {running.pid}" in capsys.readouterr().out


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunDirLock(tmp_path, "poise run"):
        with pytest.raises(RunDirError, match=f"in use by poise run \\(pid {os.getpid()} "):
            RunDirLock(tmp_path, "poise run")
    RunDirLock(tmp_path, "poise run").release()


# --------------------------------------------------------------------------------------- foreign directories


def test_a_foreign_directory_is_refused_unless_forced(tmp_path, capsys):
    for name in ("thesis.tex", "data.csv", "notes"):
        (tmp_path / name).touch()
    assert main(["run", "--protocol", "tiny", "--budget", "1", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not empty and holds no POISE run (data.csv, notes, thesis.tex)" in err and "--force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "notes", "thesis.tex"]
    assert build_parser().parse_args(["run", "--force"]).force
    run(tiny(), tmp_path, max_messages=1, force=True)
    assert (tmp_path / "archive.db").is_file() and (tmp_path / "thesis.tex").exists()
    check_run_dir(tmp_path)  # a run's directory now, whatever else it holds


def test_new_empty_and_run_directories_are_accepted(tmp_path):
    check_run_dir(tmp_path / "new")
    check_run_dir(tmp_path)
    for name in ("run.log", LOCK_FILENAME, "nodes"):
        (tmp_path / name).touch()
    check_run_dir(tmp_path)  # only what POISE writes: a run that never got its archive


def test_a_directory_holding_a_backup_but_no_archive_is_refused_even_forced(tmp_path):
    (tmp_path / BACKUP_FILENAME).touch()
    with pytest.raises(RunDirError, match="--repair` restores it"):
        check_run_dir(tmp_path, force=True)
    with pytest.raises(RunError, match="no archive.db"):
        run(tiny(), tmp_path, max_messages=1, force=True)


# ------------------------------------------------------------------------------------------------- backups


def test_a_run_backs_its_archive_up_when_it_starts_and_stops(tmp_path):
    run(tiny(), tmp_path, max_messages=1)
    backup = sqlite3.connect(tmp_path / BACKUP_FILENAME)
    try:
        assert backup.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        assert backup.execute("SELECT node_id FROM nodes").fetchall() == [("n000",)]
    finally:
        backup.close()


def test_backups_follow_finished_nodes_at_most_once_an_interval(tmp_path):
    built = archive_with_backup(tmp_path, nodes=12, backed_up=12)
    now = [1000.0]
    said: list[str] = []
    applied = SimpleNamespace(outcome=Outcome.APPLIED, node=built[3])
    assert built[-1].status == NodeStatus.TRAINED
    with SQLiteStore.in_run_dir(tmp_path) as store:
        backups = Backups(store, said.append, clock=lambda: now[0])
        assert backups.take() and backups.path == tmp_path / BACKUP_FILENAME
        taken = backups.last_at
        backups.on_result(SimpleNamespace(subject="evt.reflected"), applied)
        assert backups.last_at == taken, "a second backup within the interval"
        now[0] += 31
        backups.on_result(SimpleNamespace(subject="evt.trained"), SimpleNamespace(outcome=Outcome.APPLIED,
                                                                                 node=built[-1]))
        assert backups.last_at == taken, "a backup after a phase that does not finish a node"
        backups.on_result(SimpleNamespace(subject="evt.evaluated"), applied)
        assert backups.last_at == now[0]
    assert said == []


def test_a_damaged_copy_never_replaces_the_backup(tmp_path):
    archive_with_backup(tmp_path, nodes=12, backed_up=12)
    before = (tmp_path / BACKUP_FILENAME).read_bytes()
    path = tmp_path / "archive.db"
    zero_pages(path, path.stat().st_size // PAGE // 2, 4)
    with SQLiteStore.in_run_dir(tmp_path) as store:
        assert store.check()
        with pytest.raises(ArchiveCorrupt, match="is damaged .*its copy fails the check"):
            store.backup_to(tmp_path / BACKUP_FILENAME)
    assert (tmp_path / BACKUP_FILENAME).read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------------------------------- damage, doctor


def test_a_truncated_archive_is_reported_and_doctor_restores_the_last_backup(tmp_path, capsys):
    built = archive_with_backup(tmp_path, nodes=30, backed_up=20)
    path = tmp_path / "archive.db"
    os.truncate(path, path.stat().st_size // 2)
    damaged = path.read_bytes()
    message = f"{path} is damaged (database disk image is malformed); run `poise doctor --run-dir {tmp_path}`"
    with pytest.raises(ArchiveCorrupt) as refused:
        run(tiny(RUN_ID), tmp_path, max_messages=1)
    assert str(refused.value).startswith(message)
    assert main(["run", "--run-dir", str(tmp_path)]) != 0  # a message, never a traceback
    assert message in capsys.readouterr().err

    assert main(["doctor", "--run-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM  archive: {path} is damaged (database disk image is malformed); `poise doctor" in out
    assert f"ok       backup: sound, schema {SCHEMA_VERSION}, run bench-archive, 20 nodes" in out

    assert main(["doctor", "--run-dir", str(tmp_path), "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"restored {path}: 20 nodes from the backup" in out and "ok       archive: sound" in out
    (kept,) = tmp_path.glob("archive.db.damaged-*[0-9]")
    assert kept.read_bytes() == damaged, "the damaged file was not kept as it was"
    with SQLiteStore.in_run_dir(tmp_path) as store:
        restored = {node.node_id for node in store.nodes(RUN_ID)}
    assert {node.node_id for node in built[:20]} <= restored <= {node.node_id for node in built}
    assert main(["status", "--run-dir", str(tmp_path)]) == 0
    assert f"run {RUN_ID}: protocol tiny" in capsys.readouterr().out


def test_repair_without_a_backup_salvages_every_node_still_readable(tmp_path, capsys):
    built = archive_with_backup(tmp_path, nodes=30, backed_up=20)
    (tmp_path / BACKUP_FILENAME).unlink()
    path = tmp_path / "archive.db"
    zero_pages(path, path.stat().st_size // PAGE // 2, 6)
    assert main(["doctor", "--run-dir", str(tmp_path)]) == 1
    assert "(no sound backup)" in capsys.readouterr().out
    assert main(["doctor", "--run-dir", str(tmp_path), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "no backup" in out and "of its rows unreadable" in out
    with SQLiteStore.in_run_dir(tmp_path) as store:
        salvaged = store.nodes(RUN_ID)
        assert store.get_run(RUN_ID) is not None
    originals = {node.node_id: node for node in built}
    assert 0 < len(salvaged) < len(built)
    assert all(node == originals[node.node_id] for node in salvaged)


def test_repair_adds_the_work_newer_than_the_backup_that_it_can_read(tmp_path, capsys):
    built = archive_with_backup(tmp_path, nodes=30, backed_up=20)
    path = tmp_path / "archive.db"
    zero_pages(path, path.stat().st_size // PAGE // 3, 2)  # damage among the nodes the backup holds
    assert main(["doctor", "--run-dir", str(tmp_path), "--repair"]) == 0
    assert "20 nodes from the backup" in capsys.readouterr().out
    with SQLiteStore.in_run_dir(tmp_path) as store:
        restored = {node.node_id for node in store.nodes(RUN_ID)}
        assert not store.check(full=True)
    assert len(restored) > 20 and restored <= {node.node_id for node in built}


def test_doctor_reports_node_directories_that_belong_to_no_node(tmp_path, capsys):
    archive_with_backup(tmp_path, nodes=12, backed_up=12)
    (tmp_path / "nodes" / "n000").mkdir(parents=True)
    (tmp_path / "nodes" / "n077").mkdir()
    findings = {finding.check: finding for finding in diagnose(tmp_path)}
    assert findings["node directories"].level == "note" and "(n077)" in findings["node directories"].text
    assert main(["doctor", "--run-dir", str(tmp_path)]) == 0
