"""The testbed end to end on the tiny protocol: sandboxed RL training, evaluation, determinism, aborts."""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import pytest

from app.bench import NAN_CANDIDATE, sign_flipped_grpo
from evaluator.testbed import evaluate_checkpoint
from poise.algorithms import reference_algorithm
from poise.bus import InProcBus
from poise.contracts import EvtTrained, WorkTrain
from poise.sandbox import SandboxLimits
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol, protocol_from_dict
from trainer.service import TrainerService
from trainer.testbed_runner import STALL_S, START_WALL_S, STEP_WALL_S, train_candidate, training_limits

TINY = get_protocol("tiny")
GRPO = reference_algorithm("grpo").source()


@pytest.fixture(scope="module")
def base() -> Path:
    return base_checkpoint()


@pytest.fixture(scope="module")
def grpo_run(base, tmp_path_factory):
    steps = []
    outcome = train_candidate(GRPO, TINY, 7, base, tmp_path_factory.mktemp("grpo"), on_step=steps.append)
    return outcome, steps


def without_timings(trajectory) -> list[dict]:
    timing = {"step_time_s", "sample_s", "update_s"}
    rows = []
    for step in trajectory.steps:
        row = step.model_dump(exclude={"step_time_s"})
        row["extra"] = {k: v for k, v in row["extra"].items() if k not in timing}
        rows.append(row)
    return rows


def test_tiny_training_produces_a_full_trajectory_and_checkpoint(grpo_run):
    outcome, streamed = grpo_run
    assert outcome.failure is None, outcome.detail
    trajectory = outcome.trajectory
    assert len(trajectory.steps) == TINY.steps and not trajectory.aborted
    assert [s.step for s in streamed] == [0, 1, 2]  # progress arrives while the child runs
    for step in trajectory.steps:
        for metric in ("reward_mean", "format_valid_rate", "entropy", "response_length", "kl", "grad_norm",
                       "clip_frac", "adv_mean", "adv_std", "step_time_s"):
            assert getattr(step, metric) is not None, metric
        assert 0.0 <= step.reward_mean <= 1.0 and step.entropy > 0 and step.kl > -1e-6  # k3 >= 0 up to rounding
    assert trajectory.steps[0].kl == pytest.approx(0.0, abs=1e-3)  # step 0 samples from the base itself
    assert (outcome.checkpoint / "model.safetensors").exists()


def test_evaluation_reports_six_weighted_suites_with_intervals(grpo_run):
    outcome, _ = grpo_run
    evaluation, stats = evaluate_checkpoint(outcome.checkpoint, TINY, seed=0)
    assert len(evaluation.suites) == 6
    assert sum(r.weight for r in evaluation.suites.values()) == pytest.approx(1.0)
    kinds = sorted(r.kind.value for r in evaluation.suites.values())
    assert kinds == ["acc@1"] * 4 + ["pass@k"] * 2
    overall = sum(r.weight * r.value for r in evaluation.suites.values())
    assert evaluation.overall == pytest.approx(overall)
    low, high = evaluation.overall_ci
    assert low <= evaluation.overall <= high
    assert evaluation.mean_length > 0 and stats.generated_tokens > 0


def test_the_selection_and_reporting_halves_score_disjoint_halves_of_each_suite(grpo_run):
    outcome, _ = grpo_run
    full, _ = evaluate_checkpoint(outcome.checkpoint, TINY, seed=0)
    halves = {half: evaluate_checkpoint(outcome.checkpoint, TINY, seed=0, half=half)[0]
              for half in ("selection", "reporting")}
    assert full.half == "all" and {h: e.half for h, e in halves.items()} == {"selection": "selection",
                                                                             "reporting": "reporting"}
    for name, result in full.suites.items():
        parts = [halves[h].suites[name].n_prompts for h in ("selection", "reporting")]
        assert sum(parts) == result.n_prompts and abs(parts[0] - parts[1]) <= 1
    assert halves["selection"].overall != halves["reporting"].overall  # different problems, different scores


