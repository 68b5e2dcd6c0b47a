"""The archive read over HTTP: what the proposer and reflector use in distributed mode.

`ArchiveClient` implements the read side of `ArchiveStore` on the archive's API (archive/api.py), so a
service written against the store interface runs unchanged against the in-process store (embedded mode)
or the archive service (distributed mode). It asks for `nonfinite=constants`, so documents arrive exactly
as stored, nan/inf included.

With `token` (the archive's read token, POISE_ARCHIVE_READ_TOKEN) every request carries
`Authorization: Bearer <token>`; a 401 is not retried and names the setting to fix (archive/auth.py).

Only the archive writes: the write methods raise `ReadOnlyArchive`. Reads retry with exponential backoff
on connection errors, timeouts and 5xx answers (the archive restarting, MongoDB failing over); after the
last retry they raise `ArchiveError`, which makes the handler fail and the bus redeliver the message.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter, ValidationError

from archive.api import NOT_FOUND_HEADER
from poise.contracts import ContractError, Node, NodeStatus, RunConfig, RunCounters, reading
from poise.store import ArchiveError, ArchiveStore

log = logging.getLogger("poise.archive.client")

T = TypeVar("T")
_NODE = TypeAdapter(Node)
_NODES = TypeAdapter(list[Node])
_RUN = TypeAdapter(RunConfig)
_RUNS = TypeAdapter(list[RunConfig])
_COUNTS = TypeAdapter(dict[NodeStatus, int])
_COUNTERS = TypeAdapter(RunCounters)


class ReadOnlyArchive(ArchiveError):
    """A write through the HTTP client: only the archive service writes the archive."""


class ArchiveClient(ArchiveStore):
    """Read-only `ArchiveStore` over the archive's HTTP API at `base_url` (e.g. http://archive:8000)."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, transport: httpx.BaseTransport | None = None,
                 token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
                                  transport=transport, headers=headers)
        self._token = token

    # ----------------------------------------------------------------------------------- plumbing

    def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response | None:
        """GET `path`; None for the API's own 404 (unknown run or node), ArchiveError for anything else."""
        params = {**(params or {}), "nonfinite": "constants"}
        url = f"{self.base_url}{path}"
        for attempt in range(self.retries + 1):
            try:
                response = self._http.get(path, params=params)
            except httpx.TransportError as err:  # refused, reset, timed out: the archive may be restarting
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 404:
                    if NOT_FOUND_HEADER in response.headers:
                        return None
                    raise ArchiveError(f"{url} answered 404 without naming a run or node: is POISE's archive "
                                       "API served there? (POISE_ARCHIVE_URL)")
                if response.status_code == 401:
                    sent = "the read token it sent" if self._token else "a read without a token"
                    raise ArchiveError(f"the archive at {self.base_url} refused {sent} (GET {path}): "
                                       f"{_detail(response)}; set POISE_ARCHIVE_READ_TOKEN_FILE to its read token")
                if response.status_code < 500:
                    if response.is_success:
                        return response
                    raise ArchiveError(f"GET {url} answered {response.status_code}: {_detail(response)}")
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            if attempt < self.retries:
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                log.warning("GET %s failed (%s); retry %d/%d in %.1f s", url, problem, attempt + 1, self.retries,
                            delay)
                time.sleep(delay)
        tries = f"{self.retries + 1} tries" if self.retries else "1 try"
        raise ArchiveError(f"the archive at {self.base_url} did not answer GET {path} after {tries}: {problem} "
                           "(POISE_ARCHIVE_URL)")

    def _parse(self, adapter: TypeAdapter[T], response: httpx.Response) -> T:
        try:
            with reading():  # an archive one minor version ahead: its documents' new fields are kept, not refused
                return adapter.validate_json(response.content)
        except (ValidationError, ContractError) as err:
            raise ArchiveError(f"the archive at {self.base_url} sent a document this POISE cannot read "
                               f"({response.request.url}): {err}") from err

    # ---------------------------------------------------------------------------------------- reads

    def get_run(self, run_id: str) -> RunConfig | None:
        response = self._get(f"/api/runs/{_q(run_id)}/config")
        return None if response is None else self._parse(_RUN, response)

    def run_ids(self) -> list[str]:
        response = self._get("/api/runs")
        return [] if response is None else [config.run_id for config in self._parse(_RUNS, response)]

    def get_node(self, run_id: str, node_id: str) -> Node | None:
        response = self._get(f"/api/runs/{_q(run_id)}/nodes/{_q(node_id)}")
        return None if response is None else self._parse(_NODE, response)

    def nodes(self, run_id: str, status: NodeStatus | None = None) -> list[Node]:
        params = {"status": NodeStatus(status).value} if status is not None else None
        response = self._get(f"/api/runs/{_q(run_id)}/nodes", params)
        return [] if response is None else self._parse(_NODES, response)

    def children(self, run_id: str, node_id: str) -> list[Node]:
        response = self._get(f"/api/runs/{_q(run_id)}/nodes/{_q(node_id)}/children")
        return [] if response is None else self._parse(_NODES, response)

    def counts(self, run_id: str) -> dict[NodeStatus, int]:
        response = self._get(f"/api/runs/{_q(run_id)}/counts")
        found = {} if response is None else self._parse(_COUNTS, response)
        return {status: found.get(status, 0) for status in NodeStatus}

    def counters(self, run_id: str) -> RunCounters:
        """The run's counters as the archive keeps them (a few numbers, not the run's documents)."""
        response = self._get(f"/api/runs/{_q(run_id)}/counters")
        if response is None:
            return RunCounters(counts=dict.fromkeys(NodeStatus, 0))
        return self._parse(_COUNTERS, response)

    # --------------------------------------------------------------------------------------- writes

    def _read_only(self, what: str) -> ReadOnlyArchive:
        return ReadOnlyArchive(f"{what} through the archive's HTTP client ({self.base_url}): only the archive "
                               "service writes the archive; publish an evt.* message instead")

    def put_run(self, config: RunConfig) -> None:
        raise self._read_only(f"put_run({config.run_id})")

    def insert_node(self, node: Node) -> bool:
        raise self._read_only(f"insert_node({node.run_id}/{node.node_id})")

    def transition(self, run_id: str, node_id: str, expected: NodeStatus, node: Node) -> bool:
        raise self._read_only(f"transition({run_id}/{node_id})")

    def close(self) -> None:
        self._http.close()


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))[:300]
    except ValueError:
        return response.text[:300]
