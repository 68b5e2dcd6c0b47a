"""The in-process bus and the implementer's correction loop (no full run)."""

from __future__ import annotations

import threading
import time

import pytest

from implementer.core import CodegenError, OfflineCoder, implement, repair_proposal, sandbox_verifier
from poise.algorithms import reference_algorithm
from poise.bus import InProcBus
from poise.contracts import (
    CheckResult,
    ContractError,
    EvtFailed,
    EvtProposed,
    Failure,
    MechanismSpec,
    Phase,
    Proposal,
    WorkPropose,
    WorkTrain,
)
from poise.description.codegen import compile_proposal
from poise.description.proposals import root_proposal
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol

IDS = {"run_id": "r", "node_id": "n001"}


# ------------------------------------------------------------------------------------------------ bus


def test_bus_drops_a_republished_message_and_keeps_distinct_attempts():
    bus = InProcBus()
    seen = []
    bus.subscribe("work.propose", seen.append)
    work = WorkPropose(**IDS, parent_ids=["n000"])
    bus.publish(work)
    bus.publish(work)
    bus.publish(work.model_copy(update={"attempt": 2}))
    while bus.step():
        pass
    assert [m.attempt for m in seen] == [1, 2]


def test_bus_delivers_events_before_work_and_later_phases_first():
    bus = InProcBus()
    order = []
    for subject in ("work.propose", "work.train", "evt.proposed"):
        bus.subscribe(subject, lambda m: order.append(m.subject))
    bus.publish(WorkPropose(**IDS, parent_ids=["n000"]))
    bus.publish(WorkTrain(**IDS, source="x", protocol="tiny", seed=0))
    bus.publish(EvtProposed(**IDS, proposal=root_proposal()))
    while bus.step():
        pass
    assert order == ["evt.proposed", "work.train", "work.propose"]


def test_bus_redelivers_a_failing_handler_then_dead_letters_it():
    dead = []
    bus = InProcBus(max_deliver=3, dead_letter=lambda message, reason: dead.append((message.node_id, reason)))
    calls = []

    def broken(message):
        calls.append(message.attempt)
        raise RuntimeError("disk on fire")

    bus.subscribe("work.train", broken)
    bus.publish(WorkTrain(**IDS, source="x", protocol="tiny", seed=0))
    while bus.step():
        pass
    assert len(calls) == 3
    assert dead == [("n001", "RuntimeError: disk on fire")]


def test_bus_refuses_an_oversized_message_and_unknown_subjects():
    bus = InProcBus()
    with pytest.raises(ContractError, match="exceeds"):
        bus.publish(WorkTrain(**IDS, source="#" * (2 << 20), protocol="tiny", seed=0))
    with pytest.raises(ValueError, match="unknown subject"):
        bus.subscribe("work.dance", print)
    bus.subscribe("evt.failed", print)
    with pytest.raises(ValueError, match="already has a subscriber"):
        bus.subscribe("evt.failed", print)
    assert bus.pending() == 0
    bus.publish(EvtFailed(**IDS, failure=Failure(phase=Phase.TRAIN, reason="x")))
    assert bus.pending("evt.failed") == 1


def train_work(node_id: str) -> WorkTrain:
    return WorkTrain(run_id="r", node_id=node_id, source="x", protocol="tiny", seed=0)


def test_a_bus_with_workers_handles_concurrent_work_side_by_side_and_events_on_the_calling_thread():
    bus = InProcBus(workers=2, concurrent={"work.train": 2})
    both_started = threading.Barrier(2, timeout=10)  # broken (an error) unless two trainings run at once
    events = []

    def train(work):
        both_started.wait()
        bus.publish(EvtFailed(run_id="r", node_id=work.node_id, failure=Failure(phase=Phase.TRAIN, reason="x")))

    bus.subscribe("work.train", train)
    bus.subscribe("evt.failed", lambda event: events.append((event.node_id, threading.current_thread())))
    for node_id in ("n001", "n002"):
        bus.publish(train_work(node_id))
    while bus.step():
        pass
    assert sorted(node_id for node_id, _ in events) == ["n001", "n002"]
    assert {thread for _, thread in events} == {threading.current_thread()}
    assert bus.active() == [] and bus.pending() == 0


def test_a_bus_with_workers_keeps_to_each_subjects_share_and_retries_and_dead_letters_on_the_calling_thread():
    dead = []
    bus = InProcBus(workers=3, concurrent={"work.train": 1},
                    dead_letter=lambda message, reason: dead.append((message.node_id, threading.current_thread())))
    running, most, calls = [], [], []
    lock = threading.Lock()

    def train(work):
        with lock:
            running.append(work.node_id)
            most.append(len(running))
            calls.append(work.node_id)
        time.sleep(0.05)
        with lock:
            running.remove(work.node_id)
        if work.node_id == "n002":
            raise RuntimeError("disk on fire")

    bus.subscribe("work.train", train)
    bus.publish(train_work("n001"))
    bus.publish(train_work("n002"))
    while bus.step():
        pass
    assert max(most) == 1
    assert calls.count("n002") == 3 and calls.count("n001") == 1
    assert dead == [("n002", threading.current_thread())]


# ------------------------------------------------------------------------------------ correction loop


def grpo_proposal(**changes) -> Proposal:
    return root_proposal().model_copy(update=changes)


