"""Contracts: every model survives JSON, messages encode/decode by subject, invariants are enforced."""

import hashlib
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ValidationError

from poise import contracts
from poise.contracts import (
    EVENT_STATUS,
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    NEXT_STATUS,
    Backends,
    CheckResult,
    ContractError,
    Cost,
    Effect,
    Evaluation,
    EvtEvaluated,
    EvtFailed,
    EvtImplemented,
    EvtProposed,
    EvtReflected,
    EvtTrained,
    Failure,
    Genealogy,
    Implementation,
    LossAggMode,
    MechanismEffect,
    MechanismSpec,
    Message,
    MetricKind,
    Node,
    NodeStatus,
    Objective,
    Phase,
    Proposal,
    Reflection,
    RunConfig,
    SelectionWeights,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
    VerificationAttempt,
    WorkEvaluate,
    WorkImplement,
    WorkPropose,
    WorkReflect,
    WorkTrain,
    can_transition,
    decode,
    encode,
    parse_llm_spec,
)

RUN = "run-2024-vm"
SOURCE = """LOSS_AGG_MODE = "token-mean"
HPARAMS = {"clip_eps": 0.2, "var_floor": 1e-4}

def compute_advantages(batch):
    scores = batch["scores"] * batch["format_valid"]
    return scores - batch["group_mean_score"]

def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    ratio = (log_prob - old_log_prob).exp()
    return -(ratio * advantages[:, None]) * response_mask
"""


# ------------------------------------------------------------------------------------------ factories


def make_genealogy() -> Genealogy:
    return Genealogy(run_id=RUN, node_id="n0007", parent_ids=["n0003"], depth=2, ancestors=["n0000", "n0003"])


def make_mechanism() -> MechanismSpec:
    return MechanismSpec(name="analytic_variance_scaling", params={"var_floor": 1e-4, "per_group": True})


def make_proposal() -> Proposal:
    return Proposal(
        name="VM-AV-GRPO",
        rationale="Scale advantages by the analytic Bernoulli variance and mask format-invalid samples.",
        mechanisms=[make_mechanism(), MechanismSpec(name="validity_mask", params={"mode": "zero"})],
        hparams={"clip_eps": 0.2, "group_size": 8, "loss": "token-mean", "kl": False},
        loss_agg_mode=LossAggMode.TOKEN_MEAN,
        directive="improve Overall",
        generator="claude-sonnet-4",
        parent_ids=["n0003"],
        screening="parent n0003: best VM-AV-GRPO (EI 0.012), 3 passed; rejected grpo@eps=1e-07: novelty: ...",
    )


def make_check() -> CheckResult:
    return CheckResult(name="advantage_shape", passed=True, message="(8,) as expected")


def make_attempt() -> VerificationAttempt:
    return VerificationAttempt(attempt=2, source=SOURCE, passed=True, checks=[make_check()], duration_s=1.7, error=None)


def make_implementation() -> Implementation:
    failed = VerificationAttempt(
        attempt=1,
        source="def compute_advantages(batch): return batch",
        passed=False,
        checks=[CheckResult(name="advantage_shape", passed=False, message="got (8, 37), want (8,)")],
        duration_s=0.9,
        error="ShapeError",
    )
    return Implementation.from_source(SOURCE, attempts=[failed, make_attempt()], verified=True)


def make_step(step: int = 10) -> TrainingStep:
    return TrainingStep(
        step=step,
        reward_mean=0.41,
        format_valid_rate=0.97,
        entropy=0.62,
        response_length=212.5,
        kl=0.0031,
        grad_norm=0.84,
        clip_frac=0.012,
        adv_mean=0.0,
        adv_std=0.93,
        step_time_s=3.2,
        extra={"valid_mask_frac": 0.97},
    )


def make_trajectory() -> TrainingTrajectory:
    steps = [make_step(0), make_step(1), TrainingStep(step=2, reward_mean=0.45)]
    return TrainingTrajectory(
        protocol="testbed-v1",
        seed=17,
        steps=steps,
        aborted=False,
        abort_reason=None,
        checkpoint_uri="file:///var/poise/ckpt/run-2024-vm/n0007",
        wall_s=412.0,
    )


def make_stop_rule() -> contracts.EarlyStopRule:
    checkpoint = contracts.StopCheckpoint(step=10, intercept=-0.002, slope=0.21, residual_sd=0.011, x_mean=-0.01,
                                          sxx=0.4, n=23)
    return contracts.EarlyStopRule(protocol="default", steps=40, checkpoints=[checkpoint], source="23 pairs of run r")


def make_stop_plan() -> contracts.EarlyStopPlan:
    return contracts.EarlyStopPlan(rule=make_stop_rule(), parent_id="n0003", parent_curve=[0.3, None, 0.5],
                                   parent_utility=0.61, noise_sd=0.008)


def make_early_stop() -> contracts.EarlyStop:
    return contracts.EarlyStop(steps_run=10, steps_planned=40, parent_id="n0003", parent_utility=0.61, gap=-0.2,
                               predicted=0.55, probability=0.01, reason="stopped after 10 of 40 steps")


