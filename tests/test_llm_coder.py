"""The LLM coder end to end: the real SDK clients against local fake API servers, the real sandbox verifier.

Each test scripts the model's answers (tests/fake_llm.py) with modules that poise/description/codegen.py compiles from
real proposals, some of them broken on purpose, and runs `implement` with the sandboxed verifier of the tiny
protocol: the modules are imported, checked and (once) smoke-trained in the sandbox child, as in a run.
Only the smoke run is left out where a test is about the correction loop, to keep the file at a few
sandbox runs of seconds each.
"""

from __future__ import annotations

import pytest
from fake_llm import Answer, FakeAnthropic, FakeOpenAI, HttpError, truncated

from archive.sqlite_store import SQLiteStore
from implementer.core import implement, sandbox_verifier
from implementer.llm_coder import LLMCoder, coder_system
from implementer.service import ImplementerService
from poise.agents import Agents
from poise.bus import InProcBus
from poise.contracts import (
    Backends,
    CheckResult,
    Genealogy,
    Implementation,
    MechanismSpec,
    Node,
    NodeStatus,
    Proposal,
    RunConfig,
    WorkImplement,
)
from poise.description.codegen import compile_proposal
from poise.description.proposals import root_proposal
from poise.llm import AnthropicClient, OpenAIClient, collect_calls
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol

pytestmark = pytest.mark.llm

CLAUDE = "claude-sonnet-4-6"
LOCAL = "qwen2.5-coder-7b-instruct"
TIMEOUT_S = 10.0
FAITHFUL = Answer({"faithful": True, "discrepancies": []})


def vm_av_proposal() -> Proposal:
    """The paper's best algorithm as a child of GRPO: analytic-variance scaling plus validity masking."""
    return Proposal(
        name="vm-av-grpo",
        rationale="Scale by the analytic Bernoulli std of the group's pass rate instead of the noisy sample std, "
                  "and keep format-invalid responses out of the group statistics with a fixed penalty.",
        mechanisms=[MechanismSpec(name="baseline:group_mean"),
                    MechanismSpec(name="scale:analytic_variance", params={"variance_floor": 0.01}),
                    MechanismSpec(name="validity:mask", params={"invalid_penalty": -1.0}),
                    MechanismSpec(name="clip:symmetric", params={"clip_ratio": 0.2}),
                    MechanismSpec(name="clip:dual", params={"dual_clip": 3.0}),
                    MechanismSpec(name="agg:token-mean")],
        generator=f"anthropic:{CLAUDE}", parent_ids=["n000"],
    )


PROPOSAL = vm_av_proposal()
GOOD = compile_proposal(PROPOSAL)
GRPO = compile_proposal(root_proposal())


def broken(change_from: str, change_to: str) -> str:
    """GOOD with one line changed: the kinds of slip a model makes."""
    assert GOOD.count(change_from) == 1, change_from
    return GOOD.replace(change_from, change_to)


NAME_ERROR = broken("counted = counted_responses(batch)", "counted = counted_respones(batch)")
SEQUENCE_LOSS = broken("    return loss, metrics\n", "    return loss.sum(-1), metrics\n")
ONE_COLUMN = broken("    return advantages\n", "    return advantages[:, :1]\n")


def module(source: str, notes: str = "analytic-variance scaling with validity masking") -> Answer:
    return Answer({"source": source, "notes": notes})


def anthropic_client(fake: FakeAnthropic) -> AnthropicClient:
    return AnthropicClient(CLAUDE, base_url=fake.url, api_key="test-key", timeout_s=TIMEOUT_S, max_retries=0,
                           metrics=None)


def coder(client, parent_source: str | None = GRPO) -> LLMCoder:
    return LLMCoder(client, run_id="run-llm", node_id="n007", parent_source=parent_source)


def user_text(request) -> str:
    """The per-request prompt the client sent (the first user message)."""
    return request.body["messages"][0]["content"]


def passing(source: str) -> list[CheckResult]:
    return [CheckResult(name="policy_loss", passed=True, message="ok")]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """verify(smoke): the real sandboxed verifier of the tiny protocol, with or without the smoke run."""
    base, protocol = base_checkpoint(), get_protocol("tiny")
    workdir = tmp_path_factory.mktemp("verify")
    verifiers = {smoke: sandbox_verifier(base, workdir / f"smoke-{smoke}", protocol, wall_s=90, smoke=smoke)
                 for smoke in (False, True)}
    return lambda smoke=False: verifiers[smoke]


# ------------------------------------------------------------------------------------------ the loop