def test_repair_drops_unknown_mechanisms_and_clamps_values_and_says_so():
    broken = grpo_proposal(
        mechanisms=[*root_proposal().mechanisms, MechanismSpec(name="clip:dual_bogus"),
                    MechanismSpec(name="kl:penalty", params={"kl_coef": 50.0, "kl_estimator": "k9"})],
        hparams={"clip_ratio": 9.0, "nonsense": 1},
    )
    repaired, changes = repair_proposal(broken)
    text = "; ".join(changes)
    assert "dropped unknown mechanism clip:dual_bogus" in text
    assert "clamped kl:penalty.kl_coef=50.0 to 1" in text
    assert "reset kl:penalty.kl_estimator='k9'" in text
    assert "clamped clip:symmetric.clip_ratio=9.0 to 0.5" in text
    assert "dropped hparams['nonsense']" in text
    compile_proposal(repaired)  # compiles now
    assert repair_proposal(root_proposal())[1] == []


def test_repair_fills_a_missing_required_family_with_grpos_choice():
    no_scale = grpo_proposal(mechanisms=[m for m in root_proposal().mechanisms if not m.name.startswith("scale:")])
    repaired, changes = repair_proposal(no_scale)
    assert "added scale:group_std: a scale mechanism is required" in changes
    assert "scale:group_std" in [m.name for m in repaired.mechanisms]


class ScriptedCoder:
    """A coder that writes the given sources in turn (None: gives up)."""

    name = "scripted"

    def __init__(self, sources):
        self.sources = list(sources)
        self.reports = []

    def write(self, proposal):
        return self._next()

    def correct(self, proposal, source, report):
        self.reports.append(report)
        return self._next()

    def _next(self):
        source = self.sources.pop(0)
        if isinstance(source, Exception):
            raise source
        return source


def verdicts(*passed: bool):
    results = iter(passed)

    def verify(source):
        ok = next(results)
        return [CheckResult(name="policy_loss", passed=ok, message="ok" if ok else f"wrong shape in {source}")]

    return verify


def test_correction_loop_keeps_every_attempt_and_feeds_the_report_back():
    coder = ScriptedCoder(["v1", CodegenError("could not write"), "v3"])
    impl, summary = implement(grpo_proposal(), coder, verdicts(False, True), max_attempts=3)
    assert impl.verified and impl.source == "v3" and summary == "verified on attempt 3"
    assert [(a.attempt, a.passed, a.source) for a in impl.attempts] == [(1, False, "v1"), (2, False, "v1"),
                                                                       (3, True, "v3")]
    assert impl.attempts[1].error == "could not write"
    assert "wrong shape in v1" in coder.reports[0] and coder.reports[1] == "could not write"


def test_correction_loop_stops_at_max_attempts_or_when_the_coder_gives_up():
    impl, summary = implement(grpo_proposal(), ScriptedCoder(["a", "b", "c"]), verdicts(False, False), 2)
    assert not impl.verified and len(impl.attempts) == 2
    assert summary.startswith("verification failed after 2 attempts: policy_loss: wrong shape in b")
    impl, summary = implement(grpo_proposal(), ScriptedCoder(["a", None]), verdicts(False), 3)
    assert not impl.verified and len(impl.attempts) == 1 and "cannot correct" in summary


def test_offline_coder_repairs_a_description_that_does_not_compile():
    broken = grpo_proposal(hparams={"clip_ratio": 9.0})
    impl, summary = implement(broken, OfflineCoder(), verdicts(True), max_attempts=3)
    assert impl.verified and len(impl.attempts) == 2
    assert "out of range" in impl.attempts[0].error
    assert '"clip_ratio": 0.5' in impl.source


# ------------------------------------------------------------------------------- sandboxed verification


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    protocol = get_protocol("tiny")
    return sandbox_verifier(base_checkpoint(), tmp_path_factory.mktemp("verify"), protocol, wall_s=90)


def test_sandboxed_verification_passes_grpo_with_a_smoke_run(verifier):
    checks = verifier(reference_algorithm("grpo").source())
    assert all(c.passed for c in checks), checks
    names = [c.name for c in checks]
    assert {"import", "interface", "policy_loss", "determinism", "one_token_responses", "smoke_run"} <= set(names)
    assert "2 steps ok" in checks[-1].message


def test_sandboxed_verification_reports_what_is_wrong(verifier):
    source = reference_algorithm("grpo").source().replace(
        "def compute_advantages(batch):", "def compute_advantages(batch):\n    import random\n"
        "    return torch.rand(batch['response_mask'].shape[0]) * random.random(), {}\n\ndef _unused(batch):")
    checks = verifier(source)
    failing = [c for c in checks if not c.passed]
    assert failing and failing[0].name in ("advantages[mixed]", "determinism"), checks
    assert "smoke_run" not in [c.name for c in checks]  # no training for a candidate that fails its checks


def test_implementer_turns_a_wrong_shape_into_an_actionable_failure(verifier):
    source = ("import torch\nLOSS_AGG_MODE = 'token-mean'\nHPARAMS = {}\n\n"
              "def compute_advantages(batch):\n    return torch.zeros(batch['response_mask'].shape[0])\n\n"
              "def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):\n"
              "    return (log_prob * advantages).sum(-1)\n")
    impl, summary = implement(grpo_proposal(), ScriptedCoder([source, None]), verifier, max_attempts=3)
    assert not impl.verified
    assert "policy_loss" in summary and "shape" in summary

