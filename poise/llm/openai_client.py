"""Structured completions from any OpenAI-compatible chat endpoint (vLLM, llama.cpp, Ollama, OpenAI).

Modes, best first: `json_schema` (`response_format` with the pydantic schema: guided decoding on vLLM and
llama.cpp, structured outputs on OpenAI), `json_object` (JSON mode, the schema stated in the system
message), `prompt` (no response_format at all, the schema in the system message). `auto` starts with
`json_schema` and steps down for good when the server rejects the first request with a 400 or 422.

Transport retries (429, 5xx, timeouts, with backoff that honours retry-after) are the SDK's. Servers
without authentication still need some key for the SDK, so an absent key is sent as "EMPTY" (the vLLM
convention). Prefix caching is the server's business; the stable system text goes first so it can.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Literal

import openai

from poise.llm.client import Conversation, LLMClient, Reply, request_failure, retries_of
from poise.llm.cost import TokenUsage

StructuredMode = Literal["auto", "json_schema", "json_object", "prompt"]
NO_KEY = "EMPTY"


class OpenAIClient(LLMClient):
    """`LLMClient` for OpenAI-compatible `/chat/completions`.

    `base_url` is the server's API root (e.g. http://localhost:8000/v1), else OPENAI_BASE_URL; the key is
    `api_key`, else OPENAI_API_KEY, else none.
    """

    provider = "openai"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 structured: StructuredMode = "auto", **options: Any) -> None:
        modes = ["json_schema", "json_object", "prompt"] if structured == "auto" else [structured]
        super().__init__(model, modes=modes, **options)
        self._sdk = openai.OpenAI(
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or NO_KEY,
            base_url=base_url, max_retries=self.max_retries,  # None: the SDK reads OPENAI_BASE_URL
            timeout=openai.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s)))

    @property
    def base_url(self) -> str:
        return str(self._sdk.base_url)

    def request_args(self, conversation: Conversation, max_tokens: int) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` for the conversation in the current mode."""
        system = "\n\n".join(conversation.system)
        if self.mode != "json_schema":
            system += ("\n\n" if system else "") + (
                "Answer with one JSON object and nothing else (no prose, no code fence). It must match this "
                f"JSON schema:\n{json.dumps(conversation.schema_json)}")
        messages = ([{"role": "system", "content": system}] if system else []) + conversation.messages
        args: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens}
        if self.mode == "json_schema":
            args["response_format"] = {"type": "json_schema", "json_schema": {
                "name": conversation.answer_name, "schema": conversation.schema_json, "strict": False}}
        elif self.mode == "json_object":
            args["response_format"] = {"type": "json_object"}
        return args

    def _send(self, conversation: Conversation, max_tokens: int) -> Reply:
        args = self.request_args(conversation, max_tokens)
        started = time.perf_counter()
        try:
            raw = self._sdk.chat.completions.with_raw_response.create(**args)
            completion = raw.parse()
        except openai.APIStatusError as err:
            rejected = isinstance(err, openai.BadRequestError | openai.UnprocessableEntityError)
            fallback = rejected and self._fall_back(err.message)
            raise request_failure(status=err.status_code, message=err.message, timed_out=False,
                                  retries=retries_of(err.request), timeout_s=self.timeout_s, base_url=self.base_url,
                                  fallback=fallback, latency_s=time.perf_counter() - started) from err
        except openai.APIConnectionError as err:
            raise request_failure(status=None, message=str(err), timed_out=isinstance(err, openai.APITimeoutError),
                                  retries=retries_of(err.request), timeout_s=self.timeout_s, base_url=self.base_url,
                                  latency_s=time.perf_counter() - started) from err
        latency = time.perf_counter() - started
        choice = completion.choices[0] if completion.choices else None
        text = (choice.message.content or "") if choice else ""
        usage = completion.usage
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage and usage.prompt_tokens_details else 0
        return Reply(
            payload=None,
            text=text,
            stop_reason=choice.finish_reason if choice else None,
            truncated=choice is not None and choice.finish_reason == "length",
            # prompt_tokens includes the cached ones; split them like Anthropic's usage does
            usage=TokenUsage(input=max((usage.prompt_tokens if usage else 0) - cached, 0),
                             output=usage.completion_tokens if usage else 0, cache_read=cached),
            retries=raw.retries_taken,
            latency_s=latency,
            assistant_turn={"role": "assistant", "content": text},
        )

    def _repair_turns(self, conversation: Conversation, reply: Reply, problem: str) -> list[dict[str, Any]]:
        return [reply.assistant_turn or {"role": "assistant", "content": reply.text},
                {"role": "user", "content": f"{problem}\n\nReply with only the corrected, complete JSON object."}]