def test_a_faithful_module_verifies_on_the_first_attempt_with_every_call_recorded(sandbox):
    with FakeAnthropic() as fake, collect_calls() as calls:
        fake.script(module(GOOD), FAITHFUL)
        impl, summary = implement(PROPOSAL, coder(anthropic_client(fake)), sandbox(smoke=True), max_attempts=3)

    assert impl.verified and summary == "verified on attempt 1" and impl.source == GOOD
    [attempt] = impl.attempts
    assert [c.name for c in attempt.checks][-2:] == ["smoke_run", "fidelity"] and attempt.passed
    assert [(c.operator, c.prompt, c.ok) for c in calls] == [("implement", "implement@v1", True),
                                                            ("implement", "fidelity@v1", True)]
    write, review = fake.requests
    assert write.body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert write.body["system"][0]["text"] == coder_system()[0]
    assert "def compute_advantages(batch)" in coder_system()[0]
    prompt = user_text(write)
    assert "scale:analytic_variance (variance_floor=0.01)" in prompt and GRPO.strip() in prompt
    assert GOOD.strip() in user_text(review)


def test_a_module_that_fails_verification_is_corrected_from_the_quoted_report(sandbox):
    with FakeAnthropic() as fake, collect_calls() as calls:
        fake.script(module(NAME_ERROR), module(GOOD, notes="fixed the misspelt helper name"), FAITHFUL)
        impl, summary = implement(PROPOSAL, coder(anthropic_client(fake)), sandbox(), max_attempts=3)

    assert impl.verified and summary == "verified on attempt 2" and impl.source == GOOD
    first, second = impl.attempts
    assert not first.passed and first.source == NAME_ERROR and second.passed
    failed = next(c for c in first.checks if not c.passed)
    assert "NameError" in failed.message and "counted_respones" in failed.message
    assert [c.prompt for c in calls] == ["implement@v1", "correct@v1", "fidelity@v1"]
    correction = user_text(fake.requests[1])
    assert "<<<BEGIN the verification report" in correction and "counted_respones" in correction
    assert NAME_ERROR.strip() in correction
    assert calls[1].cache_read_tokens > 0  # the correction reused the system block the first request cached


def test_code_that_fails_three_times_leaves_an_unverified_implementation_with_every_attempt(sandbox):
    with FakeAnthropic() as fake, collect_calls() as calls:
        fake.script(module(ONE_COLUMN), module(NAME_ERROR), module(SEQUENCE_LOSS))
        impl, summary = implement(PROPOSAL, coder(anthropic_client(fake)), sandbox(), max_attempts=3)

    assert not impl.verified and impl.source == SEQUENCE_LOSS
    assert [(a.attempt, a.passed, a.source) for a in impl.attempts] == [
        (1, False, ONE_COLUMN), (2, False, NAME_ERROR), (3, False, SEQUENCE_LOSS)]
    assert summary.startswith("verification failed after 3 attempts: policy_loss: policy_loss returned shape")
    assert [c.prompt for c in calls] == ["implement@v1", "correct@v1", "correct@v1"]  # nothing to review
    assert "compute_advantages returned shape" in user_text(fake.requests[1])
    assert "counted_respones" in user_text(fake.requests[2])


def test_an_unfaithful_review_sends_a_module_that_runs_back_for_correction(sandbox):
    unfaithful = Answer({"faithful": False, "discrepancies": [
        "scale: the proposal divides by the analytic Bernoulli std (scale:analytic_variance), the code by the "
        "group's sample std (scale:group_std)",
        "validity:mask is missing: format-invalid responses still enter the group statistics"]})
    with FakeAnthropic() as fake, collect_calls() as calls:
        fake.script(module(GRPO, notes="kept the parent"), unfaithful, module(GOOD), FAITHFUL)
        impl, summary = implement(PROPOSAL, coder(anthropic_client(fake)), sandbox(), max_attempts=3)

    assert impl.verified and summary == "verified on attempt 2" and impl.source == GOOD
    first = impl.attempts[0]
    assert not first.passed and [c.name for c in first.checks if not c.passed] == ["fidelity"]
    assert all(c.passed for c in first.checks if c.name != "fidelity")  # it ran fine: only the review failed
    assert [c.prompt for c in calls] == ["implement@v1", "fidelity@v1", "correct@v1", "fidelity@v1"]
    correction = user_text(fake.requests[2])
    assert "<<<BEGIN the verification report" in correction and "scale:analytic_variance), the code by" in correction


def test_a_cut_off_or_interface_breaking_answer_costs_a_repair_round_not_a_sandbox_run(sandbox):
    no_policy_loss = GOOD[:GOOD.index("def policy_loss")]
    with FakeAnthropic() as fake, collect_calls() as calls:
        fake.script(truncated({"notes": "complete module below", "source": GOOD}),
                    Answer({"source": no_policy_loss, "notes": "most of it"}),
                    Answer({"source": f"```python\n{GOOD}```", "notes": "the whole module"}), FAITHFUL)
        impl, summary = implement(PROPOSAL, coder(anthropic_client(fake)), sandbox(), max_attempts=3)

    assert impl.verified and len(impl.attempts) == 1 and impl.source == GOOD  # the fence was taken off
    assert [(c.prompt, c.attempt, c.ok) for c in calls] == [
        ("implement@v1", 1, False), ("implement@v1", 2, False), ("implement@v1", 3, True), ("fidelity@v1", 1, True)]
    assert "cut off" in calls[0].error and "source" in calls[0].error
    assert "must define def policy_loss" in calls[1].error
    assert "must define def policy_loss" in str(fake.requests[2].body["messages"])


