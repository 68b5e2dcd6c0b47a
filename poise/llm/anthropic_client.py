"""Structured completions from Claude through the `anthropic` SDK (2.x; docs/operations.md, "Agent LLMs").

Two ways to get JSON that fits the schema:
- `tool`: a forced tool call (`tool_choice={"type": "tool", ...}`) whose `input_schema` is the pydantic
  JSON schema; the answer is the tool call's input. Works on every tool-capable model and takes any JSON
  schema (maps with free keys included).
- `output_config`: structured outputs (`output_config.format` = json_schema, constrained decoding); the
  answer is the text. The schema goes through `anthropic.transform_schema`, which closes every object
  (`additionalProperties: false`) and moves unsupported constraints into descriptions, so schemas for this
  mode should use lists of named items rather than free-key maps.
`auto` (the default) starts with the forced tool and moves to `output_config` for good when the API
rejects the first request with a 400: newer models (Sonnet 5.5, Opus 5.5) refuse forced tool use.

No sampling parameters are sent: SDK 2.x removed `temperature`/`top_p`/`top_k` and API version 2026-10-21
rejects them. The stable system blocks end with a `cache_control` breakpoint, which caches the tools and
the whole system prefix; usage reports the cache reads and writes that the cost is computed from.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import anthropic

from poise.llm.client import Conversation, LLMClient, Reply, RequestFailed, request_failure, retries_of
from poise.llm.cost import TokenUsage

StructuredMode = Literal["auto", "tool", "output_config"]
Effort = Literal["low", "medium", "high", "xhigh", "max"]


class AnthropicClient(LLMClient):
    """`LLMClient` for the Anthropic Messages API.

    The key and base URL come from the arguments, else ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL (read by the
    SDK). `effort` sets `output_config.effort` (how much the model thinks; fewer tokens, lower cost).
    """

    provider = "anthropic"

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 structured: StructuredMode = "auto", effort: Effort | None = None, **options: Any) -> None:
        modes = ["tool", "output_config"] if structured == "auto" else [structured]
        super().__init__(model, modes=modes, **options)
        self.effort = effort
        no_credentials = f"anthropic:{model}: no credentials; set ANTHROPIC_API_KEY or pass api_key"
        try:
            self._sdk = anthropic.Anthropic(
                api_key=api_key, base_url=base_url, max_retries=self.max_retries,
                timeout=anthropic.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s)))
        except anthropic.CredentialsError as err:  # a profile named by the environment that is not there
            raise ValueError(f"{no_credentials} ({err})") from err
        if not (self._sdk.api_key or self._sdk.auth_token or self._sdk.credentials):
            raise ValueError(no_credentials)

    @property
    def base_url(self) -> str:
        return str(self._sdk.base_url)

    def request_args(self, conversation: Conversation, max_tokens: int) -> dict[str, Any]:
        """The keyword arguments of `messages.create` for the conversation in the current mode."""
        args: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "messages": conversation.messages}
        if conversation.system:
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text} for text in conversation.system]
            cache: dict[str, str] = {"type": "ephemeral"}
            if self.cache_ttl != "5m":
                cache["ttl"] = self.cache_ttl
            blocks[-1]["cache_control"] = cache  # one breakpoint caches tools + every system block before it
            args["system"] = blocks
        output_config: dict[str, Any] = {"effort": self.effort} if self.effort else {}
        if self.mode == "tool":
            args["tools"] = [{"name": conversation.answer_name, "input_schema": conversation.schema_json,
                              "description": f"Submit the answer as one {conversation.schema.__name__} object."}]
            args["tool_choice"] = {"type": "tool", "name": conversation.answer_name}
        else:
            output_config["format"] = {"type": "json_schema",
                                       "schema": anthropic.transform_schema(conversation.schema_json)}
        if output_config:
            args["output_config"] = output_config
        return args

    def _send(self, conversation: Conversation, max_tokens: int) -> Reply:
        args = self.request_args(conversation, max_tokens)
        started = time.perf_counter()
        try:
            raw = self._sdk.messages.with_raw_response.create(**args)
            message = raw.parse()
        except anthropic.APIStatusError as err:
            fallback = isinstance(err, anthropic.BadRequestError) and self._fall_back(err.api_message or err.message)
            raise request_failure(status=err.status_code, message=err.api_message or err.message, timed_out=False,
                                  retries=retries_of(err.request), timeout_s=self.timeout_s, base_url=self.base_url,
                                  fallback=fallback, latency_s=time.perf_counter() - started) from err
        except anthropic.APIConnectionError as err:
            raise request_failure(status=None, message=str(err), timed_out=isinstance(err, anthropic.APITimeoutError),
                                  retries=retries_of(err.request), timeout_s=self.timeout_s, base_url=self.base_url,
                                  latency_s=time.perf_counter() - started) from err
        except anthropic.AnthropicError as err:  # e.g. no credentials could be resolved
            raise RequestFailed(f"{type(err).__name__}: {err}; set ANTHROPIC_API_KEY or pass api_key", 0,
                                time.perf_counter() - started) from err
        latency = time.perf_counter() - started
        tool_input = next((block.input for block in message.content
                           if block.type == "tool_use" and block.name == conversation.answer_name), None)
        usage = message.usage
        cache_1h = usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
        turn = [param for param in map(_as_param, message.content) if param is not None]
        return Reply(
            payload=tool_input,
            text="".join(block.text for block in message.content if block.type == "text"),
            stop_reason=message.stop_reason,
            truncated=message.stop_reason == "max_tokens",
            usage=TokenUsage(input=usage.input_tokens, output=usage.output_tokens,
                             cache_read=usage.cache_read_input_tokens or 0,
                             cache_write=usage.cache_creation_input_tokens or 0, cache_write_1h=cache_1h or 0),
            retries=raw.retries_taken,
            latency_s=latency,
            assistant_turn={"role": "assistant", "content": turn} if turn else None,
        )

    def _repair_turns(self, conversation: Conversation, reply: Reply, problem: str) -> list[dict[str, Any]]:
        turns = [reply.assistant_turn] if reply.assistant_turn else []
        content: list[dict[str, Any]] = []
        tool_use = next((block for block in (reply.assistant_turn or {}).get("content", [])
                         if block["type"] == "tool_use"), None)
        if tool_use is not None:  # a tool call must be answered by its result before anything else
            content.append({"type": "tool_result", "tool_use_id": tool_use["id"], "is_error": True,
                            "content": problem})
            content.append({"type": "text", "text": f"Call {conversation.answer_name} again with a corrected, "
                                                    "complete answer."})
        else:
            how = (f"Call {conversation.answer_name} with" if self.mode == "tool"
                   else "Reply with only")
            content.append({"type": "text", "text": f"{problem}\n\n{how} a corrected, complete answer."})
        return [*turns, {"role": "user", "content": content}]


def _as_param(block: Any) -> dict[str, Any] | None:
    """A response content block as a request block, to send the answer back in a repair round; thinking
    blocks go back unchanged (the API ties them to the conversation), other kinds are dropped."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    if block.type == "thinking":
        return {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
    if block.type == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.data}
    return None