def make_suite(suite: str = "aime25", kind: MetricKind = MetricKind.PASS_AT_K, k: int = 32) -> SuiteResult:
    return SuiteResult(
        suite=suite,
        kind=kind,
        k=k,
        value=0.433,
        ci_low=0.27,
        ci_high=0.6,
        n_prompts=30,
        n_samples=960,
        mean_length=1874.0,
        format_valid_rate=0.99,
        weight=0.2,
    )


def make_evaluation(seed: int = 1) -> Evaluation:
    return Evaluation(
        suites={"aime25": make_suite(), "math500": make_suite("math500", MetricKind.ACC_AT_1, 1)},
        overall=0.525,
        overall_ci=(0.51, 0.54),
        mean_length=1320.0,
        seed=seed,
        utility=0.525,
        constraints_satisfied=True,
    )


def make_effect() -> MechanismEffect:
    return MechanismEffect(
        mechanism="validity_mask",
        effect=Effect.HELPED,
        confidence=0.7,
        evidence="format_valid_rate rose 0.91 → 0.99; reward variance fell",
    )


def make_reflection() -> Reflection:
    return Reflection(
        text="Analytic variance scaling stabilised KL; the mask removed gradient from invalid samples.",
        effects=[make_effect()],
        diagnoses=["KL spikes at step 40 trace to near-zero group variance"],
        generator="offline",
    )


def make_failure() -> Failure:
    return Failure(phase=Phase.TRAIN, reason="loss became nan at step 12", detail="Traceback ...\n...")


def make_cost() -> Cost:
    return Cost(
        phase_seconds={Phase.IMPLEMENT: 4.0, Phase.TRAIN: 412.0},
        llm_input_tokens=12000,
        llm_output_tokens=3400,
        llm_usd=0.09,
    )


def make_call_record() -> contracts.CallRecord:
    return contracts.CallRecord(
        provider="anthropic", model="claude-sonnet-4-6", operator="propose", mode="tool", attempt=2, retries=1,
        input_tokens=1200, output_tokens=640, cache_read_tokens=9000, cache_write_tokens=0, latency_s=7.5,
        cost_usd=0.0163, stop_reason="tool_use", ok=True,
    )  # fmt: skip


def make_node() -> Node:
    return Node(
        genealogy=make_genealogy(),
        status=NodeStatus.REFLECTED,
        proposal=make_proposal(),
        implementation=make_implementation(),
        trajectory=make_trajectory(),
        evaluation=make_evaluation(),
        replicates=[make_evaluation(seed=2), make_evaluation(seed=3)],
        reflection=make_reflection(),
        failure=None,
        cost=make_cost(),
        created_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        updated_at=datetime(2025, 3, 1, 12, 9, tzinfo=UTC),
    )


def make_failed_node() -> Node:
    return Node(
        genealogy=make_genealogy(),
        status=NodeStatus.FAILED,
        proposal=make_proposal(),
        implementation=make_implementation(),
        failure=make_failure(),
    )


def make_run_config() -> RunConfig:
    return RunConfig(
        run_id=RUN,
        budget=64,
        parallel=3,
        population_size=6,
        root_seeds=2,
        seed=7,
        protocol="testbed-v1",
        objective=Objective(kind="length", accuracy_tolerance=0.02, directive="reduce length"),
        weights=SelectionWeights(div=0.7, top_k=5),
        backends=Backends(trainer="verl", evaluator="vllm", store="mongo", bus="nats", llm="anthropic:m"),
    )


def make_screening() -> contracts.ScreeningSummary:
    return contracts.ScreeningSummary(
        parent_id="n0003", acquisition="ei", threshold=0.05,
        winner=contracts.ScreeningMerits(name="VM-AV-GRPO", expected_improvement=0.012, predicted_mean=0.01,
                                         predicted_std=0.004, llm_score=0.8, nearest_id="n0003", distance=0.31),
        passed=2,
        rejections=[contracts.Rejection(proposal_name="grpo@eps=1e-07", stage="novelty", reason="behaves like n0000",
                                        nearest_id="n0000", distance=0.001)],
        skipped={"p~median": "new mechanisms scale:median_abs_dev (the LLM coder implements them)"},
        screened_by="screened by the offline gates", parent_utility=0.4213,
    )


def make_screened_proposal() -> Proposal:
    return make_proposal().model_copy(update={"screening": make_screening()})


def make_limits() -> contracts.SandboxLimits:
    return contracts.SandboxLimits(wall_s=120.0, stall_s=30.0, memory_bytes=2 << 30)


def make_train_report() -> contracts.TrainReport:
    return contracts.TrainReport(status="ok", trajectory=make_trajectory(), isolation=["no seccomp filter (EPERM)"])


def make_report_status() -> contracts.ReportStatus:
    """The report of a best against GRPO with one ablation (archive/status.py report_status builds these)."""
    arm = contracts.ArmStatus(arm="best", seeds=[100003, 101003], overall=[0.46, 0.48], mean=0.47, ci_low=0.34,
                              ci_high=0.60, mean_length=80.5)
    return contracts.ReportStatus(
        half="reporting", arms=[arm, arm.model_copy(update={"arm": "grpo", "overall": [0.44, 0.45], "mean": 0.445})],
        paired_seeds=2, gain=0.025, gain_interval=(-0.01, 0.06), p=0.2, length_change=-3.5,
        verdict="indistinguishable from GRPO on the reporting half over 2 fresh seeds (paired t p = 0.20)",
        contributions=[contracts.Contribution(difference="minus:scale:none", arm="grpo", seeds=2, gain=0.025,
                                              interval=(-0.01, 0.06), p=0.2)])


