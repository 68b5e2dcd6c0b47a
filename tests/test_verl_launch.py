"""The VERL trainer backend without a GPU: the GPU protocol as data and its rendering (checked by VERL's own
config composition and validation), VERL's metrics file as TrainingSteps (written with VERL's FileLogger), the
shared early-abort rules, the process-group launcher (a stand-in for VERL's entry point), the checkpoint for
the evaluator, and the service that books GPU-seconds and fails a node clearly on a machine without GPUs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from archive.service import ROOT_ID, ArchiveService
from archive.sqlite_store import SQLiteStore
from poise.algorithms import reference_algorithm
from poise.bus import InProcBus
from poise.contracts import (
    RESUMABLE_SETTINGS,
    EvtTrained,
    Genealogy,
    Implementation,
    Node,
    NodeStatus,
    Proposal,
    RunConfig,
    TrainingStep,
    TrainingTrajectory,
    WorkPropose,
    WorkTrain,
)
from poise.early_abort import AbortRules, AbortWatch
from trainer.service import CANDIDATE_MODULE, VerlTrainerService
from trainer.verl.launch import ProcessLauncher, hf_checkpoint, latest_actor_dir, merge_command
from trainer.verl.metrics import MetricsError, MetricsTail, training_step
from trainer.verl.protocol import (
    CANDIDATE_ENV,
    ENTRY_MODULE,
    EXTERNAL_MODULES_ENV,
    PLUGIN_MODULE,
    ProtocolError,
    TrainInputs,
    hydra_overrides,
    launch_command,
    load_gpu_protocol,
    parse_gpu_protocol,
    protocol_names,
    validate_overrides,
)

pytestmark = pytest.mark.verl  # the VERL backend (docs/verl.md): runs in CI on this CPU

PAPER = load_gpu_protocol("paper")
GRPO_SOURCE = reference_algorithm("grpo").source()
PAPER_TEXT = (Path(__file__).resolve().parents[1] / "trainer/verl/protocols/paper.toml").read_text()


def inputs_for(tmp_path: Path, **changes) -> TrainInputs:
    values = dict(model_path="/models/Qwen2.5-Math-1.5B", train_files=(str(tmp_path / "data/train.parquet"),),
                  val_files=(str(tmp_path / "data/val,small.parquet"),), candidate_module=CANDIDATE_MODULE,
                  candidate_dir=tmp_path / "node dir/candidate", run_dir=tmp_path / "node dir",
                  experiment_name="r-n001")
    return TrainInputs(**{**values, **changes})


# ------------------------------------------------------------------------------------------- the protocol


def test_the_paper_protocol_holds_the_papers_settings():
    t, r = PAPER.training, PAPER.resources
    assert (t.lr, t.train_batch_size, t.group_size, t.max_prompt_length, t.max_response_length) == \
        (1e-6, 256, 8, 1024, 3000)
    assert t.total_epochs >= 1 and r.gpus == 8 and r.deadline_s > 0
    assert {"paper", "smoke"} <= set(protocol_names())
    assert load_gpu_protocol("smoke").resources.gpus == 1


@pytest.mark.verl
def test_the_rendered_protocol_passes_verls_own_composition_and_validation(tmp_path):
    inputs = inputs_for(tmp_path)
    config = validate_overrides(hydra_overrides(PAPER, inputs))
    actor, rollout = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    assert actor.optim.lr == 1e-6 and config.data.train_batch_size == 256 and rollout.n == 8
    assert config.data.max_prompt_length == 1024 and config.data.max_response_length == 3000
    assert config.trainer.n_gpus_per_node == 8 and config.trainer.total_epochs == PAPER.training.total_epochs
    assert config.algorithm.adv_estimator == "poise" and actor.policy_loss.loss_mode == "poise"
    # the plugin and the candidate reach every Ray process; a path with ',' or ' ' survives Hydra's grammar
    env = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env[EXTERNAL_MODULES_ENV] == PLUGIN_MODULE
    assert env[CANDIDATE_ENV] == str(inputs.candidate_dir / f"{CANDIDATE_MODULE}.py")  # the plugin reads the file
    assert env["VERL_FILE_LOGGER_PATH"] == str(inputs.run_dir / "metrics.jsonl")
    assert str(inputs.candidate_dir) in env["PYTHONPATH"].split(":")
    assert config.data.val_files == inputs.val_files[0]
    assert config.reward.custom_reward_function.path.endswith("trainer/verl/reward.py")
    assert config.reward.custom_reward_function.name == "compute_score"
    assert config.trainer.save_freq > 0, "VERL saves nothing with save_freq -1"
    command = launch_command(PAPER, inputs, python="python")
    assert command[:3] == ["python", "-m", ENTRY_MODULE]


@pytest.mark.verl
@pytest.mark.parametrize("name", protocol_names())
def test_every_shipped_protocol_passes_verls_validation(tmp_path, name):
    protocol = load_gpu_protocol(name)
    config = validate_overrides(hydra_overrides(protocol, inputs_for(tmp_path)))
    assert config.trainer.n_gpus_per_node == protocol.resources.gpus_per_node
    assert config.actor_rollout_ref.rollout.n == protocol.training.group_size


@pytest.mark.verl
@pytest.mark.parametrize(("extra", "says"), [
    ("actor_rollout_ref.actor.loss_agg_mode=nonsense", "Invalid loss_agg_mode"),
    ("actor_rollout_ref.actor.use_dynamic_bsz=False", "ppo_micro_batch_size"),
    ("trainer.no_such_key=1", "Could not override 'trainer.no_such_key'"),
    ("data.train_batch_size=many", "data.train_batch_size must be a number"),
])
def test_verl_refuses_a_rendering_it_cannot_run(tmp_path, extra, says):
    with pytest.raises(ProtocolError, match=says):
        validate_overrides([*hydra_overrides(PAPER, inputs_for(tmp_path)), extra])


@pytest.mark.parametrize(("change", "field"), [
    (("lr = 1e-6", "lr = -1e-6"), "training.lr"),
    (("group_size = 8 ", "groupsize = 8 "), "training.group_size: Field required"),
    (("lr = 1e-6", "lr = 1e-6\nlearning_rate = 1e-6"), "training.learning_rate: Extra inputs are not permitted"),
    (("ppo_mini_batch_size = 256", "ppo_mini_batch_size = 100"), "training: ppo_mini_batch_size 100 must divide"),
    (("gpus_per_node = 8", 'gpus_per_node = "eight"'), "resources.gpus_per_node"),
    (("[abort]", "[abort]\nkl_max = 1"), "abort.kl_max"),
    (('name = "paper"', 'name = "Paper Protocol"'), "name: String should match pattern"),
])
def test_a_broken_protocol_file_is_refused_naming_the_field(change, field):
    old, new = change
    assert old in PAPER_TEXT
    with pytest.raises(ProtocolError, match=f"GPU protocol broken.toml refused: .*{field}"):
        parse_gpu_protocol(PAPER_TEXT.replace(old, new, 1), source="broken.toml")


def test_a_protocol_that_is_not_toml_or_not_there_is_refused_saying_so(tmp_path):
    with pytest.raises(ProtocolError, match="is not valid TOML"):
        parse_gpu_protocol("lr = = 1", source="x.toml")
    with pytest.raises(ProtocolError, match="no GPU protocol 'nope'.*one of paper, smoke"):
        load_gpu_protocol("nope")
    path = tmp_path / "mine.toml"
    path.write_text(PAPER_TEXT.replace('name = "paper"', 'name = "mine"'))
    assert load_gpu_protocol(str(path)).name == "mine"


# ------------------------------------------------------------------------------------------------ metrics


def verl_file_logger(path: Path, monkeypatch):
    """VERL's own file logger, writing to `path` as it does inside a run (VERL_FILE_LOGGER_PATH)."""
    from verl.utils.tracking import FileLogger

    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    return FileLogger(project_name="poise", experiment_name="test")


