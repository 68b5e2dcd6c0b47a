"""Fuzzing the archive's HTTP boundary (issue 23): requests drawn from the archive's own OpenAPI document and its
UI routes, well-formed and not, sent over real HTTP to the whole archive service (`serve("archive")`, as
`poise serve archive` runs it, with a stand-in bus). Most requests carry the archive's write token (so bodies
are judged); the others none or a wrong one, and a write among them must be a 401 (archive/auth.py).

No answer may be a 5xx; every 4xx carries a message a person can act on (a JSON `detail`, FastAPI's field
errors, or the UI's page that says what is missing); the service answers /healthz after every request, so a
request that kills its bus loop (a run started from a posted body) fails too. Hypothesis runs derandomized with
a bounded number of examples, so CI sends the same requests every time; a request that once broke the archive
stays below as an `@example`.
"""

from __future__ import annotations

import json
import re
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_services import RUN, FakeBus, _serve_in_thread, archive_nodes

from app.serve import build_app
from archive.api import archive_router
from archive.sqlite_store import SQLiteStore
from archive.ui.app import ui_router
from poise.contracts import RunConfig
from poise.settings import ServiceSettings
from poise.testbed.protocol import PROTOCOLS

EXAMPLES = 300  # ~30 s on two busy cores; CI runs exactly these (derandomized)
SPEC = build_app("archive", {}, router=archive_router(None, start_run=lambda run: run)).openapi()
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
# Ids the store holds or the fuzzer posts (so later requests read runs it started), then hostile ones.
RUN_IDS = (RUN, "fz-a", "fz-b")
NODE_IDS = tuple(node.node_id for node in archive_nodes())
HOSTILE = ("", " ", ".", "..", "../../etc/passwd", "a/b", "%00", "\x00", "\x7f", "<script>alert(1)</script>",
           "' OR '1'='1", "${jndi:ldap://x}", "é", "😀", "\u202e", "NaN", "-1", "9" * 40, "n" * 5000, "?a=b#c")
TOKEN = "fuzz-write-token-0123456789"  # the archive's write token (POISE_ARCHIVE_TOKEN)
JUNK = ("", "\ud800", "\udfff\ud800", "x" * 100_000, -1, 0, -(2**63) - 1, 2**64, 1e308, -1e-308, True, None, [],
        {}, [[[[[]]]]], {"a": {"b": {"c": [1, "2", None]}}})