def make_run_status() -> contracts.RunStatus:
    """Where a run stands, every optional part present (archive/status.py builds these)."""
    spend = contracts.OperatorSpend(calls=3, failed=1, unpriced=0, usd=0.042)
    return contracts.RunStatus(
        run_id=RUN, protocol="tb-v1", seed=0,
        counts={status: i for i, status in enumerate(NodeStatus)},
        budget=contracts.BudgetStatus(total=64, evaluated=12, parallel=3), depth=4,
        root=contracts.RootStatus(node_id="n000", status=NodeStatus.REFLECTED, scores=[0.41, 0.43, 0.40], mean=0.413,
                                  sd=0.015, n=3, ci_low=0.375, ci_high=0.451),
        objective=contracts.ObjectiveStatus(kind="length", accuracy_tolerance=0.01, description="shorter answers"),
        best=contracts.BestStatus(node_id="n007", name="VM-AV-GRPO", mechanisms=["scale:analytic_variance"],
                                  utility=0.45, interval=(0.42, 0.48), seeds=3, scores=[0.44, 0.46, 0.45],
                                  selection_score=0.47, confirmed=True, gain_over_root=0.037, p_vs_root=0.01,
                                  verdict="better than GRPO (Welch p = 0.010)", overall=0.45, mean_length=88.5,
                                  constraints_satisfied=True, report=make_report_status()),
        leader=contracts.LeaderStatus(node_id="n009", name="grpo+kl", utility=0.47, seeds=1),
        llm=contracts.LlmSpendStatus(agents={"propose": "anthropic:m"}, calls=3, usd=0.042, unpriced_calls=0,
                                     cap_usd=20.0, per_operator={"propose": spend}),
        constraints=contracts.ConstraintsStatus(satisfied=["n007"], violated=["n009"]),
    )


DOCUMENT_FACTORIES: dict[str, Callable[[], BaseModel]] = {
    "genealogy": make_genealogy,
    "mechanism": make_mechanism,
    "proposal": make_proposal,
    "check": make_check,
    "attempt": make_attempt,
    "implementation": make_implementation,
    "step": make_step,
    "trajectory": make_trajectory,
    "stopped_trajectory": lambda: make_trajectory().model_copy(update={"checkpoint_uri": None,
                                                                       "stopped_early": make_early_stop()}),
    "stop_checkpoint": lambda: make_stop_rule().checkpoints[0],
    "stop_rule": make_stop_rule,
    "stop_plan": make_stop_plan,
    "early_stop": make_early_stop,
    "suite": make_suite,
    "evaluation": make_evaluation,
    "effect": make_effect,
    "reflection": make_reflection,
    "failure": make_failure,
    "cost": make_cost,
    "call_record": make_call_record,
    "node": make_node,
    "failed_node": make_failed_node,
    "weights": SelectionWeights,
    "objective": Objective,
    "backends": Backends,
    "run_config": make_run_config,
    "rejection": lambda: make_screening().rejections[0],
    "screening_merits": lambda: make_screening().winner,
    "screening": make_screening,
    "screened_proposal": make_screened_proposal,
    "legacy_screening": lambda: contracts.LegacyScreening(note="parent n0003: best VM-AV-GRPO (EI 0.012), 3 passed"),
    "sandbox_limits": make_limits,
    "sandbox_payload": lambda: contracts.SandboxPayload(limits=make_limits()),
    "sandbox_report": lambda: contracts.SandboxReport(isolation=["no PID namespace"], traceback="Traceback ..."),
    "verify_payload": lambda: contracts.VerifyPayload(source=SOURCE, base_path="/ckpt/base", seed=3,
                                                      smoke_protocol={"name": "smoke-tiny", "steps": 3}),
    "verify_report": lambda: contracts.VerifyReport(checks=[make_check()], isolation=[]),
    "fingerprint_payload": lambda: contracts.FingerprintPayload(source=SOURCE, limits=make_limits()),
    "fingerprint_report": lambda: contracts.FingerprintReport(
        checks=[make_check()], loss_agg_mode="token-mean", hparams={"clip_eps": 0.2, "kl": False},
        fingerprint=[0.0, -1.5, math.inf]),
    "train_payload": lambda: contracts.TrainPayload(protocol={"name": "tiny", "steps": 2}, seed=1, source=SOURCE,
                                                    name="n0007", base_path="/ckpt/base", out_dir="/work/n0007"),
    "train_step_event": lambda: contracts.TrainStepEvent(step=make_step()),
    "phase_event": lambda: contracts.PhaseEvent(phase="calling policy_loss"),
    "sandbox_attempt": lambda: contracts.SandboxAttempt(kind="process", what="run a shell (`/bin/sh -c id`)"),
    "sandbox_attempt_event": lambda: contracts.SandboxAttemptEvent(
        sandbox_attempt=contracts.SandboxAttempt(kind="network", what="connect to `1.1.1.1:443`")),
    "train_report": make_train_report,
    "probe_payload": lambda: contracts.ProbePayload(code="result = 1", ending="deadline"),
    "probe_report": lambda: contracts.ProbeReport(notes=[], raised="OSError", errno=30, result={"a": [1, "b"]}),
    "run_settings": lambda: contracts.RunSettings(budget=8, objective=Objective(kind="length")),
    "run_request": lambda: contracts.RunRequest(run_id=RUN, budget=8, backends=Backends(llm="anthropic:m")),
    "run_status": make_run_status,
    "budget_status": lambda: make_run_status().budget,
    "root_status": lambda: make_run_status().root,
    "best_status": lambda: make_run_status().best,
    "report_status": make_report_status,
    "arm_status": lambda: make_report_status().arms[0],
    "contribution": lambda: make_report_status().contributions[0],
    "reported_run": lambda: contracts.ReportedRun(arm="minus:clip:dual", evaluation=make_evaluation().model_copy(
        update={"half": "reporting"})),
    "leader_status": lambda: make_run_status().leader,
    "llm_spend_status": lambda: make_run_status().llm,
    "operator_spend": lambda: make_run_status().llm.per_operator["propose"],
    "objective_status": lambda: make_run_status().objective,
    "constraints_status": lambda: make_run_status().constraints,
    "node_score": lambda: contracts.NodeScore(node_id="n007", utility=0.45, replicate_utilities=[0.44, 0.46],
                                              seeds=2, constraints_satisfied=None),
    "run_counters": lambda: contracts.RunCounters(counts={status: 2 for status in NodeStatus}, evaluated=5,
                                                  llm_usd=0.3, max_number=12, depth=4),
}