def test_same_candidate_protocol_and_seed_give_identical_results(grpo_run, base, tmp_path):
    outcome, _ = grpo_run
    again = train_candidate(GRPO, TINY, 7, base, tmp_path / "again")
    assert without_timings(again.trajectory) == without_timings(outcome.trajectory)
    first, _ = evaluate_checkpoint(outcome.checkpoint, TINY, seed=3)
    second, _ = evaluate_checkpoint(again.checkpoint, TINY, seed=3)
    assert first == second


def test_a_fresh_interpreter_and_the_fork_server_train_identically(grpo_run, base, tmp_path, monkeypatch):
    """The fork server (poise.forkserver) only saves start-up time: a child started the old way, as a fresh
    `python -I -m`, trains the same candidate to the same trajectory and weights."""
    outcome, _ = grpo_run
    monkeypatch.setenv("POISE_SANDBOX_FORK_SERVER", "0")
    fresh = train_candidate(GRPO, TINY, 7, base, tmp_path / "fresh")
    assert without_timings(fresh.trajectory) == without_timings(outcome.trajectory)
    assert (fresh.checkpoint / "model.safetensors").read_bytes() == \
        (outcome.checkpoint / "model.safetensors").read_bytes()


def test_another_seed_gives_another_trajectory(grpo_run, base, tmp_path):
    outcome, _ = grpo_run
    other = train_candidate(GRPO, TINY, 8, base, tmp_path / "other")
    assert without_timings(other.trajectory) != without_timings(outcome.trajectory)


def test_non_finite_loss_aborts_with_a_clear_reason(base, tmp_path):
    outcome = train_candidate(NAN_CANDIDATE, TINY.replace(steps=50), 0, base, tmp_path)
    assert outcome.trajectory.aborted
    assert "non-finite loss" in outcome.trajectory.abort_reason
    assert len(outcome.trajectory.steps) == 0  # stopped inside the first step, not after 50


def test_sign_flipped_control_is_a_valid_candidate(base, tmp_path):
    outcome = train_candidate(sign_flipped_grpo(), TINY, 0, base, tmp_path)
    assert outcome.failure is None and outcome.trajectory.steps[-1].adv_mean is not None


def test_candidate_exception_is_reported_with_its_line(base, tmp_path):
    source = GRPO.replace("    return common.group_normalized_advantages(batch)\n",
                          "    raise RuntimeError('boom')\n")
    outcome = train_candidate(source, TINY, 0, base, tmp_path)
    assert outcome.failure is not None and outcome.checkpoint is None
    line = source.splitlines().index("    raise RuntimeError('boom')") + 1
    assert outcome.failure == f'RuntimeError at line {line} of the candidate: "boom"'


def hostile(body: str) -> str:
    """GRPO whose advantage function first runs `body` (indented into the function)."""
    indented = "".join(f"    {line}\n" for line in body.strip().splitlines())
    return GRPO.replace("def compute_advantages(batch):\n", "def compute_advantages(batch):\n" + indented)


def test_candidate_cannot_read_the_parents_secrets(base, tmp_path, monkeypatch):
    monkeypatch.setenv("POISE_FAKE_SECRET", "sk-fake-123456")
    outcome = train_candidate(hostile("import os\nraise RuntimeError('env:' + repr(sorted(os.environ)))"),
                              TINY, 0, base, tmp_path)
    assert "env:" in outcome.failure and "POISE_FAKE_SECRET" not in outcome.failure
    assert "sk-fake" not in outcome.failure + outcome.detail