@dataclass
class Call:
    """One HTTP request: `path` is already percent-encoded."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    content_type: str | None = None
    token: str | None = TOKEN

    def headers(self) -> dict[str, str]:
        headers = {"content-type": self.content_type} if self.content_type else {}
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    def unauthorized_write(self) -> bool:
        return self.method == "POST" and self.path == "/api/runs" and self.token != TOKEN


# ------------------------------------------------------------------------------ values from the schema


def resolve(schema: dict) -> dict:
    """`schema` with its `$ref` (to #/components/schemas/...) followed."""
    while "$ref" in schema:
        schema = SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


# Any code point a JSON string can carry, lone surrogates included (as \udXXX escapes; UTF-8 cannot encode them).
json_text = st.text(st.characters(exclude_categories=())) | st.sampled_from(("\ud800", "lone \udfff", "\x00", "\u202e"))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | json_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
junk = st.sampled_from(JUNK) | json_values


def from_schema(schema: dict, name: str = "") -> st.SearchStrategy[Any]:
    """Values valid for one schema of the OpenAPI document (the subset pydantic writes); `name` is the property
    it describes, for the few whose valid values the schema cannot say (a protocol must exist)."""
    schema = resolve(schema)
    if name == "protocol":
        return st.sampled_from(sorted(PROTOCOLS)) | st.text(max_size=12)
    if name == "run_id":
        return st.sampled_from(RUN_IDS) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for combined in ("anyOf", "oneOf"):
        if combined in schema:
            return st.one_of([from_schema(option, name) for option in schema[combined]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else None)
        return st.integers(min_value=low, max_value=schema.get("maximum"))
    if kind == "number":
        return st.floats(min_value=schema.get("minimum"), max_value=schema.get("maximum"), allow_nan=False,
                         allow_infinity=False, exclude_min="exclusiveMinimum" in schema)
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(
                lambda s: len(s) <= schema.get("maxLength", len(s)))
        return json_text.filter(lambda s: schema.get("minLength", 0) <= len(s) <= schema.get("maxLength", 40))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=3)
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = st.fixed_dictionaries({k: from_schema(v, k) for k, v in properties.items() if k in required},
                                      optional={k: from_schema(v, k) for k, v in properties.items()
                                                if k not in required})
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not properties:
            keys = from_schema(schema["propertyNames"]) if "propertyNames" in schema else st.text(max_size=12)
            return st.dictionaries(keys, from_schema(extra), max_size=3)
        return fixed
    return json_values


@st.composite
def broken(draw: st.DrawFn, value: dict) -> Any:
    """`value` (an object valid for its schema) made invalid in one way a client could get wrong."""
    how = draw(st.sampled_from(("drop", "add", "replace", "replace", "nest", "inner", "whole")))
    keys = sorted(value)
    inner = [k for k in keys if isinstance(value[k], dict)]
    if how == "inner" and inner:  # the same, one level down (objective, weights, backends)
        key = draw(st.sampled_from(inner))
        return {**value, key: draw(broken(value[key]))}
    if how == "drop" and keys:
        return {k: v for k, v in value.items() if k != draw(st.sampled_from(keys))}
    if how == "add":
        return {**value, draw(st.text(min_size=1, max_size=12)): draw(junk)}
    if how == "replace" and keys:
        return {**value, draw(st.sampled_from(keys)): draw(junk)}
    if how == "nest" and keys:
        return {**value, draw(st.sampled_from(keys)): {"nested": [value] * 3}}
    return draw(junk)


def raw_json(value: Any) -> bytes:
    """JSON text as a client would send it; lone surrogates become \\udXXX escapes, which JSON permits."""
    return json.dumps(value).encode()


@st.composite
def bodies(draw: st.DrawFn, schema: dict | None) -> tuple[bytes | None, str | None]:
    """A request body and its content type: schema-valid JSON, invalid JSON values, text that is not JSON,
    the wrong content type or none."""
    valid = from_schema(schema) if schema else json_values
    kind = draw(st.sampled_from(("valid", "valid", "invalid", "invalid", "invalid", "bytes", "empty")))
    if kind == "valid":
        data = raw_json(draw(valid))
    elif kind == "invalid":
        value = draw(valid)
        data = raw_json(draw(broken(value)) if isinstance(value, dict) else draw(junk))
    elif kind == "bytes":
        data = draw(st.sampled_from((b"{", b'{"run_id": ', b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"[" * 5000,
                                     b'{"run_id": NaN}', b'{"run_id": "a", "budget": Infinity}', b"null",
                                     b'"\\ud800"', b"run_id=a&budget=2")) | st.binary(max_size=300))
    else:
        data = b""
    content_type = draw(st.sampled_from(("application/json",) * 20 + (
        None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
        "application/json; charset=latin-1", "application/merge-patch+json", "garbage")))
    return data, content_type


# ------------------------------------------------------------------------------------------- requests


def identifiers(name: str = "") -> st.SearchStrategy[str]:
    """Values of a path parameter: mostly ids the archive holds (so the pages behind them render), else hostile."""
    known = RUN_IDS if name == "run_id" else NODE_IDS
    return st.one_of(st.sampled_from(known), st.sampled_from(known), st.sampled_from(HOSTILE), st.text(max_size=30))


@st.composite
def path_of(draw: st.DrawFn, template: str) -> str:
    """`template` with every {param} filled, percent-encoded (a `/` inside an id stays an id)."""
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name == "path":  # the UI's catch-all: any number of segments
            segments = draw(st.lists(identifiers() | st.just("api"), min_size=0, max_size=4))
            return "/".join(quote(s, safe="") for s in segments)
        return quote(draw(identifiers(name)), safe="")

    return re.sub(r"\{(\w+)(?::\w+)?\}", fill, template)


def operations() -> list[tuple[str, str, list[str], dict | None]]:
    """(method, path template, query parameter names, body schema) of every route: the API's from its OpenAPI
    document, the UI's (left out of it) from its router."""
    found = []
    for path, methods in SPEC["paths"].items():
        for method, operation in methods.items():
            query = [p["name"] for p in operation.get("parameters", ()) if p["in"] == "query"]
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            found.append((method.upper(), path, query, body))
    for route in ui_router(None).routes:
        for method in sorted(route.methods):
            found.append((method, route.path, [p.name for p in route.dependant.query_params], None))
    return found


OPERATIONS = operations()
WRITES = [operation for operation in OPERATIONS if operation[3] is not None]


def query_values(name: str) -> st.SearchStrategy[str]:
    """Values of one query parameter: what the schema allows (or could) and junk."""
    allowed = {"nonfinite": ("null", "constants"), "status": ("proposed", "evaluated", "failed", "finished")}
    return st.sampled_from(allowed.get(name, ()) + RUN_IDS + NODE_IDS) | st.sampled_from(HOSTILE) | st.text(max_size=20)


@st.composite
def calls(draw: st.DrawFn) -> Call:
    # a third of the requests write: a body has many more ways to be wrong than a path
    method, template, query, body_schema = draw(st.one_of(st.sampled_from(WRITES), st.sampled_from(OPERATIONS),
                                                          st.sampled_from(OPERATIONS)))
    if draw(st.integers(0, 9)) == 0:  # now and then, a method the route does not take
        method = draw(st.sampled_from(METHODS))
    params = {name: draw(query_values(name)) for name in query if draw(st.booleans())}
    if draw(st.booleans()):
        params.update(draw(st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=8),
                                           st.sampled_from(HOSTILE) | st.text(max_size=20), max_size=2)))
    body, content_type = (None, None)
    if method in ("POST", "PUT", "PATCH"):
        body, content_type = draw(bodies(body_schema))
    token = draw(st.sampled_from((TOKEN,) * 8 + (None, TOKEN[:-1], TOKEN + "x")))
    return Call(method, draw(path_of(template)), params, body, content_type, token)


