"""Running untrusted candidate code in a child process (docs/sandbox.md).

Parent side (`run_sandboxed`): the child runs the harness module as `python -I -m <module>` would, in its
own session, with a scrubbed environment (no API keys or tokens reach it), its own working directory, and a
wall-clock deadline enforced from outside (optionally also a stall deadline, `SandboxLimits.stall_s`: killed
when no event line came for that long, so the hard deadline can be generous for a child that keeps reporting
progress on a loaded machine while a hung one still dies quickly). Input goes in as JSON on stdin: a payload
contract of poise/contracts.py (a `SandboxPayload`, carrying the limits), which the child validates. Output
comes back as JSON lines on stdout, size-capped and parsed by the parent, never unpickled; the result line is
validated against the report contract the parent names (a `SandboxReport`), and one that does not validate
fails the run with the reason (the candidate shares the child's process, so it could print a result of its
own). A `PhaseEvent` line (poise/integrity.py) says where the child is, so that the failure reason can tell an
exit at the candidate's import from one in a call; text the candidate controls is quoted there, never worded as
the verdict (docs/sandbox.md, "Integrity of rewards and records").

The child is forked by a fork server (poise.forkserver: one per parent process, harness module and thread
count) that imported the harness and its trusted dependencies once, so a child does not spend 10-15 s
importing torch and transformers; it has never run candidate code, and each child gets the same environment,
descriptors and layers below as a fresh interpreter would (POISE_SANDBOX_FORK_SERVER=0 starts a fresh
interpreter per child instead).

Child side (`enter_sandbox`): the trusted harness calls it before any candidate code is loaded. Layers, in
the order they are applied (docs/sandbox.md says what each one stops and what it does not):

1. Namespaces: mount, network (a downed loopback only), IPC and PID, created directly by a root service
   (CAP_SYS_ADMIN) or, by a non-root service without capabilities, from inside a new user namespace in
   which it is root over its own namespaces only. The process the parent started stays outside as a trusted
   watchdog; the harness and the candidate run as PID 1 of the new PID namespace, so everything left in it
   dies with PID 1, and the candidate sees no host process. At the deadline the parent kills the child's
   cgroup and sends the watchdog SIGTERM; the watchdog SIGKILLs PID 1; then the parent kills the group.
2. A filesystem view (`_build_view`): a new root on a tmpfs, entered with pivot_root, holding read-only
   binds of the system libraries, the interpreter and its import path, the harness checkout's packages only,
   and the payload's `read_only_paths()`; the working directory writable; a private /tmp and /dev/shm; the
   harmless devices; a fresh read-only /proc; a passwd naming only the candidate. The old root is detached.
3. An unprivileged identity: under a root service, a uid of its own (CANDIDATE_UID_BASE + pid) that is handed
   the working directory; under a non-root service, root of its user namespace without capabilities.
4. Resource limits: address space, CPU seconds, file size, open files, tasks (RLIMIT_NPROC, which binds any
   uid but 0), no core dumps. The parent adds a cgroup per child (`Cgroup`: tasks, memory, CPU).
5. Privileges: securebits locked, the capability bounding, ambient, effective, permitted and inheritable sets
   emptied, no-new-privileges, and a seccomp filter (x86_64 only, a hand-built BPF denylist) that makes
   namespace creation (unshare, setns, clone with CLONE_NEW*; clone3 answers ENOSYS so libc falls back to
   clone), the mount API, ptrace and cross-process memory access, bpf, perf events, kernel keyrings,
   userfaultfd, io_uring, module and kexec loading fail, and refuses `socket(AF_UNIX, ...)` (a network
   namespace does not cover Unix sockets bound in the filesystem).

Where the namespaces, the view or the uid switch cannot be had, the child refuses to load the candidate (exit
status REFUSED_STATUS, one line on stderr) unless the limits allow a weak boundary (POISE_SANDBOX_ALLOW_WEAK=1).
Everything is done through ctypes on libc. Whatever could not be applied is returned as an isolation
note (never silently skipped); callers report the notes with their results.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import resource
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from poise.contracts import PhaseEvent, SandboxLimits, SandboxPayload, validation_problems
from poise.faults import fault_point

log = logging.getLogger(__name__)

RESULT_KEY = "result"
PHASE_KEY = "phase"  # a PhaseEvent line: where the child is (poise/integrity.py)
MAX_OUTPUT_BYTES = 8 << 20
STDERR_TAIL_BYTES = 16 << 10
FORK_SERVER_ENV = "POISE_SANDBOX_FORK_SERVER"  # "0": a fresh interpreter for every child
ALLOW_WEAK_ENV = "POISE_SANDBOX_ALLOW_WEAK"  # "1": run candidates even where the boundary cannot be built
MAX_THREADS_ENV = "POISE_MAX_THREADS"  # a cap on every child's (and the evaluator's) threads: thread_cap
FORK_SERVER_DIR_PREFIX = "poise-forkserver-"
REFUSED_STATUS = 3  # a child's exit status when it refused to run without its boundary
WATCHDOG_GRACE_S = 5.0  # how long the parent waits for the watchdog to kill the sandbox before killing the group


Report = TypeVar("Report", bound=BaseModel)
Payload = TypeVar("Payload", bound=SandboxPayload)
MALFORMED_REPORT_CHARS = 300  # how much of a validation error the failure reason quotes

_fork_servers: dict[tuple[int, str, int], _ForkServer] = {}
_fork_servers_lock = threading.Lock()
# The children run_sandboxed waits on now, for stop_children (a service's graceful shutdown).
_running: set[subprocess.Popen | _ForkedChild] = set()
_running_lock = threading.Lock()


class StopChild(Exception):
    """Raised by an `on_event` callback of run_sandboxed: the parent stops the child now, as at a deadline (the
    trainer's early stopping, docs/early_stopping.md). The message says why; the run's `stopped` keeps it."""


@dataclass
class SandboxResult(Generic[Report]):
    returncode: int | None
    wall_s: float
    result: Report | None                  # the last {"result": ...} line the child printed, validated
    events: list[dict[str, Any]] = field(default_factory=list)  # every other JSON line, in order
    stderr_tail: str = ""
    timed_out: bool = False
    stalled: bool = False  # timed out by `stall_s` (no progress), not by the wall deadline
    stall_s: float | None = None
    output_overflow: bool = False
    peak_tasks: int | None = None  # the most tasks (processes and threads) the child's cgroup held at once
    memory_exceeded: bool = False  # the cgroup's memory limit was hit and the kernel killed in it
    malformed: str | None = None  # why the last result line did not validate as the report type (then no result)
    deadline_s: float | None = None  # the wall-clock deadline it ran under (SandboxLimits.wall_s)
    phase: str | None = None  # the last PhaseEvent the child printed: where it was when it ended (None: none came)
    stopped: str | None = None  # why an on_event callback stopped the child (StopChild); then it was killed

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None and not self.timed_out and self.stopped is None

    def record_result(self, result: object, report_type: type[Report]) -> None:
        """Take the child's result line: validated as `report_type`, else `malformed` says what is wrong."""
        try:
            self.result, self.malformed = report_type.model_validate(result), None
        except ValidationError as err:
            self.result = None
            self.malformed = f"not a valid {report_type.__name__} ({validation_problems(err)})"[:MALFORMED_REPORT_CHARS]

    def failure_reason(self) -> str:
        """Why the run failed, in one line. Text the candidate controls (its stderr, a result line it printed) is
        quoted as the child's output, never worded as the verdict; `phase` says where the child was."""
        during = f" while {self.phase}" if self.phase else ""
        if self.stopped is not None:
            return f"stopped by the parent{during}: {self.stopped}"
        if self.stalled:
            return (f"killed after {_seconds(self.stall_s or 0.0)} s without progress{during} (no event from the "
                    f"child; {self.wall_s:.0f} s in all)")
        if self.timed_out:  # the deadline it ran under, not the time it took (that adds the kill's grace)
            deadline = self.deadline_s if self.deadline_s is not None else self.wall_s
            return f"killed at the {_seconds(deadline)} s wall-clock deadline{during}"
        if self.output_overflow:
            return f"killed: wrote more than {MAX_OUTPUT_BYTES >> 20} MiB to stdout{during}"
        if self.memory_exceeded:
            return f"killed by the kernel at the sandbox's memory limit{during}"
        if self.returncode is not None and self.returncode < 0:
            name = signal.Signals(-self.returncode).name if -self.returncode in signal.valid_signals() else "?"
            hint = " (CPU time limit)" if name == "SIGXCPU" else " (killed: likely a resource limit)"
            return f"child died from signal {name}{hint if name in ('SIGXCPU', 'SIGKILL') else ''}{during}"
        if self.malformed is not None:
            # The harness writes only reports that validate: this line came from the candidate.
            what, _, problems = self.malformed.partition(" (")
            return (f"the child printed a result line that is {what}, so the candidate's output and not a verdict; "
                    f"its problems, quoted: {_quoted(problems.removesuffix(')'))}")
        last = self.stderr_tail.strip().splitlines()[-1:]
        if self.phase is None:  # no candidate code has run: the stderr is the harness's own
            said = f": {last[0]}" if last else ": no error output"
        else:
            said = f"; the last line of its stderr (the candidate's output may be in it): {_quoted(last[0])}" \
                if last else "; no error output"
        if self.result is None:
            return f"child exited with status {self.returncode} without a result{during}{said}"
        return f"child exited with status {self.returncode} after its result line{during}{said}"


def _seconds(value: float) -> str:
    """60.0 as "60", 2.5 as "2.5": a configured number of seconds as it was set."""
    return f"{value:.1f}".removesuffix(".0")


def _quoted(text: str) -> str:
    """Child output quoted: one line, its own quotes escaped, at most MALFORMED_REPORT_CHARS characters."""
    return json.dumps(text if len(text) <= MALFORMED_REPORT_CHARS else text[:MALFORMED_REPORT_CHARS] + "…",
                      ensure_ascii=False)


class Cgroup:
    """One sandboxed child's control group: a cap on its tasks (processes and threads: a fork storm stops
    there), its memory and its CPU time (the cores it was given), and a way to kill everything in it.
    cgroup v2 where the service's own cgroup can delegate the controllers, else the v1 hierarchies; `create`
    returns None (and `unavailable` says why, logged once) where neither can be written, and the child's
    rlimits are then the only bound (docs/sandbox.md)."""

    def __init__(self, directories: list[Path], version: int) -> None:
        self.directories, self.version = directories, version

    unavailable: str | None = None
    _counter = 0
    _lock = threading.Lock()

    @classmethod
    def create(cls, limits: SandboxLimits, threads: int) -> Cgroup | None:
        with cls._lock:
            cls._counter += 1
            name = f"poise-sandbox-{os.getpid()}-{cls._counter}"
        for build in (cls._v2, cls._v1):
            try:
                cgroup = build(name, limits, threads)
            except OSError as err:
                reason = f"{err.strerror or err} ({err.filename or ''})"
                if cls.unavailable != reason:
                    log.warning("sandbox: no cgroup for sandboxed children (%s); a fork storm or a memory hog is "
                                "bounded only by rlimits", reason)
                cls.unavailable = reason
                continue
            if cgroup is not None:
                return cgroup
        return None

    @classmethod
    def _v2(cls, name: str, limits: SandboxLimits, threads: int) -> Cgroup | None:
        mount = _cgroup_mounts().get("cgroup2")
        own = _own_cgroups().get("")
        if mount is None or own is None:
            return None
        parent = mount / own.lstrip("/")
        wanted = {"pids", "memory", "cpu"}
        if not wanted <= set((parent / "cgroup.controllers").read_text().split()):
            return None
        if not wanted <= set((parent / "cgroup.subtree_control").read_text().split()):
            # A cgroup with processes cannot hand controllers down: the service moves into a leaf of its own.
            leaf = parent / "poise-service"
            leaf.mkdir(exist_ok=True)
            for pid in (parent / "cgroup.procs").read_text().split():
                try:
                    (leaf / "cgroup.procs").write_text(pid)
                except ProcessLookupError:
                    pass
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        directory = parent / name
        directory.mkdir()
        cgroup = cls([directory], 2)
        try:
            (directory / "pids.max").write_text(str(limits.processes))
            (directory / "memory.max").write_text(str(limits.memory_bytes))
            (directory / "memory.swap.max").write_text("0") if (directory / "memory.swap.max").exists() else None
            (directory / "cpu.max").write_text(f"{threads * 100_000} 100000")
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    @classmethod
    def _v1(cls, name: str, limits: SandboxLimits, threads: int) -> Cgroup | None:
        mounts, own = _cgroup_mounts(), _own_cgroups()
        if "pids" not in mounts:
            return None
        directories = []
        cgroup = cls(directories, 1)
        try:
            for controller, settings in (
                ("pids", {"pids.max": limits.processes}),
                ("memory", {"memory.limit_in_bytes": limits.memory_bytes}),
                ("cpu", {"cpu.cfs_period_us": 100_000, "cpu.cfs_quota_us": threads * 100_000}),
            ):
                if controller not in mounts:
                    continue
                directory = mounts[controller] / own.get(controller, "/").lstrip("/") / name
                directory.mkdir()
                directories.append(directory)
                for key, value in settings.items():
                    (directory / key).write_text(str(value))
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def add(self, pid: int) -> None:
        for directory in self.directories:
            (directory / "cgroup.procs").write_text(str(pid))

    def peak_tasks(self) -> int | None:
        """The most tasks the cgroup held at once (pids.peak, where the kernel keeps it)."""
        try:
            return int((self.directories[0] / "pids.peak").read_text())
        except (OSError, ValueError, IndexError):
            return None

    def memory_exceeded(self) -> bool:
        """Whether the memory limit was hit (the kernel then kills inside the cgroup)."""
        for directory in self.directories:
            for name in ("memory.events", "memory.oom_control"):  # v2, v1: both count "oom_kill"
                try:
                    values = dict(line.split()[:2] for line in (directory / name).read_text().splitlines()
                                  if len(line.split()) >= 2)
                except OSError:
                    continue
                if int(values.get("oom_kill", "0")) > 0:
                    return True
        return False

    def kill(self) -> None:
        """SIGKILL every task in the cgroup, until none is left (a fork storm keeps forking meanwhile)."""
        if not self.directories:
            return
        directory = self.directories[0]
        if self.version == 2 and (directory / "cgroup.kill").exists():
            (directory / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                pids = [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup (retried while the killed tasks are being reaped)."""
        self.kill()
        for directory in self.directories:
            for _ in range(200):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _cgroup_mounts() -> dict[str, Path]:
    """Controller (or "cgroup2") -> where its hierarchy is mounted."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3].split(",")
            point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
            if fstype == "cgroup2":
                mounts.setdefault("cgroup2", point)
            elif fstype == "cgroup":
                for option in options:
                    mounts.setdefault(option, point)
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Controller ("" for cgroup v2) -> this process's cgroup path in that hierarchy."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


@functools.cache
def boundary_problem() -> str | None:
    """Why a sandboxed child cannot be given its boundary here (no namespaces: neither CAP_SYS_ADMIN nor user
    namespaces), or None when it can. With POISE_SANDBOX_ALLOW_WEAK=1 there is no problem, only a warning.
    Services that run candidate code call it at start and refuse to start on a problem (docs/sandbox.md).
    Asked once per process: the answer does not change while it runs."""
    from poise.contracts import ProbePayload, ProbeReport

    with tempfile.TemporaryDirectory(prefix="poise-boundary-") as directory:
        run = run_sandboxed("poise.sandbox_probe", ProbePayload(code="result = None"), Path(directory) / "probe",
                            SandboxLimits(wall_s=120.0), threads=1, report_type=ProbeReport)
    if run.ok:
        if run.result.notes:
            log.warning("sandbox: %s", "; ".join(run.result.notes))
        return None
    lines = run.stderr_tail.strip().splitlines()
    if run.returncode == REFUSED_STATUS and lines:
        return lines[-1].removeprefix("sandbox: ")
    return f"the sandbox probe failed: {run.failure_reason()}"


def make_undumpable() -> None:
    """A service's own process: not dumpable, so a process of the same uid (a candidate where the boundary is
    weak) cannot read its /proc/<pid>/environ or memory (where keys live) nor ptrace it."""
    prctl(load_libc(), _PR_SET_DUMPABLE, 0)


def thread_cap(threads: int) -> int:
    """`threads`, capped by POISE_MAX_THREADS when it is set: processes that share the cores (parallel test
    workers, several services on one host) each get fewer threads instead of OpenMP threads spinning against
    each other, which slows every one of them several-fold."""
    cap = os.environ.get(MAX_THREADS_ENV, "").strip()
    return max(1, min(threads, int(cap))) if cap.isdigit() and int(cap) > 0 else threads


def scrubbed_env(workdir: Path, threads: int) -> dict[str, str]:
    """Only what an interpreter needs: no inherited variable (API keys, tokens, proxies) survives."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "TMPDIR": str(workdir),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONHASHSEED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def run_sandboxed(
    module: str,
    payload: SandboxPayload,
    workdir: Path,
    limits: SandboxLimits | None = None,
    threads: int = 2,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    *,
    report_type: type[Report],
    fault: str | None = None,
) -> SandboxResult[Report]:
    """Run `python -I -m module` in a sandboxed child with `payload` (its limits set to `limits`) as JSON on
    stdin; the child's result comes back validated as `report_type`. Default limits: SandboxLimits().
    `on_event` gets every event line as it comes; raising StopChild there kills the child as a deadline would.
    `fault`: the fault point passed once the child runs (poise/faults.py; tests only)."""
    limits = limits or SandboxLimits()
    if os.environ.get(ALLOW_WEAK_ENV, "") == "1":
        limits = limits.model_copy(update={"allow_weak": True})
    workdir.mkdir(parents=True, exist_ok=True)
    stdin = payload.model_copy(update={"limits": limits}).model_dump_json().encode()
    started = time.monotonic()
    result: SandboxResult[Report] = SandboxResult(returncode=None, wall_s=0.0, result=None, deadline_s=limits.wall_s)
    cgroup = Cgroup.create(limits, thread_cap(threads))
    try:
        child = _start_child(module, workdir, thread_cap(threads), limits.wall_s)
    except TimeoutError:  # the fork server was still importing at the deadline
        result.timed_out, result.wall_s = True, time.monotonic() - started
        if cgroup is not None:
            cgroup.remove()
        return result
    with _running_lock:
        _running.add(child)
    if cgroup is not None:
        try:  # before the payload goes in: the child waits for it, so nothing has run yet
            cgroup.add(child.pid)
        except OSError as err:
            log.warning("sandbox: child %d not put in its cgroup (%s)", child.pid, err)
    assert child.stdin and child.stdout and child.stderr
    try:
        child.stdin.write(stdin)
        child.stdin.flush()
    except BrokenPipeError:  # it died before reading its payload: its status and stderr say why
        pass
    with contextlib.suppress(BrokenPipeError):
        child.stdin.close()
    if fault is not None:
        fault_point(fault, f"child={child.pid}")
    stdout_buffer, stderr_tail, total = b"", b"", 0
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ, "out")
    selector.register(child.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    progress = time.monotonic()  # the last event or result line (the child's start counts as one)
    while open_streams:
        now = time.monotonic()
        remaining = limits.wall_s - (now - started)
        if remaining <= 0:
            result.timed_out = True
            break
        if limits.stall_s is not None and now - progress > limits.stall_s:
            result.timed_out = result.stalled = True
            result.stall_s = limits.stall_s
            break
        for key, _ in selector.select(timeout=min(remaining, 1.0)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.data == "err":
                stderr_tail = (stderr_tail + chunk)[-STDERR_TAIL_BYTES:]
                continue
            total += len(chunk)
            if total > MAX_OUTPUT_BYTES:
                result.output_overflow = True
                open_streams = 0
                break
            stdout_buffer += chunk
            *lines, stdout_buffer = stdout_buffer.split(b"\n")
            for line in lines:
                try:
                    if _take_line(line, result, report_type, on_event):
                        progress = time.monotonic()
                except StopChild as stop:
                    result.stopped = str(stop) or "stopped by the caller"
                    open_streams = 0
                    break
            if result.stopped is not None:
                break
    if result.timed_out or result.output_overflow or result.stopped is not None:
        if cgroup is not None:
            cgroup.kill()  # at once, whatever a fork storm does to the watchdog's pace
        _stop(child)
    result.returncode = child.wait()
    with _running_lock:
        _running.discard(child)
    kill_group(child.pid)  # forks left behind by a child that exited still die
    if cgroup is not None:
        result.peak_tasks, result.memory_exceeded = cgroup.peak_tasks(), cgroup.memory_exceeded()
        cgroup.remove()
    child.stdout.close()
    child.stderr.close()
    if stdout_buffer and not result.output_overflow and result.stopped is None:
        with contextlib.suppress(StopChild):  # the child has ended already: nothing is left to stop
            _take_line(stdout_buffer, result, report_type, on_event)
    result.stderr_tail = stderr_tail.decode("utf-8", "replace")
    result.wall_s = time.monotonic() - started
    return result


# `python -I -m module args` that imports this checkout's modules, whatever the interpreter has installed: -I
# drops the current directory and PYTHONPATH, so a service run from another checkout than the installed one
# (an editable install points at one directory) would otherwise run another harness than its own.
CODE_ROOT = str(Path(__file__).resolve().parent.parent)
_BOOT = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); module = sys.argv[2]; "
         "sys.argv = [module, *sys.argv[3:]]; runpy.run_module(module, run_name='__main__', alter_sys=True)")


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-I", "-c", _BOOT, CODE_ROOT, module, *args]


def _start_child(module: str, workdir: Path, threads: int, timeout: float) -> subprocess.Popen | _ForkedChild:
    """A child running `module` in `workdir` with the scrubbed environment, in its own session (so the
    deadline kills every fork too): forked by the module's fork server, or a fresh interpreter when the
    server is switched off (POISE_SANDBOX_FORK_SERVER=0) or has died."""
    env = scrubbed_env(workdir, threads)
    if os.environ.get(FORK_SERVER_ENV, "1") != "0":
        key = (os.getpid(), module, threads)
        with _fork_servers_lock:
            server = _fork_servers.get(key)
            if server is None or not server.alive():
                server = _fork_servers[key] = _ForkServer(module, threads)
        child = server.spawn(workdir, env, timeout)
        if child is not None:
            return child
    return subprocess.Popen(
        python_command(module),
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        start_new_session=True,
    )


class _ForkServer:
    """Parent side of poise.forkserver: one server process per (parent, module, threads), started on first
    use, with the environment its children get (so libraries that read it at import see the same values)."""

    def __init__(self, module: str, threads: int) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=FORK_SERVER_DIR_PREFIX))
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lock = threading.Lock()
        with theirs:
            self.process = subprocess.Popen(
                python_command("poise.forkserver", str(theirs.fileno()), module),
                cwd=self.workdir, env=scrubbed_env(self.workdir, threads), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def spawn(self, workdir: Path, env: dict[str, str], timeout: float) -> _ForkedChild | None:
        """Fork a child; None when the server is gone. TimeoutError when it did not fork within `timeout`
        (the server then kills the child it forks later, since nobody listens for it any more)."""
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        report, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours = (stdin_write, stdout_read, stderr_read)
        request = json.dumps({"cwd": str(workdir), "env": env}).encode()
        try:
            with self.lock:
                socket.send_fds(self.control, [request], [stdin_read, stdout_write, stderr_write, theirs.fileno()])
            report.settimeout(timeout)
            message = report.recv(4096)
        except OSError as err:
            for fd in ours:
                os.close(fd)
            report.close()
            if isinstance(err, TimeoutError):
                raise
            return None
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)
            theirs.close()
        if not message:  # the server died before forking
            for fd in ours:
                os.close(fd)
            report.close()
            return None
        return _ForkedChild(json.loads(message)["pid"], report, *ours)


class _ForkedChild:
    """What run_sandboxed uses of a subprocess.Popen, for a child of the fork server: the server reports
    the exit status on `report` (the child is the server's, not ours, so we cannot wait for it)."""

    def __init__(self, pid: int, report: socket.socket, stdin: int, stdout: int, stderr: int) -> None:
        self.pid, self.returncode, self._report = pid, None, report
        self.stdin, self.stdout, self.stderr = os.fdopen(stdin, "wb"), os.fdopen(stdout, "rb"), os.fdopen(stderr, "rb")

    def poll(self) -> int | None:
        if self.returncode is None:
            self._receive(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._receive(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"sandboxed child {self.pid}", timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def _receive(self, timeout: float | None) -> None:
        self._report.settimeout(timeout)
        try:
            message = self._report.recv(4096)
        except (TimeoutError, BlockingIOError):
            return
        self._report.close()
        # An empty message: the server died, and its children's watchdogs with it (parent-death signal).
        self.returncode = json.loads(message)["returncode"] if message else -signal.SIGKILL


def _take_line(line: bytes, result: SandboxResult, report_type: type[BaseModel],
               on_event: Callable[[dict[str, Any]], None] | None) -> bool:
    """Record one stdout line; True when it was protocol (an event or the result), i.e. progress."""
    try:
        message = json.loads(line)
    except ValueError:
        return False  # stray prints of the candidate are not protocol
    if not isinstance(message, dict):
        return False
    if RESULT_KEY in message:
        result.record_result(message[RESULT_KEY], report_type)
        return True
    if PHASE_KEY in message:
        try:
            result.phase = PhaseEvent.model_validate(message).phase
            return True
        except ValidationError:
            pass  # not a phase the harness prints: an ordinary event
    result.events.append(message)
    if on_event:
        on_event(message)
    return True


def _stop(child: subprocess.Popen) -> None:
    """Deadline or overflow: the watchdog kills the sandbox's PID 1 (and with it the whole PID namespace),
    then the process group goes too. Without a watchdog (no PID namespace) SIGTERM simply ends the child."""
    if child.poll() is None:
        try:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=WATCHDOG_GRACE_S)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    kill_group(child.pid)


def stop_children() -> int:
    """A service's graceful shutdown: kill the sandboxed children running now, as at a deadline; returns how many.
    Their run_sandboxed calls return a killed child. One started after this dies with the process: the fork
    server kills its children when its parent goes, and a fresh interpreter's next line hits a closed pipe."""
    with _running_lock:
        children = list(_running)
    stopped = 0
    for child in children:
        if child.poll() is None:  # still ours: not reaped, so its pid names no other process
            _stop(child)
            stopped += 1
    return stopped


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------- child

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEW_ANY = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_NOSYMFOLLOW, _MS_NOATIME, _MS_NODIRATIME = 0x20, 0x100, 0x400, 0x800
_MS_BIND, _MS_REC, _MS_PRIVATE, _MS_STRICTATIME = 0x1000, 0x4000, 0x40000, 0x1000000
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
VIEW_DIR = ".sandbox-root"  # in the working directory: where the child's new root is assembled (empty inside)
CANDIDATE_UID_BASE = 900_000  # a root service runs each child as this plus the child's pid: a uid of its own
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # the only usable device nodes inside

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_SECCOMP = 22
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE set; KEEP_CAPS clear; all four locked.
_SECUREBITS = 0b11101111
_CAP_SYS_ADMIN = 21
_CAPABILITY_VERSION_3 = 0x20080522

# seccomp: a BPF denylist for x86_64 (numbers from asm/unistd_64.h).
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_SYS_SOCKET, _SYS_CLONE, _SYS_CLONE3 = 41, 56, 435
_AF_UNIX = 1
DENIED_SYSCALLS_X86_64 = {
    "syslog": 103, "ptrace": 101, "personality": 135, "pivot_root": 155, "chroot": 161, "acct": 163,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438,
    "process_madvise": 440, "mount_setattr": 442,
}
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_SECCOMP_MODE_FILTER = 2


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def enter_sandbox(payload_type: type[Payload]) -> tuple[Payload, list[str]]:
    """In the child: read the payload (validated as `payload_type`), apply every layer, return (payload,
    isolation notes).

    Must run before any candidate code is loaded. The notes list what could not be applied. With a PID
    namespace the process that called this never returns from it: it becomes the watchdog and exits with
    the sandboxed child's status; the call returns in the child, as PID 1 of the new namespace. A payload
    that does not validate ends the child (status 2) with one line on stderr saying why, before anything runs;
    so does a boundary that cannot be built (status 3), unless the payload's limits allow a weak one.
    """
    try:
        payload = payload_type.model_validate_json(sys.stdin.buffer.read())
    except ValidationError as err:
        print(f"sandbox: the payload is not a valid {payload_type.__name__} ({validation_problems(err)})",
              file=sys.stderr)
        sys.exit(2)
    limits = payload.limits
    notes: list[str] = []
    missing: list[str] = []  # parts of the boundary that could not be built
    libc = load_libc()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the watchdog too
    os.umask(0o022)
    workdir = os.getcwd()
    host_uid = os.geteuid()
    # Root services run each candidate as an unprivileged uid of its own (no account needed); a non-root
    # service's candidate keeps the service's uid, behind a user namespace and the filesystem view.
    candidate_uid = CANDIDATE_UID_BASE + os.getpid() if host_uid == 0 else None
    tasks_before = 0 if host_uid == 0 else _tasks_of_uid(host_uid)
    if _has_capability(_CAP_SYS_ADMIN):
        mode = "root"
    elif _enter_user_namespace(libc, host_uid, os.getegid(), notes):
        mode = "user namespace"
    else:
        mode = None
    if mode is not None:
        new_mounts = _unshare(libc, _CLONE_NEWNS, "mount", notes)
        if not _unshare(libc, _CLONE_NEWNET, "network", notes):
            missing.append("network namespace")
        _unshare(libc, _CLONE_NEWIPC, "IPC", notes)
        pid1 = _unshare(libc, _CLONE_NEWPID, "PID", notes) and _fork_behind_watchdog(libc, notes)
        if not pid1:
            missing.append("PID namespace")
        owner = (candidate_uid, candidate_uid) if candidate_uid is not None else (0, 0)
        if not (new_mounts and _build_view(libc, workdir, payload.read_only_paths(), pid1, owner, notes)):
            missing.append("filesystem view")
    else:
        candidate_uid = None
        missing.append("namespaces")
        notes.append(f"no namespaces: uid {host_uid} has no CAP_SYS_ADMIN and cannot create a user namespace, so "
                     "the network, the host's processes and every file this uid may read or write stay reachable")
    for limit, value in (
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_CPU, limits.cpu_s),
        (resource.RLIMIT_FSIZE, limits.file_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        # Binds every uid but 0: the candidate's own uid (root services), else the service's, shared with it.
        (resource.RLIMIT_NPROC, limits.processes + tasks_before),
    ):
        resource.setrlimit(limit, (value, value))
    if prctl(libc, _PR_SET_NO_NEW_PRIVS, 1) != 0:
        notes.append(f"no-new-privileges not set ({_errno()})")
    if not _drop_capabilities(libc, notes, candidate_uid) and candidate_uid is not None:
        missing.append("unprivileged uid")
    _install_seccomp_filter(libc, notes)
    if missing and not limits.allow_weak:
        print(f"sandbox: refused to run candidate code: the boundary could not be built (no {', no '.join(missing)}: "
              f"{'; '.join(notes)}){_userns_hint(host_uid)}; POISE_SANDBOX_ALLOW_WEAK=1 runs it anyway without the "
              "missing layers (docs/sandbox.md)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(REFUSED_STATUS)
    # The protocol channel moves to a private descriptor; fd 1 now goes to stderr, so whatever the
    # candidate prints cannot pass for a harness message.
    global _channel
    _channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return payload, notes


def _userns_hint(uid: int) -> str:
    """What would give a non-root service its user namespaces back, where the host is known to restrict them."""
    if uid == 0:
        return ""
    for path, value, hint in (
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
         "AppArmor restricts unprivileged user namespaces on this host (kernel.apparmor_restrict_unprivileged_userns"
         "=1): allow them for this interpreter with an AppArmor profile, or set the sysctl to 0, or run as root"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0",
         "unprivileged user namespaces are off (kernel.unprivileged_userns_clone=0): set it to 1, or run as root"),
        ("/proc/sys/user/max_user_namespaces", "0",
         "user namespaces are off (user.max_user_namespaces=0): raise it, or run as root"),
    ):
        try:
            if Path(path).read_text().strip() == value:
                return f". {hint}"
        except OSError:
            continue
    return ""


def _tasks_of_uid(uid: int) -> int:
    """Tasks (threads included: RLIMIT_NPROC counts them) that `uid` runs now, as far as /proc shows."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("Uid", "").split()[:1] == [str(uid)]:
                count += int(fields.get("Threads", "1"))
    return count


def _enter_user_namespace(libc: ctypes.CDLL, uid: int, gid: int, notes: list[str]) -> bool:
    """A new user namespace in which this process is root (mapped to `uid` outside) with every capability
    over the namespaces it then creates, and none over the host."""
    if libc.unshare(_CLONE_NEWUSER) != 0:
        notes.append(f"no user namespace (unshare failed: {_errno()}: the kernel or the container runtime forbids "
                     "them)")
        return False
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    except OSError as err:
        notes.append(f"no user namespace (mapping uid {uid} failed: {err})")
        return False
    return True


def load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def prctl(libc: ctypes.CDLL, option: int, arg2: int = 0, arg3: int = 0) -> int:
    return libc.prctl(option, arg2, arg3, 0, 0)


def _errno() -> str:
    number = ctypes.get_errno()
    return errno.errorcode.get(number, str(number))


def _proc_status() -> dict[str, str]:
    with open("/proc/self/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def _has_capability(cap: int) -> bool:
    return bool(int(_proc_status().get("CapEff", "0"), 16) >> cap & 1)


def _unshare(libc: ctypes.CDLL, flag: int, name: str, notes: list[str]) -> bool:
    if libc.unshare(flag) == 0:
        return True
    notes.append(f"no {name} namespace (unshare failed: {_errno()})")
    return False


def _fork_behind_watchdog(libc: ctypes.CDLL, notes: list[str]) -> bool:
    """Fork the sandboxed child (PID 1 of the new PID namespace); the caller becomes its watchdog."""
    parent = os.getppid()
    try:
        child = os.fork()
    except OSError as err:
        notes.append(f"no PID namespace (fork failed: {err})")
        return False
    if child == 0:
        prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # a backstop only: the candidate could undo it
        return True
    _watch(libc, child, parent)


def _watch(libc: ctypes.CDLL, child: int, parent: int) -> NoReturn:
    """The process the parent started: trusted, runs no candidate code, cannot be reached from inside the
    namespace. SIGTERM (the parent's deadline) or the parent's death kills the sandbox's PID 1, which takes
    every process of the namespace with it. Exits the way the child exited."""
    reaped = False

    def stop(*_: object) -> None:
        if not reaped:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    prctl(libc, _PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        stop()
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # not reaped yet: `child` cannot name another process
    reaped = True
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _build_view(libc: ctypes.CDLL, workdir: str, read_only: list[Path], new_proc: bool, owner: tuple[int, int],
                notes: list[str]) -> bool:
    """A new root of its own (this mount namespace only): the interpreter, its libraries, the harness's
    packages and `read_only` paths, read-only; the working directory, writable (handed to `owner`); a
    private /tmp and /dev/shm; harmless devices; a fresh /proc of the new PID namespace. Nothing else of the
    host's filesystem (/root, /home, /etc/shadow, keys, service-account tokens) exists inside."""
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        # Without private propagation the mounts below would show up in the host's mount table.
        notes.append(f"no filesystem view (making mounts private failed: {_errno()})")
        return False
    root = os.path.join(workdir, VIEW_DIR)
    try:
        if os.path.lexists(root) and not stat.S_ISDIR(os.lstat(root).st_mode):
            os.unlink(root)  # a link left by an earlier candidate: never mount through it
        os.makedirs(root, exist_ok=True)
        _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=8m")
        if owner != (0, 0):
            _hand_over(workdir, owner)
        for scratch, size in (("/tmp", "256m"), ("/dev/shm", "64m")):  # before the binds: some lie under /tmp
            os.makedirs(root + scratch, exist_ok=True)
            _mount(libc, "tmpfs", root + scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={size}")
        binds = [(path, False) for path in _view_paths(read_only)] + [(workdir, True)]
        for path, writable in sorted(binds, key=lambda bind: bind[0].count("/")):
            _bind(libc, path, root, writable, notes)
        os.makedirs(f"{root}/dev", exist_ok=True)
        for name in DEVICES:
            if os.path.exists(f"/dev/{name}") and stat.S_ISCHR(os.stat(f"/dev/{name}").st_mode):
                _bind(libc, f"/dev/{name}", root, False, notes, device=True)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{root}/dev/{name}")
        _write_etc(root, workdir, owner)
        os.makedirs(f"{root}/proc", exist_ok=True)
        if not new_proc:
            notes.append("no /proc (no PID namespace of its own to show)")
        elif libc.mount(b"proc", f"{root}/proc".encode(), b"proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                        None) != 0:
            # A container's /proc with masked paths cannot be mounted afresh from a user namespace.
            notes.append(f"no /proc (mounting a new one failed: {_errno()})")
        os.chdir(root)
        if libc.syscall(_SYS_PIVOT_ROOT, b".", b".") != 0:
            raise OSError(ctypes.get_errno(), "pivot_root")
        if libc.umount2(b".", _MNT_DETACH) != 0:  # the old root, stacked under the new one
            raise OSError(ctypes.get_errno(), "detaching the old root")
        os.chdir("/")
        _mount(libc, None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        os.chdir(workdir)
    except OSError as err:
        notes.append(f"no filesystem view ({err})")
        return False
    if os.statvfs(workdir).f_flag & os.ST_RDONLY:
        notes.append("the working directory is read-only")
    return True


def _view_paths(read_only: list[Path]) -> list[str]:
    """What a child reads outside its working directory: system libraries, the interpreter, its import path
    (the harness's checkout contributes only its packages, not its runs, tests or git history), `read_only`."""
    paths = {"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime",
             sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix}
    for entry in sys.path:
        if entry and os.path.isabs(entry) and os.path.realpath(entry) != os.path.realpath(CODE_ROOT):
            paths.add(entry)
    for entry in os.scandir(CODE_ROOT):
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, "__init__.py")):
            paths.add(entry.path)
    paths.update(str(path) for path in read_only)
    return sorted(p for p in paths if os.path.lexists(p) and os.path.realpath(p) != "/")


def _bind(libc: ctypes.CDLL, path: str, root: str, writable: bool, notes: list[str], device: bool = False) -> None:
    """`path` at the same place in the view (its symlinks kept as symlinks): read-only unless `writable`."""
    real = os.path.realpath(path)
    if real != os.path.normpath(path) and not os.path.lexists(root + path):
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        os.symlink(os.readlink(path) if os.path.islink(path) else real, root + path)
        if os.path.lexists(root + real):
            return
        path = real
    if os.path.lexists(root + real) and os.path.ismount(root + real):
        return
    target = root + real
    if not os.path.lexists(target):  # else it shows through a bind of a directory above it
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(real):
            os.mkdir(target)
        else:
            open(target, "x").close()
    _mount(libc, real, target, None, _MS_BIND)
    flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _kept_flags(real)
    flags |= 0 if writable else _MS_RDONLY
    flags |= 0 if device else _MS_NODEV
    try:
        _mount(libc, None, target, None, flags)
    except OSError as err:
        notes.append(f"{real} not remounted {'nodev' if writable else 'read-only'} ({err})")
        if not writable:
            raise


def _kept_flags(path: str) -> int:
    """The flags of `path`'s mount that a remount must keep (a user namespace cannot clear them: EPERM)."""
    flag = os.statvfs(path).f_flag
    kept = _MS_NOEXEC if flag & os.ST_NOEXEC else 0
    kept |= _MS_NODEV if flag & os.ST_NODEV else 0
    kept |= _MS_NOATIME if flag & os.ST_NOATIME else 0
    kept |= _MS_NODIRATIME if flag & os.ST_NODIRATIME else 0
    if not flag & (os.ST_NOATIME | os.ST_RELATIME):
        kept |= _MS_STRICTATIME
    return kept


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    encoded = [value.encode() if value is not None else None for value in (source, target, fstype, data)]
    if libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"mount of {target} failed: {errno.errorcode.get(number, number)}")


def _hand_over(workdir: str, owner: tuple[int, int]) -> None:
    """The working directory and what the parent put in it become the candidate uid's (links not followed)."""
    os.chown(workdir, *owner)
    for directory, subdirs, files in os.walk(workdir):
        subdirs[:] = [d for d in subdirs if os.path.join(directory, d) != os.path.join(workdir, VIEW_DIR)]
        for name in subdirs + files:
            os.chown(os.path.join(directory, name), *owner, follow_symlinks=False)


def _write_etc(root: str, workdir: str, owner: tuple[int, int]) -> None:
    """A passwd and group naming only the candidate (libraries look its uid up), and a hosts file."""
    os.makedirs(f"{root}/etc", exist_ok=True)
    for name, line in (("passwd", f"candidate:x:{owner[0]}:{owner[1]}:POISE candidate:{workdir}:/usr/sbin/nologin"),
                       ("group", f"candidate:x:{owner[1]}:"), ("hosts", "127.0.0.1 localhost")):
        Path(f"{root}/etc/{name}").write_text(line + "\n")


def _drop_capabilities(libc: ctypes.CDLL, notes: list[str], uid: int | None = None) -> bool:
    """Securebits and the bounding set (while CAP_SETPCAP is held), then the switch to `uid` (its own group,
    no supplementary groups), then the ambient and effective/permitted/inheritable sets: all empty. False
    when the switch to `uid` failed."""
    if prctl(libc, _PR_SET_SECUREBITS, _SECUREBITS) != 0 and os.geteuid() == 0:
        notes.append(f"securebits not locked ({_errno()})")
    try:
        with open("/proc/sys/kernel/cap_last_cap") as last:
            last_cap = int(last.read())
    except (OSError, ValueError):
        last_cap = 63
    for cap in range(last_cap + 1):
        prctl(libc, _PR_CAPBSET_DROP, cap)
    switched = True
    if uid is not None:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except OSError as err:
            notes.append(f"still uid {os.geteuid()} (switching to uid {uid} failed: {err})")
            switched = False
    prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    if libc.capset(header, data) != 0:
        notes.append(f"capabilities not dropped (capset failed: {_errno()})")
    status = _proc_status()
    kept = [f"{key}={status.get(key)}" for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
            if int(status.get(key, "0"), 16)]
    if kept:
        notes.append("capabilities kept: " + ", ".join(kept))
    return switched


# What the sandbox's builder needs of the syscalls its own filter later denies the candidate.
BUILDER_SYSCALLS = ("unshare", "mount", "umount2", "pivot_root")
SECCOMP_PROFILE_PATH = "deploy/seccomp/poise-sandbox.json"  # in the repository; scripts/seccomp_profile.py


def container_seccomp_profile() -> dict[str, Any]:
    """The container runtime's seccomp profile (Docker/OCI JSON) for the services that run candidate code: the
    runtime's default profiles refuse user namespaces to a process without CAP_SYS_ADMIN, which a non-root
    service needs to build the boundary, so this one allows them and the mount calls, and denies the rest of
    the candidate filter's list (kernel keyrings, bpf, ptrace, kexec, io_uring...) to the service itself too.
    Every candidate still gets the full filter (`seccomp_program`). docs/sandbox.md, In containers."""
    denied = sorted(name for name in DENIED_SYSCALLS_X86_64 if name not in BUILDER_SYSCALLS)
    return {"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}]}


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) classic-BPF instructions over struct seccomp_data (x86_64)."""
    code: list[tuple[int, str | None, str | None, int]] = []
    labels: dict[str, int] = {}

    def op(instruction: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        code.append((instruction, jt, jf, k))

    op(_BPF_LD_W_ABS, 4)                                    # seccomp_data.arch
    op(_BPF_JEQ_K, _AUDIT_ARCH_X86_64, jf="kill")           # i386 or x32 entry: kill
    op(_BPF_LD_W_ABS, 0)                                    # seccomp_data.nr
    op(_BPF_JGE_K, _X32_SYSCALL_BIT, jt="kill")
    for number in sorted(DENIED_SYSCALLS_X86_64.values()):
        op(_BPF_JEQ_K, number, jt="eperm")
    op(_BPF_JEQ_K, _SYS_CLONE3, jt="enosys")                # flags sit behind a pointer: let libc use clone
    op(_BPF_JEQ_K, _SYS_CLONE, jt="clone")
    op(_BPF_JEQ_K, _SYS_SOCKET, jt="socket", jf="allow")
    labels["clone"] = len(code)
    op(_BPF_LD_W_ABS, 16)                                   # low word of args[0]: clone flags
    op(_BPF_JSET_K, _CLONE_NEW_ANY, jt="eperm", jf="allow")
    labels["socket"] = len(code)
    op(_BPF_LD_W_ABS, 16)                                   # args[0]: address family
    op(_BPF_JEQ_K, _AF_UNIX, jt="eperm", jf="allow")
    labels["eperm"] = len(code)
    op(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EPERM)
    labels["enosys"] = len(code)
    op(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.ENOSYS)
    labels["kill"] = len(code)
    op(_BPF_RET_K, _SECCOMP_RET_KILL_PROCESS)
    labels["allow"] = len(code)
    op(_BPF_RET_K, _SECCOMP_RET_ALLOW)

    def offset(index: int, label: str | None) -> int:
        jump = 0 if label is None else labels[label] - index - 1
        assert 0 <= jump <= 255, "BPF jumps are forward and at most 255"
        return jump

    return [(ins, offset(i, jt), offset(i, jf), k) for i, (ins, jt, jf, k) in enumerate(code)]


def _install_seccomp_filter(libc: ctypes.CDLL, notes: list[str]) -> None:
    if os.uname().machine != "x86_64":
        notes.append(f"no seccomp filter (built for x86_64 only, this is {os.uname().machine})")
        return
    program = seccomp_program()
    filters = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
    fprog = _SockFprog(len(program), filters)
    if prctl(libc, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog)) != 0:
        notes.append(f"no seccomp filter ({_errno()})")


_channel = sys.stdout


def emit(message: dict[str, Any]) -> None:
    """In the child: one JSON line to the parent."""
    _channel.write(json.dumps(message) + "\n")
    _channel.flush()


def emit_result(report: BaseModel) -> None:
    """In the child: the result line, `report` (a SandboxReport contract) under RESULT_KEY."""
    _channel.write(f'{{"{RESULT_KEY}": {report.model_dump_json()}}}\n')
    _channel.flush()