MESSAGE_FACTORIES: dict[str, Callable[[], Message]] = {
    "work.propose": lambda: WorkPropose(run_id=RUN, node_id="n0008", parent_ids=["n0003", "n0005"], round=4),
    "work.implement": lambda: WorkImplement(run_id=RUN, node_id="n0007", proposal=make_proposal()),
    "work.train": lambda: WorkTrain(run_id=RUN, node_id="n0007", source=SOURCE, protocol="tb-v1", seed=17),
    "work.evaluate": lambda: WorkEvaluate(
        run_id=RUN,
        node_id="n0007",
        checkpoint_uri="file:///ckpt/n0007",
        protocol="tb-v1",
        seed=2,
        replicate=1,
    ),
    "work.reflect": lambda: WorkReflect(run_id=RUN, node_id="n0007", attempt=2, parent_ids=["n0003"]),
    "evt.proposed": lambda: EvtProposed(run_id=RUN, node_id="n0007", proposal=make_proposal()),
    "evt.implemented": lambda: EvtImplemented(run_id=RUN, node_id="n7", implementation=make_implementation()),
    "evt.trained": lambda: EvtTrained(run_id=RUN, node_id="n0007", trajectory=make_trajectory()),
    "evt.evaluated": lambda: EvtEvaluated(run_id=RUN, node_id="n0007", evaluation=make_evaluation()),
    "evt.reflected": lambda: EvtReflected(run_id=RUN, node_id="n0007", reflection=make_reflection()),
    "evt.failed": lambda: EvtFailed(run_id=RUN, node_id="n0007", failure=make_failure()),
}


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", DOCUMENT_FACTORIES)
def test_every_document_round_trips_through_json(name: str) -> None:
    model = DOCUMENT_FACTORIES[name]()
    restored = type(model).model_validate_json(model.model_dump_json())
    assert restored == model


@pytest.mark.parametrize("name", DOCUMENT_FACTORIES)
def test_every_document_round_trips_through_stdlib_json_dicts(name: str) -> None:
    # Stores that hold plain dicts (Mongo, sqlite JSON columns via json.dumps) must also get the model back.
    model = DOCUMENT_FACTORIES[name]()
    as_dict = json.loads(json.dumps(model.model_dump(mode="json")))
    assert type(model).model_validate(as_dict) == model


def test_every_contract_model_has_a_round_trip_factory() -> None:
    tested = {type(factory()) for factory in DOCUMENT_FACTORIES.values()}
    defined = {
        obj
        for obj in vars(contracts).values()
        if isinstance(obj, type)
        and issubclass(obj, contracts.Contract)
        and not issubclass(obj, Message)
        and obj not in (contracts.Contract, contracts.Versioned)
    }
    assert defined - tested == set()


def test_scalar_params_keep_their_json_types() -> None:
    proposal = Proposal.model_validate_json(make_proposal().model_dump_json())
    assert proposal.hparams == {"clip_eps": 0.2, "group_size": 8, "loss": "token-mean", "kl": False}
    assert [type(v) for v in proposal.hparams.values()] == [float, int, str, bool]


def test_full_node_keeps_all_five_parts_and_ids() -> None:
    node = Node.model_validate_json(make_node().model_dump_json())
    assert node.node_id == "n0007" and node.run_id == RUN
    assert None not in (node.proposal, node.implementation, node.trajectory, node.evaluation, node.reflection)
    assert [e.seed for e in node.replicates] == [2, 3]
    assert node.created_at.tzinfo is not None


