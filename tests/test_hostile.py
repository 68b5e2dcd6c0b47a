"""Hostile candidates through verification and training (docs/sandbox.md, "The hostile corpus").

Each module of tests/hostile/ is a valid-looking GRPO candidate with one hostile act at import, in
`compute_advantages` or in `policy_loss`. Each goes through the implementer's sandboxed verification
(`implement` with `sandbox_verifier`, as the service runs it) and one step of sandboxed testbed training
(`train_candidate`), side by side, and must end as its row of EXPECTED says: failed with a reason that says what
happened, or, where the act is harmless, passed. Whatever the outcome, afterwards:

- no secret in any stored text or log: a canary API key in this process's environment (the service's) and a canary
  secret file outside the working directory, root's alone (0600), appear in no implementation, trajectory, reason,
  detail, log record or file the child left;
- no marker outside the working directory, the harness's source unchanged, no connection to a loopback listener;
- no surviving process: none left with its working directory in the entry's directories or the entry's token in
  its command line;
- the services are up: the same fork servers still run, and an honest candidate verifies and trains at the end.

An entry may be marked `xfail` for a known gap, said in its mark; `strict` makes the run fail once it is closed, so
the mark goes then. None is marked now. Verification takes a report forged on its own channel at its word (the
candidate shares its process: `forged_result_on_the_channel` has `verify="passed"`); training does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import poise.sandbox
from implementer.core import implement, sandbox_verifier
from poise.algorithms import reference_algorithm
from poise.contracts import SandboxLimits
from poise.description.proposals import root_proposal
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol
from trainer.testbed_runner import train_candidate

pytestmark = pytest.mark.hostile

HOSTILE = Path(__file__).parent / "hostile"
# One short step: every act at import or in either function happens in it, and 46 entries stay within minutes.
ONE_STEP = get_protocol("tiny").replace(name="hostile-step", steps=1, prompts_per_step=2, minibatches=1,
                                        max_new_tokens=24)
VERIFY_WALL_S = 60.0
TRAIN_LIMITS = SandboxLimits(wall_s=120.0, stall_s=60.0)
HANG_VERIFY_WALL_S = 8.0  # an entry that only a deadline ends gets short ones
HANG_TRAIN_LIMITS = SandboxLimits(wall_s=10.0)
CANARY_KEY = f"sk-ant-canary-{uuid.uuid4().hex}"
CANARY_SECRET = f"poise-canary-secret-{uuid.uuid4().hex}"
LARGEST_SEARCHED_FILE = 16 << 20  # files the child left, searched for the canaries (a disk filler is skipped)
MAX_REASON_CHARS = 1000
SURVIVOR_WAIT_S = 10.0

DEADLINE = r"killed at the \d+ s wall-clock deadline while (importing the candidate|calling \w+)"
THREAD = r"tampering: a thread was started .* while importing the candidate"
SECRET_READ = r"FileNotFoundError .*canary-secret|No such file or directory"  # outside the child's view


@dataclass(frozen=True)
class Expect:
    outcome: str                 # "failed" or "passed", for training, and for verification unless `verify` says
    reason: str = ""             # a failure's reason matches this (re.search), in verification and training
    hangs: bool = False          # only a deadline ends it: run with the short ones
    xfail: str | None = None     # why it fails today: the work that will make it pass
    verify: str | None = None    # verification's outcome where it differs (and then its reason is not checked)


PASSES = Expect("passed")

EXPECTED: dict[str, Expect] = {
    # hangs
    "loop_at_import": Expect("failed", DEADLINE, hangs=True),
    "loop_in_policy_loss": Expect("failed", DEADLINE, hangs=True),
    "sleep_in_advantages": Expect("failed", DEADLINE, hangs=True),
    "ignores_sigterm": Expect("failed", DEADLINE, hangs=True),
    # a thread of the candidate's is tampering with the harness's state (poise/integrity.py): caught at import
    "thread_outlives_the_harness": Expect("failed", THREAD),
    "daemon_threads": Expect("failed", THREAD),
    # resources
    "memory_bomb_at_import": Expect("failed", r"MemoryError"),
    "memory_bomb_in_policy_loss": Expect("failed", r"RuntimeError at line \d+ of the candidate: .*allocate"),
    "fork_storm": Expect("failed", r"attempted to fork the process: blocked"),
    # the pool's semaphore goes to /dev/shm first, which is read-only inside the mount namespace (no audit event)
    "multiprocessing_pool": Expect("failed", r"Read-only file system|attempted to fork the process: blocked"),
    "disk_fill": Expect("failed", r"File too large"),
    "deep_recursion": Expect("failed", r"RecursionError"),
    "deep_recursion_past_the_c_stack": Expect("failed", r"SIGSEGV"),
    # exits
    "sys_exit_at_import": Expect("failed", r"importing the module called sys\.exit\(3\) at line \d+ of the candidate"),
    "os_exit_in_policy_loss": Expect("failed", r"exited with status 0 without a result while calling policy_loss"),
    "signal_the_parent": Expect("failed", r"attempted to send SIGSTOP to process( group)? \d+: blocked"),
    # processes and native code
    "shell_at_import": Expect("failed", r"attempted to run a shell \(`/bin/sh -c echo escaped > [^`]*`\): blocked"),
    "os_system_in_policy_loss": Expect("failed", r"attempted to run a shell \(`/bin/sh -c touch [^`]*`\): blocked"),
    "detached_sleeper": Expect("failed", r"attempted to run a process \(`sleep 600 [^`]*`\): blocked"),
    "exec_a_shell": Expect("failed", r"attempted to run a shell \(`sh -c touch [^`]*`\): blocked"),
    "ctypes_system": Expect("failed", r"attempted to call libc `system` through ctypes: blocked"),
    "ctypes_fork": Expect("failed", r"attempted to call libc `fork` through ctypes: blocked"),
    # past the audit hook, the shell still finds no secret: the file is not in the child's view
    "shell_unaudited": Expect("failed", r"canary-secret: No such file or directory"),
    # secrets
    "read_shadow": Expect("failed", r"attempted to read `/etc/shadow` \(a protected path\): blocked"),
    "secret_file_into_metrics": Expect("failed", SECRET_READ),
    "secret_file_into_exception": Expect("failed", SECRET_READ),
    "secret_file_to_stdout": Expect("failed", SECRET_READ),
    "secret_through_a_symlink": Expect("failed", SECRET_READ),
    "secret_through_a_hard_link": Expect(
        "failed", r"attempted to hard-link `[^`]*canary-secret` into the working directory: blocked"),
    "environ_of_other_processes": Expect("failed", r"attempted to read `/proc/\d+/environ` \(.*\): blocked"),
    "own_environment": PASSES,  # the environment is scrubbed: nothing to find
    "list_root_for_keys": Expect("failed", r"attempted to list `/root`: blocked"),
    # network
    "connect_loopback": Expect("failed", r"attempted to connect to `127\.0\.0\.1:\d+`: blocked"),
    "connect_outside": Expect("failed", r"attempted to connect to `1\.1\.1\.1:443`: blocked"),
    "dns_exfiltration": Expect("failed", r"attempted to look up `[^`]*\.exfil\.example\.com` \(DNS\): blocked"),
    "udp_exfiltration": Expect("failed", r"attempted to send to `8\.8\.8\.8:53`: blocked"),
    # writes
    "write_outside": Expect("failed", r"attempted to write `[^`]*/write-marker` \(outside the working directory\)"),
    "write_tmp": Expect("failed", r"attempted to write `/tmp/poise-hostile-[\w-]+` \(outside the working directory\)"),
    "rewrite_the_harness": Expect("failed", r"attempted to write `[^`]*poise/sandbox\.py` \(outside the working"),
    # output and results
    "huge_stdout": PASSES,  # stdout goes to the bounded stderr tail
    "huge_exception": Expect("failed", r"ValueError at line \d+ of the candidate: \"y+…\""),  # quoted, bounded
    "forged_result_on_stdout": PASSES,  # not the protocol channel: the real result wins
    # Verification takes a report written on its own channel at its word (the candidate shares its process); training
    # checks the report against what the child did, so the node fails there.
    "forged_result_on_the_channel": Expect(
        "failed", r"the child reported a checkpoint it did not write", verify="passed"),
    # integrity
    "mutates_the_batch": Expect("failed", r"(?i)tamper|mutat|in.place"),
    "replaces_the_grader": Expect("failed", r"(?i)tamper|replace"),
    "replaces_the_loss_aggregation": Expect("failed", r"(?i)tamper|replace"),
}


def test_every_module_of_the_corpus_has_an_expectation() -> None:
    assert sorted(p.stem for p in HOSTILE.glob("*.py")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 30


# ------------------------------------------------------------------------------------------------ fixtures


@dataclass
class Host:
    """What the corpus runs against: the base checkpoint, the canaries, a listener on the loopback, a directory
    beside the working directories, and the fork servers as they were before the first entry."""

    base: Path
    secret_file: Path
    outside: Path
    listener: socket.socket
    harness_sha256: str
    fork_servers: dict[tuple, int]


def _fork_servers() -> dict[tuple, int]:
    # Private to poise.sandbox: the one way to tell that a service's long-lived fork server survived an entry.
    return {key: server.process.pid for key, server in poise.sandbox._fork_servers.items() if server.alive()}


def _same_fork_servers(host: Host) -> bool:
    """The fork servers the corpus started are the ones running (other tests of this worker may have more)."""
    servers = _fork_servers()
    return {key: servers.get(key) for key in host.fork_servers} == host.fork_servers


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    previous = os.environ.get("ANTHROPIC_API_KEY")
    os.environ["ANTHROPIC_API_KEY"] = CANARY_KEY  # the service's environment: the child must never see it
    secret_file = tmp_path_factory.mktemp("secret") / "canary-secret"
    secret_file.write_text(CANARY_SECRET + "\n")
    secret_file.chmod(0o600)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    base = base_checkpoint()
    harness = Path(poise.sandbox.__file__)
    try:
        # also starts the fork servers every entry must leave running
        _assert_honest_candidate_runs(base, tmp_path_factory.mktemp("honest-first"))
        yield Host(base, secret_file, tmp_path_factory.mktemp("outside"), listener,
                   hashlib.sha256(harness.read_bytes()).hexdigest(), _fork_servers())
    finally:
        listener.close()
        if previous is None:
            os.environ.pop("ANTHROPIC_API_KEY", None)
        else:
            os.environ["ANTHROPIC_API_KEY"] = previous


class _GivenModule:
    """A coder that writes the hostile module as it is and cannot correct it."""

    name = "hostile"

    def __init__(self, source: str) -> None:
        self.source = source

    def write(self, proposal):
        return self.source

    def correct(self, proposal, source, report):
        return None


@dataclass
class Ran:
    verify_outcome: str
    verify_reason: str
    train_outcome: str
    train_reason: str
    stored: list[str]  # every text a node, a log or an operator would see


def _run(source: str, root: Path, base: Path, hangs: bool) -> Ran:
    """Verification and one training step of `source`, side by side (two children on two cores)."""
    verifier = sandbox_verifier(base, root / "verify", ONE_STEP, wall_s=HANG_VERIFY_WALL_S if hangs else VERIFY_WALL_S,
                                smoke=False)
    limits = HANG_TRAIN_LIMITS if hangs else TRAIN_LIMITS
    with ThreadPoolExecutor(2) as pool:
        verified = pool.submit(implement, root_proposal(), _GivenModule(source), verifier, 1)
        trained = pool.submit(train_candidate, source, ONE_STEP, 0, base, root / "train", limits)
        implementation, summary = verified.result()
        outcome = trained.result()
    if outcome.failure is None:
        assert outcome.checkpoint is not None and (outcome.checkpoint / "model.safetensors").exists()
    return Ran(verify_outcome="passed" if implementation.verified else "failed", verify_reason=summary,
               train_outcome="passed" if outcome.failure is None else "failed", train_reason=outcome.failure or "",
               stored=[implementation.model_dump_json(), summary, outcome.trajectory.model_dump_json(),
                       outcome.failure or "", outcome.detail, *outcome.isolation_notes])


def _assert_honest_candidate_runs(base: Path, root: Path) -> None:
    ran = _run(reference_algorithm("grpo").source(), root, base, hangs=False)
    assert (ran.verify_outcome, ran.train_outcome) == ("passed", "passed"), (ran.verify_reason, ran.train_reason)


# --------------------------------------------------------------------------------------------- the checks


def _files_left(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= LARGEST_SEARCHED_FILE:
            yield path


def _survivors(root: Path, token: str) -> list[str]:
    """Processes with their working directory under `root`, or `token` in their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue  # gone, or a kernel thread
        if cwd == str(root) or cwd.startswith(f"{root}/") or token in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()} (in {cwd})")
    return found


