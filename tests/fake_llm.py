"""Local fake LLM servers for tests: the Anthropic Messages API and OpenAI chat completions over real HTTP.

A test scripts what the server answers, one step per request, and reads back what the client sent:

    with FakeAnthropic() as fake:
        fake.script(HttpError(429, retry_after_s=0.01), Answer({"name": "x", ...}))
        client = AnthropicClient("claude-sonnet-4-5", base_url=fake.url, api_key="test-key")
        ...
        fake.requests[1].headers["x-stainless-retry-count"] == "1"

`respond_with(fn)` answers whatever the script does not cover with `fn(request)`, for a whole run whose
requests come in no fixed order. Steps: `Answer` (a JSON answer, shaped the way the request asked: a
tool call, structured-output text, or chat content), `truncated(data)` (the same answer cut off at the
token limit), `HttpError` (any status, with retry-after), `Stall` (no answer until after the client's
timeout). A request that finds the script empty (and no responder) gets a 500 the SDKs do not retry, so
a test that under-scripts fails at once instead of hanging. Usage is computed from the request sizes,
and the Anthropic fake mimics prompt caching: the first request with a `cache_control` prefix writes it,
later ones with the same prefix read it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    """A model answer: `data` as JSON (or `text` verbatim), optionally cut off at the token limit."""

    data: Any = None
    text: str | None = None
    cut_off: bool = False


def truncated(data: dict[str, Any]) -> Answer:
    """`data` cut off by the token limit: half its JSON text, or (as a tool call) half its fields."""
    return Answer(data=data, cut_off=True)


@dataclass
class HttpError:
    status: int
    retry_after_s: float | None = None
    message: str = "scripted failure"


@dataclass
class Stall:
    """Hold the request `seconds` and close it unanswered (the client should have timed out by then)."""

    seconds: float


@dataclass
class Request:
    """One request as the server received it; header names are lower case."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


Reply = tuple[int, dict[str, str], dict[str, Any]]


