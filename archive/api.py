"""The archive's HTTP read API (FastAPI router), mounted under /api by `poise serve archive`.

    GET  /api/runs                                        every run's RunConfig, oldest first
    POST /api/runs                                        start or resume a run (body: RunRequest); 202
    GET  /api/runs/{run_id}                               {"config": RunConfig, "status": RunStatus}
    GET  /api/runs/{run_id}/config                        RunConfig
    GET  /api/runs/{run_id}/counts                        {status: number of nodes} for every status
    GET  /api/runs/{run_id}/counters                      RunCounters (counts, evaluated, spend, ...)
    GET  /api/runs/{run_id}/nodes[?status=evaluated]      the run's nodes in insertion order
    GET  /api/runs/{run_id}/nodes/{node_id}               one Node
    GET  /api/runs/{run_id}/nodes/{node_id}/children      the nodes bred from it

Authentication (archive/auth.py): `POST /api/runs` needs the write token (`Authorization: Bearer <token>`), and
is refused (403) by an archive that has none; reads need a token only where a read token is configured. A
missing or wrong token is a 401 with `WWW-Authenticate: Bearer`, answered before the body is read.

An unknown run or node is a 404 whose `detail` says which, with the header `X-Poise-Not-Found: run|node`
(so a client can tell "no such node" from "no POISE API at this address"). A store failure is a 503. A run
request that is not a valid `RunRequest` (poise/contracts.py: an unknown field, a value out of range, text that
is not JSON) is a 422 whose `detail` is one line naming every problem and the fields a client may set; one the
archive refuses (it holds the run with other settings) is a 409.

Non-finite floats: the contracts keep nan/inf (a diverging curve is data) and write them as the JSON
constants NaN/Infinity, which browsers' `JSON.parse` rejects. Responses therefore write every non-finite
float as `null` by default. `?nonfinite=constants` keeps the constants instead, so a POISE client
(`archive.client.ArchiveClient`) reads back exactly the stored documents.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

import pydantic_core
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from archive.auth import ApiAuth
from archive.runs import RunRefused
from archive.status import run_status
from poise.contracts import Node, NodeStatus, RunConfig, RunCounters, RunRequest, RunStatus, validation_problems
from poise.store import ArchiveError, ArchiveStore

NOT_FOUND_HEADER = "X-Poise-Not-Found"
Nonfinite = Annotated[Literal["null", "constants"], Query(
    description="how nan/inf are written: null (default; what browsers parse) or the JSON constants "
                "NaN/Infinity (lossless; what ArchiveClient asks for)")]


class RunView(BaseModel):
    """A run as the API shows it: its configuration and where it stands (archive/status.py)."""

    config: RunConfig
    status: RunStatus


def finite(value: Any) -> Any:
    """`value` (JSON-ready data) with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def respond(payload: Any, nonfinite: str = "null", status_code: int = 200) -> Response:
    """A JSON response of contracts (models, lists of them, dicts); see the module docstring for nan/inf."""
    data = _plain(payload)
    if nonfinite == "constants":
        body = json.dumps(data, allow_nan=True, separators=(",", ":"))
    else:
        body = json.dumps(finite(data), allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status_code, media_type="application/json")


def _plain(payload: Any) -> Any:
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json")
    if isinstance(payload, list):
        return [_plain(item) for item in payload]
    if isinstance(payload, dict):
        return {key: _plain(item) for key, item in payload.items()}
    return payload


def _not_found(what: Literal["run", "node"], message: str) -> HTTPException:
    return HTTPException(404, detail=message, headers={NOT_FOUND_HEADER: what})


def run_request_problems(errors: list[dict[str, Any]]) -> str:
    """The 422 `detail` of a body that is not a valid RunRequest: every problem, and what a client may set."""
    problems = validation_problems([_in_body(e) for e in errors])
    return (f"not a valid run request: {problems} (a client may set {', '.join(RunRequest.model_fields)}; see "
            "RunRequest in poise/contracts.py)")


