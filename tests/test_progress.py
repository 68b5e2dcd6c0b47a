"""What `poise run` shows while it runs (app/progress.py): the ETA from measured phase times, lines that are never
cut inside a word, and the live block on a terminal. Synthetic numbers only: nothing here trains or sleeps."""

from __future__ import annotations

import io

import pytest

from app.progress import (
    Progress,
    Running,
    eta_seconds,
    eta_text,
    extra_trainings,
    phase_means,
    phases_left,
    render_block,
    shorten,
)
from poise.bus import InProcBus
from poise.contracts import NodeStatus, RootStatus, RunConfig, RunStatus, WorkPropose, WorkTrain

IMPLEMENT_S, TRAIN_S, EVALUATE_S = 10.0, 100.0, 20.0  # one candidate: 130 s; a further seed: 120 s


def measured(implement: int, train: int, evaluate: int) -> dict[str, float] | None:
    """The phase means after that many phases of the synthetic durations above."""
    counts = {"implement": implement, "train": train, "evaluate": evaluate}
    seconds = {"implement": IMPLEMENT_S * implement, "train": TRAIN_S * train, "evaluate": EVALUATE_S * evaluate}
    return phase_means(seconds, counts)


def test_the_eta_waits_until_every_phase_was_measured_once():
    left = phases_left({NodeStatus.TRAINED: 1}, budget=4, evaluated=0, root_in_flight=True, extra_trainings=4)
    assert eta_seconds(left, measured(1, 1, 0)) is None
    assert eta_text(None) == "ETA after the first candidate"


def test_the_eta_counts_the_roots_seeds_and_the_confirmation_that_elapsed_per_candidate_missed():
    # budget 4, the root trained with 3 seeds, the best confirmed with 2 fresh seeds: after the root's first
    # evaluation, 4 candidates (4 x 130 s), 2 root seeds and 2 confirmation replicates (4 x 120 s) are left.
    left = phases_left({NodeStatus.EVALUATED: 1}, budget=4, evaluated=0, root_in_flight=False, extra_trainings=4)
    assert left == {"implement": 4, "train": 8, "evaluate": 8}
    assert eta_seconds(left, measured(1, 1, 1)) == pytest.approx(4 * 130 + 4 * 120)
    # After the first child: the root's 3 seeds and one child measured; 3 candidates and the confirmation left.
    # Elapsed / evaluated children x children left would say 3 x 500 s and nothing for the confirmation.
    left = phases_left({NodeStatus.REFLECTED: 2}, budget=4, evaluated=1, root_in_flight=False, extra_trainings=2)
    assert eta_seconds(left, measured(2, 4, 4)) == pytest.approx(3 * 130 + 2 * 120)
    assert eta_text(630.0) == "ETA ~0:10:30"


def test_the_eta_counts_only_the_phases_left_of_candidates_in_flight():
    counts = {NodeStatus.REFLECTED: 2, NodeStatus.PROPOSED: 1, NodeStatus.IMPLEMENTED: 1, NodeStatus.TRAINED: 1}
    left = phases_left(counts, budget=5, evaluated=1, root_in_flight=False, extra_trainings=0)
    # 3 in flight (implement+train+evaluate, train+evaluate, evaluate) and 1 not yet proposed
    assert left == {"implement": 2, "train": 3, "evaluate": 4}


def test_a_phases_first_measurement_which_pays_start_up_is_left_out_once_there_are_others():
    seconds = {"implement": 25.0, "train": 115.0 + 2 * 100.0, "evaluate": 20.0}
    counts = {"implement": 1, "train": 3, "evaluate": 1}
    first = {"implement": 25.0, "train": 115.0, "evaluate": 20.0}
    assert phase_means(seconds, counts, first) == {"implement": 25.0, "train": 100.0, "evaluate": 20.0}


def test_the_eta_scales_phase_work_by_the_measured_wall_time_per_second_of_work():
    left = {"implement": 1, "train": 1, "evaluate": 1}
    assert eta_seconds(left, measured(1, 1, 1), wall_per_work_s=0.5) == pytest.approx(65.0)


def test_extra_trainings_are_the_roots_missing_seeds_and_the_confirmation_replicates():
    config = RunConfig(run_id="r", budget=4, root_seeds=3, replicate_seeds=2)

    def status(root_scores: list[float]) -> RunStatus:
        root = RootStatus(node_id="n000", status=NodeStatus.REFLECTED, scores=root_scores)
        return RunStatus.model_construct(root=root, best=None)

    assert extra_trainings(status([]), config) == 2 + 2  # the root not evaluated yet: 2 more of its seeds
    assert extra_trainings(status([0.4]), config) == 2 + 2
    assert extra_trainings(status([0.4, 0.5, 0.45]), config) == 2


