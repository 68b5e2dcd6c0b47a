r"""poise.grading: the last boxed answer, format validity apart from correctness, math-verify's equivalences on
real-style answers, and the bound on a pathological answer from any thread (docs/evaluation.md, "Grading")."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from poise.grading import (
    KILL_GRACE_S,
    GradingError,
    GradingPool,
    extract_boxed,
    grade,
    grade_many,
    reference_answer,
)

# ---- extracting the final answer ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    (r"The answer is \boxed{12}.", "12"),
    (r"so $\boxed{\frac{\sqrt{2}}{2}}$", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed {5}", "5"),
    (r"\fbox{7}", "7"),
    (r"First \boxed{1}, then on reflection \boxed{2}", "2"),
    (r"Hence \boxed{42} is the count, as checked above.", "42"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"),
])
def test_extract_boxed_takes_the_last_box_with_balanced_braces(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", [
    "The answer is 12.",
    r"the answer is \boxed{\frac{1}{2}",                # truncated mid-box
    r"\boxed{3} but then \boxed{\frac{1}{2}",           # the last box never closes: the earlier one does not count
    r"\boxedx{3}",
])
def test_extract_boxed_is_none_without_a_closed_last_box(text):
    assert extract_boxed(text) is None


def test_reference_answer_takes_a_solutions_box_and_drops_dollars():
    assert reference_answer(r"Adding, we get $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert reference_answer(r"$\frac{1}{2}$") == r"\frac{1}{2}"
    assert reference_answer("  27 ") == "27"


# ---- grading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("response", "reference"), [
    (r"Therefore the answer is \boxed{204}.", "204"),
    (r"\boxed{\frac{3}{4}}", "3/4"),
    (r"\boxed{\dfrac34}", "3/4"),
    (r"\boxed{0.75}", r"\frac{3}{4}"),
    (r"\boxed{3/4}", r"\dfrac{3}{4}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{10\text{ cm}}", "10"),
    (r"\boxed{10}", r"10\text{ cm}"),
    (r"\boxed{(1, 2)}", "(1,2)"),
    (r"\boxed{[1, 2)}", "[1,2)"),
    (r"\boxed{1+x^2}", "x^2+1"),
    (r"\boxed{27}", "27.0"),
    (r"\boxed{x = 3}", "3"),
    (r"\boxed{0.5}", r"So the probability is $\boxed{\frac{1}{2}}$."),   # a reference given as a solution
    (r"\boxed{7.5 \times 10^{-5}}", "7.5e-5"),     # e-notation, as some Minerva answers are written
    (r"\boxed{1\,000}", "1000"),
])
def test_equivalent_boxed_answers_are_correct(response, reference):
    result = grade(response, reference)
    assert result.format_valid and result.correct, result
    assert result.reason is None


@pytest.mark.parametrize(("response", "reference"), [
    (r"\boxed{13}", "12"),
    (r"\boxed{(2, 1)}", "(1,2)"),                  # a tuple is ordered
    (r"\boxed{[1, 2]}", "(1,2)"),                  # closed is not open
    (r"\boxed{x^2-1}", "x^2+1"),
    (r"\boxed{0.7}", "3/4"),
])
def test_wrong_boxed_answers_are_format_valid_but_incorrect(response, reference):
    result = grade(response, reference)
    assert result.format_valid and not result.correct, result


def test_the_right_number_without_a_box_is_format_invalid_and_incorrect():
    result = grade("After simplifying, the answer is 12.", "12")
    assert (result.format_valid, result.correct, result.extracted) == (False, False, None)


def test_an_unclosed_or_empty_box_is_format_invalid():
    assert not grade(r"so the answer is \boxed{12", "12").format_valid
    assert not grade(r"the answer is \boxed{}", "12").format_valid


def test_with_several_boxes_the_last_one_is_graded():
    assert not grade(r"\boxed{12} ... wait, that is wrong: \boxed{13}", "12").correct
    second_thought = grade(r"\boxed{13} ... wait, that is wrong: \boxed{12}", "12")
    assert second_thought.correct and second_thought.extracted == "12"


def test_grade_many_keeps_the_order_and_matches_grade():
    pairs = [(r"\boxed{2}", "2"), ("no box 2", "2"), (r"\boxed{3}", "2"), (r"\boxed{2}", "2"), (r"\boxed{\pi}", r"\pi")]
    grades = grade_many(pairs)
    assert [(g.format_valid, g.correct) for g in grades] == [(True, True), (False, False), (True, False),
                                                            (True, True), (True, True)]
    assert grades == [grade(response, reference) for response, reference in pairs]


def test_grading_from_many_threads_at_once_gives_each_its_own_verdicts():
    results: dict[int, list[bool]] = {}

    def worker(index: int) -> None:
        pairs = [(rf"\boxed{{{index + j}}}", str(index + 2 * j)) for j in range(4)]  # right only for j = 0
        results[index] = [g.correct for g in grade_many(pairs)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {i: [True, False, False, False] for i in range(4)}


# ---- bounds -------------------------------------------------------------------------------------------------


def test_a_pathological_answer_graded_from_a_thread_times_out_within_the_bound():
    grade(r"\boxed{1}", "1")  # the shared pool's workers are started: only grading is timed below
    timeout_s = 1.0
    outcome: dict = {}

    def grade_tower() -> None:
        start = time.monotonic()
        outcome["grade"] = grade(r"\boxed{9^{9^{9^{9}}}}", "12", timeout_s=timeout_s)
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=grade_tower)
    thread.start()
    thread.join(timeout_s + KILL_GRACE_S + 30)
    assert not thread.is_alive(), "grading hung"
    result = outcome["grade"]
    assert result.format_valid and not result.correct
    assert "timed out" in result.reason
    assert outcome["seconds"] < timeout_s + KILL_GRACE_S + 2
    assert grade(r"\boxed{5}", "5").correct  # the pool still grades afterwards


def test_a_huge_nested_answer_times_out_while_its_neighbours_are_graded():
    nested = "(" * 200 + "1" + ")" * 200
    start = time.monotonic()
    grades = grade_many([(rf"\boxed{{{nested}}}", "1"), (r"\boxed{\frac{6}{8}}", "3/4")], timeout_s=1.0)
    assert not grades[0].correct and "timed out" in grades[0].reason
    assert grades[1].correct
    assert time.monotonic() - start < 1.0 + KILL_GRACE_S + 10  # includes starting a worker for the second


# ---- the worker pool's own guarantees, with stand-in workers ------------------------------------------------

# A worker speaking the pool's protocol that hangs on "hang" (ignoring SIGALRM, as stuck C code would) and
# exits on "crash"; otherwise "correct" is string equality.
FAKE_WORKER = """
import json, signal, sys, time
signal.signal(signal.SIGALRM, signal.SIG_IGN)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["answer"] == "hang":
        time.sleep(600)
    if request["answer"] == "crash":
        sys.exit(3)
    print(json.dumps({"correct": request["answer"] == request["reference"]}), flush=True)