# ------------------------------------------------------------------------------------------ nan / inf


def diverging_trajectory() -> TrainingTrajectory:
    nan, inf = float("nan"), float("inf")
    steps = [
        make_step(0),
        TrainingStep(step=1, reward_mean=0.1, kl=nan, grad_norm=inf, extra={"ratio_max": -inf}),
    ]
    return TrainingTrajectory(protocol="testbed-v1", seed=3, steps=steps, aborted=True, abort_reason="kl nan")


def assert_diverged(trajectory: TrainingTrajectory) -> None:
    last = trajectory.steps[1]
    assert math.isnan(last.kl)
    assert last.grad_norm == math.inf
    assert last.extra["ratio_max"] == -math.inf
    assert last.entropy is None  # not measured stays None, distinct from nan


def test_nan_and_inf_in_a_trajectory_survive_json() -> None:
    data = diverging_trajectory().model_dump_json()
    assert_diverged(TrainingTrajectory.model_validate_json(data))
    assert_diverged(TrainingTrajectory.model_validate(json.loads(data)))


def test_nan_and_inf_survive_the_bus_and_the_node_document() -> None:
    msg = EvtTrained(run_id=RUN, node_id="n0007", trajectory=diverging_trajectory())
    decoded = decode(msg.subject, encode(msg))
    assert isinstance(decoded, EvtTrained)
    assert_diverged(decoded.trajectory)
    node = make_failed_node().model_copy(update={"trajectory": diverging_trajectory()})
    assert_diverged(Node.model_validate_json(node.model_dump_json()).trajectory)


def test_curve_reads_named_fields_and_extra_metrics() -> None:
    trajectory = make_trajectory()
    assert trajectory.curve("reward_mean") == [0.41, 0.41, 0.45]
    assert trajectory.curve("kl") == [0.0031, 0.0031, None]
    assert trajectory.curve("valid_mask_frac") == [0.97, 0.97, None]
    with pytest.raises(KeyError, match="klx"):
        trajectory.curve("klx")


# ------------------------------------------------------------------------------------------ messages


def test_registry_has_all_eleven_subjects() -> None:
    assert set(MESSAGE_TYPES) == {
        "work.propose", "work.implement", "work.train", "work.evaluate", "work.reflect",
        "evt.proposed", "evt.implemented", "evt.trained", "evt.evaluated", "evt.reflected", "evt.failed",
    }  # fmt: skip
    assert all(cls.subject == subject for subject, cls in MESSAGE_TYPES.items())
    assert set(MESSAGE_FACTORIES) == set(MESSAGE_TYPES)


def test_every_event_moves_the_node_to_a_status() -> None:
    assert set(EVENT_STATUS) == {s for s in MESSAGE_TYPES if s.startswith("evt.")}
    assert EVENT_STATUS["evt.trained"] == NodeStatus.TRAINED
    assert EVENT_STATUS["evt.failed"] == NodeStatus.FAILED


@pytest.mark.parametrize("subject", MESSAGE_TYPES)
def test_every_subject_encodes_and_decodes(subject: str) -> None:
    msg = MESSAGE_FACTORIES[subject]()
    assert msg.subject == subject
    data = encode(msg)
    assert isinstance(data, bytes)
    decoded = decode(subject, data)
    assert type(decoded) is MESSAGE_TYPES[subject]
    assert decoded == msg
    assert decoded.msg_id == msg.msg_id


def test_decode_of_unknown_subject_names_it() -> None:
    with pytest.raises(ContractError, match="work.dance"):
        decode("work.dance", b"{}")


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b'{"run_id": "r", "node_id": "n"}', b"[]"])
def test_decode_of_bad_payload_raises_contract_error_naming_the_subject(data: bytes) -> None:
    with pytest.raises(ContractError, match="work.train"):
        decode("work.train", data)


def test_decode_rejects_a_payload_of_another_subject() -> None:
    data = encode(MESSAGE_FACTORIES["work.train"]())
    with pytest.raises(ContractError, match="evt.trained"):
        decode("evt.trained", data)


def test_contract_error_is_a_value_error() -> None:
    assert issubclass(ContractError, ValueError)


def test_oversize_message_is_refused() -> None:
    msg = WorkTrain(run_id=RUN, node_id="n0007", source="x" * MAX_MESSAGE_BYTES, protocol="p", seed=0)
    with pytest.raises(ContractError, match="work.train"):
        encode(msg)


def test_msg_id_is_deterministic_and_distinguishes_subject_node_attempt_and_replicate() -> None:
    base = WorkReflect(run_id=RUN, node_id="n0007")
    assert base.msg_id == WorkReflect(run_id=RUN, node_id="n0007").msg_id
    others = [
        WorkReflect(run_id=RUN, node_id="n0007", attempt=2),
        WorkReflect(run_id=RUN, node_id="n0008"),
        WorkReflect(run_id="run-other", node_id="n0007"),
        EvtFailed(run_id=RUN, node_id="n0007", failure=make_failure()),
    ]
    ids = [base.msg_id] + [m.msg_id for m in others]
    assert len(set(ids)) == len(ids)
    primary = MESSAGE_FACTORIES["work.evaluate"]().model_copy(update={"replicate": 0})
    replicates = [primary.model_copy(update={"replicate": i}) for i in (1, 2)]
    assert len({primary.msg_id, *(m.msg_id for m in replicates)}) == 3


