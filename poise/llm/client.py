"""The agent-LLM client interface: one structured completion, validated, repaired, metered, recorded.

An operator (proposer, screener, implementer, reflector) calls

    value, calls = client.complete_json(system, prompt, Schema, operator="propose", run_id=..., node_id=...)

`system` is a list of stable text blocks (instructions, interface docs, literature priors) that the
provider can cache across calls; `prompt` is the per-request part. The answer is parsed into the pydantic
`Schema`. An answer that is not JSON, is cut off at `max_tokens`, or breaks the schema goes back to the
model with the validation error, up to `max_repairs` times; then `LLMAnswerError`. Transport trouble
(429, 5xx, timeouts) is retried inside the SDK with backoff; what remains is `LLMCallError`. Every
request becomes a `CallRecord` (tokens, cost, latency, retries), returned with the value or carried by
the error, booked on the `CostMeter` and counted in the Prometheus metrics.

Providers implement `_send` (one request of the conversation so far) and `_repair_turns` (how an invalid
answer and its error are put back into the conversation); everything else lives here.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError

from poise.contracts import CallRecord, LlmOperator, parse_llm_spec
from poise.llm.cost import CacheTTL, CostMeter, PriceTable, TokenUsage
from poise.llm.errors import LLMAnswerError, LLMCallError
from poise.metrics import METRICS, Metrics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

DEFAULT_MAX_REPAIRS = 2
DEFAULT_MAX_RETRIES = 4      # the SDK's transport retries per request (its default is 2)
DEFAULT_TIMEOUT_S = 600.0    # per HTTP attempt; the SDKs' default, long enough for a thinking model's answer
DEFAULT_MAX_TOKENS = 8192
MAX_SCHEMA_ERRORS = 20       # validation errors listed in one repair message


_COLLECTORS: ContextVar[tuple[list[CallRecord], ...]] = ContextVar("poise_llm_collectors", default=())


@contextmanager
def collect_calls() -> Iterator[list[CallRecord]]:
    """Every CallRecord booked by any client in this context (this thread), in order, failed requests included.

    A service wraps the handling of one message in it, so the requests an operator made — including those of
    a completion that ended in an error — reach the node's event however the operator exited."""
    calls: list[CallRecord] = []
    token = _COLLECTORS.set((*_COLLECTORS.get(), calls))
    try:
        yield calls
    finally:
        _COLLECTORS.reset(token)


class Completion(NamedTuple, Generic[M]):
    """A validated answer and every request it took (the last one is the answer's)."""

    value: M
    calls: list[CallRecord]

    @property
    def cost_usd(self) -> float:
        return sum(call.cost_usd for call in self.calls)


@dataclass
class Conversation:
    """The request so far: stable system blocks, the messages in the provider's format, the answer schema."""

    system: list[str]
    messages: list[dict[str, Any]]
    schema: type[BaseModel]
    schema_json: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.schema_json = self.schema.model_json_schema()

    @property
    def answer_name(self) -> str:
        """A name for the answer (the tool or json_schema name): letters, digits and underscores."""
        return "submit_" + re.sub(r"\W+", "_", self.schema.__name__).strip("_").lower()[:50]

    def chars(self) -> int:
        """The request's size in characters, for budget estimates."""
        return (sum(len(block) for block in self.system) + len(json.dumps(self.messages))
                + len(json.dumps(self.schema_json)))


@dataclass
class Reply:
    """One answer from the provider, before validation."""

    payload: Any | None          # structured data the provider already parsed (a tool call's input), or None
    text: str                    # the answer's text, parsed as JSON when there is no payload
    stop_reason: str | None
    truncated: bool              # stopped at max_tokens
    usage: TokenUsage
    retries: int
    latency_s: float
    assistant_turn: dict[str, Any] | None  # the answer as a message to send back in a repair round


class RequestFailed(Exception):
    """A provider request that produced no answer; `fallback` asks to resend it in the next mode."""

    def __init__(self, message: str, retries: int, latency_s: float, fallback: bool = False) -> None:
        super().__init__(message)
        self.retries = retries
        self.latency_s = latency_s
        self.fallback = fallback