def test_the_coder_works_through_an_openai_compatible_endpoint(sandbox):
    with FakeOpenAI() as fake, collect_calls() as calls:
        fake.script(module(GOOD), FAITHFUL)
        client = OpenAIClient(LOCAL, base_url=fake.url, api_key="test-key", timeout_s=TIMEOUT_S, max_retries=0,
                              metrics=None)
        impl, summary = implement(PROPOSAL, coder(client, parent_source=None), sandbox(), max_attempts=3)

    assert impl.verified and summary == "verified on attempt 1"
    assert [(c.provider, c.prompt) for c in calls] == [("openai", "implement@v1"), ("openai", "fidelity@v1")]
    system, user = fake.requests[0].body["messages"][:2]
    assert system["role"] == "system" and "def compute_advantages(batch)" in system["content"]
    assert "No verified parent module" in user["content"]


# --------------------------------------------------------------------------------- when the LLM fails


def test_an_llm_that_never_answers_in_schema_ends_the_node_without_a_sandbox_run():
    ignoring = Answer({"code": GOOD, "explanation": "here you go"})
    with FakeAnthropic() as fake, collect_calls() as calls:
        fake.script(ignoring, ignoring, ignoring)
        impl, summary = implement(PROPOSAL, coder(anthropic_client(fake)), verifier=pytest.fail, max_attempts=3)

    assert not impl.verified and impl.source == ""
    [attempt] = impl.attempts
    assert attempt.error.startswith("llm coder: anthropic:claude-sonnet-4-6 (implement): no valid ModuleAnswer")
    assert summary.startswith("attempt 1: llm coder:") and "\n" not in summary
    assert [c.attempt for c in calls] == [1, 2, 3] and not any(c.ok for c in calls)


def test_a_review_that_gets_no_answer_ends_the_node_with_the_checks_kept():
    with FakeAnthropic() as fake, collect_calls() as calls:
        fake.script(module(GOOD), HttpError(529, message="overloaded"))
        impl, summary = implement(PROPOSAL, coder(anthropic_client(fake)), passing, max_attempts=3)

    assert not impl.verified and impl.source == GOOD
    [attempt] = impl.attempts
    assert not attempt.passed and [c.name for c in attempt.checks] == ["policy_loss"]
    assert "HTTP 529" in attempt.error and summary.startswith("attempt 1: llm coder:")
    assert [(c.prompt, c.ok) for c in calls] == [("implement@v1", True), ("fidelity@v1", False)]


# ------------------------------------------------------------------------------------------- service


def test_the_service_uses_the_runs_implement_llm_from_the_parents_module_and_books_its_calls(tmp_path):
    config = RunConfig(run_id="run-llm", protocol="tiny",
                       backends=Backends(agents={"implement": f"anthropic:{CLAUDE}"}))
    root = Genealogy(run_id=config.run_id, node_id="n000")
    with SQLiteStore(tmp_path / "archive.db") as store, FakeAnthropic() as fake:
        store.put_run(config)
        store.insert_node(Node(genealogy=root, status=NodeStatus.IMPLEMENTED, proposal=root_proposal(),
                               implementation=Implementation.from_source(GRPO, verified=True)))
        bus = InProcBus()
        events = []
        bus.subscribe("evt.implemented", events.append)
        agents = Agents(base_url=fake.url, api_key="test-key", timeout_s=TIMEOUT_S, max_retries=0, metrics=None)
        service = ImplementerService(bus, tmp_path / "nodes", config.protocol, config=config, archive=store,
                                     agents=agents)
        root_work = WorkImplement(run_id=config.run_id, node_id="n000", proposal=root_proposal())
        assert service.backend == "llm" and service.coder_for(root_work).name == "offline"

        service.handle(WorkImplement(run_id=config.run_id, node_id="n001", proposal=PROPOSAL))  # nothing scripted
        bus.step()

    [event] = events
    assert not event.implementation.verified
    assert "server error HTTP 500" in event.implementation.attempts[0].error
    [call] = event.llm_calls
    assert (call.operator, call.prompt, call.ok) == ("implement", "implement@v1", False)
    assert GRPO.strip() in user_text(fake.requests[0])  # the coder started from the parent's verified module


def test_the_service_stays_offline_unless_the_run_names_an_implement_llm(tmp_path):
    config = RunConfig(run_id="run-offline", protocol="tiny",
                       backends=Backends(agents={"propose": f"anthropic:{CLAUDE}"}))
    service = ImplementerService(InProcBus(), tmp_path, config.protocol, config=config,
                                 agents=Agents(api_key="test-key", metrics=None))
    work = WorkImplement(run_id=config.run_id, node_id="n001", proposal=PROPOSAL)
    assert service.llm is None and service.backend == "offline" and service.coder_for(work).name == "offline"
