r"""The math grader shared by evaluation and the VERL reward function (docs/evaluation.md, "Grading").

A response is graded on its final answer: the content of its last `\boxed{...}` (or `\fbox{...}`).

- `format_valid`: the response has such an answer (an empty box is no answer);
- `correct`: it is format-valid and math-verify finds the answer equal to the reference.

The two are recorded apart so that an evaluation can report the format-valid rate next to accuracy: a
response that states the right number without a box is format-invalid and incorrect. The reference is a
plain answer ("3/4", "\frac{3}{4}", "(1,2)", "10\text{ cm}") or a solution whose `\boxed{}` holds it.

Both sides are wrapped in `$...$` and parsed by math-verify, the reference as gold: numbers compare by
value (3/4 = \dfrac34 = 0.75, rounded to 6 decimals), expressions symbolically, tuples, intervals and sets
structurally, `x = 3` against `3` by its right-hand side, and units are dropped. Two notations math-verify
misreads are rewritten first (`normalize_answer`): 7.5e-5 (to it, 7.5·e − 5) and 1\,000 (to it, 1·0).

Why the comparison runs in child processes. math-verify 0.9 bounds its own work with SIGALRM, which Python
allows only in the main thread: from any other thread, `parse` and `verify` with their timeouts on raise
ValueError, and with them off nothing bounds them, so an answer such as `\boxed{9^{9^{9^{9}}}}` keeps
sympy busy for minutes. The evaluator grades from worker threads; so every comparison is sent to a worker
process (`python -m poise.grading`, one JSON line per request and per verdict) that runs it in its own main
thread under an interval timer of `timeout_s`. A worker that overruns that by KILL_GRACE_S (stuck in C code
that no signal interrupts) is killed and replaced. Either way the answer counts as incorrect, with a reason,
and the caller waits at most about `timeout_s + KILL_GRACE_S` for such an answer (a batch spreads its
answers over the pool's workers). An answer that times out is graded incorrect even if it was right, which
no real final answer comes close to: they compare in milliseconds. Workers are kept between calls
(`GradingPool`, `shared_pool`), so starting one (under a second) is paid once per process and not per
answer; each has an address-space limit so that a runaway computation fails with MemoryError instead of
exhausting the machine.

Use `grade` for one response and `grade_many` for a batch (identical answer/reference pairs are compared
once, the workers share the batch). `answers_match` is the bare comparison, with no bound: for code that
is itself a worker, and for tests.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0        # per comparison; math-verify's own default for each parse and compare
KILL_GRACE_S = 2.0             # past timeout_s, a worker that has not answered is killed
START_TIMEOUT_S = 60.0         # a worker not ready by then is broken (e.g. math-verify not installed)
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of a worker process

_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DOLLARS = re.compile(r"\$+(.*?)\$+", re.DOTALL)
# 7.5e-5 as a number on its own (math-verify reads it as 7.5·e − 5), and a digit group after a thin space (1\,000).
_E_NOTATION = re.compile(r"(?<![\w\\.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_GROUPING_SPACE = re.compile(r"(?<=\d)\\[,;:! ](?=\d{3}(?!\d))")


class GradingError(RuntimeError):
    """The grader itself cannot run (its worker process does not start), as opposed to one bad answer."""


@dataclass(frozen=True)
class MathGrade:
    """The grade of one response: whether it has a final boxed answer, and whether that answer is right."""

    correct: bool
    format_valid: bool
    extracted: str | None       # the last boxed answer, None when the response has none
    reason: str | None = None   # why the answer could not be compared (timed out, worker died), else None


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing one answer with one reference in a worker."""

    correct: bool
    reason: str | None = None


