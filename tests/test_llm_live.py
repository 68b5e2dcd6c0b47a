"""Opt-in: one real Anthropic call per agent operator (propose, screen, implement with its fidelity review,
reflect), through the same code the services run. Needs ANTHROPIC_API_KEY; POISE_LIVE_ANTHROPIC_MODEL picks
the model (a small one by default: the whole module costs a few cents)."""

from __future__ import annotations

import os

import pytest
from test_llm_proposer import propose, run_with
from test_llm_reflector import CHILD
from test_reflector import evaluated, trajectory

from archive.sqlite_store import SQLiteStore
from implementer.llm_coder import LLMCoder, module_problem
from poise.agents import Agents
from poise.contracts import EvtProposed, RunConfig
from poise.llm import AnthropicClient
from reflector.llm_reflector import llm_reflect

pytestmark = [
    pytest.mark.llm,
    pytest.mark.skipif(not os.environ.get("ANTHROPIC_API_KEY"),
                       reason="ANTHROPIC_API_KEY is not set: the live calls are opt-in"),
]
MODEL = os.environ.get("POISE_LIVE_ANTHROPIC_MODEL", "claude-haiku-4-5")


@pytest.fixture(scope="module")
def client() -> AnthropicClient:
    return AnthropicClient(MODEL, timeout_s=300, max_retries=2, metrics=None)


def test_live_propose_and_screen(tmp_path):
    with SQLiteStore(tmp_path / "archive.db") as store:
        run_with(store, f"anthropic:{MODEL}", implement="offline")
        event = propose(store, Agents(timeout_s=300, max_retries=2, metrics=None))
    assert isinstance(event, EvtProposed), event
    assert event.proposal.generator == f"anthropic:{MODEL}"
    assert {c.operator for c in event.llm_calls if c.ok} == {"propose", "screen"}


def test_live_implement_and_review(client):
    from test_population_screening import proposal

    idea = proposal("grpo+entropy", "entropy:bonus")
    coder = LLMCoder(client, run_id="live", node_id="n001")
    source = coder.write(idea)
    assert module_problem(source) is None
    review = coder.review(idea, source)
    assert review.name == "fidelity" and isinstance(review.passed, bool)


def test_live_reflect(client):
    root = evaluated("n0", 0.50)
    child = evaluated("n1", 0.56, parent=root, mechanisms=CHILD, trained=trajectory())
    reflection = llm_reflect(client, child, root, root, 0.02, RunConfig(run_id="live"))
    assert reflection.generator == f"anthropic:{MODEL}" and reflection.text and reflection.effects