class LLMClient(ABC):
    """Structured completions from one model of one provider (see the module docstring)."""

    provider: ClassVar[str]

    def __init__(self, model: str, *, modes: Sequence[str], max_repairs: int = DEFAULT_MAX_REPAIRS,
                 max_retries: int = DEFAULT_MAX_RETRIES, timeout_s: float = DEFAULT_TIMEOUT_S,
                 prices: PriceTable | None = None, meter: CostMeter | None = None,
                 metrics: Metrics | None = METRICS, cache_ttl: CacheTTL = "5m") -> None:
        if max_repairs < 0 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("max_repairs and max_retries must be >= 0 and timeout_s > 0")
        self.model = model
        self.max_repairs = max_repairs
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.prices = prices or PriceTable()
        self.meter = meter
        self.metrics = metrics
        self.cache_ttl = cache_ttl
        # Ways of asking for structure, best first. Until one request in the current mode has succeeded, a
        # 400 that says the server does not support it moves on to the next (see `_fall_back`).
        self._modes = list(modes)
        self._mode_confirmed = len(self._modes) == 1

    @property
    def mode(self) -> str:
        return self._modes[0]

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.model}"

    # ---------------------------------------------------------------------------------- provider hooks

    @abstractmethod
    def _send(self, conversation: Conversation, max_tokens: int) -> Reply:
        """One request in the current mode; raises RequestFailed when no answer came back."""

    @abstractmethod
    def _repair_turns(self, conversation: Conversation, reply: Reply, problem: str) -> list[dict[str, Any]]:
        """The messages that put `reply` and what is wrong with it back into the conversation."""

    def _fall_back(self, reason: str) -> bool:
        """Switch to the next mode if the current one is unconfirmed; True if there was one to switch to."""
        if self._mode_confirmed or len(self._modes) < 2:
            return False
        log.warning("%s does not accept structured mode %r (%s); falling back to %r", self.name, self._modes[0],
                    reason, self._modes[1])
        self._modes.pop(0)
        self._mode_confirmed = len(self._modes) == 1
        return True

    # ------------------------------------------------------------------------------------------ the call

    def complete_json(self, system: Sequence[str], prompt: str, schema: type[M], *, operator: LlmOperator,
                      max_tokens: int = DEFAULT_MAX_TOKENS, run_id: str | None = None,
                      node_id: str | None = None, prompt_id: str | None = None) -> Completion[M]:
        """Ask for one answer matching `schema`; see the module docstring for retries, repairs and costs.

        Raises BudgetExceeded (the run's cap would be passed; nothing sent), LLMCallError (no answer from
        the endpoint) or LLMAnswerError (no valid answer after the repair rounds); each carries `calls`.
        """
        conversation = Conversation(list(system), [{"role": "user", "content": prompt}], schema)
        calls: list[CallRecord] = []
        attempt = 1
        while True:
            mode = self.mode
            worst_case = self.prices.worst_case(self.model, conversation.chars(), max_tokens, self.cache_ttl)
            budget = (self.meter.reserve(run_id, worst_case, f"{operator} request {attempt} to {self.name}", calls)
                      if self.meter is not None else nullcontext())
            with budget:
                try:
                    reply = self._send(conversation, max_tokens)
                except RequestFailed as failure:
                    self._book(calls, CallRecord(
                        provider=self.provider, model=self.model, operator=operator, prompt=prompt_id, mode=mode,
                        attempt=attempt, retries=failure.retries, latency_s=failure.latency_s, ok=False,
                        error=str(failure), priced=self.prices.price_of(self.model) is not None), run_id, node_id)
                    if failure.fallback:
                        continue
                    raise LLMCallError(f"{self.name} ({operator}): {failure}", calls) from failure
            self._mode_confirmed = True
            value, problem = validate_answer(schema, reply, max_tokens)
            usd, priced = self.prices.cost(self.model, reply.usage)
            self._book(calls, CallRecord(
                provider=self.provider, model=self.model, operator=operator, prompt=prompt_id, mode=mode,
                attempt=attempt, retries=reply.retries, input_tokens=reply.usage.input,
                output_tokens=reply.usage.output, cache_read_tokens=reply.usage.cache_read,
                cache_write_tokens=reply.usage.cache_write,
                latency_s=reply.latency_s, cost_usd=usd, priced=priced, stop_reason=reply.stop_reason,
                ok=problem is None, error=problem), run_id, node_id)
            if problem is None:
                return Completion(value, calls)
            if attempt > self.max_repairs:
                raise LLMAnswerError(
                    f"{self.name} ({operator}): no valid {schema.__name__} after {attempt} answers "
                    f"({self.max_repairs} repair rounds); last problem: {problem}", calls)
            log.info("%s (%s): answer %d is invalid, asking for a repair: %s", self.name, operator, attempt,
                     problem.splitlines()[0])
            conversation.messages.extend(self._repair_turns(conversation, reply, problem))
            attempt += 1

    def _book(self, calls: list[CallRecord], call: CallRecord, run_id: str | None, node_id: str | None) -> None:
        calls.append(call)
        for collector in _COLLECTORS.get():
            collector.append(call)
        if self.meter is not None:
            self.meter.record(call, run_id=run_id, node_id=node_id)
        if self.metrics is not None:
            self.metrics.record_llm_call(call)


