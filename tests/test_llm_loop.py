"""A whole embedded run with every operator an agent LLM, through the fake Anthropic server and the real SDK.

The fake replays recorded answers keyed on what each request asks for (its answer schema and prompt), since
the order of requests in a run is not fixed: populations of library mechanisms, the screen's verdicts, module
source compiled from the proposal (deliberately broken the first time, to force a correction round), fidelity
reviews and reflections. Everything else is real: screening fingerprints, sandboxed verification, training
and evaluation on the tiny protocol, the archive and its cost accounting.
"""

from __future__ import annotations

import re
import threading

import pytest
from fake_llm import Answer, FakeAnthropic, Request

from app.runner import run
from archive.sqlite_store import SQLiteStore
from poise.agents import Agents
from poise.contracts import Backends, MechanismSpec, NodeStatus, Proposal, RunConfig
from poise.description.codegen import compile_proposal

pytestmark = [pytest.mark.llm, pytest.mark.slow]

PROPOSER = "claude-sonnet-5-5"
SCREENER = "claude-haiku-5-5"
BROKEN = "    scale = undefined_helper(batch)  # the first draft calls a helper that does not exist\n"


def mechanism(name: str, **params: float) -> dict:
    return {"name": name, "params": [{"name": k, "value": v} for k, v in params.items()]}


GROUP = [mechanism("baseline:group_mean"), mechanism("scale:group_std", eps=1e-6)]
CLIP = [mechanism("clip:symmetric", clip_ratio=0.2), mechanism("clip:dual", dual_clip=3.0)]
POPULATIONS = [
    [
        {"name": "grpo~clip_higher", "direction": "mutation", "loss_agg_mode": "token-mean", "hparams": [],
         "rationale": "Decouple the clip range (0.2 below, 0.28 above) so low-probability tokens with positive "
                      "advantage can still grow; the parent's entropy falls steadily.",
         "mechanisms": [*GROUP, mechanism("clip:clip_higher", clip_low=0.2, clip_high=0.28),
                        mechanism("clip:dual", dual_clip=3.0)]},
        {"name": "grpo~leave_one_out", "direction": "crossover", "loss_agg_mode": "token-mean", "hparams": [],
         "rationale": "Take RLOO's leave-one-out baseline without std scaling: unbiased advantages that do not "
                      "blow up in near-uniform groups.",
         "mechanisms": [mechanism("baseline:leave_one_out"), mechanism("scale:none"), *CLIP]},
    ],
]


def as_proposal(answer: dict) -> Proposal:
    specs = [MechanismSpec(name=m["name"], params={p["name"]: p["value"] for p in m["params"]})
             for m in answer["mechanisms"]]
    return Proposal(name=answer["name"], rationale=answer["rationale"], mechanisms=specs, generator="recorded",
                    loss_agg_mode=answer["loss_agg_mode"])


class Replay:
    """Answers a run's requests by what each asks for; keeps what it answered for the assertions."""

    def __init__(self) -> None:
        self.populations = list(POPULATIONS)
        self.sources = {a["name"]: compile_proposal(as_proposal(a)) for pop in POPULATIONS for a in pop}
        self.drafted: set[str] = set()
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Answer:
        schema = request.body["tool_choice"]["name"]
        prompt = "\n".join(m["content"] if isinstance(m["content"], str) else
                           "\n".join(block.get("text", "") for block in m["content"]) for m in request.body["messages"])
        with self.lock:
            self.asked.append(schema)
            return getattr(self, schema)(prompt)

    def submit_proposalset(self, prompt: str) -> Answer:
        return Answer({"proposals": self.populations.pop(0)})

    def submit_screenset(self, prompt: str) -> Answer:
        count = len(re.findall(r"^## Candidate \d+:", prompt, re.MULTILINE))
        judged = {"score": 0.8, "reason": "a known remedy, cheap to try"}
        return Answer({"verdicts": [
            {"proposal": n, "consistency": judged, "feasibility": judged, "novelty": judged,
             "expected_improvement": {"score": 0.9 - 0.1 * n, "reason": "addresses the parent's weak spot"},
             "verdict": "keep"} for n in range(1, count + 1)]})

    def submit_moduleanswer(self, prompt: str) -> Answer:
        name = next(n for n in self.sources if n in prompt)
        source = self.sources[name]
        if name not in self.drafted:  # the first draft of every module is broken: a correction round follows
            self.drafted.add(name)
            source = source.replace("def compute_advantages(batch):\n", "def compute_advantages(batch):\n" + BROKEN)
            return Answer({"source": source, "notes": "first draft"})
        return Answer({"source": source, "notes": "removed the call to a helper that does not exist"})

    def submit_fidelityreview(self, prompt: str) -> Answer:
        return Answer({"faithful": True, "discrepancies": []})

    def submit_reflectionanswer(self, prompt: str) -> Answer:
        judged = re.search(r"Mechanisms to judge: (.+?)\.\n", prompt + "\n")
        names = judged[1].split(", ") if judged else []
        return Answer({
            "text": "The child trained as stably as its parent; its Overall moved by less than the seed noise.",
            "effects": [{"mechanism": n, "effect": "neutral", "confidence": 0.3,
                         "evidence": "Overall within one seed SD of the parent"} for n in names],
            "diagnoses": ["within_noise"],
            "suggestion": "Try the change together with a stronger KL penalty before discarding it.",
        })