def _assert_nothing_survives(root: Path, token: str) -> None:
    deadline = time.monotonic() + SURVIVOR_WAIT_S  # a killed PID namespace takes a moment to empty
    while (left := _survivors(root, token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the sandbox: {left}"


def _entry_params() -> list:
    params = []
    for name, expect in EXPECTED.items():
        marks = [pytest.mark.xfail(strict=True, reason=expect.xfail)] if expect.xfail else []
        params.append(pytest.param(name, expect, id=name, marks=marks))
    return params


@pytest.mark.parametrize(("name", "expect"), _entry_params())
def test_a_hostile_candidate_ends_as_expected_and_leaves_nothing_behind(
        name: str, expect: Expect, host: Host, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = f"poise-hostile-{uuid.uuid4().hex}"
    outside = host.outside / name
    outside.mkdir()
    source = (HOSTILE / f"{name}.py").read_text()
    for placeholder, value in (("@SECRET_FILE@", str(host.secret_file)), ("@OUTSIDE@", str(outside)),
                               ("@TOKEN@", token), ("@PORT@", str(host.listener.getsockname()[1]))):
        source = source.replace(placeholder, value)
    root = tmp_path / "work"
    caplog.set_level(logging.DEBUG)  # every record the services log, not only warnings
    try:
        ran = _run(source, root, host.base, expect.hangs)

        _assert_nothing_survives(root, token)
        stored = [*ran.stored, caplog.text, *(p.read_text("utf-8", "replace") for p in _files_left(root))]
        for canary in (CANARY_KEY, CANARY_SECRET):
            assert not [text for text in stored if canary in text], f"a canary leaked: {canary}"
        assert list(outside.iterdir()) == [], "a marker was written outside the working directory"
        assert not list(Path("/tmp").glob(f"{token}*")) and not list(Path("/tmp").glob(f"poise-hostile-{token}*"))
        assert hashlib.sha256(Path(poise.sandbox.__file__).read_bytes()).hexdigest() == host.harness_sha256
        with pytest.raises(BlockingIOError):
            host.listener.accept()  # nothing reached the loopback
        assert _same_fork_servers(host), "a fork server died"

        assert (ran.verify_outcome, ran.train_outcome) == (expect.verify or expect.outcome, expect.outcome), (
            ran.verify_reason, ran.train_reason)
        checked = (ran.train_reason,) if expect.verify else (ran.verify_reason, ran.train_reason)
        for reason in checked if expect.outcome == "failed" else ():
            assert re.search(expect.reason, reason), reason[:MAX_REASON_CHARS]
            assert len(reason) <= MAX_REASON_CHARS and "\n" not in reason, reason[:MAX_REASON_CHARS]
    finally:
        shutil.rmtree(root, ignore_errors=True)  # a disk filler leaves hundreds of MB


def test_the_services_still_verify_and_train_an_honest_candidate(host: Host, tmp_path: Path) -> None:
    _assert_honest_candidate_runs(host.base, tmp_path)
    assert _same_fork_servers(host)


AS_SERVICE_ENV = "POISE_HOSTILE_AS_SERVICE"  # set in the run below: the corpus as a non-root service


def _can_become_a_service() -> bool:
    import shutil

    from test_sandbox import ISOLATED

    return ISOLATED and bool(shutil.which("setpriv") and shutil.which("unshare"))


@pytest.mark.skipif(os.environ.get(AS_SERVICE_ENV) == "1", reason="this is that run")
@pytest.mark.skipif(not _can_become_a_service(), reason="needs root to become a non-root service, and setpriv")
def test_the_corpus_holds_under_a_non_root_service(tmp_path: Path) -> None:
    """The whole corpus again, with every check above, in a pytest run as uid 10001 with no capability at all (as
    the shipped containers run the services): the boundary then comes from a user namespace, the canary API key
    sits in that service's environment, and the canary secret file is that uid's own."""
    import subprocess
    import sys

    from test_sandbox import PROJECT_DIR, service_command

    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 10001, 10001)
    for directory in (tmp_path, *tmp_path.parents):  # pytest's base temporary directory is root's alone
        if directory != Path("/") and not directory.stat().st_mode & 0o001:
            directory.chmod(directory.stat().st_mode | 0o001)
    command = (f"{sys.executable} -m pytest -q -p no:cacheprovider -p no:randomly -n 0 "
               f"--basetemp {home / 'pytest'} tests/test_hostile.py")
    done = subprocess.run(service_command(command), capture_output=True, text=True, timeout=900, cwd=PROJECT_DIR,
                          env={"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(home), "USER": "poise",
                               "PYTHONDONTWRITEBYTECODE": "1", AS_SERVICE_ENV: "1"})
    summary = done.stdout.strip().splitlines()[-1:] or [done.stderr[-2000:]]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert not re.search(r"\d+ (failed|error)", summary[0]) and re.search(r"4\d passed", summary[0]), summary


@pytest.mark.skipif(os.environ.get(AS_SERVICE_ENV) != "1", reason="only in the non-root service's run")
def test_the_non_root_run_is_what_it_claims() -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    assert os.getuid() == os.geteuid() == 10001
    assert all(int(status[key].strip(), 16) == 0 for key in ("CapEff", "CapPrm", "CapBnd"))
