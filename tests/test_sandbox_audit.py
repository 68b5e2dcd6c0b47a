"""Attempts are recorded (poise/sandbox_audit.py): the audit hook blocks what no honest candidate needs and sends
each attempt to the parent as it happens. The hook is installed in a fresh interpreter (it can never be removed,
so never in the test process); tests/test_hostile.py drives it through the real harnesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import poise
from poise.contracts import SandboxAttempt
from poise.sandbox_audit import ATTEMPT_KEY, MAX_RECORDED, attempts_in, describe_attempts

PROJECT_DIR = Path(poise.__file__).resolve().parent.parent


def run_watched(code: str, workdir: Path) -> tuple[list[dict], dict]:
    """Run `code` in a fresh interpreter under the hook, in `workdir`: (attempt lines, the JSON the code printed
    last as `outcome`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    program = "from poise.sandbox_audit import record_attempts\nrecord_attempts()\n" + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", program], cwd=workdir, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_DIR)})
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return [line for line in lines if ATTEMPT_KEY in line], next(line["outcome"] for line in lines
                                                               if "outcome" in line)


TRY = """
import json, os, socket, subprocess, ctypes
blocked = {}
def attempt(name, action):
    try:
        action()
        blocked[name] = False
    except PermissionError as err:
        blocked[name] = "blocked by the sandbox" in str(err)
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, so that attempts quote paths whole."""
    path = Path(tempfile.mkdtemp(prefix="audit-"))
    yield path
    shutil.rmtree(path)


def test_each_act_no_honest_candidate_needs_is_blocked_and_recorded_as_it_happens(tmp_path, short_dir):
    secret = short_dir / "secret"
    secret.write_text("canary")
    secret.chmod(0o600)
    outside = short_dir / "outside.txt"
    far = f"/tmp/{'d' * 100}/end.txt"
    attempts, outcome = run_watched(TRY + f"""
attempt("shell", lambda: os.system("true"))
attempt("process", lambda: subprocess.run(["true"]))
attempt("fork", os.fork)
attempt("connect", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
attempt("write", lambda: open({str(outside)!r}, "w"))
attempt("far", lambda: open({far!r}, "w"))
attempt("secret", lambda: open({str(secret)!r}).read())
attempt("shadow", lambda: open("/etc/shadow"))
attempt("listing", lambda: os.listdir("/root"))
attempt("native", lambda: ctypes.CDLL(None).system)
attempt("signal", lambda: os.kill(1, 0))
print(json.dumps({{"outcome": blocked}}))
""", tmp_path / "work")
    assert outcome == dict.fromkeys(outcome, True) and len(outcome) == 12, outcome
    recorded = [(line[ATTEMPT_KEY]["kind"], line[ATTEMPT_KEY]["what"]) for line in attempts]
    assert recorded == [
        ("process", "run a shell (`/bin/sh -c true`)"),
        ("process", "run a process (`true`)"),
        ("process", "fork the process"),
        ("network", "connect to `127.0.0.1:9`"),
        ("network", "look up `example.com` (DNS)"),
        ("write", f"write `{outside}` (outside the working directory)"),
        ("write", f"write `…{far[-79:]}` (outside the working directory)"),  # a long path keeps its end
        ("read", f"read `{secret}` (a file other users may not read)"),
        ("read", "read `/etc/shadow` (a protected path)"),
        ("read", "list `/root`"),
        ("native", "call libc `system` through ctypes"),
        ("process", "send signal 0 to process 1"),
    ]
    assert not outside.exists()


def test_what_honest_code_does_is_not_judged(tmp_path):
    attempts, outcome = run_watched(TRY + """
import tempfile, decimal  # a fresh import reads the standard library
with open("own.txt", "w") as own:
    own.write("inside")
os.makedirs("sub/dir")
os.rename("own.txt", "sub/dir/moved.txt")
with tempfile.NamedTemporaryFile(dir=".") as scratch:
    scratch.write(b"x")
with open("/dev/null", "w") as null:
    null.write("x")
passwd = open("/etc/passwd").read()
status = open("/proc/self/status").read()
print(json.dumps({"outcome": {"moved": open("sub/dir/moved.txt").read(), "passwd": bool(passwd)}}))
""", tmp_path / "work")
    assert attempts == []
    assert outcome == {"moved": "inside", "passwd": True}


def test_a_loop_of_attempts_is_blocked_every_time_and_recorded_once_each_within_a_bound(tmp_path):
    attempts, outcome = run_watched(TRY + """
for i in range(200):
    attempt(f"same{i}", lambda: os.system("true"))
    attempt(f"new{i}", lambda i=i: open(f"/tmp/poise-never-{i}", "w"))
print(json.dumps({"outcome": all(blocked.values()) and len(blocked)}))
""", tmp_path / "work")
    assert outcome == 400
    assert len(attempts) == MAX_RECORDED
    assert attempts[0][ATTEMPT_KEY]["what"] == "run a shell (`/bin/sh -c true`)"
    assert sum(a[ATTEMPT_KEY]["kind"] == "process" for a in attempts) == 1
    assert not any(Path("/tmp").glob("poise-never-*"))


def test_arguments_that_lie_to_the_judge_gain_nothing(tmp_path):
    outside = tmp_path / "outside.txt"
    attempts, outcome = run_watched(TRY + f"""
class Numeric(str):  # looks like an address to a parser that trusts its methods
    def split(self, *args, **kwargs):
        return ["127", "0", "0", "1"]
class Sneaky:  # would run a shell while the judge reads the path
    def __fspath__(self):
        os.system("true")
        return "own.txt"
class TwoFaced:  # one path for the judge, another for the call
    calls = 0
    def __fspath__(self):
        TwoFaced.calls += 1
        return "own.txt" if TwoFaced.calls % 2 else {str(outside)!r}
attempt("lying host", lambda: socket.getaddrinfo(Numeric("exfil.example.com"), 53))
attempt("acting path", lambda: open(Sneaky(), "w"))
attempt("two-faced path", lambda: open(TwoFaced(), "a"))
print(json.dumps({{"outcome": blocked}}))
""", tmp_path / "work")
    # The shell inside __fspath__ is judged like any other; a path converted once is what both the call and the
    # judge see, so the two-faced path writes inside the working directory and never outside.
    assert outcome == {"lying host": True, "acting path": True, "two-faced path": False}
    assert [a[ATTEMPT_KEY]["what"] for a in attempts] == [
        "look up `exfil.example.com` (DNS)", "run a shell (`/bin/sh -c true`)"]
    assert not outside.exists() and (tmp_path / "work" / "own.txt").exists()


def test_the_reason_names_the_first_attempt_and_counts_the_others():
    events = [{"step": {"step": 0}},
              {ATTEMPT_KEY: {"kind": "network", "what": "connect to `1.1.1.1:443`"}},
              {ATTEMPT_KEY: {"kind": "bogus", "what": "a forged line that does not validate"}},
              {ATTEMPT_KEY: {"kind": "write", "what": "write `/etc/x` (outside the working directory)"}},
              {ATTEMPT_KEY: {"kind": "write", "what": "write `/etc/y` (outside the working directory)"}}]
    attempts = attempts_in(events)
    assert [a.kind for a in attempts] == ["network", "write", "write"]
    assert describe_attempts(attempts) == "attempted to connect to `1.1.1.1:443`: blocked (and 2 more attempts: write)"
    assert describe_attempts(attempts[:1]) == "attempted to connect to `1.1.1.1:443`: blocked"
    assert describe_attempts([SandboxAttempt(kind="read", what="read `/etc/shadow` (a protected path)"),
                              attempts[0]]) == ("attempted to read `/etc/shadow` (a protected path): blocked "
                                                "(and 1 more attempt: network)")
    assert os.linesep not in describe_attempts(attempts)