def tokens(value: Any) -> int:
    """A token count for `value`: a token per four characters of its JSON, like real tokenizers roughly."""
    text = value if isinstance(value, str) else json.dumps(value)
    return max(1, len(text) // 4)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw or b"{}"))
        outcome = self.server.fake.handle(request)
        if isinstance(outcome, Stall):
            self.server.fake.stopping.wait(outcome.seconds)
            self.close_connection = True
            return
        status, headers, payload = outcome
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for name, value in {"content-type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this attempt

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer


class FakeServer:
    """A scripted HTTP server on 127.0.0.1, used as a context manager; subclasses speak one API."""

    api_path = ""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self._steps: deque[Answer | HttpError | Stall] = deque()
        self._responder: Callable[[Request], Answer | HttpError | Stall] | None = None
        self._lock = threading.Lock()
        self._server: _Server | None = None

    def script(self, *steps: Answer | HttpError | Stall) -> FakeServer:
        with self._lock:
            self._steps.extend(steps)
        return self

    def respond_with(self, responder: Callable[[Request], Answer | HttpError | Stall]) -> FakeServer:
        """Answer every request the script does not cover with `responder(request)`: a replay keyed on what
        the request asks for (its answer schema, its prompt), for runs whose request order is not fixed."""
        self._responder = responder
        return self

    @property
    def remaining(self) -> int:
        return len(self._steps)

    @property
    def url(self) -> str:
        assert self._server is not None, "use the fake as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def handle(self, request: Request) -> Reply | Stall:
        with self._lock:
            self.requests.append(request)
            if request.path != self.api_path:
                return 404, {}, self.error_body(404, f"fake serves only POST {self.api_path}")
            refusal = self.refuse(request)
            if refusal is not None:
                return refusal
            if self._steps:
                step = self._steps.popleft()
            elif self._responder is not None:
                step = self._responder(request)
            else:
                return 500, {"x-should-retry": "false"}, self.error_body(
                    500, f"fake server: no scripted step left for request {len(self.requests)}")
            if isinstance(step, Stall):
                return step
            if isinstance(step, HttpError):
                headers = {} if step.retry_after_s is None else {"retry-after": str(step.retry_after_s)}
                return step.status, headers, self.error_body(step.status, step.message)
            return 200, {}, self.answer(request, step)

    # ------------------------------------------------------------------------------- per API

    def refuse(self, request: Request) -> Reply | None:
        """A 400 for a request shape this server is set up to reject (before any scripted step)."""
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def answer(self, request: Request, step: Answer) -> dict[str, Any]:
        raise NotImplementedError


def _answer_text(step: Answer) -> str:
    text = step.text if step.text is not None else json.dumps(step.data)
    return text[: len(text) // 2] if step.cut_off else text


_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


class FakeAnthropic(FakeServer):
    """POST /v1/messages. `reject_forced_tool` answers a forced tool_choice with a 400, as Sonnet 5.5 does."""

    api_path = "/v1/messages"

    def __init__(self, reject_forced_tool: bool = False) -> None:
        super().__init__()
        self.reject_forced_tool = reject_forced_tool
        self._cached_prefixes: set[str] = set()

    def refuse(self, request: Request) -> Reply | None:
        if self.reject_forced_tool and request.body.get("tool_choice", {}).get("type") in ("tool", "any"):
            return 400, {}, self.error_body(400, "tool_choice: forced tool use is not supported on this model; "
                                                 "use tool_choice auto or output_config.format")
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": message},
                "request_id": f"req_fake{len(self.requests)}"}

    def answer(self, request: Request, step: Answer) -> dict[str, Any]:
        body = request.body
        n = len(self.requests)
        forced = body.get("tool_choice", {}).get("type") == "tool"
        if forced and step.text is None:
            data = step.data
            if step.cut_off and isinstance(data, dict):
                data = dict(list(data.items())[: len(data) // 2])
            content = [{"type": "tool_use", "id": f"toolu_fake{n}", "name": body["tool_choice"]["name"],
                        "input": data}]
            stop = "max_tokens" if step.cut_off else "tool_use"
        else:
            content = [{"type": "text", "text": _answer_text(step)}]
            stop = "max_tokens" if step.cut_off else "end_turn"
        cache_read = cache_write = 0
        system = body.get("system", [])
        if isinstance(system, list) and any("cache_control" in block for block in system):
            prefix = json.dumps([body.get("tools", []), system], sort_keys=True)
            key = hashlib.sha256(prefix.encode()).hexdigest()
            if key in self._cached_prefixes:
                cache_read = tokens(prefix)
            else:
                cache_write = tokens(prefix)
                self._cached_prefixes.add(key)
        return {
            "id": f"msg_fake{n}", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": tokens(body.get("messages", [])), "output_tokens": tokens(content),
                      "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read,
                      "cache_creation": {"ephemeral_5m_input_tokens": cache_write, "ephemeral_1h_input_tokens": 0},
                      "service_tier": "standard"},
        }


class FakeOpenAI(FakeServer):
    """POST /v1/chat/completions. `reject_json_schema` answers response_format json_schema with a 400, as
    older llama.cpp and Ollama builds do; `cached_tokens` is reported as the prompt's cached part."""

    api_path = "/v1/chat/completions"

    def __init__(self, reject_json_schema: bool = False, cached_tokens: int = 0) -> None:
        super().__init__()
        self.reject_json_schema = reject_json_schema
        self.cached_tokens = cached_tokens

    @property
    def url(self) -> str:
        return super().url + "/v1"

    def refuse(self, request: Request) -> Reply | None:
        if self.reject_json_schema and request.body.get("response_format", {}).get("type") == "json_schema":
            return 400, {}, self.error_body(400, "response_format type json_schema is not supported")
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def answer(self, request: Request, step: Answer) -> dict[str, Any]:
        text = _answer_text(step)
        prompt = tokens(request.body.get("messages", []))
        completion = tokens(text)
        return {
            "id": f"chatcmpl-fake{len(self.requests)}", "object": "chat.completion", "created": 1767225600,
            "model": request.body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if step.cut_off else "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt)}},
        }
