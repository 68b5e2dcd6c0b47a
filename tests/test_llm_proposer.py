"""The proposer with an agent LLM: the real anthropic and openai SDKs against the local fake servers.

A small archive (GRPO root, a reflected child as the parent, a contrasting node) in a SQLite store; the
ProposerService handles one work.propose with a sandbox-free fingerprinter, and the test reads the event it
published. The fakes answer in script order, so each test scripts the population answer, any repair rounds,
and the screen answer.
"""

from __future__ import annotations

import json

import pytest
from fake_llm import Answer, FakeAnthropic, FakeOpenAI, HttpError
from test_population_screening import GRPO_SOURCE, ROOT, RUN, literal_fingerprints, node, proposal, reflection

from archive.sqlite_store import SQLiteStore
from poise.agents import Agents
from poise.contracts import Backends, EvtFailed, EvtProposed, Message, Objective, Phase, RunConfig, WorkPropose
from poise.description.codegen import compile_proposal
from proposer.baseline import proposal_description
from proposer.llm_agent import ScreenSet
from proposer.service import ProposerService

pytestmark = pytest.mark.llm

CLAUDE = "anthropic:claude-sonnet-4-6"
LOCAL = "qwen2.5-7b-instruct"
CLIENT_OPTIONS = {"api_key": "test-key", "timeout_s": 10.0, "max_retries": 0, "metrics": None}

# Children of the parent (GRPO + entropy bonus), as the model writes them.
GRPO_PLUS_ENTROPY = {"baseline:group_mean": {}, "scale:group_std": {}, "clip:symmetric": {"clip_ratio": 0.2},
                     "clip:dual": {"dual_clip": 3.0}, "entropy:bonus": {"entropy_coef": 0.01}}


def algorithm(name: str, direction: str, changes: dict[str, dict], drop: tuple[str, ...] = (),
              agg: str = "token-mean") -> dict:
    mechanisms = {**{k: v for k, v in GRPO_PLUS_ENTROPY.items() if k not in drop}, **changes}
    return {"name": name, "direction": direction, "rationale": f"{name} should help the parent.",
            "mechanisms": [{"name": m, "params": [{"name": k, "value": v} for k, v in params.items()]}
                           for m, params in mechanisms.items()],
            "hparams": [], "loss_agg_mode": agg}


CLIP_HIGHER = algorithm("p~clip_higher", "crossover", {"clip:clip_higher": {"clip_low": 0.2, "clip_high": 0.28}},
                        drop=("clip:symmetric",))
SHORTER = algorithm("p+shorter", "remedy", {"length:correct_shorter": {"length_coef": 0.2}})
MORE_ENTROPY = algorithm("p@entropy_coef=0.02", "hparam", {"entropy:bonus": {"entropy_coef": 0.02}})
MAGIC = algorithm("p~magic", "mutation", {"clip:magic": {}}, drop=("clip:symmetric", "clip:dual"))
MEDIAN_SCALE = algorithm("p~median_abs_dev", "mutation", {"scale:median_abs_dev": {"floor": 0.05}},
                         drop=("scale:group_std",))


def population(*algorithms: dict) -> Answer:
    return Answer({"proposals": list(algorithms)})


def judgement(score: float, reason: str = "plausible") -> dict:
    return {"score": score, "reason": reason}


def verdict(number: int, score: float, keep: bool = True, feasibility: dict | None = None) -> dict:
    return {"proposal": number, "consistency": judgement(score), "feasibility": feasibility or judgement(score),
            "novelty": judgement(score), "expected_improvement": judgement(score),
            "verdict": "keep" if keep else "reject"}


def screen(*verdicts: dict) -> Answer:
    return Answer({"verdicts": list(verdicts)})


class Recorder:
    """A bus that keeps what the service publishes."""

    def __init__(self) -> None:
        self.published: list[Message] = []

    def publish(self, message: Message) -> None:
        self.published.append(message)

    def subscribe(self, subject, handler) -> None:
        raise AssertionError("the proposer only publishes")


@pytest.fixture
def store(tmp_path):
    with SQLiteStore(tmp_path / "archive.db") as store:
        yield store


def run_with(store: SQLiteStore, llm: str, **agents: str) -> RunConfig:
    """The run (population 3) with its agent LLMs, and the archive: root, parent n001, contrasting n002."""
    config = RunConfig(run_id=RUN, parent_selection="greedy", population_size=3,
                       objective=Objective(directive="keep responses short"),
                       backends=Backends(llm=llm, agents=agents))
    store.put_run(config)
    root = node("n000", ROOT, {"a": 0.40, "b": 0.40}, source=GRPO_SOURCE)
    parent = node("n001", proposal("p", "entropy:bonus"), {"a": 0.45, "b": 0.42}, [root],
                  reflection=reflection({"entropy:bonus": ("helped", 0.4)}, ["length_drift"]))
    other = node("n002", proposal("o", "scale:none"), {"a": 0.35, "b": 0.50}, [root])
    for entry in (root, parent, other):
        assert store.insert_node(entry)
    return config