def test_msg_id_does_not_depend_on_payload() -> None:
    # A redelivered event with a re-run result must still dedupe against the first one.
    first = EvtTrained(run_id=RUN, node_id="n0007", trajectory=make_trajectory())
    again = EvtTrained(run_id=RUN, node_id="n0007", trajectory=diverging_trajectory())
    assert first.msg_id == again.msg_id


# ------------------------------------------------------------------------------------------ validation


def test_extra_fields_are_rejected_in_documents_and_messages() -> None:
    with pytest.raises(ValidationError):
        Proposal.model_validate({**make_proposal().model_dump(), "score": 1.0})
    with pytest.raises(ValidationError):
        TrainingStep(step=0, reward=0.3)  # type: ignore[call-arg]
    payload = json.loads(encode(MESSAGE_FACTORIES["evt.failed"]()))
    payload["priority"] = "high"
    with pytest.raises(ContractError, match="priority"):
        decode("evt.failed", json.dumps(payload).encode())


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (NodeStatus.PROPOSED, NodeStatus.IMPLEMENTED),
        (NodeStatus.IMPLEMENTED, NodeStatus.TRAINED),
        (NodeStatus.TRAINED, NodeStatus.EVALUATED),
        (NodeStatus.EVALUATED, NodeStatus.REFLECTED),
        (NodeStatus.PROPOSED, NodeStatus.FAILED),
        (NodeStatus.EVALUATED, NodeStatus.FAILED),
    ],
)
def test_allowed_transitions(current: NodeStatus, new: NodeStatus) -> None:
    assert can_transition(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (NodeStatus.PROPOSED, NodeStatus.TRAINED),  # skips a phase
        (NodeStatus.EVALUATED, NodeStatus.TRAINED),  # backwards
        (NodeStatus.TRAINED, NodeStatus.TRAINED),  # a repeat is not a transition
        (NodeStatus.REFLECTED, NodeStatus.FAILED),  # terminal
        (NodeStatus.FAILED, NodeStatus.PROPOSED),  # terminal
        (NodeStatus.FAILED, NodeStatus.FAILED),
    ],
)
def test_rejected_transitions(current: NodeStatus, new: NodeStatus) -> None:
    assert not can_transition(current, new)


def test_next_status_walks_the_pipeline_in_order() -> None:
    walk, status = [NodeStatus.PROPOSED], NodeStatus.PROPOSED
    while status in NEXT_STATUS:
        status = NEXT_STATUS[status]
        walk.append(status)
    assert walk == ["proposed", "implemented", "trained", "evaluated", "reflected"]


@pytest.mark.parametrize(
    ("parent_ids", "depth", "ancestors"),
    [
        (["n0003"], 1, ["n0003", "n0007"]),  # its own ancestor
        (["n0007"], 1, ["n0007"]),  # its own parent
        ([], 1, []),  # depth without parents
        (["n0003"], 0, ["n0003"]),  # parents at depth 0
        (["n0003"], 1, []),  # parent missing from ancestors
    ],
)
def test_genealogy_rejects_inconsistent_lineage(parent_ids: list[str], depth: int, ancestors: list[str]) -> None:
    with pytest.raises(ValidationError, match="n0007"):
        Genealogy(run_id=RUN, node_id="n0007", parent_ids=parent_ids, depth=depth, ancestors=ancestors)


def test_genealogy_child_extends_the_lineage_of_all_parents() -> None:
    root = Genealogy(run_id=RUN, node_id="n0000")
    a = Genealogy.child("n0001", [root])
    b = Genealogy.child("n0002", [a])
    child = Genealogy.child("n0003", [b, a])
    assert child.depth == 3
    assert child.parent_ids == ["n0002", "n0001"]
    assert sorted(child.ancestors) == ["n0000", "n0001", "n0002"]
    with pytest.raises(ValueError, match="parent"):
        Genealogy.child("n0004", [])
    with pytest.raises(ValueError, match="different runs"):
        Genealogy.child("n0004", [a, Genealogy(run_id="run-other", node_id="n0009")])


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("offline", ("offline", None, None)),
        ("anthropic:claude-sonnet-4-5", ("anthropic", None, "claude-sonnet-4-5")),
        ("openai:http://localhost:8000/v1#Qwen2.5-7B", ("openai", "http://localhost:8000/v1", "Qwen2.5-7B")),
    ],
)
def test_backends_accept_known_llm_specs(spec: str, parts: tuple[str, str | None, str | None]) -> None:
    assert Backends(llm=spec).llm == spec
    assert parse_llm_spec(spec) == parts


@pytest.mark.parametrize(
    "spec", ["", "gpt-4", "anthropic:", "openai:http://localhost:8000/v1", "openai:localhost#m", "Offline"]
)
def test_backends_reject_unknown_llm_specs(spec: str) -> None:
    with pytest.raises(ValidationError, match="anthropic:<model>"):
        Backends(llm=spec)