def test_a_long_rationale_is_shortened_at_a_word_boundary():
    rationale = "Swaps agg:token-mean for agg:seq-mean-token-sum-norm: " + "divide by a constant horizon " * 10
    short = shorten(rationale, 80)
    assert len(short) <= 80 and short.endswith("…")
    assert rationale.startswith(short[:-1]) and rationale[len(short) - 1] == " "  # the cut falls between words
    assert shorten("short enough", 80) == "short enough"


def test_the_block_shows_each_phase_a_training_bar_and_fits_the_width():
    running = [Running("train", "n003", step=2, steps=4), Running("train", "n000", replicate=1, step=0, steps=4),
               Running("evaluate", "n002")]
    lines = render_block(running, {"implement": 1}, evaluated=2, budget=6, timing="elapsed 0:01:00 · ETA ~0:02:00",
                         best="leader n002 0.4000 (1 seed)", width=200)
    assert lines[0].split() == ["implement", "—", "(+1", "waiting)"]
    assert "n003 █████░░░░░ 2/4" in lines[1] and "n000 r1 ░░░░░░░░░░ 0/4" in lines[1]
    assert lines[2].split() == ["evaluate", "n002"]
    assert "2/6" in lines[4] and "ETA ~0:02:00" in lines[4]
    assert lines[5].split() == ["best", "leader", "n002", "0.4000", "(1", "seed)"]
    assert all(len(line) <= 39 for line in render_block(running, {}, 2, 6, "x" * 100, "y" * 100, width=40))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_event_lines_scroll_above_a_block_that_is_redrawn_in_place(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    bus = InProcBus()
    bus.publish(WorkTrain(run_id="r", node_id="n001", source="x", protocol="tiny", seed=0))
    config = RunConfig(run_id="r", budget=3, protocol="tiny")
    stream = Terminal()
    progress = Progress(stream, store=None, config=config, clock=None, bus=bus)  # type: ignore[arg-type]
    progress.say("n001 proposed: " + "a rationale of many words " * 6)
    progress.say("n001 verified after 1 attempt(s)")
    progress.close()
    out = stream.getvalue()
    first, second = out.split("\r\x1b[2K" + "\x1b[1A\x1b[2K" * 4)[:2]  # the block's 5 lines erased
    assert "(+1 waiting)" in first and "0/3" in first and "ETA after the first candidate" in first
    assert all(len(line) <= 79 for line in first.splitlines())
    assert second.startswith("[0:00:00] n001 verified")
    assert out.endswith("\r\x1b[2K" + "\x1b[1A\x1b[2K" * 4)  # a finished run leaves no block behind


def test_without_a_terminal_lines_are_plain_and_never_wrapped():
    stream = io.StringIO()
    progress = Progress(stream, store=None, config=RunConfig(run_id="r"), clock=None)  # type: ignore[arg-type]
    long = "n001 proposed: " + "word " * 80
    progress.say(long)
    progress.close()
    assert stream.getvalue() == f"[0:00:00] {long}\n"


def test_the_status_line_counts_the_candidates_and_the_work_in_flight_per_phase():
    bus = InProcBus()
    ids = {"run_id": "r", "seed": 0, "protocol": "tiny", "source": "x"}
    progress = Progress(None, store=None, config=RunConfig(run_id="r"), clock=None, bus=bus)  # type: ignore[arg-type]
    status = RunStatus.model_construct(counts={NodeStatus.IMPLEMENTED: 2, NodeStatus.REFLECTED: 4})
    seen = []
    bus.subscribe("work.train", lambda work: seen.append(progress._in_flight(status)))
    bus.subscribe("work.propose", lambda work: None)
    bus.publish(WorkTrain(node_id="n005", **ids))
    bus.publish(WorkTrain(node_id="n006", **ids))
    bus.publish(WorkPropose(run_id="r", node_id="n007"))
    bus.step()
    assert seen == ["in flight: 3 candidate(s) — propose 0 (+1 waiting), train 1 (+1 waiting)"]
    assert Progress(None, None, RunConfig(run_id="r"), None, bus=InProcBus())._in_flight(  # type: ignore[arg-type]
        RunStatus.model_construct(counts={})) == "in flight: 0 candidate(s)"
