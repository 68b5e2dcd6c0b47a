"""What agent-LLM calls cost: a price table, and a meter that keeps a run under its spend cap.

Prices are USD per million tokens, by model family, as published on
https://platform.claude.com/docs/en/about-claude/pricing (read October 2026; Anthropic changes them, so
a deployment overrides entries with `PriceTable({...})`). A model id is priced by its entry, or by the
entry it extends with a snapshot date or `-latest` (`claude-opus-4-5-20251101` → `claude-opus-4-5`); a
newer version of a family (`claude-fable-5-2`) is not priced as an older one. Models with no entry (a
local vLLM, an unknown id) cost 0 and their CallRecords say `priced=False`, so a $0 total is never
mistaken for free.

Cache accounting follows the Messages API usage: `input_tokens` excludes cache reads and writes, which
are billed at their own rates (reads ≈ 0.1× input, 5-minute writes 1.25×, 1-hour writes 2×).
"""

from __future__ import annotations

import math
import re
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from poise.contracts import CallRecord, Contract, Cost, NonNegative
from poise.llm.errors import BudgetExceeded

CacheTTL = Literal["5m", "1h"]
_SNAPSHOT = re.compile(r"-(?:\d{8}|latest)$")
CHARS_PER_TOKEN_FLOOR = 3.0  # budget estimates count a token per 3 characters: an overestimate for prose and code


class ModelPrice(Contract):
    """USD per million tokens of one model family."""

    input: NonNegative
    output: NonNegative
    cache_read: NonNegative
    cache_write: NonNegative = Field(description="5-minute cache writes")
    cache_write_1h: NonNegative


def _family(input: float, output: float, cache_read: float) -> ModelPrice:
    # Cache writes are 1.25x (5 minutes) and 2x (1 hour) the input rate for every family on the page.
    return ModelPrice(input=input, output=output, cache_read=cache_read, cache_write=1.25 * input,
                      cache_write_1h=2.0 * input)


ANTHROPIC_PRICES: dict[str, ModelPrice] = {
    "claude-fable-5-1": _family(10.0, 50.0, 0.25),
    "claude-mythos-5-1": _family(10.0, 50.0, 0.25),
    "claude-fable-5": _family(10.0, 50.0, 1.0),
    "claude-mythos-5": _family(10.0, 50.0, 1.0),
    "claude-opus-5-5": _family(4.0, 20.0, 0.20),
    "claude-opus-5": _family(5.0, 25.0, 0.50),
    "claude-opus-4-8": _family(5.0, 25.0, 0.50),
    "claude-opus-4-7": _family(5.0, 25.0, 0.50),
    "claude-opus-4-6": _family(5.0, 25.0, 0.50),
    "claude-opus-4-5": _family(5.0, 25.0, 0.50),
    "claude-opus-4-1": _family(15.0, 75.0, 1.50),
    "claude-opus-4-0": _family(15.0, 75.0, 1.50),
    "claude-opus-4": _family(15.0, 75.0, 1.50),
    "claude-sonnet-5-5": _family(2.0, 10.0, 0.10),
    "claude-sonnet-5": _family(2.0, 10.0, 0.20),
    "claude-sonnet-4-6": _family(3.0, 15.0, 0.30),
    "claude-sonnet-4-5": _family(3.0, 15.0, 0.30),
    "claude-sonnet-4-0": _family(3.0, 15.0, 0.30),
    "claude-sonnet-4": _family(3.0, 15.0, 0.30),
    "claude-3-7-sonnet": _family(3.0, 15.0, 0.30),
    "claude-haiku-5-5": _family(0.10, 0.50, 0.01),  # prompts up to 100k tokens; longer ones cost 5x (not modelled)
    "claude-haiku-4-5": _family(1.0, 5.0, 0.10),
    "claude-3-5-haiku": _family(0.80, 4.0, 0.08),
    "claude-3-haiku": _family(0.25, 1.25, 0.03),
}


