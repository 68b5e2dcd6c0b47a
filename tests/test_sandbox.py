"""The sandbox holds: a probe child (poise.sandbox_probe) runs snippets inside it and reports what happened."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import poise
from poise.contracts import FingerprintPayload, ProbePayload, ProbeReport
from poise.sandbox import (
    CANDIDATE_UID_BASE,
    REFUSED_STATUS,
    VIEW_DIR,
    WATCHDOG_GRACE_S,
    Cgroup,
    SandboxLimits,
    SandboxResult,
    run_sandboxed,
    thread_cap,
)

PROBE = "poise.sandbox_probe"
LIMITS = SandboxLimits(wall_s=60.0, memory_bytes=2 << 30)
PROJECT_DIR = Path(poise.__file__).resolve().parent.parent
DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


def _privileged() -> bool:
    with open("/proc/self/status") as status:
        cap_eff = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    return bool(int(cap_eff, 16) >> 21 & 1)  # CAP_SYS_ADMIN: namespaces and mounts


ISOLATED = _privileged()
isolated = pytest.mark.skipif(not ISOLATED, reason="namespaces and mounts need CAP_SYS_ADMIN (root)")


def run_probe(code: str, workdir: Path, limits: SandboxLimits = LIMITS, **payload) -> SandboxResult[ProbeReport]:
    return run_sandboxed(PROBE, ProbePayload(code=code, **payload), workdir, limits, threads=1,
                         report_type=ProbeReport)


def probe(code: str, workdir: Path, limits: SandboxLimits = LIMITS, **payload) -> dict:
    run = run_probe(textwrap.dedent(code), workdir, limits, **payload)
    assert run.ok, f"{run.failure_reason()}\n{run.stderr_tail}"
    return run.result.model_dump()


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path / "work"


def test_every_layer_applies_and_the_notes_say_what_did_not(workdir):
    report = probe("""
        import os
        status = {k: v.strip() for k, v in (line.split(":", 1) for line in open("/proc/self/status"))}
        result = {"status": status, "pid": os.getpid(), "procs": [p for p in os.listdir("/proc") if p.isdigit()]}
        """, workdir)
    assert report["raised"] is None, report["message"]
    if not ISOLATED:
        assert any("namespace" in note for note in report["notes"])
        return
    assert report["notes"] == []
    status = report["result"]["status"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, key
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert report["result"]["pid"] == 1 and report["result"]["procs"] == ["1"]  # its own PID namespace


@isolated
def test_writes_outside_the_working_directory_fail_and_leave_nothing(workdir, tmp_path):
    owned = tmp_path / "owned-by-root.txt"  # root's own file, next to the working directory
    owned.write_text("original")
    owned.chmod(0o644)
    scratch = f"/tmp/poise-sandbox-probe-{uuid.uuid4().hex}"
    targets = [str(tmp_path / "new.txt"), str(PROJECT_DIR / f"poise-sandbox-probe-{uuid.uuid4().hex}"),
               f"/usr/poise-sandbox-probe-{uuid.uuid4().hex}"]
    report = probe("""
        import os
        result = {}
        def attempt(name, action):
            try:
                action()
                result[name] = 0
            except OSError as err:
                result[name] = err.errno
        for i, target in enumerate(payload["targets"]):
            attempt(f"create{i}", lambda: open(target, "w").write("escaped"))
        owned = payload["owned"]
        attempt("append", lambda: open(owned, "a").write("escaped"))
        attempt("truncate", lambda: os.truncate(owned, 0))
        attempt("chmod", lambda: os.chmod(owned, 0o777))
        attempt("rename", lambda: os.rename(owned, owned + ".moved"))
        attempt("unlink", lambda: os.unlink(owned))
        attempt("mkdir", lambda: os.mkdir(owned + ".d"))
        attempt("scratch", lambda: open(payload["scratch"], "w").write("private"))
        """, workdir, targets=targets, owned=str(owned), scratch=scratch)
    assert report["raised"] is None, report["message"]
    codes = report["result"]
    # Next to the working directory nothing exists in the view (its parent is a bare directory of root's, where
    # the candidate's uid may not create anything); elsewhere the view is read-only.
    assert all(codes[key] == errno.ENOENT for key in ("truncate", "chmod", "rename", "unlink"))
    assert codes["create0"] == codes["append"] == codes["mkdir"] == errno.EACCES
    # The checkout is under the read-only root, or (a clone under /tmp) a bare directory of root's in the private /tmp.
    assert codes["create1"] in (errno.EROFS, errno.EACCES) and codes["create2"] == errno.EROFS
    assert codes["scratch"] == 0  # /tmp is the child's own, gone with it
    for target in (*targets, scratch):
        assert not Path(target).exists(), target
    assert owned.read_text() == "original" and stat.S_IMODE(owned.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owned-by-root.txt", "work"]


def test_the_working_directory_stays_writable(workdir):
    report = probe("""
        import os, tempfile
        open("relative.txt", "w").write("relative")
        open(os.path.join(payload["path"], "absolute.txt"), "w").write("absolute")
        os.makedirs("sub/dir")
        open("sub/dir/nested.txt", "w").write("nested")
        with tempfile.NamedTemporaryFile("w", delete=False) as handle:  # TMPDIR is the working directory
            handle.write("temporary")
        result = os.path.dirname(handle.name)
        """, workdir, path=str(workdir.resolve()))
    assert report["raised"] is None, report["message"]
    assert report["result"] == str(workdir.resolve())
    assert (workdir / "relative.txt").read_text() == "relative"
    assert (workdir / "absolute.txt").read_text() == "absolute"
    assert (workdir / "sub" / "dir" / "nested.txt").read_text() == "nested"


@isolated
def test_links_do_not_lead_out_of_the_working_directory(workdir, tmp_path):
    owned = tmp_path / "owned.txt"
    owned.write_text("original")
    report = probe("""
        import os
        result = {}
        os.symlink(payload["outside"], "link")
        try:
            open("link", "w").write("escaped")
        except OSError as err:
            result["symlink"] = err.errno
        try:
            os.link(payload["owned"], "hard")  # then write through the hard link
        except OSError as err:
            result["hardlink"] = err.errno
        """, workdir, outside=str(tmp_path / "via-link.txt"), owned=str(owned))
    # The link's target lies next to the working directory, where the view has nothing the candidate may write;
    # the file to hard-link does not exist in the view at all.
    assert report["result"] == {"symlink": errno.EACCES, "hardlink": errno.ENOENT}
    assert not (tmp_path / "via-link.txt").exists() and owned.read_text() == "original"


@isolated
def test_the_sandbox_cannot_be_undone(workdir, tmp_path):
    target = tmp_path / "escaped.txt"
    report = probe("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
        MS_REMOUNT, MS_BIND, CLONE_NEWNS, CLONE_NEWUSER = 0x20, 0x1000, 0x20000, 0x10000000
        result = {}
        def call(name, rc):
            result[name] = 0 if rc == 0 else ctypes.get_errno()
        call("remount_root_rw", libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None))
        call("remount_root_rw_plain", libc.mount(None, b"/", None, MS_REMOUNT, None))
        call("umount_proc", libc.umount2(b"/proc", 2))
        call("tmpfs_over_tmp", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
        call("unshare_user_mount", libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
        if result["unshare_user_mount"] == 0:  # then a user namespace's capabilities would be tried
            call("remount_in_userns", libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None))
        call("mknod_block_device", libc.mknod(b"vda", 0o60600, os.makedev(254, 0)))
        call("keyctl", libc.syscall(250, 0, -4, 0, 0, 0))  # KEYCTL_GET_KEYRING_ID of the user keyring
        call("ptrace_traceme", libc.ptrace(0, 0, None, None))
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)(*([0xFFFFFFFF] * 6))
        call("capset_all", libc.capset(header, data))
        try:
            open(payload["target"], "w").write("escaped")
            result["write_after"] = 0
        except OSError as err:
            result["write_after"] = err.errno
        """, workdir, target=str(target))
    assert report["raised"] is None, report["message"]
    result = report["result"]
    assert result.pop("write_after") == errno.EACCES and not target.exists()
    assert "remount_in_userns" not in result
    assert all(code == errno.EPERM for code in result.values()), result


