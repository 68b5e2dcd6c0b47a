"""The agent operators' shared parts: which LLM client each operator of a run uses, and the prompt files.

    agents = Agents()                                   # one per process; shares one CostMeter
    client = agents.client(config, "propose")           # None: the operator stays offline
    prompt = load_prompt("propose")                     # poise/agents/prompts/propose.md
    text = prompt.render(parent=..., references=...)

A run's `backends.llm` names the agent LLM of every operator, and `backends.agents` overrides it per operator
("propose", "screen", "implement", "reflect"). The meter holds the run's `llm_budget_usd`: a request that
could pass it is not sent (BudgetExceeded), and the archive stops proposing once the run's nodes have spent it.
In distributed mode every service process has its own meter, seeded by the caller with what the archive
already recorded; the archive's check over all nodes is the run-wide one.
"""

from __future__ import annotations

import threading
from typing import Any

from poise.agents.prompts import Prompt, PromptError, load_prompt
from poise.contracts import LlmOperator, RunConfig
from poise.llm import CostMeter, LLMClient, make_client

__all__ = ["Agents", "Prompt", "PromptError", "default_agents", "describe_agents", "load_prompt"]
OPERATORS: tuple[LlmOperator, ...] = ("propose", "screen", "implement", "reflect")


class Agents:
    """The LLM clients of this process, one per (spec, settings), built on first use and shared by runs."""

    def __init__(self, meter: CostMeter | None = None, **client_options: Any) -> None:
        self.meter = meter or CostMeter()
        self.client_options = client_options
        self._clients: dict[str, LLMClient | None] = {}
        self._lock = threading.Lock()

    def spec(self, config: RunConfig, operator: LlmOperator) -> str:
        return config.backends.llm_for(operator)

    def client(self, config: RunConfig, operator: LlmOperator, spent_usd: float | None = None) -> LLMClient | None:
        """The client `operator` uses in `config`'s run (None when it is offline), with the run's cap set."""
        spec = self.spec(config, operator)
        with self._lock:
            if config.llm_budget_usd is not None or self.meter.cap_usd(config.run_id) is not None:
                self.meter.set_cap(config.run_id, config.llm_budget_usd)
            if spent_usd is not None and self.meter.run_usd(config.run_id) < spent_usd:
                self.meter.record_spend(config.run_id, spent_usd - self.meter.run_usd(config.run_id))
            if spec not in self._clients:
                self._clients[spec] = make_client(spec, meter=self.meter, **self.client_options)
            return self._clients[spec]


_DEFAULT: Agents | None = None
_DEFAULT_LOCK = threading.Lock()


def default_agents() -> Agents:
    """This process's Agents: the services share it (and its meter) unless a test passes its own."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Agents()
        return _DEFAULT


def describe_agents(config: RunConfig) -> str:
    """The operators' agent LLMs in a few words: "offline", or each operator's spec, and the cap."""
    specs = {op: config.backends.llm_for(op) for op in OPERATORS}
    if set(specs.values()) == {"offline"}:
        return "offline"
    text = ", ".join(f"{op} {spec}" for op, spec in specs.items())
    return text + (f", cap ${config.llm_budget_usd:.2f}" if config.llm_budget_usd is not None else ", no cost cap")