"""


def test_a_worker_that_overruns_is_killed_and_the_batch_goes_on():
    pool = GradingPool(workers=1, command=[sys.executable, "-c", FAKE_WORKER])
    try:
        start = time.monotonic()
        verdicts = pool.judge([("hang", "1"), ("1", "1"), ("2", "3")], timeout_s=0.5)
        elapsed = time.monotonic() - start
    finally:
        pool.close()
    assert not verdicts[0].correct and "killed" in verdicts[0].reason
    assert [v.correct for v in verdicts[1:]] == [True, False]
    assert elapsed < 0.5 + KILL_GRACE_S + 10  # one kill, one fresh worker


def test_a_worker_that_dies_on_an_answer_fails_only_that_answer():
    pool = GradingPool(workers=1, command=[sys.executable, "-c", FAKE_WORKER])
    try:
        verdicts = pool.judge([("crash", "1"), ("4", "4")], timeout_s=5.0)
    finally:
        pool.close()
    assert not verdicts[0].correct and "exited with code 3" in verdicts[0].reason
    assert verdicts[1].correct


def test_a_worker_that_cannot_start_raises_grading_error():
    fatal = 'import json; print(json.dumps({"fatal": "ModuleNotFoundError: no math_verify"}), flush=True)'
    with pytest.raises(GradingError, match="no math_verify"):
        GradingPool(workers=1, command=[sys.executable, "-c", fatal]).judge([("1", "1")])
    with pytest.raises(GradingError, match="before it was ready"):
        GradingPool(workers=1, command=[sys.executable, "-c", "raise SystemExit(2)"]).judge([("1", "1")])