@isolated
def test_only_harmless_devices_open(workdir):
    block = next((f"/dev/{name}" for name in sorted(os.listdir("/dev"))
                  if stat.S_ISBLK(os.stat(f"/dev/{name}").st_mode)), None)
    report = probe("""
        import os
        result = {"null": open("/dev/null", "w").write("x"), "urandom": len(open("/dev/urandom", "rb").read(16))}
        if payload["block"]:
            try:
                os.close(os.open(payload["block"], os.O_RDONLY))
                result["block"] = 0
            except OSError as err:
                result["block"] = err.errno
        """, workdir, block=block)
    assert report["raised"] is None, report["message"]
    assert report["result"]["null"] == 1 and report["result"]["urandom"] == 16
    if block:
        assert report["result"]["block"] == errno.ENOENT  # the view's /dev holds only the harmless devices


@isolated
def test_kernel_settings_and_host_processes_are_out_of_reach(workdir):
    report = probe("""
        import os
        result = {}
        value = open("/proc/sys/kernel/core_pattern").read()
        try:
            open("/proc/sys/kernel/core_pattern", "w").write(value)  # the same value: harmless if it worked
            result["sysctl"] = 0
        except OSError as err:
            result["sysctl"] = err.errno
        try:
            os.kill(payload["parent"], 0)
            result["signal_parent"] = 0
        except OSError as err:
            result["signal_parent"] = err.errno
        """, workdir, parent=os.getpid())
    assert report["result"] == {"sysctl": errno.EROFS, "signal_parent": errno.ESRCH}


