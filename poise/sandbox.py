"""Running untrusted candidate code in a child process (ARCHITECTURE.md section 5).

Parent side (`run_sandboxed`): the child is a fresh interpreter (`python -I -m <module>`) in its own
session, with a scrubbed environment (no API keys or tokens reach it), its own working directory, and a
wall-clock deadline enforced from outside by killing the whole process group. Input goes in as JSON on
stdin; output comes back as JSON lines on stdout, size-capped and parsed by the parent, never unpickled.

Child side (`enter_sandbox`): before any candidate code is loaded, the trusted harness lowers its own
resource limits (address space, CPU seconds, file size, open files, no core dumps), moves into a new
network namespace when it can (root: no interface but a downed loopback, so no socket reaches anything),
and sets no-new-privileges. What could not be applied is reported in the result, never silently skipped.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_KEY = "result"
MAX_OUTPUT_BYTES = 8 << 20
STDERR_TAIL_BYTES = 16 << 10
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 600.0
    cpu_s: int = 3600               # CPU seconds over all threads; the wall deadline is the real bound
    memory_bytes: int = 8 << 30     # address space: torch reserves a lot of virtual memory
    file_bytes: int = 256 << 20     # largest file the child may write (a checkpoint is ~4 MB)
    open_files: int = 256


@dataclass
class SandboxResult:
    returncode: int | None
    wall_s: float
    result: dict[str, Any] | None          # the last {"result": ...} line the child printed
    events: list[dict[str, Any]] = field(default_factory=list)  # every other JSON line, in order
    stderr_tail: str = ""
    timed_out: bool = False
    output_overflow: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None and not self.timed_out

    def failure_reason(self) -> str:
        if self.timed_out:
            return f"killed after the {self.wall_s:.0f} s wall-clock deadline"
        if self.output_overflow:
            return f"killed: wrote more than {MAX_OUTPUT_BYTES >> 20} MiB to stdout"
        if self.returncode is not None and self.returncode < 0:
            name = signal.Signals(-self.returncode).name if -self.returncode in signal.valid_signals() else "?"
            hint = " (CPU time limit)" if name == "SIGXCPU" else " (killed: likely a resource limit)"
            return f"child died from signal {name}{hint if name in ('SIGXCPU', 'SIGKILL') else ''}"
        last = self.stderr_tail.strip().splitlines()[-1:] or ["no error output"]
        if self.result is None:
            return f"child exited with status {self.returncode} without a result: {last[0]}"
        return f"child exited with status {self.returncode}: {last[0]}"


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
    payload: dict[str, Any],
    workdir: Path,
    limits: SandboxLimits = SandboxLimits(),
    threads: int = 2,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> SandboxResult:
    """Run `python -I -m module` in a sandboxed child with `payload` as JSON on stdin."""
    workdir.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "_limits": limits.__dict__}
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-I", "-m", module],
        cwd=workdir,
        env=scrubbed_env(workdir, threads),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        start_new_session=True,  # its own process group, so the deadline kills every fork too
    )
    assert child.stdin and child.stdout and child.stderr
    child.stdin.write(json.dumps(payload).encode())
    child.stdin.close()
    result = SandboxResult(returncode=None, wall_s=0.0, result=None)
    stdout_buffer, stderr_tail, total = b"", b"", 0
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ, "out")
    selector.register(child.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    while open_streams:
        remaining = limits.wall_s - (time.monotonic() - started)
        if remaining <= 0:
            result.timed_out = True
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
                _take_line(line, result, on_event)
    if result.timed_out or result.output_overflow:
        _kill_group(child.pid)
    result.returncode = child.wait()
    _kill_group(child.pid)  # forks left behind by a child that exited still die
    if stdout_buffer and not result.output_overflow:
        _take_line(stdout_buffer, result, on_event)
    result.stderr_tail = stderr_tail.decode("utf-8", "replace")
    result.wall_s = time.monotonic() - started
    return result


def _take_line(line: bytes, result: SandboxResult, on_event: Callable[[dict[str, Any]], None] | None) -> None:
    try:
        message = json.loads(line)
    except ValueError:
        return  # stray prints of the candidate are not protocol
    if not isinstance(message, dict):
        return
    if RESULT_KEY in message and isinstance(message[RESULT_KEY], dict):
        result.result = message[RESULT_KEY]
        return
    result.events.append(message)
    if on_event:
        on_event(message)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------- child


def enter_sandbox() -> tuple[dict[str, Any], list[str]]:
    """In the child: read the payload, apply the limits, return (payload, isolation notes).

    Must run before any candidate code is loaded. The notes list what could not be applied.
    """
    payload = json.loads(sys.stdin.buffer.read())
    limits = payload.get("_limits", {})
    notes: list[str] = []
    for limit, value in (
        (resource.RLIMIT_AS, limits.get("memory_bytes")),
        (resource.RLIMIT_CPU, limits.get("cpu_s")),
        (resource.RLIMIT_FSIZE, limits.get("file_bytes")),
        (resource.RLIMIT_NOFILE, limits.get("open_files")),
        (resource.RLIMIT_CORE, 0),
    ):
        if value is not None:
            resource.setrlimit(limit, (int(value), int(value)))
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() == 0:
        if libc.unshare(_CLONE_NEWNET) != 0:
            notes.append(f"no network namespace (unshare failed: errno {ctypes.get_errno()})")
    else:
        notes.append("no network namespace (needs root or user namespaces)")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        notes.append("no-new-privileges not set")
    # The protocol channel moves to a private descriptor; fd 1 now goes to stderr, so whatever the
    # candidate prints cannot pass for a harness message.
    global _channel
    _channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return payload, notes


_channel = sys.stdout


def emit(message: dict[str, Any]) -> None:
    """In the child: one JSON line to the parent."""
    _channel.write(json.dumps(message) + "\n")
    _channel.flush()


def emit_result(result: dict[str, Any]) -> None:
    emit({RESULT_KEY: result})
