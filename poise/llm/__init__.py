"""Agent-LLM clients for the operators: structured completions with repair, retries, cost and caps.

    client = make_client(run_config.backends.llm, meter=meter)   # None for "offline"
    value, calls = client.complete_json(system_blocks, prompt, Schema, operator="propose",
                                        run_id=run_id, node_id=node_id)

`AnthropicClient` and `OpenAIClient` are imported on first use, so importing this package does not load
either SDK (the offline operators need neither).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from poise.contracts import CallRecord
from poise.llm.client import Completion, LLMClient, collect_calls, make_client
from poise.llm.cost import ANTHROPIC_PRICES, CostMeter, ModelPrice, PriceTable, llm_cost
from poise.llm.errors import BudgetExceeded, LLMAnswerError, LLMCallError, LLMError
from poise.llm.untrusted import quote_untrusted

if TYPE_CHECKING:
    from poise.llm.anthropic_client import AnthropicClient
    from poise.llm.openai_client import OpenAIClient

__all__ = [
    "ANTHROPIC_PRICES", "AnthropicClient", "BudgetExceeded", "CallRecord", "collect_calls", "Completion", "CostMeter",
    "llm_cost", "LLMAnswerError", "LLMCallError", "LLMClient", "LLMError", "make_client", "ModelPrice",
    "OpenAIClient", "PriceTable", "quote_untrusted",
]


def __getattr__(name: str) -> Any:
    if name == "AnthropicClient":
        from poise.llm.anthropic_client import AnthropicClient

        return AnthropicClient
    if name == "OpenAIClient":
        from poise.llm.openai_client import OpenAIClient

        return OpenAIClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