def test_implementation_sha256_matches_hashlib() -> None:
    impl = Implementation.from_source(SOURCE)
    assert impl.source_sha256 == hashlib.sha256(SOURCE.encode("utf-8")).hexdigest()
    assert impl.verified is False and impl.attempts == []


@pytest.mark.parametrize("digest", ["0" * 64, "abc", hashlib.sha256(SOURCE.encode()).hexdigest().upper()])
def test_implementation_rejects_a_wrong_or_malformed_sha256(digest: str) -> None:
    with pytest.raises(ValidationError):
        Implementation(source=SOURCE, source_sha256=digest, verified=True)


def test_node_status_guarantees_the_parts_of_the_phases_it_passed() -> None:
    fields = make_node().model_dump()
    with pytest.raises(ValidationError, match="trajectory"):
        Node.model_validate({**fields, "status": "trained", "trajectory": None})
    with pytest.raises(ValidationError, match="failure"):
        Node.model_validate({**fields, "status": "failed"})
    with pytest.raises(ValidationError, match="failure"):
        Node.model_validate({**fields, "failure": make_failure().model_dump()})
    proposed = Node(genealogy=make_genealogy(), proposal=make_proposal())
    assert proposed.status == NodeStatus.PROPOSED and proposed.cost == Cost()


def test_node_rejects_naive_timestamps() -> None:
    with pytest.raises(ValidationError):
        Node(genealogy=make_genealogy(), proposal=make_proposal(), created_at=datetime(2025, 3, 1, 12, 0))


def test_failure_reason_is_kept_to_one_short_line() -> None:
    failure = Failure(phase=Phase.IMPLEMENT, reason="\n  SyntaxError: bad indent\n  line 3\n")
    assert failure.reason == "SyntaxError: bad indent"
    long = Failure(phase=Phase.TRAIN, reason="x" * 1000)
    assert len(long.reason) <= contracts.MAX_REASON_CHARS
    with pytest.raises(ValidationError):
        Failure(phase=Phase.TRAIN, reason=" \n ")


def test_cost_add_sums_phases_and_llm_usage() -> None:
    total = make_cost().add(Cost(phase_seconds={Phase.TRAIN: 8.0, Phase.REFLECT: 2.0}, llm_input_tokens=100))
    assert total.phase_seconds == {Phase.IMPLEMENT: 4.0, Phase.TRAIN: 420.0, Phase.REFLECT: 2.0}
    assert total.llm_input_tokens == 12100 and total.llm_output_tokens == 3400
    assert total.llm_usd == pytest.approx(0.09)
    assert Cost().add(Cost()) == Cost()


def test_suite_result_enforces_metric_ranges() -> None:
    with pytest.raises(ValidationError, match="k=1"):
        make_suite("math500", MetricKind.ACC_AT_1, k=4)
    with pytest.raises(ValidationError):
        SuiteResult.model_validate({**make_suite().model_dump(), "value": 1.3})
    with pytest.raises(ValidationError, match="ci_low"):
        SuiteResult.model_validate({**make_suite().model_dump(), "ci_low": 0.7, "ci_high": 0.6})


def test_evaluation_suites_are_keyed_by_their_own_name() -> None:
    with pytest.raises(ValidationError, match="aime24"):
        Evaluation(suites={"aime24": make_suite("aime25")}, overall=0.5, mean_length=10.0, seed=0)


def test_run_config_defaults_are_usable() -> None:
    config = RunConfig(run_id=RUN)
    assert (config.parents_per_round, config.max_correction_attempts, config.replicate_seeds) == (3, 3, 3)
    assert config.backends == Backends() and config.weights == SelectionWeights()
    assert config.weights.top_k == 3 and config.weights.gamma == 0.8
    with pytest.raises(ValidationError):
        RunConfig(run_id=RUN, budget=0)
    with pytest.raises(ValidationError):
        SelectionWeights(top_k=0)
    with pytest.raises(ValidationError):
        SelectionWeights(div=-0.1)


@pytest.mark.parametrize("bad_id", ["", "has space", "a/b", "-leading-dash"])
def test_ids_are_restricted_to_a_safe_charset(bad_id: str) -> None:
    with pytest.raises(ValidationError):
        WorkReflect(run_id=RUN, node_id=bad_id)


# ------------------------------------------------------------------------------------- Phase I screening


def test_a_proposal_keeps_its_screening_typed_and_its_line_reads_as_before() -> None:
    proposal = Proposal.model_validate_json(make_screened_proposal().model_dump_json())
    screening = proposal.screening
    assert isinstance(screening, contracts.ScreeningSummary)
    assert screening.winner.llm_score == 0.8 and screening.rejections[0].stage == "novelty"
    assert screening.summary() == (
        "parent n0003: best VM-AV-GRPO (LLM screen 0.80, EI 0.012), 2 passed; rejected grpo@eps=1e-07: novelty: "
        "behaves like n0000; offline gates skipped for p~median: new mechanisms scale:median_abs_dev (the LLM coder "
        "implements them); screened by the offline gates; parent utility 0.4213")