def verl_metrics(step: int, **overrides) -> dict:
    """One step's metrics with VERL 0.9.1's V1 keys, numpy scalars as VERL logs them."""
    data = {"critic/score/mean": np.float32(0.25 + 0.05 * step), "actor/entropy": np.float32(0.6),
            "response_length/mean": np.float64(812.0), "actor/kl_loss": np.float32(0.001 * step),
            "actor/grad_norm": np.float32(0.4), "actor/pg_clipfrac": np.float32(0.0),
            "critic/advantages/mean": np.float32(0.0), "timing_s/step": 61.5, "actor/lr": 1e-6,
            "poise/format_valid_rate": 0.9, "training/global_step": step, "perf/mfu/actor": np.float32(0.31)}
    data.update(overrides)
    return data


@pytest.mark.verl
def test_verls_file_logger_records_become_the_testbeds_training_steps(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    logger = verl_file_logger(path, monkeypatch)
    tail = MetricsTail(path)
    assert tail.read_new() == []
    logger.log(data=verl_metrics(1), step=1)
    logger.log(data=verl_metrics(2), step=2)
    first, second = tail.read_new()
    assert first.step == 0 and second.step == 1  # VERL counts from 1, the testbed from 0
    assert second.reward_mean == pytest.approx(0.35) and second.entropy == pytest.approx(0.6)
    assert second.response_length == 812.0 and second.kl == pytest.approx(0.002)
    assert second.grad_norm == pytest.approx(0.4) and second.clip_frac == 0.0
    assert second.format_valid_rate == pytest.approx(0.9) and second.step_time_s == 61.5
    assert second.extra["perf/mfu/actor"] == pytest.approx(0.31) and "actor/entropy" not in second.extra
    logger.log(data=verl_metrics(3), step=3)
    assert [s.step for s in tail.read_new()] == [2]  # only what is new
    logger.finish()


def test_a_line_still_being_written_waits_for_the_next_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "data": {"actor/entropy": 0.5}}\n{"step": 2, "da')
    tail = MetricsTail(path)
    assert [s.step for s in tail.read_new()] == [0]
    with path.open("ab") as handle:
        handle.write(b'ta": {"actor/entropy": 0.4}}\n')
    (step,) = tail.read_new()
    assert step.step == 1 and step.entropy == 0.4


def test_a_line_that_is_not_verls_format_is_refused_saying_what_was_expected():
    with pytest.raises(MetricsError, match="not a VERL FileLogger record"):
        training_step({"global_step": 3, "metrics": {}})
    assert training_step({"step": 1, "data": {"actor/entropy": 0.3, "note": "text"}}).extra == {}


@pytest.mark.verl
def test_a_nan_in_verls_log_reaches_the_abort_rules_as_nan(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    logger = verl_file_logger(path, monkeypatch)
    logger.log(data=verl_metrics(1, **{"actor/grad_norm": np.float32("nan")}), step=1)  # orjson writes null
    (step,) = MetricsTail(path).read_new()
    assert math.isnan(step.grad_norm) and step.adv_std is None  # absent: None; present as null: nan
    reason = AbortWatch(PAPER.abort_rules()).observe(step)
    assert reason == "grad_norm is nan at step 0: the run diverged"


def test_the_early_abort_rules_fire_on_collapsed_format_and_kl_as_on_the_testbed():
    rules = AbortRules(kl=2.0, format_valid=0.25, patience=3)
    watch = AbortWatch(rules)
    rates = [0.9, 0.1, 0.1, 0.5, 0.1, 0.0]
    reasons = [watch.observe(TrainingStep(step=i, format_valid_rate=r)) for i, r in enumerate(rates)]
    assert reasons[:5] == [None] * 5  # the 0.5 broke the streak
    assert watch.observe(TrainingStep(step=6, format_valid_rate=0.2)) == (
        "format-valid rate 0.20 below 0.25 for 3 steps (step 6): the policy stopped answering in the required format")
    assert AbortWatch(rules).observe(TrainingStep(step=4, kl=2.5)).startswith(
        "KL to the base model 2.5 exceeds 2.0 at step 4: the policy collapsed")
    assert AbortWatch(rules).observe(TrainingStep(step=1, kl=1.0, format_valid_rate=None)) is None


def test_the_testbed_uses_the_same_rules():
    from poise.testbed.protocol import get_protocol
    from poise.testbed.training import abort_rules

    protocol = get_protocol("default")
    assert abort_rules(protocol) == AbortRules(kl=protocol.abort_kl, format_valid=protocol.abort_format_valid,
                                               patience=protocol.abort_patience)


# ------------------------------------------------------------------------------- the process-group launcher

FAKE_VERL = textwrap.dedent('''
    """A stand-in for `python -m verl.trainer.main_ppo`: logs steps with VERL's FileLogger, saves a checkpoint."""
    import json, os, subprocess, sys, time
    from pathlib import Path
    plan = json.loads(sys.argv[1])
    run_dir = Path(plan["run_dir"])
    if plan.get("grandchild"):   # a Ray worker of the run: must die with the group
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        (run_dir / "grandchild.pid").write_text(str(child.pid))
    plugin = os.environ.pop("VERL_USE_EXTERNAL_MODULES")  # the plugin is not what this stand-in tests
    from verl.utils.tracking import FileLogger
    logger = FileLogger("poise", "x")  # VERL_FILE_LOGGER_PATH from the launcher's environment
    for step, metrics in enumerate(plan["steps"], start=1):
        logger.log(data=metrics, step=step)
        time.sleep(plan.get("step_s", 0.05))
    if plan.get("save"):
        hf = run_dir / "ckpt" / "global_step_2" / "actor" / "huggingface"
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
        (hf / "model.safetensors").write_bytes(b"weights")
        (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    print("env", plugin, os.environ.get("POISE_CANDIDATE_MODULE"))
    print("leaked", sorted(k for k in os.environ if k.startswith("POISE_") and k != "POISE_CANDIDATE_MODULE"
                           or "API_KEY" in k))
    time.sleep(plan.get("linger_s", 0))
    sys.exit(plan.get("exit", 0))
''')


def fake_launcher(tmp_path: Path, gpus: int = 8, **plan) -> ProcessLauncher:
    script = tmp_path / "fake_verl.py"
    script.write_text(FAKE_VERL)
    import json

    def command(protocol, inputs):
        return [sys.executable, str(script), json.dumps({"run_dir": str(inputs.run_dir), **plan})]

    return ProcessLauncher(poll_s=0.05, gpus_available=lambda: gpus, command=command)


GOOD_STEP = {"critic/score/mean": 0.3, "actor/entropy": 0.5, "actor/grad_norm": 0.2, "actor/kl_loss": 0.01,
             "poise/format_valid_rate": 0.9}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.verl
def test_the_launcher_hands_on_each_step_and_books_gpu_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("POISE_NATS_PASSWORD", "the-service's")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "not for candidates")
    launcher = fake_launcher(tmp_path, steps=[GOOD_STEP, GOOD_STEP, GOOD_STEP])
    inputs = inputs_for(tmp_path)
    inputs.run_dir.mkdir(parents=True)
    inputs.metrics_path.write_text('{"step": 9, "data": {}}\n' * 5)  # an earlier attempt's: not this run's
    seen: list[TrainingStep] = []
    outcome = launcher.run(PAPER, inputs, on_step=seen.append)
    assert outcome.failure is None and outcome.aborted is None
    assert [s.step for s in outcome.steps] == [0, 1, 2] and seen == outcome.steps
    assert outcome.gpu_seconds == pytest.approx(outcome.wall_s * 8) and outcome.wall_s > 0
    log = (tmp_path / "node dir" / "verl.log").read_text()
    candidate = inputs.candidate_dir / f"{CANDIDATE_MODULE}.py"
    assert f"env {PLUGIN_MODULE} {candidate}" in log  # the plugin and the candidate reach the run
    assert "leaked []" in log, "the service's settings or keys reached the run's processes"


@pytest.mark.verl
def test_the_launcher_kills_the_whole_group_on_the_deadline(tmp_path):
    short = PAPER.model_copy(update={"resources": PAPER.resources.model_copy(update={"deadline_s": 1.5})})
    launcher = fake_launcher(tmp_path, steps=[GOOD_STEP], linger_s=300, grandchild=True)
    started = time.monotonic()
    outcome = launcher.run(short, inputs_for(tmp_path))
    assert time.monotonic() - started < 30
    assert outcome.failure.startswith("the VERL run passed its deadline of 2 s")
    grandchild = int((tmp_path / "node dir" / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "a process of the run outlived its deadline"


@pytest.mark.verl
def test_a_broken_curve_stops_the_run_early(tmp_path):
    broken = {**GOOD_STEP, "poise/format_valid_rate": 0.0}
    launcher = fake_launcher(tmp_path, steps=[GOOD_STEP, broken, broken, broken], linger_s=300, grandchild=True)
    started = time.monotonic()
    outcome = launcher.run(PAPER, inputs_for(tmp_path))
    assert time.monotonic() - started < 30, "the run was not stopped at the abort"
    assert outcome.failure is None and "stopped answering in the required format" in outcome.aborted
    assert len(outcome.steps) == 4
    assert not alive(int((tmp_path / "node dir" / "grandchild.pid").read_text()))


@pytest.mark.verl
def test_a_crashed_run_fails_with_its_exit_status_and_log(tmp_path):
    outcome = fake_launcher(tmp_path, steps=[GOOD_STEP], exit=3).run(PAPER, inputs_for(tmp_path))
    assert outcome.failure == "the VERL run exited with status 3; the end of verl.log says why"
    assert "env trainer.verl.plugin" in outcome.detail


def test_an_interpreter_that_cannot_start_fails_the_run_naming_the_setting(tmp_path):
    outcome = ProcessLauncher(python=str(tmp_path / "no-python")).run(PAPER, inputs_for(tmp_path))
    assert outcome.failure.startswith("cannot start VERL") and "POISE_VERL_PYTHON" in outcome.failure


# ---------------------------------------------------------------------------------------------- checkpoint


def test_the_checkpoint_is_verls_hf_weights_or_the_merged_shards(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert hf_checkpoint(tmp_path, ckpt)[1].startswith("the VERL run ended without a checkpoint")
    actor = ckpt / "global_step_5" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "huggingface" / "config.json").write_text("{}")  # config + tokenizer only: shards must be merged
    (ckpt / "latest_checkpointed_iteration.txt").write_text("5")
    assert latest_actor_dir(ckpt) == actor
    commands = []

    def merger(argv):
        commands.append(argv)
        target = Path(argv[argv.index("--target_dir") + 1])
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"w")
        return subprocess.CompletedProcess(argv, 0, "", "")

    path, problem = hf_checkpoint(tmp_path, ckpt, python="py", runner=merger)
    assert problem is None and path == tmp_path / "hf"
    assert commands == [merge_command(actor, tmp_path / "hf", "py")]
    assert commands[0][1:5] == ["-m", "verl.model_merger", "merge", "--backend"]
    failing = lambda argv: subprocess.CompletedProcess(argv, 1, "", "KeyError: 'model.embed_tokens'")  # noqa: E731
    path, problem = hf_checkpoint(tmp_path / "other", ckpt, runner=failing)
    assert path is None and "model merger did not write HF weights" in problem and "embed_tokens" in problem


@pytest.mark.verl
def test_verls_model_merger_command_exists():
    done = subprocess.run(merge_command(Path("a"), Path("b"))[:4] + ["--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--local_dir" in done.stdout and "--target_dir" in done.stdout


# ------------------------------------------------------------------------------------------------ service


def verl_service(tmp_path: Path, launcher: ProcessLauncher, bus: InProcBus) -> VerlTrainerService:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.parquet").write_bytes(b"PAR1")
    (data / "val.parquet").write_bytes(b"PAR1")
    return VerlTrainerService(bus, tmp_path / "nodes", PAPER, launcher, "Qwen/Qwen2.5-Math-1.5B",
                              (str(data / "train.parquet"),), (str(data / "val.parquet"),))


def trained(bus: InProcBus, service: VerlTrainerService, work: WorkTrain) -> EvtTrained:
    events: list[EvtTrained] = []
    bus.subscribe(EvtTrained.subject, events.append)
    service.handle(work)
    while bus.step():
        pass
    (event,) = events
    return event


WORK = WorkTrain(run_id="r1", node_id="n001", source="# candidate\n", protocol="default", seed=7)


def test_a_machine_without_gpus_fails_the_node_with_a_clear_reason(tmp_path):
    bus = InProcBus()
    service = verl_service(tmp_path, ProcessLauncher(gpus_available=lambda: 0), bus)
    event = trained(bus, service, WORK)
    trajectory = event.trajectory
    assert trajectory.aborted and trajectory.checkpoint_uri is None and event.gpu_seconds == 0
    assert trajectory.abort_reason.startswith("GPU protocol paper needs 8 GPU(s) and this machine has 0 visible")
    assert "POISE_TRAINER_BACKEND=testbed" in trajectory.abort_reason


def test_missing_data_fails_the_node_naming_the_setting(tmp_path):
    bus = InProcBus()
    service = verl_service(tmp_path, ProcessLauncher(gpus_available=lambda: 8), bus)
    (tmp_path / "data" / "val.parquet").unlink()
    reason = trained(bus, service, WORK).trajectory.abort_reason
    assert reason.startswith("POISE_VERL_VAL_FILES:") and "val.parquet does not exist" in reason


@pytest.mark.verl
def test_the_service_trains_publishes_the_hf_checkpoint_and_books_gpu_seconds(tmp_path):
    bus = InProcBus()
    service = verl_service(tmp_path, fake_launcher(tmp_path, steps=[GOOD_STEP, GOOD_STEP], save=True), bus)
    event = trained(bus, service, WORK)
    trajectory = event.trajectory
    run_dir = tmp_path / "nodes" / "n001" / "train"
    assert not trajectory.aborted and trajectory.protocol == "paper" and trajectory.seed == 7
    assert trajectory.checkpoint_uri == str(run_dir / "ckpt/global_step_2/actor/huggingface")
    assert len(trajectory.steps) == 2 and trajectory.steps[1].reward_mean == pytest.approx(0.3)
    assert event.gpu_seconds == pytest.approx(trajectory.wall_s * 8, rel=0.2) and event.gpu_seconds > 0
    assert (run_dir / "candidate" / f"{CANDIDATE_MODULE}.py").read_text() == WORK.source


# ------------------------------------------------------------------------------------ GPU-seconds and budget


def implemented_child(run_id: str) -> Node:
    from test_agents_config import evaluated_root

    return Node(genealogy=Genealogy.child("n001", [evaluated_root(run_id).genealogy]), status=NodeStatus.IMPLEMENTED,
                proposal=Proposal(name="child", rationale="r", generator="x", parent_ids=[ROOT_ID]),
                implementation=Implementation.from_source(GRPO_SOURCE, [], verified=True))


@pytest.mark.parametrize(("cap_hours", "proposes"), [(2.0, False), (3.0, True), (None, True)])
def test_gpu_seconds_are_booked_on_the_node_and_the_gpu_hours_budget_stops_proposing(tmp_path, cap_hours, proposes):
    from test_agents_config import evaluated_root

    config = RunConfig(run_id="r", budget=4, parallel=2, root_seeds=1, gpu_hours_budget=cap_hours)
    store = SQLiteStore.in_run_dir(tmp_path)
    store.put_run(config)
    store.insert_node(evaluated_root("r"))
    store.insert_node(implemented_child("r"))
    bus = InProcBus()
    proposals: list[WorkPropose] = []
    bus.subscribe(WorkPropose.subject, proposals.append)
    archive = ArchiveService(bus, store, config)
    trajectory = TrainingTrajectory(protocol="paper", seed=0, steps=[TrainingStep(step=0)],
                                    checkpoint_uri="/ckpt/hf")
    archive.handle(EvtTrained(run_id="r", node_id="n001", trajectory=trajectory, gpu_seconds=8 * 900.0))  # 2 h
    assert store.get_node("r", "n001").cost.gpu_seconds == 7200.0
    while bus.step():
        pass
    assert bool(proposals) == proposes
    if not proposes:
        assert archive.state.stop_reason == ("the GPU-hours budget is reached (2.00 of 2 GPU-hours of training); "
                                             "stopped proposing")
    # a restarted archive reads what its nodes booked
    assert ArchiveService(InProcBus(), store, config).gpu_seconds() == 7200.0
    store.close()


def test_poise_run_takes_a_gpu_hours_budget_and_a_resume_may_raise_it():
    from app.cli import build_parser, run_config

    config = run_config(build_parser().parse_args(["run", "--gpu-hours-budget", "64"]), None, "r1")
    assert config.gpu_hours_budget == 64.0
    assert "gpu_hours_budget" in RESUMABLE_SETTINGS
    with pytest.raises(ValidationError):
        RunConfig(run_id="r", gpu_hours_budget=-1)


# ------------------------------------------------------------------------------------- embedded: poise run


def test_poise_run_records_the_trainer_and_refuses_to_switch_it_on_resume():
    from app.cli import build_parser, run_config

    config = run_config(build_parser().parse_args(["run", "--trainer", "verl"]), None, "r1")
    assert config.backends.trainer == "verl"
    with pytest.raises(ValueError, match="the run was trained with 'verl'; --trainer testbed would make its nodes"):
        run_config(build_parser().parse_args(["run", "--trainer", "testbed"]), config, "r1")


def test_an_embedded_run_trains_with_verl_and_a_machine_without_gpus_fails_the_root_saying_why(tmp_path):
    from app.runner import RunError, run
    from trainer.service import VerlTrainerSetup

    config = RunConfig(run_id="r-verl", budget=1, parallel=1, root_seeds=1, protocol="tiny",
                       backends={"trainer": "verl"})
    with pytest.raises(RunError, match="trains with VERL .* `poise run --trainer verl`"):
        run(config, tmp_path / "no-setup")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.parquet", "val.parquet"):
        (data / name).write_bytes(b"PAR1")
    setup = VerlTrainerSetup(PAPER, ProcessLauncher(gpus_available=lambda: 0), "Qwen/Qwen2.5-Math-1.5B",
                             (str(data / "train.parquet"),), (str(data / "val.parquet"),), sys.executable)
    summary = run(config, tmp_path / "run", verl=setup)
    assert summary.stop_reason.startswith("the root (GRPO) failed in train: training left no checkpoint to "
                                          "evaluate (aborted: GPU protocol paper needs 8 GPU(s) and this machine has 0")