def request_failure(*, status: int | None, message: str, timed_out: bool, retries: int, timeout_s: float,
                    base_url: str, fallback: bool = False, latency_s: float = 0.0) -> RequestFailed:
    """A RequestFailed whose message says what happened and what to do about it."""
    tries = f"{retries + 1} attempt{'s' if retries else ''}"
    if timed_out:
        text = (f"no answer within {timeout_s:g} s per attempt, {tries}; raise timeout_s or check that "
                f"{base_url} is serving")
    elif status is None:
        text = f"cannot reach {base_url} ({message}), {tries}; check the URL and the network"
    elif status in (401, 403):
        text = f"HTTP {status} {message}; check the API key (argument or environment)"
    elif status == 429:
        text = f"rate limited (HTTP 429) after {tries}: {message}; lower the parallelism or raise max_retries"
    elif status >= 500:
        text = f"server error HTTP {status} after {tries}: {message}"
    else:
        text = f"HTTP {status}: {message}"
    return RequestFailed(text, retries, latency_s, fallback)


def retries_of(request: Any) -> int:
    """How many retries the SDK had made when it gave up: the retry count it sends on every attempt."""
    try:
        return int(request.headers.get("x-stainless-retry-count", 0))
    except (AttributeError, TypeError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------- validation

_FENCED = re.compile(r"^```(?:json)?\s*\n(?P<body>.*?)\n?```\s*$", re.DOTALL)


def validate_answer(schema: type[M], reply: Reply, max_tokens: int) -> tuple[M | None, str | None]:
    """(value, None) for a valid answer, or (None, the problem in words the model can act on)."""
    data, problem = reply.payload, None
    if data is None:
        text = reply.text.strip()
        fenced = _FENCED.match(text)
        text = fenced["body"] if fenced else text
        if not text:
            problem = "The answer was empty; no JSON object was given."
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                problem = (f"The answer is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno} "
                           f"(character {err.pos} of {len(text)}).")
    if problem is None:
        try:
            return schema.model_validate(data), None
        except ValidationError as err:
            problem = describe_validation_error(schema, err)
    if reply.truncated:
        problem = (f"The answer was cut off at the {max_tokens}-token limit before it was complete.\n{problem}\n"
                   "Give a shorter answer that is complete.")
    return None, problem


def describe_validation_error(schema: type[BaseModel], err: ValidationError) -> str:
    """The pydantic errors as one line each: where, what is wrong, and (shortened) what was given."""
    lines = [f"The answer does not match the {schema.__name__} schema ({err.error_count()} errors):"]
    for error in err.errors(include_url=False)[:MAX_SCHEMA_ERRORS]:
        where = ".".join(str(part) for part in error["loc"]) or "(the whole answer)"
        given = json.dumps(error.get("input"), default=str)
        given = given if len(given) <= 80 else given[:77] + "..."
        lines.append(f"- {where}: {error['msg']} (given: {given})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- from the config


def make_client(spec: str, **options: Any) -> LLMClient | None:
    """The client of a `Backends.llm` spec: None for "offline" (the offline operators), an AnthropicClient for
    "anthropic:<model>", an OpenAIClient for "openai:<url>#<model>". `options` go to the client's constructor
    (max_repairs, max_retries, timeout_s, prices, meter, api_key, ...)."""
    provider, base_url, model = parse_llm_spec(spec)
    if provider == "offline":
        return None
    assert model is not None
    if provider == "anthropic":
        from poise.llm.anthropic_client import AnthropicClient

        return AnthropicClient(model, **options)
    from poise.llm.openai_client import OpenAIClient

    return OpenAIClient(model, base_url=base_url, **options)