def propose(store: SQLiteStore, agents: Agents) -> Message:
    bus = Recorder()
    service = ProposerService(bus, store, agents=agents, fingerprinter=literal_fingerprints)
    service.handle(WorkPropose(run_id=RUN, node_id="n003", parent_ids=["n001"]))
    (event,) = bus.published
    return event


def sent_text(request) -> str:
    return json.dumps(request.body.get("messages", []))


# ------------------------------------------------------------------------------------------------ tests


def test_population_answer_becomes_a_screened_proposal_with_its_calls_on_the_event(store):
    run_with(store, CLAUDE, implement="offline")
    with FakeAnthropic() as fake:
        fake.script(population(CLIP_HIGHER, SHORTER, MORE_ENTROPY),
                    screen(verdict(1, 0.6), verdict(2, 0.8), verdict(3, 0.5)))
        event = propose(store, Agents(base_url=fake.url, **CLIENT_OPTIONS))

    assert isinstance(event, EvtProposed), event
    child = event.proposal
    assert child.name == "p+shorter" and child.generator == CLAUDE
    assert child.parent_ids == ["n001"] and child.directive == "keep responses short"
    assert child.rationale.startswith("Direction: remedy. ")
    assert "length:correct_shorter" in proposal_description(child).names
    compile_proposal(child)  # written the way the offline implementer reads it
    assert child.screening.summary().startswith("parent n001: best p+shorter (LLM screen 0.80, EI ")
    assert "3 passed" in child.screening.summary()
    assert f"screened by {CLAUDE} and the offline gates" in child.screening.summary()
    assert child.screening.winner.name == "p+shorter" and child.screening.winner.llm_score == 0.8
    assert child.screening.parent_id == "n001" and child.screening.passed == 3

    assert [(c.operator, c.prompt, c.ok) for c in event.llm_calls] == [("propose", "propose@v1", True),
                                                                       ("screen", "screen@v1", True)]
    assert all(c.cost_usd > 0 and c.model == "claude-sonnet-4-6" for c in event.llm_calls)
    asked, judged = fake.requests
    system = asked.body["system"]
    assert "clip:clip_higher" in system[0]["text"] and "dr_grpo" in system[0]["text"]  # library and priors
    assert system[-1]["cache_control"] == {"type": "ephemeral"} and judged.body["system"] == system
    assert "Design 3 children" in sent_text(asked) and "# Parent n001" in sent_text(asked)
    assert "Candidate 2: p+shorter" in sent_text(judged) and "passed the sandbox check" in sent_text(judged)


def test_unknown_mechanism_with_the_offline_implementer_gets_a_repair_round(store):
    run_with(store, CLAUDE, implement="offline", screen="offline")
    with FakeAnthropic() as fake:
        fake.script(population(CLIP_HIGHER, MAGIC), population(CLIP_HIGHER, SHORTER))
        event = propose(store, Agents(base_url=fake.url, **CLIENT_OPTIONS))

    assert isinstance(event, EvtProposed), event
    assert event.proposal.name in ("p~clip_higher", "p+shorter")
    assert "screened by the offline gates" in event.proposal.screening.summary()
    assert [(c.operator, c.attempt, c.ok) for c in event.llm_calls] == [("propose", 1, False), ("propose", 2, True)]
    assert "unknown mechanism 'clip:magic'" in event.llm_calls[0].error
    repair = sent_text(fake.requests[1])
    assert "proposals.1: Value error, not a valid description of the mechanism library" in repair
    assert "unknown mechanism 'clip:magic'" in repair


def test_an_answer_that_never_validates_fails_the_node_with_reason_and_calls(store):
    run_with(store, CLAUDE, implement="offline")
    with FakeAnthropic() as fake:
        fake.script(population(MAGIC), population(MAGIC), population(MAGIC))
        event = propose(store, Agents(base_url=fake.url, **CLIENT_OPTIONS))
        assert fake.remaining == 0

    assert isinstance(event, EvtFailed) and event.failure.phase == Phase.PROPOSE
    assert event.failure.reason.startswith(f"propose LLM {CLAUDE} gave no valid answer after 3 answers: proposals.0")
    assert "no valid LibraryProposalSet after 3 answers" in event.failure.detail
    assert [(c.attempt, c.ok) for c in event.llm_calls] == [(1, False), (2, False), (3, False)]