def test_candidate_cannot_reach_the_network(base, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    outcome = train_candidate(hostile(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"),
                              TINY, 0, base, tmp_path)
    server.close()
    # the audit hook blocks and names it (poise/sandbox_audit.py); the network namespace would refuse it anyway
    assert outcome.failure == f"attempted to connect to `127.0.0.1:{port}`: blocked", outcome.failure
    assert not accepted


def test_runaway_candidate_is_killed_at_the_deadline(base, tmp_path):
    outcome = train_candidate("while True:\n    pass\n" + GRPO, TINY, 0, base, tmp_path,
                              limits=SandboxLimits(wall_s=20))
    # the deadline as configured, however long the kill took on a loaded machine, and where the child was
    assert outcome.failure == "killed at the 20 s wall-clock deadline while importing the candidate"
    assert outcome.trajectory.aborted


def test_a_hung_candidate_is_killed_by_the_stall_deadline_long_before_the_wall_deadline(base, tmp_path):
    outcome = train_candidate(hostile("while True:\n    pass"), TINY, 0, base, tmp_path,
                              limits=SandboxLimits(wall_s=300, stall_s=6))
    assert outcome.failure.startswith("killed after 6 s without progress") and outcome.trajectory.aborted
    assert outcome.wall_s < 60


def test_default_training_limits_scale_with_steps_and_stop_a_stall():
    limits = training_limits(get_protocol("default"))
    assert limits.wall_s == STEP_WALL_S * get_protocol("default").steps + START_WALL_S and limits.stall_s == STALL_S
    assert limits.wall_s > 5 * limits.stall_s  # a slow run is spared, a hung one dies in minutes


def test_the_trainer_services_wall_limit_setting_reaches_the_sandbox(tmp_path):
    """POISE_TRAIN_WALL_S (TrainerService wall_s) replaces the step-scaled default deadline, not the stall one."""
    assert TrainerService(InProcBus(), tmp_path).limits(TINY) == training_limits(TINY)
    assert TrainerService(InProcBus(), tmp_path, wall_s=8).limits(TINY) == SandboxLimits(wall_s=8, stall_s=STALL_S)
    bus = InProcBus()
    trained: list[EvtTrained] = []
    bus.subscribe(EvtTrained.subject, trained.append)
    service = TrainerService(bus, tmp_path, wall_s=8)
    service.handle(WorkTrain(run_id="r", node_id="n001", source="while True:\n    pass\n" + GRPO, protocol="tiny",
                             seed=0))
    while bus.step():
        pass
    (event,) = trained
    assert event.trajectory.aborted
    # the configured deadline; where the child was, unless the deadline came before it loaded the candidate
    assert re.fullmatch(r"killed at the 8 s wall-clock deadline( while importing the candidate)?",
                        event.trajectory.abort_reason), event.trajectory.abort_reason
    assert event.trajectory.checkpoint_uri is None


def test_huge_allocation_fails_inside_the_sandbox(base, tmp_path):
    outcome = train_candidate(hostile("blob = bytearray(64 << 30)"), TINY, 0, base, tmp_path)
    assert outcome.failure is not None and "MemoryError" in outcome.failure


def test_protocol_round_trips_through_json():
    import json

    for name in ("default", "ema", "iterate", "tiny"):
        protocol = get_protocol(name)
        assert protocol_from_dict(json.loads(json.dumps(protocol.as_dict()))) == protocol


def test_policy_ema_averages_the_weights_without_changing_training(base, tmp_path):
    import safetensors.torch
    import torch

    one_step = TINY.replace(steps=1)
    plain = train_candidate(GRPO, one_step, 5, base, tmp_path / "plain")
    averaged = train_candidate(GRPO, one_step.replace(policy_ema=0.75), 5, base, tmp_path / "ema")
    assert plain.failure is None and averaged.failure is None, (plain.detail, averaged.detail)
    assert without_timings(averaged.trajectory) == without_timings(plain.trajectory)  # training runs on the iterate
    weights = {name: safetensors.torch.load_file(str(path / "model.safetensors"))
               for name, path in (("base", base), ("plain", plain.checkpoint), ("ema", averaged.checkpoint))}
    moved = 0
    for key, base_weight in weights["base"].items():
        expected = 0.75 * base_weight + 0.25 * weights["plain"][key]
        torch.testing.assert_close(weights["ema"][key], expected, atol=1e-7, rtol=1e-6)
        moved += int(not torch.equal(weights["plain"][key], base_weight))
    assert moved > 0  # the step changed the weights, so the average is not trivially the base


def test_policy_ema_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="policy_ema"):
        TINY.replace(policy_ema=1.0)