@dataclass(frozen=True)
class TokenUsage:
    """The billed token counts of one response."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0  # all cache writes; `cache_write_1h` of them at the 1-hour rate
    cache_write_1h: int = 0


class PriceTable:
    """Model family → price; `overrides` replace or add families (e.g. a negotiated rate, a hosted open model)."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self.prices = {**ANTHROPIC_PRICES, **(overrides or {})}

    def price_of(self, model: str) -> ModelPrice | None:
        """The price of `model`, or of the entry it is a dated snapshot of; None when unpriced."""
        base = _SNAPSHOT.sub("", model)
        return self.prices.get(model) or self.prices.get(base)

    def cost(self, model: str, usage: TokenUsage) -> tuple[float, bool]:
        """(USD, priced) of one response; an unpriced model costs 0."""
        price = self.price_of(model)
        if price is None:
            return 0.0, False
        write_5m = max(usage.cache_write - usage.cache_write_1h, 0)
        usd = (usage.input * price.input + usage.output * price.output + usage.cache_read * price.cache_read
               + write_5m * price.cache_write + usage.cache_write_1h * price.cache_write_1h) / 1e6
        return usd, True

    def worst_case(self, model: str, prompt_chars: int, max_tokens: int, cache_ttl: CacheTTL = "5m") -> float:
        """An upper estimate of one request's cost before it is sent: every prompt token billed as a cache
        write (the dearest way to read it) at a token per 3 characters, and all `max_tokens` generated."""
        price = self.price_of(model)
        if price is None:
            return 0.0
        prompt_rate = max(price.input, price.cache_write_1h if cache_ttl == "1h" else price.cache_write)
        prompt_tokens = math.ceil(prompt_chars / CHARS_PER_TOKEN_FLOOR)
        return (prompt_tokens * prompt_rate + max_tokens * price.output) / 1e6


def llm_cost(calls: list[CallRecord]) -> Cost:
    """The agent-LLM part of a node's Cost; input counts every prompt token (uncached, read, written)."""
    return Cost(
        llm_input_tokens=sum(c.input_tokens + c.cache_read_tokens + c.cache_write_tokens for c in calls),
        llm_output_tokens=sum(c.output_tokens for c in calls),
        llm_usd=sum(c.cost_usd for c in calls),
    )


class CostMeter:
    """Sums agent-LLM spend per run and per node, and refuses requests that could break a run's cap.

    Thread-safe: parallel proposals share one meter. A request reserves its worst-case cost while it
    is in flight (`reserve`), so two requests cannot both squeeze under the cap; `record` books the
    actual cost. `spent_usd` seeds a resumed run with what its archive already recorded.
    """

    def __init__(self, caps_usd: Mapping[str, float] | None = None,
                 spent_usd: Mapping[str, float] | None = None) -> None:
        self._caps: dict[str, float] = dict(caps_usd or {})
        self._run_usd: dict[str, float] = defaultdict(float, spent_usd or {})
        self._reserved: dict[str, float] = defaultdict(float)
        self._node_calls: dict[str, list[CallRecord]] = defaultdict(list)
        self._lock = threading.Lock()

    def set_cap(self, run_id: str, usd: float | None) -> None:
        """Cap a run's agent-LLM spend at `usd` (None: no cap)."""
        with self._lock:
            if usd is None:
                self._caps.pop(run_id, None)
            else:
                self._caps[run_id] = usd

    def cap_usd(self, run_id: str) -> float | None:
        return self._caps.get(run_id)

    def run_usd(self, run_id: str) -> float:
        with self._lock:
            return self._run_usd.get(run_id, 0.0)

    def node_usd(self, node_id: str) -> float:
        with self._lock:
            return sum(c.cost_usd for c in self._node_calls.get(node_id, []))

    def node_calls(self, node_id: str) -> list[CallRecord]:
        with self._lock:
            return list(self._node_calls.get(node_id, []))

    def remaining_usd(self, run_id: str) -> float | None:
        """What the run may still spend (None without a cap), not counting requests in flight."""
        cap = self._caps.get(run_id)
        return None if cap is None else max(cap - self.run_usd(run_id), 0.0)

    @contextmanager
    def reserve(self, run_id: str | None, worst_case_usd: float, what: str,
                calls: list[CallRecord]) -> Iterator[None]:
        """Hold `worst_case_usd` of the run's cap for one request, or raise BudgetExceeded carrying `calls`."""
        if run_id is None:
            yield
            return
        with self._lock:
            cap = self._caps.get(run_id)
            committed = self._run_usd.get(run_id, 0.0) + self._reserved.get(run_id, 0.0)
            if cap is not None and committed + worst_case_usd > cap:
                raise BudgetExceeded(
                    f"run {run_id}: agent-LLM spend ${self._run_usd.get(run_id, 0.0):.4f} "
                    f"(+${self._reserved.get(run_id, 0.0):.4f} in flight) of the ${cap:.2f} cap; {what} could cost "
                    f"up to ${worst_case_usd:.4f}, so it was not sent. Raise the run's LLM budget to go on.",
                    calls)
            self._reserved[run_id] += worst_case_usd
        try:
            yield
        finally:
            with self._lock:
                self._reserved[run_id] -= worst_case_usd

    def record_spend(self, run_id: str, usd: float) -> None:
        """Book spend this meter did not see (a resumed run's, or another process's, from the archive)."""
        with self._lock:
            self._run_usd[run_id] += usd

    def record(self, call: CallRecord, run_id: str | None = None, node_id: str | None = None) -> None:
        """Book one finished request against its run and node."""
        with self._lock:
            if run_id is not None:
                self._run_usd[run_id] += call.cost_usd
            if node_id is not None:
                self._node_calls[node_id].append(call)
