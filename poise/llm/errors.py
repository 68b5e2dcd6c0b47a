"""What can go wrong when an operator asks the agent LLM for a structured answer.

Every error carries `calls`, the CallRecords of every request made for that answer (including the
failed ones), so the caller can store them on the node: a failure never loses what was spent.
"""

from __future__ import annotations

from poise.contracts import CallRecord


class LLMError(RuntimeError):
    """Base of the agent-LLM errors; `calls` lists every request made, in order."""

    def __init__(self, message: str, calls: list[CallRecord]) -> None:
        super().__init__(message)
        self.calls = list(calls)

    @property
    def cost_usd(self) -> float:
        return sum(call.cost_usd for call in self.calls)


class LLMCallError(LLMError):
    """The endpoint could not be reached or refused the request, after the SDK's own retries."""


class LLMAnswerError(LLMError):
    """The model's answers never matched the schema, after every repair round."""


class BudgetExceeded(LLMError):
    """The run's agent-LLM spend cap would be exceeded by the next request, which was not sent."""