def extract_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` / `\boxed {...}` / `\fbox{...}` in `text`, braces balanced.

    None when there is none or when the last one's braces never close (a truncated response). Escaped
    braces (`\{`, `\}`) do not count. In `\boxed{\boxed{5}}` the last opening is the inner one: "5".
    """
    openings = list(_BOX_OPENING.finditer(text))
    if not openings:
        return None
    start = openings[-1].end()
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, \{ and \} included
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def strip_dollars(text: str) -> str:
    """`text` without surrounding `$...$` / `$$...$$` math delimiters (release answers such as "$\\frac{1}{2}$")."""
    text = text.strip()
    match = _DOLLARS.fullmatch(text)
    if match and "$" not in match.group(1):
        return match.group(1).strip()
    return text


def reference_answer(reference: str) -> str:
    r"""The answer a reference states: the content of its last `\boxed{}` if it has one, else the whole text;
    surrounding `$` dropped."""
    boxed = extract_boxed(reference)
    return strip_dollars(boxed if boxed is not None else reference)


def normalize_answer(text: str) -> str:
    r"""What math-verify misreads, rewritten: 7.5e-5 as 7.5\times 10^{-5}, 1\,000 as 1000."""
    text = _E_NOTATION.sub(r"\1\\times 10^{\2}", text)
    return _GROUPING_SPACE.sub("", text)


def answers_match(answer: str, reference: str) -> bool:
    """math-verify's verdict on `answer` against `reference` (both plain answers, not responses).

    Nothing bounds its time (math-verify's own timeouts are off: they work only in the main thread), and a
    pathological answer keeps it busy for minutes. Call it in a worker process, as `grade` does, never
    directly on model output.
    """
    from math_verify import parse, verify

    gold = parse(f"${normalize_answer(reference)}$", parsing_timeout=None)
    guess = parse(f"${normalize_answer(answer)}$", parsing_timeout=None)
    return bool(gold) and bool(guess) and verify(gold, guess, timeout_seconds=None)


def grade(response: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> MathGrade:
    """Grade one response against its reference. Callable from any thread; returns within about timeout_s, or
    timeout_s + KILL_GRACE_S when the worker must be killed."""
    return grade_many([(response, reference)], timeout_s)[0]


def grade_many(pairs: Sequence[tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S,
               pool: GradingPool | None = None) -> list[MathGrade]:
    """Grade (response, reference) pairs, in order, on `pool` (the process's shared pool by default).

    Each comparison is bounded by timeout_s (plus KILL_GRACE_S if its worker must be killed); a response
    without a boxed answer is never sent to a worker.
    """
    answers = [extract_boxed(response) for response, _ in pairs]
    jobs = {i: (answer.strip(), reference_answer(pairs[i][1]))
            for i, answer in enumerate(answers) if answer is not None and answer.strip()}
    verdicts = dict(zip(jobs, (pool or shared_pool()).judge(list(jobs.values()), timeout_s), strict=True))
    return [MathGrade(verdicts[i].correct, True, answer, verdicts[i].reason) if i in verdicts
            else MathGrade(False, False, answer) for i, answer in enumerate(answers)]


# ---- worker processes -------------------------------------------------------------------------------------


class GradingPool:
    """Worker processes that compare answers, each comparison bounded by a deadline. Thread-safe: concurrent
    `judge` calls each borrow their own workers (started as needed); at most `workers` are kept idle."""

    def __init__(self, workers: int = DEFAULT_WORKERS, command: Sequence[str] | None = None):
        if workers < 1:
            raise ValueError(f"a grading pool needs at least one worker, got {workers}")
        self.workers = workers
        # The worker program; a test may substitute one that misbehaves on purpose.
        self.command = list(command) if command else [sys.executable, "-m", "poise.grading"]
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def judge(self, pairs: Sequence[tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Verdict]:
        """Verdicts on (answer, reference) pairs, in order; equal pairs are compared once."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        unique = list(dict.fromkeys(pairs))
        if not unique:
            return []
        borrowed = self._borrow(min(self.workers, len(unique)))
        try:
            verdicts = _judge_on(borrowed, unique, timeout_s, self._start)
        except BaseException:
            for worker in borrowed:  # some may be mid-comparison: their late verdicts must not reach another call
                worker.kill()
            raise
        self._give_back(borrowed)
        return [verdicts[pair] for pair in pairs]

    def close(self) -> None:
        """Stop the idle workers (a `judge` call still running keeps its own until it ends)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()

    def _start(self) -> _Worker:
        return _Worker(self.command)

    def _borrow(self, count: int) -> list[_Worker]:
        with self._lock:
            taken, self._idle = self._idle[:count], self._idle[count:]
        taken = [worker for worker in taken if worker.alive()]  # one that died idle would fail an answer
        return taken + [self._start() for _ in range(count - len(taken))]

    def _give_back(self, workers: list[_Worker]) -> None:
        alive = [worker for worker in workers if worker.alive()]
        with self._lock:
            keep = max(0, self.workers - len(self._idle))
            self._idle += alive[:keep]
        for worker in alive[keep:]:
            worker.stop()


_shared: GradingPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> GradingPool:
    """The process's grading pool, started on first use and stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = GradingPool()
            atexit.register(_shared.close)
        return _shared


class _Worker:
    """One worker process, seen from the parent: its pipes, whether it is ready, what it is comparing."""

    def __init__(self, command: list[str]):
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.ready = False
        self.job: tuple[str, str] | None = None
        self.deadline: float | None = time.monotonic() + START_TIMEOUT_S
        self._buffer = b""

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, job: tuple[str, str], timeout_s: float) -> bool:
        """Start comparing `job`; False when the worker is gone."""
        line = json.dumps({"answer": job[0], "reference": job[1], "timeout_s": timeout_s}) + "\n"
        self.job, self.deadline = job, time.monotonic() + timeout_s + KILL_GRACE_S
        try:
            self.process.stdin.write(line.encode())
            self.process.stdin.flush()
        except OSError:
            return False
        return True

    def receive(self) -> list[dict] | None:
        """The complete messages that have arrived; None at end of output (the worker exited)."""
        data = os.read(self.process.stdout.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def exit_description(self) -> str:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._close_pipes()

    def stop(self) -> None:
        try:
            self.process.stdin.close()  # end of input: the worker's loop ends
            self.process.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _judge_on(workers: list[_Worker], jobs: list[tuple[str, str]], timeout_s: float,
              start: Callable[[], _Worker]) -> dict[tuple[str, str], Verdict]:
    """Run `jobs` on `workers` until each has a verdict. A worker that overruns its deadline or dies is replaced
    in `workers` by a fresh one; a worker that cannot start raises GradingError."""
    pending = deque(jobs)
    verdicts: dict[tuple[str, str], Verdict] = {}
    selector = selectors.DefaultSelector()
    for worker in workers:
        selector.register(worker.process.stdout, selectors.EVENT_READ, worker)

    def replace(worker: _Worker, verdict: Verdict | None) -> None:
        if worker.job is not None and verdict is not None:
            verdicts[worker.job] = verdict
        selector.unregister(worker.process.stdout)
        worker.kill()
        fresh = start()
        workers[workers.index(worker)] = fresh
        selector.register(fresh.process.stdout, selectors.EVENT_READ, fresh)

    try:
        while len(verdicts) < len(jobs):
            for worker in list(workers):
                if worker.ready and worker.job is None and pending:
                    job = pending.popleft()
                    if not worker.send(job, timeout_s):
                        replace(worker, Verdict(False, f"grading worker {worker.exit_description()}"))
            # Every worker is starting or busy here, so each has a deadline (the default is only a safeguard).
            deadline = min((w.deadline for w in workers if w.deadline is not None), default=time.monotonic() + 1.0)
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                worker = key.data
                messages = worker.receive()
                if messages is None:
                    if not worker.ready:
                        raise GradingError(f"the grading worker {worker.exit_description()} before it was ready; "
                                           "its error output is above (is math-verify installed?)")
                    replace(worker, Verdict(False, f"grading worker {worker.exit_description()} on this answer"))
                    continue
                for message in messages:
                    if "fatal" in message:
                        raise GradingError(f"the grading worker cannot run: {message['fatal']}")
                    if message.get("ready"):
                        worker.ready, worker.deadline = True, None
                    elif worker.job is not None:
                        verdicts[worker.job] = Verdict(bool(message["correct"]), message.get("reason"))
                        worker.job, worker.deadline = None, None
            now = time.monotonic()
            for worker in list(workers):
                if worker.deadline is None or worker.deadline > now:
                    continue
                if not worker.ready:
                    raise GradingError(f"the grading worker did not start within {START_TIMEOUT_S:g} s")
                replace(worker, Verdict(False, f"grading timed out after {timeout_s:g} s; its worker was killed"))
    finally:
        selector.close()
    return verdicts


# ---- the worker: python -m poise.grading -----------------------------------------------------------------


class _Overrun(BaseException):
    """Raised by the interval timer. Not an Exception, so math-verify's own handlers let it through."""


def _serve() -> None:
    # Protocol lines go to the original stdout; anything a library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def emit(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        import math_verify  # noqa: F401 -- fail here, once, rather than on every answer

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = WORKER_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(WORKER_MEMORY_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except Exception as error:  # reported to the parent, which raises GradingError
        emit({"fatal": f"{type(error).__name__}: {error}"})
        return
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the "timeout is disabled" and parse warnings

    def overrun(signum, frame):
        raise _Overrun

    signal.signal(signal.SIGALRM, overrun)
    emit({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        timeout_s = float(request["timeout_s"])
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                verdict = {"correct": answers_match(request["answer"], request["reference"]), "reason": None}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Overrun:
            verdict = {"correct": False, "reason": f"grading timed out after {timeout_s:g} s"}
        except Exception as error:  # one bad answer must not stop the worker
            verdict = {"correct": False, "reason": f"grading failed: {type(error).__name__}"}
        emit(verdict)


if __name__ == "__main__":
    _serve()
