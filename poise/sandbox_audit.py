"""Attempts are recorded: what a candidate tries that no honest candidate needs (docs/sandbox.md, "Attempts
are recorded").

Child side (`record_attempts`): the trusted harness installs a Python audit hook (PEP 578, `sys.addaudithook`)
after its own imports and before it loads the candidate; Python offers no way to remove one. The hook sees
every audited act of the process and blocks (PermissionError, raised into the caller) these, whoever calls:

- network: connect, bind, send to an address, DNS lookups;
- processes: a shell (`os.system`), `subprocess`, `exec`, `posix_spawn`, `fork`, a signal to another process;
- writes outside the working directory (open for writing, remove, rename, link, chmod, ...);
- reads of protected paths: files not readable by other users (/etc/shadow, a 0600 key), credential files and
  directories (.ssh, .aws, .netrc, *.pem, ...), /var/run/secrets, the environment and memory of any process and
  anything else of another process under /proc, and listings of /root and /home;
- ctypes lookups of libc functions that do any of the above (`system`, `execve`, `fork`, `socket`, `open`,
  `syscall`, ...).

Each one leaves the process at once as an event line to the parent (`{"sandbox_attempt": {...}}`, a
`SandboxAttempt`), before the exception is raised, so the candidate cannot erase the record by catching the
exception, exiting or being killed afterwards. At most MAX_RECORDED distinct attempts are sent; later ones are
still blocked.

This is a record, not a boundary: the hook runs inside the candidate's process, so a candidate that writes to
the interpreter's memory through ctypes, calls a function pointer it found without a symbol lookup, or starts
a process through `_posixsubprocess` (not audited in Python 3.11) is not seen. Paths relative to a directory
descriptor (`dir_fd`) are judged as if relative to the working directory. The layers of poise/sandbox.py stay
the boundary; the record says what was tried.

Parent side (`attempts_in`, `describe_attempts`): the attempts a run's events hold, and the one-line reason
that fails the candidate ("attempted to run a shell (`/bin/sh -c ...`): blocked").
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import signal
import stat
import sys
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

from pydantic import ValidationError

from poise.contracts import SandboxAttempt, SandboxAttemptEvent
from poise.sandbox import emit

ATTEMPT_KEY = "sandbox_attempt"  # the field of an attempt's event line (SandboxAttemptEvent)
MAX_RECORDED = 16  # distinct attempts sent to the parent; a loop of attempts cannot flood the output
QUOTED_CHARS = 80  # how much of a candidate-chosen text (a command, a host) an attempt quotes

WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full")
PROTECTED_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/proc/kcore", "/dev/mem", "/dev/kmem", "/dev/port")
PROTECTED_DIRS = ("/var/run/secrets", "/run/secrets", "/etc/ssh", "/etc/sudoers.d")
CREDENTIAL_DIRS = (".ssh", ".aws", ".kube", ".docker", ".gnupg", ".azure", "gcloud")
CREDENTIAL_FILES = (".netrc", ".git-credentials", ".pgpass", ".pypirc", ".env", "credentials")
KEY_FILE_PREFIXES = ("id_rsa", "id_ecdsa", "id_ed25519", "id_dsa")  # ssh keys, public ones included
CREDENTIAL_SUFFIXES = (".pem", ".key", ".p12", ".pfx")
CODE_SUFFIXES = (".py", ".pyc", ".so")  # modules: an import may read them whatever their mode
LISTED_DIRS = ("/root", "/home")  # listing these shows whose secrets lie where
PROCESS_PRIVATE = ("environ", "mem")  # /proc/<pid>/... no honest code reads, not even its own
SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "busybox")
# libc functions whose lookup through ctypes bypasses the audited Python wrappers above.
DENIED_SYMBOLS = frozenset({
    "system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execlp", "execle", "fexecve", "fork",
    "vfork", "_Fork", "clone", "clone3", "posix_spawn", "posix_spawnp", "syscall", "kill", "tgkill", "ptrace",
    "socket", "connect", "bind", "sendto", "sendmsg", "getaddrinfo", "gethostbyname", "open", "open64", "openat",
    "openat64", "fopen", "fopen64", "creat", "creat64", "unlink", "unlinkat", "rename", "renameat", "truncate",
    "chmod", "chown", "link", "symlink", "mkdir",
})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audited calls that change the filesystem, and which of their arguments are paths.
_FILESYSTEM_CHANGES = {
    "os.remove": ("remove", (0,)), "os.rmdir": ("remove", (0,)), "shutil.rmtree": ("remove", (0,)),
    "os.mkdir": ("create a directory", (0,)), "os.rename": ("rename", (0, 1)), "shutil.move": ("move", (0, 1)),
    "os.link": ("hard-link", (0, 1)), "os.symlink": ("create a symlink", (1,)), "os.truncate": ("truncate", (0,)),
    "os.chmod": ("change the mode of", (0,)), "os.chown": ("change the owner of", (0,)),
    "os.chflags": ("change the flags of", (0,)), "os.utime": ("change the times of", (0,)),
    "os.setxattr": ("set an attribute of", (0,)), "os.removexattr": ("remove an attribute of", (0,)),
    "os.mkfifo": ("create a FIFO", (0,)), "os.mknod": ("create a device node", (0,)),
}
_NETWORK = {"socket.connect": "connect to", "socket.bind": "bind a socket to", "socket.sendto": "send to",
            "socket.sendmsg": "send to", "socket.getaddrinfo": "look up", "socket.gethostbyname": "look up",
            "socket.gethostbyname_ex": "look up", "socket.gethostbyaddr": "look up the name of",
            "socket.getnameinfo": "look up the name of"}
_SOCKET_CALLS = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")  # (socket, address)
_LOOKUPS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex")


def record_attempts(workdir: str | os.PathLike | None = None, readable: Iterable[str | os.PathLike] = (),
                    imports: Iterable[str] = ()) -> None:
    """In the child, before the candidate is loaded: import the harness's trusted modules `imports` (its PRELOAD,
    which the fork server has imported already; a fresh interpreter imports them here, since importing may start a
    process: ctypes.util.find_library runs ldconfig), then block and record every attempt listed above.
    `workdir`: the only place writes may go (default: the current directory). `readable`: trusted inputs (the base
    checkpoint) read whatever their permission bits; the interpreter's own installation (sys.prefix) is always, so
    that an import of a file installed without read permission for others still works."""
    for module in imports:
        importlib.import_module(module)
    trusted = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *readable)}
    sys.addaudithook(_Auditor(os.path.realpath(workdir or os.getcwd()), tuple(sorted(trusted))))


class _Auditor:
    """The hook. Fails closed: an act whose arguments it cannot read (a path object of the candidate's own class, an
    object that breaks the judge) is blocked. It judges events raised while it judges as any other, so nothing
    runs unjudged meanwhile (none of the calls it makes is audited)."""

    def __init__(self, workdir: str, trusted: tuple[str, ...]) -> None:
        self.workdir = workdir
        self.trusted = trusted
        self.pid = os.getpid()
        self.sent: set[tuple[str, str]] = set()

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        try:
            attempt = self.judge(event, args)
        except Exception:  # noqa: BLE001 - a candidate's object that breaks the judge gets no benefit of the doubt
            attempt = _kind(event), f"call `{event}` with arguments the sandbox cannot read"
        if attempt is None:
            return
        kind, what = attempt
        if (kind, what) not in self.sent and len(self.sent) < MAX_RECORDED:
            self.sent.add((kind, what))
            emit({ATTEMPT_KEY: {"kind": kind, "what": what}})
        raise PermissionError(f"blocked by the sandbox: {what}")

    def judge(self, event: str, args: tuple[Any, ...]) -> tuple[str, str] | None:
        """(kind, what was attempted) for an act no honest candidate needs; None for any other event."""
        if event == "open":
            return self.judge_open(args[0], args[1], args[2])
        if event in _FILESYSTEM_CHANGES:
            verb, positions = _FILESYSTEM_CHANGES[event]
            paths = [_resolve(args[i]) for i in positions]
            if event == "os.link" and paths[0] is not None and not self.inside(paths[0]):
                return "write", f"hard-link {_quote_path(paths[0])} into the working directory"
            outside = [path for path in paths if path is not None and not self.inside(path)]
            return ("write", f"{verb} {_quote_path(outside[0])} (outside the working directory)") if outside else None
        if event in ("os.listdir", "os.scandir"):
            path = _resolve(args[0] if args[0] is not None else ".")
            return ("read", f"list {_quote_path(path)}") if path is not None and self.listing_protected(path) else None
        if event in _NETWORK:
            target = args[1] if event in _SOCKET_CALLS else args[0]  # the others name no socket
            if event in _LOOKUPS and _local_name(target):
                return None  # no packet leaves: the connect that follows is the attempt
            dns = " (DNS)" if event.startswith("socket.get") else ""
            return "network", f"{_NETWORK[event]} {_quote(_address(target))}{dns}"
        if event == "os.system":
            return "process", f"run a shell (`/bin/sh -c {_quote(_text(args[0]), fence=False)}`)"
        if event == "subprocess.Popen":
            return "process", _run(args[1] if args[1] is not None else args[0])
        if event in ("os.exec", "os.posix_spawn"):
            return "process", _run(args[1] if args[1] else args[0])
        if event == "os.spawn":
            return "process", _run(args[2] if args[2] else args[1])
        if event in ("os.fork", "os.forkpty"):
            return "process", "fork the process"
        if event in ("os.kill", "os.killpg"):
            target, sig = args
            if event == "os.kill" and target == self.pid:
                return None  # its own end, like an exit
            group = "process group" if event == "os.killpg" or target <= 0 else "process"
            return "process", f"send {_signal_name(sig)} to {group} {target}"
        if event in ("ctypes.dlsym", "ctypes.dlsym/handle"):
            name = args[1] if isinstance(args[1], str) else None
            return ("native", f"call libc `{name}` through ctypes") if name in DENIED_SYMBOLS else None
        return None

    def judge_open(self, file: Any, mode: Any, flags: Any) -> tuple[str, str] | None:
        path = _resolve(file)
        if path is None:
            return None  # a descriptor: judged when it was opened
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes and not self.inside(path) and path not in WRITABLE_DEVICES:
            return "write", f"write {_quote_path(path)} (outside the working directory)"
        why = self.protected(path)
        return ("read", f"read {_quote_path(path)} ({why})") if why else None

    def inside(self, path: str, root: str | None = None) -> bool:
        root = root or self.workdir
        return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

    def protected(self, path: str) -> str | None:
        """Why reading `path` is not for a candidate; None when it may be read."""
        if self.inside(path):
            return None
        proc = re.match(r"^/proc/(\d+)/(?:task/\d+/)?([^/]+)", path)
        if proc:
            if int(proc.group(1)) != self.pid:
                return "another process's /proc entry"
            if proc.group(2) in PROCESS_PRIVATE:
                return f"the process's {proc.group(2)}"
        if path in PROTECTED_FILES or any(path == d or path.startswith(d + "/") for d in PROTECTED_DIRS):
            return "a protected path"
        if any(self.inside(path, root) for root in self.trusted):
            return None
        parts = path.split("/")
        name = parts[-1]
        if (any(part in CREDENTIAL_DIRS for part in parts[:-1]) or name in CREDENTIAL_FILES
                or name.startswith(KEY_FILE_PREFIXES) or name.endswith(CREDENTIAL_SUFFIXES)):
            return "a credential file"
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None  # nothing to read there
        if stat.S_ISREG(mode) and not mode & stat.S_IROTH and not name.endswith(CODE_SUFFIXES):
            return "a file other users may not read"
        return None

    def listing_protected(self, path: str) -> bool:
        return (path in LISTED_DIRS or path.startswith("/home/")
                or any(path == d or path.startswith(d + "/") for d in PROTECTED_DIRS)
                or any(part in CREDENTIAL_DIRS for part in path.split("/")))


def _kind(event: str) -> str:
    if event.startswith("socket."):
        return "network"
    if event.startswith("ctypes."):
        return "native"
    if event in _FILESYSTEM_CHANGES:
        return "write"
    return "read" if event in ("open", "os.listdir", "os.scandir") else "process"


def _resolve(value: Any) -> str | None:
    """The absolute, symlink-free path of a path argument; None for a descriptor. TypeError for a path object
    whose `__fspath__` is not the standard library's: the call converts it once more, and could be given
    another path than the judge was."""
    if isinstance(value, int) or value is None:
        return None
    if not isinstance(value, str | bytes):
        kind = type(value)
        standard = kind is os.DirEntry or (isinstance(value, PurePath) and kind.__fspath__ is PurePath.__fspath__
                                           and kind.__str__ is PurePath.__str__)
        if not standard:
            raise TypeError(f"a path object of type {kind.__name__}")
        value = os.fspath(value)
    return os.path.realpath(_text(value))


def _local_name(host: Any) -> bool:
    """A host whose lookup sends nothing: none, an address written as numbers, localhost."""
    if host is None:
        return True
    name = _text(host)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name == "localhost"
    return True


def _text(value: Any) -> str:
    """`value` as a plain str: a subclass of str or bytes is copied first, so that methods it overrides cannot make
    the judge see another text than the call uses."""
    if isinstance(value, str):
        return "".join((value,))
    if isinstance(value, bytes):
        return os.fsdecode(b"".join((value,)))
    if isinstance(value, int):
        return repr(int(value))
    return "".join((str(value),))


def _quote(text: str, fence: bool = True) -> str:
    """Candidate-chosen text, bounded, without control characters, in backticks unless inside some already."""
    flat = "".join(c if c.isprintable() else " " for c in _text(text)).replace("`", "'")
    flat = flat if len(flat) <= QUOTED_CHARS else flat[:QUOTED_CHARS - 1] + "…"
    return f"`{flat}`" if fence else flat


def _quote_path(path: str) -> str:
    """A path as `_quote` has it, shortened at the front when too long: its end says what it is."""
    flat = _quote(path, fence=False)
    if len(path) > QUOTED_CHARS:
        flat = "…" + _quote(path[-(QUOTED_CHARS - 1):], fence=False)
    return f"`{flat}`"


def _address(target: Any) -> str:
    if isinstance(target, tuple) and len(target) >= 2:
        return f"{_text(target[0])}:{target[1]}"
    return _text(target)


def _run(argv: Any) -> str:
    """How starting `argv` (a list or a command line) reads in an attempt."""
    words = [_text(word) for word in argv] if isinstance(argv, list | tuple) else [_text(argv)]
    if len(words) >= 3 and os.path.basename(words[0]) in SHELLS and words[1] == "-c":
        return f"run a shell (`{_quote(' '.join(words), fence=False)}`)"
    return f"run a process ({_quote(' '.join(words))})"


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# ------------------------------------------------------------------------------------------- parent


def attempts_in(events: Iterable[dict[str, Any]]) -> list[SandboxAttempt]:
    """The attempts among a run's event lines, in order (a line that does not validate is not one)."""
    attempts = []
    for event in events:
        if ATTEMPT_KEY in event:
            try:
                attempts.append(SandboxAttemptEvent.model_validate(event).sandbox_attempt)
            except ValidationError:
                continue
    return attempts


def describe_attempts(attempts: list[SandboxAttempt]) -> str:
    """The reason a candidate with `attempts` fails, one line: the first attempt, then how many more."""
    first = f"attempted to {attempts[0].what}: blocked"
    more = len(attempts) - 1
    return first + (f" (and {more} more attempt{'s' if more > 1 else ''}: "
                    f"{', '.join(sorted({a.kind for a in attempts[1:]}))})" if more else "")
