"""The agent-LLM settings of a run: per-operator specs from the command line, the clients each operator gets,
the run's spend cap, and the prompt files. No LLM server is involved here (tests/test_llm_*.py use the fakes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.cli import build_parser, run_config
from app.runner import RunError, open_run
from archive.service import ROOT_ID, ArchiveService
from archive.sqlite_store import SQLiteStore
from poise.agents import Agents
from poise.agents.prompts import Prompt, PromptError, load_prompt
from poise.algorithms import reference_algorithm
from poise.bus import InProcBus
from poise.contracts import (
    Backends,
    CallRecord,
    Cost,
    Evaluation,
    EvtReflected,
    Failure,
    Genealogy,
    Implementation,
    MetricKind,
    Node,
    NodeStatus,
    Phase,
    Proposal,
    Reflection,
    RunConfig,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
    WorkPropose,
)
from poise.llm import BudgetExceeded, CostMeter

GRPO_SOURCE = reference_algorithm("grpo").source()
PROMPTS = Path(__file__).resolve().parents[1] / "poise" / "agents" / "prompts"


def config_from(*flags: str, stored: RunConfig | None = None) -> RunConfig:
    return run_config(build_parser().parse_args(["run", *flags]), stored, "r1")


# ------------------------------------------------------------------------------------- per-operator specs


def test_one_llm_for_every_operator_and_overrides_per_operator():
    config = config_from("--llm", "anthropic:claude-opus-5", "--llm", "screen=openai:http://localhost:8000/v1#qwen",
                         "--llm", "reflect=offline", "--llm-budget-usd", "2.5")
    backends = config.backends
    assert [backends.llm_for(op) for op in ("propose", "screen", "implement", "reflect")] == [
        "anthropic:claude-opus-5", "openai:http://localhost:8000/v1#qwen", "anthropic:claude-opus-5", "offline"]
    assert config.llm_budget_usd == 2.5
    assert RunConfig(run_id="r").backends.llm_for("propose") == "offline"  # the default stays offline


@pytest.mark.parametrize(("flag", "says"), [
    ("judge=anthropic:claude-opus-5", "'judge' is not an operator"),
    ("gpt-4", "is not one of: offline, anthropic:<model>, openai:<url>#<model>"),
    ("screen=openai:localhost#qwen", "is not one of"),
])
def test_a_bad_llm_flag_is_refused_saying_why(flag, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        config_from("--llm", flag)


def test_a_resumed_run_may_raise_its_cap_but_not_switch_its_agents(tmp_path):
    first = config_from("--llm", "anthropic:claude-opus-5", "--llm-budget-usd", "1")
    open_run(tmp_path, first)[0].close()
    store, resumed = open_run(tmp_path, first.model_copy(update={"llm_budget_usd": 3.0}))
    store.close()
    assert resumed.llm_budget_usd == 3.0
    switched = first.model_copy(update={"backends": Backends(llm="anthropic:claude-haiku-4-5")})
    with pytest.raises(RunError, match="backends"):
        open_run(tmp_path, switched)


# ------------------------------------------------------------------------------------------- clients


def test_offline_operators_get_no_client_and_llm_operators_share_one_per_spec():
    agents = Agents(api_key="test-key")
    config = RunConfig(run_id="r", backends=Backends(llm="anthropic:claude-opus-5", agents={"reflect": "offline"}))
    assert agents.client(config, "reflect") is None
    propose, implement = agents.client(config, "propose"), agents.client(config, "implement")
    assert propose is implement and propose.name == "anthropic:claude-opus-5" and propose.meter is agents.meter


def test_the_runs_cap_is_set_on_the_meter_and_seeded_with_the_archived_spend():
    agents = Agents(api_key="test-key")
    config = RunConfig(run_id="r", llm_budget_usd=1.0, backends=Backends(llm="anthropic:claude-opus-5"))
    agents.client(config, "propose", spent_usd=0.75)
    assert agents.meter.cap_usd("r") == 1.0 and agents.meter.remaining_usd("r") == pytest.approx(0.25)
    agents.client(config, "screen", spent_usd=0.5)  # an older view of the archive never lowers what was spent
    assert agents.meter.run_usd("r") == pytest.approx(0.75)
    with pytest.raises(BudgetExceeded, match=r"\$1\.00 cap"), agents.meter.reserve("r", 0.3, "a request", []):
        pass


# -------------------------------------------------------------------------------------------- the cap


def evaluated_root(run_id: str) -> Node:
    suite = SuiteResult(suite="s", kind=MetricKind.ACC_AT_1, k=1, value=0.5, ci_low=0.45, ci_high=0.55,
                        n_prompts=10, n_samples=10, mean_length=40.0, format_valid_rate=1.0, weight=1.0)
    return Node(genealogy=Genealogy(run_id=run_id, node_id=ROOT_ID), status=NodeStatus.EVALUATED,
                proposal=Proposal(name="GRPO", rationale="root", generator="offline"),
                implementation=Implementation.from_source(GRPO_SOURCE, [], verified=True),
                trajectory=TrainingTrajectory(protocol="tiny", seed=0, steps=[TrainingStep(step=0)],
                                              checkpoint_uri="file:///ckpt"),
                evaluation=Evaluation(suites={"s": suite}, overall=0.5, mean_length=40.0, seed=0))


def spending_child(run_id: str, usd: float) -> Node:
    call = CallRecord(provider="anthropic", model="claude-opus-5", operator="propose", mode="tool", cost_usd=usd,
                      ok=False, error="no valid answer")
    return Node(genealogy=Genealogy.child("n001", [evaluated_root(run_id).genealogy]), status=NodeStatus.FAILED,
                proposal=Proposal(name="failed proposal n001", rationale="no valid answer", generator="x",
                                  parent_ids=[ROOT_ID]),
                failure=Failure(phase=Phase.PROPOSE, reason="no valid answer"), llm_calls=[call],
                cost=Cost(llm_usd=usd))


@pytest.mark.parametrize(("cap", "proposes"), [(0.05, False), (1.0, True), (None, True)])
def test_the_archive_stops_proposing_once_the_runs_nodes_have_spent_the_cap(tmp_path, cap, proposes):
    config = RunConfig(run_id="r", budget=4, parallel=2, root_seeds=1, llm_budget_usd=cap)
    store = SQLiteStore.in_run_dir(tmp_path)
    store.put_run(config)
    store.insert_node(evaluated_root("r"))
    store.insert_node(spending_child("r", 0.06))
    assert store.counters("r").llm_usd == pytest.approx(0.06)
    bus = InProcBus()
    proposals: list[WorkPropose] = []
    bus.subscribe(WorkPropose.subject, proposals.append)
    archive = ArchiveService(bus, store, config)
    archive.pump()
    while bus.step():
        pass
    assert bool(proposals) == proposes
    if not proposes:
        assert archive.state.stop_reason == ("the agent-LLM cost cap is reached ($0.0600 of $0.05); "
                                             "stopped proposing")
        assert not archive.state.finished  # the root still waits for its reflection
        archive.handle(EvtReflected(run_id="r", node_id=ROOT_ID, reflection=Reflection(text="GRPO", generator="x")))
        assert archive.state.finished
    store.close()


# -------------------------------------------------------------------------------------------- prompts


def test_every_prompt_file_loads_with_its_name_and_version():
    names = sorted(p.stem for p in PROMPTS.glob("*.md"))
    assert {"propose", "screen", "reflect", "implement", "correct", "fidelity"} <= set(names)
    for name in names:
        prompt = load_prompt(name)
        assert prompt.name == name and prompt.version >= 1 and prompt.id == f"{name}@v{prompt.version}"
        assert prompt.fields, f"{name}.md has no {{{{field}}}} slot: nothing of the run reaches the model"


def test_rendering_fills_every_slot_and_refuses_missing_or_unexpected_fields():
    prompt = Prompt(name="t", version=2, text="Parent: {{parent}}\nGoal: {{ directive }}\n")
    assert prompt.render(parent="n003 {json: 1}", directive="shorter") == "Parent: n003 {json: 1}\nGoal: shorter\n"
    with pytest.raises(PromptError, match=r"missing fields \['directive'\], unexpected \['extra'\]"):
        prompt.render(parent="x", extra="y")
    with pytest.raises(PromptError, match="no prompt file"):
        load_prompt("no_such_prompt")


def test_the_meter_books_spend_it_did_not_see():
    meter = CostMeter({"r": 1.0})
    meter.record_spend("r", 0.4)
    assert meter.remaining_usd("r") == pytest.approx(0.6)


def test_a_run_whose_agent_cannot_start_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from app.runner import run

    for variable in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    config = RunConfig(run_id="r", protocol="tiny", budget=1,
                       backends=Backends(agents={"reflect": "anthropic:claude-haiku-4-5"}))
    with pytest.raises(RunError, match=r"the reflect agent \(anthropic:claude-haiku-4-5\) cannot start: .*no "
                                       r"credentials; set ANTHROPIC_API_KEY"):
        run(config, tmp_path / "run", agents=Agents())
    assert not (tmp_path / "run").exists()