# ----------------------------------------------------------------------------------------- the service


@dataclass
class Served:
    url: str
    client: httpx.Client
    thread: threading.Thread

    def send(self, call: Call) -> httpx.Response:
        return self.client.request(call.method, f"{self.url}{call.path}", params=call.params, content=call.body,
                                   headers=call.headers())


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Served]:
    """The archive service over an SQLite store holding one run (an evaluated root with nan and inf in its
    curves, a failed child and a proposed one), on a real uvicorn server."""
    work_dir: Path = tmp_path_factory.mktemp("fuzz-api")
    store = SQLiteStore(work_dir / "archive.db")
    store.put_run(RunConfig(run_id=RUN, protocol="tiny", budget=4))
    for node in archive_nodes():
        store.insert_node(node)
    store.close()
    settings = ServiceSettings(work_dir=work_dir, http_port=0, http_host="127.0.0.1", archive_token=TOKEN)
    stop, thread, result, url = _serve_in_thread("archive", settings, FakeBus())
    with httpx.Client(timeout=30) as client:
        yield Served(url, client, thread)
    stop.set()
    thread.join(10)
    assert result == [0], "the archive service did not stop cleanly"


def test_the_fuzzed_schema_is_the_one_the_archive_serves(archive: Served):
    assert archive.client.get(f"{archive.url}/api/openapi.json").json() == SPEC


def assert_answered_with_a_message(call: Call, response: httpx.Response) -> None:
    """Below 500, and a 4xx that says what is wrong: a JSON `detail` (text, or FastAPI's errors naming each
    field) or a UI page with a heading."""
    status = response.status_code
    assert status < 500, f"{call}: {status} {response.text[:2000]}"
    if status < 400 or call.method == "HEAD":  # a HEAD answer has no body by definition
        return
    kind = response.headers.get("content-type", "")
    if kind.startswith("application/json"):
        detail = response.json().get("detail")
        if isinstance(detail, list):  # FastAPI's validation errors: each names where the problem is
            assert detail and all(e.get("loc") and e.get("msg") for e in detail), f"{call}: {response.text}"
        else:
            assert isinstance(detail, str) and detail.strip(), f"{call}: {status} without a message: {response.text}"
    else:
        assert kind.startswith("text/html") and "<h1>" in response.text, f"{call}: {status} {kind}: {response.text}"


def assert_json_answers_parse_strictly(call: Call, response: httpx.Response) -> None:
    """A 2xx JSON answer is JSON a browser parses: no NaN or Infinity (archive/api.py writes them as null)."""
    if response.status_code < 300 and response.headers.get("content-type", "").startswith("application/json"):
        nonfinite = call.params.get("nonfinite") == "constants"
        json.loads(response.text, parse_constant=None if nonfinite else lambda c: pytest.fail(f"{call}: {c}"))


@settings(derandomize=True, database=None, max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
# A run whose objective directive is a lone surrogate: JSON allows the escape, Python's json module took it, and
# the store, which cannot encode it in UTF-8, failed with a 500 (now a 422: the body is parsed like a bus message).
@example(call=Call("POST", "/api/runs", body=b'{"run_id": "fz-a", "protocol": "tiny", "objective": '
                                             b'{"directive": "\\ud800"}}', content_type="application/json"))
def test_no_request_gets_a_5xx_every_4xx_says_why_and_the_archive_keeps_serving(archive: Served, call: Call):
    response = archive.send(call)
    assert_answered_with_a_message(call, response)
    if call.unauthorized_write():
        assert response.status_code == 401, f"{call}: {response.status_code} {response.text[:500]}"
    assert_json_answers_parse_strictly(call, response)
    health = archive.client.get(f"{archive.url}/healthz")
    assert health.status_code == 200 and archive.thread.is_alive(), f"after {call}: {health.text}"


@pytest.mark.parametrize("body", [b'{"run_id": "never-stored-by-the-fuzzer", "objective": {"directive": "\\ud800"}}',
                                  b'{"run_id": ', b"\xff{}", b"[" * 5000])
def test_a_run_request_that_is_not_json_is_a_422_saying_where(archive: Served, body: bytes):
    response = archive.send(Call("POST", "/api/runs", body=body, content_type="application/json"))
    detail = response.json()["detail"]
    assert response.status_code == 422 and detail.startswith("not a valid run request: body: not JSON (")
    assert re.search(r"at line 1 column \d+\)", detail), detail
    assert archive.client.get(f"{archive.url}/api/runs/never-stored-by-the-fuzzer").status_code == 404