def test_a_screening_line_from_an_old_archive_still_reads() -> None:
    line = "parent n0003: best VM-AV-GRPO (EI 0.012), 3 passed; rejected grpo@eps=1e-07: novelty: ..."
    document = json.loads(make_node().model_dump_json())
    document["proposal"]["screening"] = line  # what archives stored before screening was typed
    node = Node.model_validate_json(json.dumps(document))
    assert node.proposal.screening == contracts.LegacyScreening(note=line)
    assert node.proposal.screening.summary() == line
    assert Node.model_validate_json(node.model_dump_json()) == node  # and written again, it reads again
    assert make_proposal().screening.summary() == make_proposal().model_dump()["screening"]["note"]


def test_an_old_sqlite_archive_with_screening_lines_stays_readable(tmp_path) -> None:
    import sqlite3

    from archive.sqlite_store import SQLiteStore

    path = tmp_path / "archive.sqlite"
    with SQLiteStore(path) as store:
        store.put_run(RunConfig(run_id=RUN))
        store.insert_node(make_node())
    document = json.loads(make_node().model_dump_json())
    document["proposal"]["screening"] = "parent n0003: best VM-AV-GRPO (EI 0.012), 3 passed"
    with sqlite3.connect(path) as db:
        db.execute("UPDATE nodes SET doc = ?", (json.dumps(document),))
    with SQLiteStore(path) as store:
        (node,) = store.nodes(RUN)
    assert node.proposal.screening.summary() == "parent n0003: best VM-AV-GRPO (EI 0.012), 3 passed"


# ------------------------------------------------------------------------------------- sandboxed children


def test_sandbox_limits_are_frozen_and_positive() -> None:
    limits = contracts.SandboxLimits()
    assert (limits.wall_s, limits.stall_s, limits.memory_bytes) == (600.0, None, 8 << 30)
    with pytest.raises(ValidationError):
        limits.wall_s = 1.0
    with pytest.raises(ValidationError):
        contracts.SandboxLimits(wall_s=0)


def test_a_run_request_gives_only_the_settings_it_sets_and_refuses_recorded_ones() -> None:
    request = contracts.RunRequest.model_validate({"run_id": RUN, "budget": 8, "objective": {"kind": "length"}})
    assert request.given() == {"budget": 8, "objective": Objective(kind="length").model_dump(mode="json")}
    assert contracts.RunRequest(run_id=RUN).given() == {}
    with pytest.raises(ValidationError, match="protocol_sha256"):
        contracts.RunRequest(run_id=RUN, protocol_sha256="0" * 64)
    # RunConfig = the settings + the run's id + what the archive records; nothing else.
    settings = set(contracts.RunSettings.model_fields)
    assert set(RunConfig.model_fields) == settings | {"run_id", *contracts.RECORDED_SETTINGS}
    assert set(contracts.RunRequest.model_fields) == settings | {"run_id"}


def test_a_payload_refuses_fields_its_child_does_not_know() -> None:
    with pytest.raises(ValidationError, match="smoke"):
        contracts.FingerprintPayload(source=SOURCE, smoke_protocol={})
    payload = contracts.TrainPayload.model_validate_json(FACTORY_JSON["train_payload"])
    assert payload.base_path.is_absolute() and payload.limits == contracts.SandboxLimits()


FACTORY_JSON = {name: DOCUMENT_FACTORIES[name]().model_dump_json() for name in ("train_payload",)}


@pytest.mark.parametrize("report", [
    {"status": "ok", "isolation": []},  # no trajectory
    {"status": "error", "steps": []},  # no reason
    {"status": "candidate_error", "reason": "x", "trajectory": json.loads(make_trajectory().model_dump_json())},
    {"status": "finished", "reason": "x"},
])
def test_a_training_report_says_how_it_ended_consistently(report: dict) -> None:
    with pytest.raises(ValidationError):
        contracts.TrainReport.model_validate(report)


@pytest.mark.parametrize("forged", [
    {"checks": [1]},
    {"checks": [], "fingerprint": "zeros"},
    {"checks": [], "hparams": ["not", "a", "dict"]},
    {"checks": [], "extra": True},
    "not a dict",
    None,
])
def test_a_result_that_does_not_validate_is_a_failed_run_with_the_reason(forged: object) -> None:
    from poise.sandbox import SandboxResult

    run = SandboxResult(returncode=0, wall_s=0.1, result=None)
    run.record_result(forged, contracts.FingerprintReport)
    assert not run.ok and run.result is None
    assert run.failure_reason().startswith("the child printed a result line that is not a valid FingerprintReport")
    run.record_result({"checks": [], "isolation": ["no seccomp filter"]}, contracts.FingerprintReport)
    assert run.ok and run.malformed is None and run.result.isolation == ["no seccomp filter"]


@pytest.mark.parametrize("field", ["budget", "parallel", "parents_per_round", "population_size",
                                   "max_correction_attempts", "root_seeds", "replicate_seeds", "seed"])
def test_run_settings_refuse_integers_mongodb_cannot_store(field):
    """MongoDB stores 8-byte integers: `POST /api/runs` with seed 2**64 was a 500 (OverflowError) there, found by
    the API fuzzer; such settings are refused when they are validated, the same in both stores."""
    with pytest.raises(ValidationError, match=field):
        RunConfig(run_id="r", **{field: 2**64})
    with pytest.raises(ValidationError, match="top_k"):
        SelectionWeights(top_k=2**64)