def test_a_run_with_llm_agents_proposes_implements_corrects_and_reflects(tmp_path, monkeypatch):
    replay = Replay()
    with FakeAnthropic() as fake:
        fake.respond_with(replay)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        config = RunConfig(run_id="llm", budget=1, parallel=1, population_size=2, protocol="tiny", root_seeds=1,
                           replicate_seeds=1, seed=5, llm_budget_usd=5.0,
                           backends=Backends(llm=f"anthropic:{PROPOSER}", agents={"screen": f"anthropic:{SCREENER}"}))
        summary = run(config, tmp_path / "run", agents=Agents(max_retries=1))
        requests = list(fake.requests)
    assert summary.stop_reason == "budget reached", summary.stop_reason
    with SQLiteStore.in_run_dir(tmp_path / "run") as store:
        nodes = {n.node_id: n for n in store.nodes("llm")}
    children = [n for n in nodes.values() if n.node_id != "n000"]
    assert [n.status for n in nodes.values()] == [NodeStatus.REFLECTED] * 2
    assert nodes["n000"].proposal.generator == "reference" and nodes["n000"].implementation.attempts[0].passed

    for child in children:
        assert child.proposal.generator == f"anthropic:{PROPOSER}"
        assert child.proposal.name in replay.sources and "screened by" in child.proposal.screening.summary()
        attempts = child.implementation.attempts
        assert [a.passed for a in attempts] == [False, True], "the broken first draft is corrected once"
        assert "undefined_helper" in attempts[0].source and "undefined_helper" not in attempts[1].source
        assert attempts[1].source == replay.sources[child.proposal.name]
        assert child.reflection.generator == f"anthropic:{PROPOSER}" and child.reflection.effects
        assert "within_noise" in child.reflection.diagnoses
        operators = [c.operator for c in child.llm_calls]
        # propose, screen, then write + correct + one fidelity review of the module that passed, then reflect
        assert operators == ["propose", "screen", "implement", "implement", "implement", "reflect"], operators
        assert [c.model for c in child.llm_calls if c.operator == "screen"] == [SCREENER]
        assert {c.prompt for c in child.llm_calls} >= {"propose@v1", "screen@v1", "implement@v1", "correct@v1",
                                                      "fidelity@v1", "reflect@v1"}
        assert child.cost.llm_usd == pytest.approx(sum(c.cost_usd for c in child.llm_calls)) and child.cost.llm_usd > 0
        assert child.cost.llm_input_tokens > 0 and child.cost.llm_output_tokens > 0

    # The correction round saw the verification report, quoted as untrusted data.
    corrections = [r for r in requests if "<<<BEGIN" in str(r.body["messages"]) and "undefined_helper" in
                   str(r.body["messages"]) and r.body["tool_choice"]["name"] == "submit_moduleanswer"]
    assert corrections and "NameError" in str(corrections[0].body["messages"])
    # The long stable context (interface, library, priors) is sent as cacheable system blocks and read back.
    assert any("cache_control" in block for r in requests for block in r.body.get("system", []))
    assert summary.status.llm.calls == sum(len(n.llm_calls) for n in nodes.values())
    assert summary.status.llm.usd == pytest.approx(sum(n.cost.llm_usd for n in nodes.values()))
    assert summary.status.llm.usd < config.llm_budget_usd