def _in_body(error: dict[str, Any]) -> dict[str, Any]:
    """A FastAPI body error located in the request body rather than in `body`; text that is not JSON says why
    (FastAPI's own error locates it by offset and keeps the reason in `ctx`)."""
    if error.get("type") == "json_invalid":
        return {"loc": ("body",), "msg": f"not JSON ({error.get('ctx', {}).get('error', error['msg'])})"}
    return {**error, "loc": error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"]}


class _JsonRequest(Request):
    """A request whose JSON body is parsed as a bus message is (pydantic's parser), not by Python's `json`: that
    one takes the escape of a lone surrogate ("\\ud800"), a string no UTF-8 store, message or response can hold,
    and the run it came with failed later, when the store wrote it."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as err:  # FastAPI answers a JSONDecodeError with a 422 json_invalid error
                raise json.JSONDecodeError(str(err), body.decode(errors="replace"), 0) from err
        return self._json


def _run_request_route(auth: ApiAuth) -> type[APIRoute]:
    """The route class of POST /api/runs: the write token is checked first, before the body is read (a client
    without it learns nothing of what the archive accepts); a body that does not validate is a 422 with one
    readable line (run_request_problems) instead of FastAPI's list of error objects; its JSON is parsed strictly
    (_JsonRequest)."""

    class RunRequestRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                auth.check_write(request)
                try:
                    return await handler(_JsonRequest(request.scope, request.receive))
                except RequestValidationError as err:
                    raise HTTPException(422, detail=run_request_problems(list(err.errors()))) from err

            return handle

    return RunRequestRoute


def archive_router(store: ArchiveStore, start_run: Callable[[RunRequest], RunConfig] | None = None,
                   auth: ApiAuth | None = None) -> APIRouter:
    """The /api routes over `store`. With `start_run` (the archive service's), POST /api/runs starts runs: it gets
    the validated RunRequest and answers the stored RunConfig, or raises RunRefused. `auth` says which tokens
    write and read (archive/auth.py); without it reads are open and every write is refused."""
    auth = auth or ApiAuth()
    router = APIRouter(prefix="/api", tags=["archive"], dependencies=[Depends(auth.read)])

    def config_of(run_id: str) -> RunConfig:
        config = store.get_run(run_id)
        if config is None:
            known = ", ".join(store.run_ids()) or "none"
            raise _not_found("run", f"no run {run_id!r} in the archive; known runs: {known}")
        return config

    def node_of(run_id: str, node_id: str) -> Node:
        config_of(run_id)
        node = store.get_node(run_id, node_id)
        if node is None:
            raise _not_found("node", f"no node {node_id!r} in run {run_id!r}; "
                                     f"GET /api/runs/{run_id}/nodes lists its nodes")
        return node

    @router.get("/runs", response_model=list[RunConfig])
    def list_runs(nonfinite: Nonfinite = "null") -> Response:
        return respond([config_of(run_id) for run_id in store.run_ids()], nonfinite)

    @router.get("/runs/{run_id}", response_model=RunView)
    def get_run(run_id: str, nonfinite: Nonfinite = "null") -> Response:
        config = config_of(run_id)
        return respond(RunView(config=config, status=run_status(store, run_id)), nonfinite)

    @router.get("/runs/{run_id}/config", response_model=RunConfig)
    def get_config(run_id: str, nonfinite: Nonfinite = "null") -> Response:
        return respond(config_of(run_id), nonfinite)

    @router.get("/runs/{run_id}/counts", response_model=dict[NodeStatus, int])
    def get_counts(run_id: str) -> Response:
        config_of(run_id)
        return respond({status.value: n for status, n in store.counts(run_id).items()})

    @router.get("/runs/{run_id}/counters", response_model=RunCounters)
    def get_counters(run_id: str, nonfinite: Nonfinite = "null") -> Response:
        config_of(run_id)
        return respond(store.counters(run_id), nonfinite)

    @router.get("/runs/{run_id}/nodes", response_model=list[Node])
    def list_nodes(run_id: str, status: NodeStatus | None = None, nonfinite: Nonfinite = "null") -> Response:
        config_of(run_id)
        return respond(store.nodes(run_id, status), nonfinite)

    @router.get("/runs/{run_id}/nodes/{node_id}", response_model=Node)
    def get_node(run_id: str, node_id: str, nonfinite: Nonfinite = "null") -> Response:
        return respond(node_of(run_id, node_id), nonfinite)

    @router.get("/runs/{run_id}/nodes/{node_id}/children", response_model=list[Node])
    def list_children(run_id: str, node_id: str, nonfinite: Nonfinite = "null") -> Response:
        node_of(run_id, node_id)
        return respond(store.children(run_id, node_id), nonfinite)

    if start_run is not None:
        def post_run(run: Annotated[RunRequest, Body()]) -> Response:
            """Start the run, or resume it: a stored run may only change RESUMABLE_SETTINGS (poise/contracts.py)."""
            try:
                started = start_run(run)
            except RunRefused as err:
                raise HTTPException(409, detail=str(err)) from err
            return respond(started, status_code=202)

        router.add_api_route("/runs", post_run, methods=["POST"], response_model=RunConfig, status_code=202,
                             route_class_override=_run_request_route(auth), responses={
                                 401: {"description": "no write token, or a wrong one (archive/auth.py)"},
                                 403: {"description": "the archive was started without a write token"}})

    return router


def store_unavailable(request: Any, err: ArchiveError) -> JSONResponse:
    """Exception handler for the app: a store failure is the archive's trouble (503), not the caller's."""
    return JSONResponse({"detail": f"the archive store failed: {err}"}, status_code=503)
