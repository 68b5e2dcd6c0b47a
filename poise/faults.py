"""Fault points (tests only): stop a service at a named moment, so that a kill lands there every time.

A kill test must hit its moment deterministically: a SIGKILL "while the trainer trains" timed by polling for a
file the training child writes is a race on a loaded machine. A fault point is a call such as
`fault_point("trainer.train")` at a moment that matters (`POINTS`); it does nothing unless the process was
started with it armed:

    POISE_TESTING=1 POISE_FAULT_DIR=/tmp/faults POISE_FAULT_POINTS=implementer.verify=block,trainer.train=block

`POISE_FAULT_POINTS` is read once, at import: comma-separated `name=action`, each name one of `POINTS`, each
action one of

- `block`: announce the moment, then wait until released. The point appends a line `<pid> <detail>` to
  `<POISE_FAULT_DIR>/<name>.reached` (the detail names, e.g., the sandboxed child's pid) and waits until
  `<POISE_FAULT_DIR>/<name>.release` exists. A test waits for `.reached`, then SIGKILLs, SIGTERMs or
  SIGSTOPs the service: the signal lands inside the handler, at that moment, every time.
- `crash`: announce the moment the same way, then end the process at once with `CRASH_STATUS` (`os._exit`:
  no cleanup, no nak, what SIGKILL leaves behind), for the chaos harness.
- `raise`: announce the moment, then raise `FaultInjected` in the handler, on every delivery: a poison message,
  which the bus redelivers and finally dead-letters with the reason.

A point whose `.release` file exists is passed with no effect and announces nothing: create it to let a
blocked point go on, or before restarting a service that crashed at it; remove it to arm the point again
(`release`, `arm`). `reached` reads the announcements.

Two switches on purpose: points are honoured only with `POISE_TESTING=1` as well, so one stray variable cannot
make a production deployment block or crash; without it the setting is ignored with a warning. With it, a spec
that names an unknown point or action, or no `POISE_FAULT_DIR`, stops the import with the reason (a test that
misspells a point should fail, not wait forever). Unset, which is the normal case, `fault_point` costs one
dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("poise.faults")

POINTS_ENV = "POISE_FAULT_POINTS"
DIR_ENV = "POISE_FAULT_DIR"
TESTING_ENV = "POISE_TESTING"
ACTIONS = ("block", "crash", "raise")
CRASH_STATUS = 99  # `crash` exits with this; no code path of POISE exits with it
POLL_S = 0.05      # how often a blocked point looks for its release file

# Every point, and the moment it marks. A point is named `<service>.<moment>`.
POINTS: dict[str, str] = {
    "proposer.received": "the proposer took a work.propose; nothing done yet",
    "proposer.publish": "the proposal is screened; evt.proposed not yet published",
    "implementer.received": "the implementer took a work.implement; nothing done yet",
    "implementer.verify": "a verification's sandboxed child has started (detail: its pid)",
    "implementer.publish": "the implementation is verified or given up; evt.implemented not yet published",
    "trainer.received": "the trainer took a work.train; nothing done yet",
    "trainer.train": "the training run's sandboxed child has started (detail: its pid)",
    "trainer.publish": "the training run ended; evt.trained not yet published",
    "evaluator.received": "the evaluator took a work.evaluate; nothing done yet",
    "evaluator.publish": "the evaluation is done; evt.evaluated not yet published",
    "reflector.received": "the reflector took a work.reflect; nothing done yet",
    "reflector.publish": "the reflection is written; evt.reflected not yet published",
    "archive.publish": "an event is applied to the store; the work that follows not yet published "
                       "(detail: the event's subject and node)",
}


class FaultInjected(RuntimeError):
    """Raised at a point armed with `raise`."""


class FaultSpecError(ValueError):
    """POISE_FAULT_POINTS (with POISE_TESTING=1) names an unknown point or action, or POISE_FAULT_DIR is unset."""


@dataclass(frozen=True)
class Reach:
    """One process that reached a point: its pid and the point's detail."""

    pid: int
    detail: str


def parse_points(spec: str) -> dict[str, str]:
    """`name=action,...` as {name: action}; FaultSpecError naming every problem."""
    points, problems = {}, []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = (part.strip() for part in item.partition("="))
        if name not in POINTS:
            problems.append(f"unknown point {name!r}")
        elif action not in ACTIONS:
            problems.append(f"{name}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
        else:
            points[name] = action
    if problems:
        raise FaultSpecError(f"{POINTS_ENV}: {'; '.join(problems)}; points: {', '.join(POINTS)}")
    return points


def load(env: Mapping[str, str]) -> tuple[dict[str, str], Path | None]:
    """The armed points and their directory that `env` describes; none without POISE_TESTING=1 (warned)."""
    spec = env.get(POINTS_ENV, "").strip()
    if not spec:
        return {}, None
    if env.get(TESTING_ENV) != "1":
        log.warning("%s is set but %s=1 is not: fault points are for tests only and stay off", POINTS_ENV,
                    TESTING_ENV)
        return {}, None
    points = parse_points(spec)
    directory = env.get(DIR_ENV, "").strip()
    if not directory:
        raise FaultSpecError(f"{POINTS_ENV} is set but {DIR_ENV} is not: set it to a directory the test reads")
    return points, Path(directory)


_POINTS, _DIR = load(os.environ)


def fault_point(name: str, detail: str = "") -> None:
    """The moment `name` (one of POINTS): nothing, unless the process was started with it armed (module doc)."""
    action = _POINTS.get(name)
    if action is None:
        return
    assert _DIR is not None
    if release_file(_DIR, name).exists():
        return
    _announce(_DIR, name, detail)
    if action == "crash":
        log.warning("fault point %s: crashing (exit status %d)", name, CRASH_STATUS)
        os._exit(CRASH_STATUS)
    if action == "raise":
        raise FaultInjected(f"fault point {name} raised (a test's poison message)")
    log.warning("fault point %s: blocked until %s exists", name, release_file(_DIR, name))
    while not release_file(_DIR, name).exists():
        time.sleep(POLL_S)
    log.warning("fault point %s: released", name)


def _announce(directory: Path, name: str, detail: str) -> None:
    """Append `<pid> <detail>` to the point's `.reached` file in one write, so a reader sees whole lines."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(reached_file(directory, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {' '.join(detail.split())}\n".encode())
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- the test's side


def reached_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.reached"


def release_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.release"


def reached(directory: Path, name: str) -> list[Reach]:
    """Every complete announcement of `name` so far, oldest first."""
    try:
        text = reached_file(directory, name).read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # a line still being written has no newline yet
    return [Reach(int(pid), detail) for pid, _, detail in (line.partition(" ") for line in lines)]


def release(directory: Path, name: str) -> None:
    """Let a blocked `name` go on; while the file exists the point is passed with no effect."""
    directory.mkdir(parents=True, exist_ok=True)
    release_file(directory, name).touch()


def arm(directory: Path, name: str) -> None:
    """Arm `name` again: remove its release file and its announcements."""
    release_file(directory, name).unlink(missing_ok=True)
    reached_file(directory, name).unlink(missing_ok=True)