def test_an_unreachable_endpoint_fails_the_node_instead_of_raising(store):
    run_with(store, CLAUDE)
    with FakeAnthropic() as fake:
        fake.script(HttpError(401, message="invalid x-api-key"))
        event = propose(store, Agents(base_url=fake.url, **CLIENT_OPTIONS))

    assert isinstance(event, EvtFailed) and event.failure.phase == Phase.PROPOSE
    assert "HTTP 401" in event.failure.reason and "check the API key" in event.failure.reason
    (call,) = event.llm_calls
    assert not call.ok and call.operator == "propose"


def test_openai_compatible_endpoint_proposes_with_offline_screening(store):
    with FakeOpenAI() as fake:
        spec = f"openai:{fake.url}#{LOCAL}"
        run_with(store, spec, screen="offline")
        fake.script(population(CLIP_HIGHER, SHORTER, MORE_ENTROPY))
        event = propose(store, Agents(**CLIENT_OPTIONS))

    assert isinstance(event, EvtProposed), event
    assert event.proposal.generator == f"openai:{LOCAL}"
    assert event.proposal.name in ("p~clip_higher", "p+shorter", "p@entropy_coef=0.02")
    assert event.proposal.screening.summary().startswith("parent n001: best ")
    assert "LLM screen" not in event.proposal.screening.summary()
    (call,) = event.llm_calls
    assert call.provider == "openai" and call.operator == "propose" and call.ok and not call.priced
    assert fake.requests[0].body["response_format"]["type"] == "json_schema"


def test_a_proposal_the_screen_rejects_is_recorded_with_stage_and_reason(store):
    run_with(store, CLAUDE)
    with FakeAnthropic() as fake:
        fake.script(population(CLIP_HIGHER, SHORTER),
                    screen(verdict(1, 0.9, keep=False, feasibility=judgement(0.1, "needs a value network")),
                           verdict(2, 0.4)))
        event = propose(store, Agents(base_url=fake.url, **CLIENT_OPTIONS))

    assert isinstance(event, EvtProposed), event
    assert event.proposal.name == "p+shorter"
    assert "1 passed; rejected p~clip_higher: llm_screen: feasibility 0.10: needs a value network" \
        in event.proposal.screening.summary()
    assert [(r.proposal_name, r.stage) for r in event.proposal.screening.rejections] == [("p~clip_higher",
                                                                                          "llm_screen")]


def test_with_an_llm_implementer_new_mechanisms_pass_and_skip_the_offline_gates(store):
    run_with(store, CLAUDE)  # the run's llm implements too
    with FakeAnthropic() as fake:
        fake.script(population(MEDIAN_SCALE, SHORTER), screen(verdict(1, 0.9), verdict(2, 0.5)))
        event = propose(store, Agents(base_url=fake.url, **CLIENT_OPTIONS))

    assert isinstance(event, EvtProposed), event
    child = event.proposal
    assert child.name == "p~median_abs_dev" and [c.attempt for c in event.llm_calls] == [1, 1]  # no repair
    assert {"name": "scale:median_abs_dev", "params": {"floor": 0.05}} in [s.model_dump() for s in child.mechanisms]
    assert child.screening.summary().startswith(
        "parent n001: best p~median_abs_dev (LLM screen 0.90, not compiled offline)")
    assert ("offline gates skipped for p~median_abs_dev: new mechanisms scale:median_abs_dev (the LLM coder "
            "implements them)") in child.screening.summary()
    assert child.screening.skipped["p~median_abs_dev"].startswith("new mechanisms scale:median_abs_dev")
    assert "Offline screening: not run, new mechanisms scale:median_abs_dev" in sent_text(fake.requests[1])


def test_screen_answer_must_judge_every_candidate_exactly_once():
    schema = ScreenSet.judging(2)
    assert schema.__name__ == "ScreenSet"
    schema.model_validate({"verdicts": [verdict(2, 0.5), verdict(1, 0.5)]})
    with pytest.raises(ValueError, match=r"missing \[2\], unknown or repeated \[1, 3\]"):
        schema.model_validate({"verdicts": [verdict(1, 0.5), verdict(1, 0.5), verdict(3, 0.5)]})


def test_missing_credentials_fail_the_node_with_what_to_set(store, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    run_with(store, CLAUDE)
    event = propose(store, Agents(timeout_s=1.0, metrics=None))

    assert isinstance(event, EvtFailed) and event.failure.phase == Phase.PROPOSE
    assert "no credentials; set ANTHROPIC_API_KEY" in event.failure.reason and event.llm_calls == []


def test_offline_runs_keep_the_offline_population_and_make_no_calls(store):
    config = run_with(store, "offline")
    store.put_run(config.model_copy(update={"parent_selection": "poise"}))
    event = propose(store, Agents(**CLIENT_OPTIONS))

    assert isinstance(event, EvtProposed), event
    assert event.proposal.generator == "offline" and event.llm_calls == []
    assert event.proposal.screening.summary().startswith("parent n001: best ")
    assert "LLM" not in event.proposal.screening.summary()
