"""Fork server for sandboxed children: one per (harness module, thread count) and parent process.

Started only by poise.sandbox (`python -I -m poise.forkserver <socket fd> <module>`) with the same
scrubbed environment a sandboxed child gets. It imports the harness module and the trusted modules the
harness names in `PRELOAD` (torch, transformers, the testbed: 10-15 s on 2 cores), then waits. For each
request it forks a child that looks like a fresh `python -I -m <module>`: its own session, the request's
working directory, environment, stdin/stdout/stderr, no other descriptor, fresh random seeds, and the
module run as `__main__`. The child then calls enter_sandbox() like any other; candidate code is loaded
only there, never in this process, so every candidate still starts from the same trusted state.

Protocol (SOCK_SEQPACKET, one JSON message each): the parent sends {"cwd", "env"} with four descriptors
(stdin read end, stdout and stderr write ends, a report socket); the server answers on the report socket
{"pid": n} once forked, then {"returncode": c} when the child has exited (negative: killed by a signal, as
in subprocess). When the parent's control socket closes (the parent died), every child's process group is
killed and the server exits.

Nothing here runs torch operations: OpenMP thread pools started before a fork would not work in the child.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import select
import shutil
import signal
import socket
import sys
import traceback

from poise.sandbox import FORK_SERVER_DIR_PREFIX, kill_group, load_libc, prctl

MAX_MESSAGE = 1 << 20
_PR_SET_DUMPABLE = 4


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    module = sys.argv[2]
    _preload(module)
    # Not dumpable: a candidate without namespaces runs as the server's uid and could otherwise open
    # /proc/<server>/mem and tamper with every later child. Children set it back (a fresh interpreter's).
    _set_dumpable(0)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)
    children: dict[int, socket.socket | None] = {}  # None: the parent stopped listening
    while True:
        ready, _, _ = select.select([control, wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 4096)
            _reap(children)
        if control in ready:
            message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 4)
            if not message:
                _kill_all(children)
                _remove_own_directory()
                return
            if len(fds) != 4:
                for fd in fds:
                    os.close(fd)
                continue
            request = json.loads(message)
            report = socket.socket(fileno=fds[3])
            pid = os.fork()
            if pid == 0:
                for sock in (control, *children.values()):
                    if sock is not None:
                        sock.close()
                _run_child(module, request, fds[:3], report)
            for fd in fds[:3]:
                os.close(fd)
            try:
                report.send(json.dumps({"pid": pid}).encode())
                children[pid] = report
            except OSError:  # the parent gave up waiting: nobody would ever stop this child
                kill_group(pid)
                report.close()
                children[pid] = None  # still reaped below
            _reap(children)


def _preload(module: str) -> None:
    """Import the harness and what it declares in PRELOAD; a failure here is left for the child to report."""
    try:
        harness = importlib.import_module(module)
        for name in getattr(harness, "PRELOAD", ()):
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - the child imports it again and fails with the real traceback
        pass
    sys.modules.pop(module, None)  # runpy runs it afresh as __main__


def _run_child(module: str, request: dict, stdio: list[int], report: socket.socket) -> None:
    """In the forked child: become a fresh-looking interpreter running `module`; never returns."""
    code = 1
    try:
        report.close()
        _set_dumpable(1)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile

        tempfile.tempdir = None  # TMPDIR is the child's working directory now
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # `random` reseeds itself after a fork; numpy does not
        sys.argv = [module]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what an interpreter does with an uncaught exception
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken pipe: nothing left to tell
                pass
        os._exit(code)


def _set_dumpable(value: int) -> None:
    prctl(load_libc(), _PR_SET_DUMPABLE, value)


def _reap(children: dict[int, socket.socket | None]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        report = children.pop(pid, None)
        if report is not None:
            try:
                report.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass
            report.close()


def _remove_own_directory() -> None:
    """The parent made the working directory for this server alone."""
    here = os.getcwd()
    if os.path.basename(here).startswith(FORK_SERVER_DIR_PREFIX):
        shutil.rmtree(here, ignore_errors=True)


def _kill_all(children: dict[int, socket.socket | None]) -> None:
    for pid in children:
        kill_group(pid)


if __name__ == "__main__":
    main()