@isolated
def test_no_network_and_no_unix_sockets(workdir, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    unix_path = str(tmp_path / "service.sock")
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(unix_path)
    unix_listener.listen()
    try:
        report = probe("""
            import socket
            result = {}
            try:
                socket.create_connection(("127.0.0.1", payload["port"]), timeout=2)
                result["tcp"] = 0
            except OSError as err:
                result["tcp"] = err.errno
            try:
                client = socket.socket(socket.AF_UNIX)
                client.connect(payload["unix"])
                result["unix"] = 0
            except OSError as err:
                result["unix"] = err.errno
            left, right = socket.socketpair()  # in-process pairs (multiprocessing pipes) still work
            left.sendall(b"ok")
            result["pair"] = right.recv(2).decode()
            """, workdir, port=listener.getsockname()[1], unix=unix_path)
        assert report["result"] == {"tcp": errno.ENETUNREACH, "unix": errno.EPERM, "pair": "ok"}
        for server in (listener, unix_listener):
            server.settimeout(0.2)
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        listener.close()
        unix_listener.close()


def test_the_parent_environment_does_not_reach_the_child(workdir, monkeypatch):
    monkeypatch.setenv("POISE_TEST_SECRET", "sk-should-not-leak")
    report = probe("""
        import os
        result = {"secret": os.environ.get("POISE_TEST_SECRET"), "keys": sorted(os.environ)}
        """, workdir)
    assert report["result"]["secret"] is None
    assert not any("SECRET" in key or "KEY" in key or "TOKEN" in key for key in report["result"]["keys"])


def test_an_infinite_loop_is_killed_at_the_wall_deadline(workdir):
    run = run_probe("while True:\n    pass\n", workdir, SandboxLimits(wall_s=3.0))
    assert run.timed_out and not run.ok and run.result is None
    assert 3.0 <= run.wall_s < 3.0 + WATCHDOG_GRACE_S
    assert "deadline" in run.failure_reason()


def test_the_stall_deadline_spares_a_child_that_reports_progress_and_kills_a_silent_one(workdir, tmp_path):
    limits = SandboxLimits(wall_s=60.0, stall_s=2.0)
    ticking = "import time\nfrom poise.sandbox import emit\nfor i in range(6):\n    emit({'tick': i})\n" \
              "    time.sleep(0.8)\nresult = 'done'\n"
    run = run_probe(ticking, workdir, limits)
    assert run.ok and run.result.result == "done" and [e["tick"] for e in run.events] == list(range(6))
    assert run.wall_s > 4.0 and not run.stalled  # longer than the stall deadline, in steps shorter than it
    silent = "import sys, time\nprint('a stray line is not progress', file=sys.__stdout__, flush=True)\n" \
             "time.sleep(50)\n"
    run = run_probe(silent, tmp_path / "silent", limits)
    assert run.timed_out and run.stalled and not run.ok and run.result is None
    assert run.wall_s < 2.0 + 30.0  # not the 60 s wall deadline (the rest: starting the child, the grace)
    assert run.failure_reason().startswith("killed after 2 s without progress")


@isolated
@pytest.mark.parametrize("ending", ["exit", "deadline"])
def test_forks_that_leave_the_process_group_do_not_outlive_the_sandbox(workdir, ending):
    code = """
        import ctypes, os, signal, time
        if os.fork() == 0:
            os.setsid()  # out of the process group the parent kills
            ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # and no parent-death signal
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            while True:
                with open("beat", "a") as beat:
                    beat.write(".")
                time.sleep(0.05)
        time.sleep(0.5)
        if payload["ending"] == "deadline":
            while True:
                time.sleep(1)
        """
    limits = SandboxLimits(wall_s=3.0 if ending == "deadline" else 60.0)
    run = run_probe(textwrap.dedent(code), workdir, limits, ending=ending)
    assert run.timed_out == (ending == "deadline")
    beats = (workdir / "beat").read_text()
    assert len(beats) >= 3  # the fork did run
    time.sleep(0.5)
    assert (workdir / "beat").read_text() == beats  # and it is gone


def test_a_huge_allocation_raises_memory_error(workdir):
    report = probe("result = len(bytearray(8 << 30))", workdir, SandboxLimits(wall_s=60.0, memory_bytes=1 << 30))
    assert report["raised"] == "MemoryError"


def test_threads_and_subprocesses_still_work(workdir):
    report = probe("""
        import subprocess, threading
        box = []
        thread = threading.Thread(target=box.append, args=("thread",))  # clone3 answers ENOSYS: libc falls back
        thread.start()
        thread.join()
        echo = subprocess.run(["echo", "child"], capture_output=True, text=True, check=True).stdout.strip()
        result = box + [echo]
        """, workdir)
    assert report["raised"] is None, report["message"]
    assert report["result"] == ["thread", "child"]


def test_poise_max_threads_caps_the_childs_threads(monkeypatch):
    monkeypatch.delenv("POISE_MAX_THREADS", raising=False)
    assert thread_cap(2) == 2
    monkeypatch.setenv("POISE_MAX_THREADS", "1")
    assert thread_cap(2) == 1 and thread_cap(1) == 1
    monkeypatch.setenv("POISE_MAX_THREADS", "not-a-number")
    assert thread_cap(2) == 2


# ------------------------------------------------------------------------------ the fork server

def _fork_server(module: str = PROBE, threads: int = 1):
    from poise.sandbox import _fork_servers

    return _fork_servers[(os.getpid(), module, threads)]


FRESH_STATE = """
    import ctypes, os, random, sys
    result = {"fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")), "env": dict(os.environ),
              "harness": sys.modules["__main__"].__file__,
              "cwd": os.getcwd(), "random": random.random(), "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)}
    """


def test_children_of_the_fork_server_start_like_fresh_interpreters(workdir, tmp_path, monkeypatch):
    monkeypatch.delenv("POISE_SANDBOX_FORK_SERVER", raising=False)
    first = probe(FRESH_STATE, workdir)["result"]
    server = _fork_server()
    second = probe(FRESH_STATE, tmp_path / "second")["result"]
    assert _fork_server() is server and server.alive()  # one server forked both
    for report, directory in ((first, workdir), (second, tmp_path / "second")):
        assert report["cwd"] == str(directory)
        assert report["env"]["HOME"] == str(directory) and report["env"]["TMPDIR"] == str(directory)
    assert first["random"] != second["random"]  # reseeded after the fork, as a new interpreter would be
    monkeypatch.setenv("POISE_SANDBOX_FORK_SERVER", "0")
    fresh = probe(FRESH_STATE, tmp_path / "fresh")["result"]
    # The harness is this checkout's (the one the parent imported), not whatever the interpreter has installed.
    assert first["harness"] == fresh["harness"] == str(PROJECT_DIR / "poise" / "sandbox_probe.py")
    assert first["dumpable"] == fresh["dumpable"]  # the server itself is never dumpable
    assert first["fds"] == fresh["fds"]  # no descriptor of the server (its control socket) reaches the child
    assert {key: value for key, value in first["env"].items() if key not in ("HOME", "TMPDIR")} == \
        {key: value for key, value in fresh["env"].items() if key not in ("HOME", "TMPDIR")}


def test_a_dead_fork_server_is_replaced(workdir, tmp_path, monkeypatch):
    monkeypatch.delenv("POISE_SANDBOX_FORK_SERVER", raising=False)
    probe("result = 1", workdir)
    server = _fork_server()
    server.process.kill()
    server.process.wait()
    assert probe("result = 2", tmp_path / "again")["result"] == 2
    assert _fork_server() is not server and _fork_server().alive()


def test_the_exit_status_and_errors_come_back_through_the_fork_server(workdir, tmp_path):
    run = run_sandboxed("poise.no_such_harness", ProbePayload(code=""), workdir, LIMITS, threads=1,
                        report_type=ProbeReport)
    assert run.returncode == 1 and "No module named" in run.stderr_tail
    run = run_probe("import os\nos._exit(3)", tmp_path / "exit")
    assert run.returncode == 3 and "status 3" in run.failure_reason()


def test_a_result_that_is_not_the_report_type_fails_the_run_with_the_reason(workdir):
    # The candidate shares the child's process: it can print a result line of its own and exit 0.
    run = run_probe("import os\nfrom poise.sandbox import emit\nemit({'result': {'notes': 5}})\nos._exit(0)", workdir)
    assert run.returncode == 0 and not run.ok and run.result is None
    assert run.malformed.startswith("not a valid ProbeReport (notes: ")
    assert run.failure_reason().startswith("the child printed a result line that is not a valid ProbeReport, so the "
                                           "candidate's output and not a verdict; its problems, quoted: \"notes: ")


def test_a_payload_that_is_not_the_childs_type_ends_it_before_anything_runs(workdir):
    run = run_sandboxed(PROBE, FingerprintPayload(source="x = 1"), workdir, LIMITS, threads=1,
                        report_type=ProbeReport)
    assert run.returncode == 2 and not run.ok
    assert run.failure_reason() == ("child exited with status 2 without a result: sandbox: the payload is not a "
                                    "valid ProbePayload (code: Field required)")


def test_when_the_parent_dies_the_fork_server_and_its_children_go_too(tmp_path):
    """A service killed outright must not leave a candidate running: the server sees its control socket close,
    kills every child's process group and removes its directory."""
    script = textwrap.dedent(f"""
        import sys, textwrap
        from pathlib import Path
        from poise.contracts import ProbePayload, ProbeReport
        from poise.sandbox import SandboxLimits, run_sandboxed
        code = "import time\\nwhile True:\\n    open('beat', 'a').write('.')\\n    time.sleep(0.05)\\n"
        run_sandboxed({PROBE!r}, ProbePayload(code=code), Path(sys.argv[1]), SandboxLimits(wall_s=120), threads=1,
                      report_type=ProbeReport)
        """)
    work, temp = tmp_path / "work", tmp_path / "temp"
    temp.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", script, str(work)], env={**os.environ, "TMPDIR": str(temp)})
    deadline = time.monotonic() + 60
    while not (work / "beat").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (work / "beat").exists(), "the sandboxed child never started"
    assert [p.name for p in temp.iterdir()][0].startswith("poise-forkserver-")
    parent.kill()
    parent.wait()
    time.sleep(2.0)
    beats = (work / "beat").read_text()
    time.sleep(0.5)
    assert (work / "beat").read_text() == beats  # the child is gone
    assert list(temp.iterdir()) == []  # and the server exited cleanly


# ------------------------------------------------------------------------------------- the boundary


@isolated
def test_the_child_sees_only_its_view_as_an_unprivileged_uid_of_its_own(workdir, tmp_path):
    readable = tmp_path / "base"
    readable.mkdir()
    (readable / "weights.bin").write_bytes(b"w")
    secret = tmp_path / "secret.txt"  # a file of root's next to the working directory, world-readable
    secret.write_text("secret")
    hidden = ["/etc/shadow", "/etc/hostname", "/home", "/var", "/root/.bashrc", "/run/secrets",
              str(PROJECT_DIR / "tests"), str(PROJECT_DIR / "README.md"), str(PROJECT_DIR / ".git"), str(secret)]
    visible = [str(PROJECT_DIR / "poise" / "sandbox.py"), os.path.realpath(sys.executable),
               str(readable / "weights.bin"), "/usr/lib", "/proc/self/status", "/dev/null", "/tmp"]
    report = probe("""
        import os, resource
        result = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                  "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
                  "exists": {path: os.path.exists(path) for path in payload["hidden"] + payload["visible"]},
                  "weights": open(payload["weights"], "rb").read().decode(),
                  "passwd": open("/etc/passwd").read()}
        """, workdir, readable=[str(readable)], hidden=hidden, visible=visible, weights=str(readable / "weights.bin"))
    assert report["raised"] is None, report["message"]
    result = report["result"]
    assert result["uid"] >= CANDIDATE_UID_BASE and result["gid"] == result["uid"] and result["groups"] == []
    assert result["nproc"] == LIMITS.processes  # binds: the uid is not 0, and no other process has it
    assert {path for path, exists in result["exists"].items() if exists} == set(visible)
    assert result["weights"] == "w" and result["passwd"].startswith(f"candidate:x:{result['uid']}:")
    assert (workdir / VIEW_DIR).is_dir() and not any((workdir / VIEW_DIR).iterdir())  # the view left nothing


@isolated
def test_a_fork_storm_stays_under_the_task_limit_and_dies_at_the_deadline(workdir):
    marker = f"poise-fork-storm-{uuid.uuid4().hex}"
    limits = SandboxLimits(wall_s=6.0, processes=64)
    run = run_probe(textwrap.dedent(f"""
        import os
        os.environ["MARKER"] = "{marker}"
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """), workdir, limits)
    assert run.timed_out and run.result is None
    assert run.wall_s - limits.wall_s < 2.0, run.wall_s  # the kill lands within 2 s of the deadline
    if Cgroup.unavailable is None:
        assert run.peak_tasks is not None and run.peak_tasks <= limits.processes
    survivors = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert survivors == []


SERVICE_UID = 10001
# Runs as SERVICE_UID without capabilities, as the shipped containers run a service: a sandboxed probe,
# with the agent-LLM key in this process's environment and in a key file, then prints what came back.
AS_SERVICE = """
import json, os, sys
from pathlib import Path
from poise.contracts import ProbePayload, ProbeReport
from poise.sandbox import REFUSED_STATUS, SandboxLimits, boundary_problem, make_undumpable, run_sandboxed
if sys.argv[3] == "no-user-namespaces":  # as a container runtime's seccomp profile that forbids them
    from poise.sandbox import _install_seccomp_filter, _PR_SET_NO_NEW_PRIVS, load_libc, prctl
    libc = load_libc()
    prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    _install_seccomp_filter(libc, [])
make_undumpable()
base = Path(sys.argv[1])
run = run_sandboxed("poise.sandbox_probe", ProbePayload(code=sys.argv[2], key_file=str(base / "key"),
                    service=os.getpid()), base / "work", SandboxLimits(wall_s=60.0), threads=1,
                    report_type=ProbeReport)
print(json.dumps({"returncode": run.returncode, "report": run.result.model_dump() if run.result else None,
                  "stderr": run.stderr_tail, "problem": boundary_problem(), "uid": os.getuid()}))
"""
CANARY = f"canary-agent-llm-key-{uuid.uuid4().hex}"  # made up per run: never a key-shaped literal in the source


def service_command(command: str) -> list[str]:
    """`command` (a shell line) run as SERVICE_UID with no capability at all, as the shipped containers run a
    service. The interpreter of this machine may sit under a directory only root may enter (pyenv under /root):
    a private mount namespace then shows that directory with only the interpreter in it, as a container image
    holds its interpreter where its user can read it."""
    prefix = Path(sys.base_prefix).resolve()
    closed = next((p for p in reversed(prefix.parents) if p != Path("/") and not p.stat().st_mode & 0o001), None)
    shim = ""
    if closed is not None:
        inner = prefix.relative_to(closed)
        shim = (f'hold=$(mktemp -d); mount --bind "{prefix}" "$hold"; mount -t tmpfs -o mode=755 tmpfs "{closed}"; '
                f'mkdir -p "{closed}/{inner}"; mount --bind "$hold" "{closed}/{inner}"; ')
    return ["unshare", "--mount", "--propagation", "private", "bash", "-c",
            f"{shim}exec setpriv --reuid {SERVICE_UID} --regid {SERVICE_UID} --clear-groups --inh-caps=-all "
            f"--bounding-set=-all -- {command}"]


def _as_service(tmp_path: Path, code: str, mode: str = "", env: dict | None = None) -> dict:
    """Run AS_SERVICE as SERVICE_UID without capabilities (service_command)."""
    base = tmp_path / "service"
    base.mkdir(mode=0o755, parents=True)
    os.chown(base, SERVICE_UID, SERVICE_UID)
    key = base / "key"
    key.write_text(CANARY)
    key.chmod(0o400)
    os.chown(key, SERVICE_UID, SERVICE_UID)
    script = base / "as_service.py"
    script.write_text(AS_SERVICE)
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:  # pytest's base temporary directory is root's alone
        if parent != Path("/") and not parent.stat().st_mode & 0o001:
            parent.chmod(parent.stat().st_mode | 0o001)
    command = service_command(f"{sys.executable} {script} {base} \"$PROBE\" {mode or 'default'}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=PROJECT_DIR,
                          env={"PATH": os.environ["PATH"], "HOME": str(base), "TMPDIR": str(base), "PROBE": code,
                               "ANTHROPIC_API_KEY": CANARY, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _user_namespaces() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return False


as_service = pytest.mark.skipif(not (ISOLATED and shutil.which("setpriv") and shutil.which("unshare")),
                                reason="needs root to become a non-root service, and setpriv/unshare")

REACH_FOR_THE_KEY = """
import os, socket
result = {"env": os.environ.get("ANTHROPIC_API_KEY"), "uid": os.getuid()}
for name, path in (("key_file", payload["key_file"]), ("service_environ", f"/proc/{payload['service']}/environ"),
                   ("parent_environ", f"/proc/{os.getppid()}/environ")):
    try:
        result[name] = open(path).read()
    except OSError as err:
        result[name] = err.errno
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2)
except OSError as err:
    result["network"] = err.errno
"""


@as_service
@pytest.mark.skipif(not _user_namespaces(), reason="user namespaces are switched off on this kernel")
def test_a_non_root_service_without_capabilities_still_builds_the_boundary(tmp_path):
    out = _as_service(tmp_path, REACH_FOR_THE_KEY)
    assert out["uid"] == SERVICE_UID and out["returncode"] == 0 and out["problem"] is None, out
    report = out["report"]
    assert report["notes"] == [] and report["raised"] is None, report
    result = report["result"]
    assert result["env"] is None and result["uid"] == 0  # root of its own user namespace, the service's uid outside
    assert result["key_file"] == errno.ENOENT and result["service_environ"] == errno.ENOENT  # neither is in its view
    assert result["network"] == errno.ENETUNREACH
    assert CANARY not in json.dumps(out)


@as_service
def test_without_user_namespaces_a_non_root_service_refuses_candidates_unless_told_otherwise(tmp_path):
    out = _as_service(tmp_path / "strict", REACH_FOR_THE_KEY, "no-user-namespaces")
    assert out["returncode"] == REFUSED_STATUS and out["report"] is None
    assert "refused to run candidate code" in out["stderr"] and "POISE_SANDBOX_ALLOW_WEAK=1" in out["stderr"]
    assert "no user namespace" in out["problem"] and CANARY not in json.dumps(out)
    out = _as_service(tmp_path / "weak", REACH_FOR_THE_KEY, "no-user-namespaces", {"POISE_SANDBOX_ALLOW_WEAK": "1"})
    report = out["report"]
    assert out["returncode"] == 0 and out["problem"] is None
    assert any(note.startswith("no namespaces") for note in report["notes"])
    # Even so, the key is not within reach: a scrubbed environment, a service that is not dumpable.
    assert report["result"]["env"] is None and report["result"]["service_environ"] == errno.EACCES
    assert CANARY not in json.dumps(report["result"]["service_environ"])


def test_a_service_that_runs_candidates_refuses_to_start_without_the_boundary(monkeypatch):
    from app import serve

    monkeypatch.setattr(serve, "boundary_problem", lambda: "no namespaces (a test)")
    with pytest.raises(serve.ServeError, match="implementer will not run candidate code here: no namespaces"):
        serve.sandbox_ready("implementer")
    serve.sandbox_ready("reflector")  # runs no candidate code
