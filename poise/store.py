"""The archive store interface: where a run's configuration and its genealogical nodes are kept.

Every implementation (the embedded SQLite file, MongoDB in production) keeps the contracts' documents
as they are and offers the same small set of operations, checked by one contract-test suite:

- writes are idempotent: a node id is inserted once and never overwritten by a second insert;
- a node moves only by compare-and-set on its status (`transition`), so a redelivered or concurrent
  event can change a document at most once (Mongo: `find_one_and_update` with a status filter);
- listings come back in insertion order, so a resumed run sees its nodes as it made them;
- what a run's bookkeeping reads after every event (`counters`, `scores`, `llm_spend`) comes from fields the
  store keeps beside each document as it writes it, never from parsing the whole run: the work of one event
  does not grow with the archive. The methods here compute the same answers from every document; they are
  the reference the contract suite holds each store's fast version to.

The store enforces no pipeline rules; `archive.update.ArchiveUpdater` decides which transition is legal.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import get_args

from poise.contracts import (
    CONTRACT_VERSION,
    VERSION_PATTERN,
    LlmOperator,
    Node,
    NodeScore,
    NodeStatus,
    OperatorSpend,
    RunConfig,
    RunCounters,
    newest,
    node_number,
    unreadable,
)
from poise.scoring import node_score


@dataclass(frozen=True)
class LineageEntry:
    """What a lineage view needs of one node, without its document: ids, status, depth, its score's utility
    (None unless evaluated and not failed; nan as None), the phase it failed in, Phase I's expected improvement
    of the winning proposal (None without screening), and its name."""

    id: str
    parents: tuple[str, ...]
    status: str
    depth: int
    utility: float | None
    failed_phase: str | None
    selection_score: float | None
    name: str


def lineage_entry(node: Node) -> LineageEntry:
    score = node_score(node)
    winner = getattr(node.proposal.screening, "winner", None)
    return LineageEntry(id=node.node_id, parents=tuple(node.genealogy.parent_ids), status=node.status.value,
                        depth=node.genealogy.depth, utility=_finite(score.utility if score else None),
                        failed_phase=node.failure.phase.value if node.failure else None,
                        selection_score=selection_score(winner.model_dump() if winner else None),
                        name=node.proposal.name)


def selection_score(winner: dict | None) -> float | None:
    """The expected improvement the winning proposal of a Phase I screening was ranked by (a dump of its
    `ScreeningMerits`); None where no surrogate ranked it (without one every score is 0)."""
    if not winner or winner.get("skipped") is not None or winner.get("predicted_mean") is None:
        return None
    return _finite(winner.get("expected_improvement"))


def _finite(value: float | None) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


class ArchiveError(Exception):
    """The store could not do what was asked: storage failure, incompatible database, or a misuse of the API."""


class IncompatibleArchive(ArchiveError):
    """The store holds documents of a contract version this POISE cannot read; the message names both versions and
    what to do. Raised when the store is opened, before anything is written to it."""


CONTRACT_KEY = "contract_version"  # where a store records the contract version of what it holds


def check_contract(stored: str | None, where: str) -> str:
    """The contract version a store records once this POISE has opened it: this POISE's, or the newer one already
    recorded. `stored` is what the store records (UNVERSIONED for a store from before stores recorded one, None
    for an empty store); a version this POISE cannot read raises IncompatibleArchive."""
    if stored is None:
        return CONTRACT_VERSION
    if not isinstance(stored, str) or re.match(VERSION_PATTERN, stored) is None:
        raise IncompatibleArchive(f"{where} records the contract version {stored!r}, which is not one")
    problem = unreadable(stored)
    if problem is not None:
        raise IncompatibleArchive(f"{where} holds documents of {problem}")
    return newest(stored, CONTRACT_VERSION)


class ArchiveStore(ABC):
    """A run's configuration and nodes, keyed by (run_id, node_id). Usable as a context manager."""

    @abstractmethod
    def put_run(self, config: RunConfig) -> None:
        """Store the run's configuration, replacing any earlier one with the same run_id."""

    @abstractmethod
    def get_run(self, run_id: str) -> RunConfig | None:
        """The run's configuration, or None if no such run was stored."""

    @abstractmethod
    def run_ids(self) -> list[str]:
        """Every stored run, oldest first."""

    @abstractmethod
    def insert_node(self, node: Node) -> bool:
        """Add a new node; False (and nothing written) if a node with this run_id and node_id exists."""

    def insert_nodes(self, nodes: Iterable[Node]) -> int:
        """Add many new nodes (an import, a benchmark's archive); how many were new. Each is `insert_node`'s
        write; a store may batch them into fewer transactions."""
        return sum(self.insert_node(node) for node in nodes)

    @abstractmethod
    def get_node(self, run_id: str, node_id: str) -> Node | None:
        """The node's current document, or None."""

    @abstractmethod
    def nodes(self, run_id: str, status: NodeStatus | None = None) -> list[Node]:
        """The run's nodes (only those at `status` if given), in insertion order."""

    @abstractmethod
    def children(self, run_id: str, node_id: str) -> list[Node]:
        """The nodes listing `node_id` among their parents, in insertion order."""

    @abstractmethod
    def transition(self, run_id: str, node_id: str, expected: NodeStatus, node: Node) -> bool:
        """Compare-and-set: replace the stored document by `node` only if its status is still `expected`.

        Returns whether it wrote. `node` must carry the same run_id and node_id; its genealogy must not
        change (parent links are indexed at insert). `node.status` may equal `expected` (e.g. adding a
        replicate evaluation), in which case the write is guarded by the status alone.
        """

    def counts(self, run_id: str) -> dict[NodeStatus, int]:
        """How many of the run's nodes are at each status (every status present, zero included): the counters'."""
        return self.counters(run_id).counts

    def counters(self, run_id: str) -> RunCounters:
        """The run's totals: nodes per status, evaluated nodes (failed ones with an evaluation included), spend,
        highest node number, depth."""
        return counters_of(self.nodes(run_id))

    def scores(self, run_id: str, *, min_seeds: int = 0, limit: int | None = None) -> list[NodeScore]:
        """The scores of the run's evaluated nodes that did not fail and have at least `min_seeds` finite seed
        scores: highest utility first (nan last, insertion order among ties), the first `limit` of them."""
        return ranked(filter(None, map(node_score, self.nodes(run_id))), min_seeds, limit)

    def llm_spend(self, run_id: str) -> dict[LlmOperator, OperatorSpend]:
        """The run's agent-LLM requests per operator that made any, in the order of `LlmOperator`."""
        return spend_of(self.nodes(run_id))

    def lineage(self, run_id: str) -> list[LineageEntry]:
        """Every node of the run as a `LineageEntry`, in insertion order: what the web UI's tree draws. Stores
        answer it from their columns or a projection, without building the documents (docs/ui.md)."""
        return [lineage_entry(node) for node in self.nodes(run_id)]

    @abstractmethod
    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""

    def __enter__(self) -> ArchiveStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_same_node(run_id: str, node_id: str, node: Node) -> None:
    """Refuse a transition whose document belongs to another node (a caller bug, not a data race)."""
    if (node.run_id, node.node_id) != (run_id, node_id):
        raise ArchiveError(f"transition of {run_id}/{node_id} was given the document of {node.run_id}/{node.node_id}")


def counters_of(nodes: Iterable[Node]) -> RunCounters:
    """The totals of `counters` over these nodes (the reference every store's counters must equal)."""
    counts = dict.fromkeys(NodeStatus, 0)
    evaluated, usd, number, depth = 0, 0.0, -1, 0
    for node in nodes:
        counts[node.status] += 1
        evaluated += node.evaluation is not None
        usd += node.cost.llm_usd
        number = max(number, node_number(node.node_id))
        depth = max(depth, node.genealogy.depth)
    return RunCounters(counts=counts, evaluated=evaluated, llm_usd=usd, max_number=number, depth=depth)


def ranked(scores: Iterable[NodeScore], min_seeds: int = 0, limit: int | None = None) -> list[NodeScore]:
    """`scores` with at least `min_seeds` seeds, highest utility first (nan last; the given order among ties)."""
    kept = sorted((s for s in scores if s.seeds >= min_seeds),
                  key=lambda s: (math.isnan(s.utility), -s.utility if not math.isnan(s.utility) else 0.0))
    return kept if limit is None else kept[:limit]


def node_spend(node: Node) -> dict[LlmOperator, OperatorSpend]:
    """The node's agent-LLM requests per operator (what a store keeps beside the document)."""
    return spend_of([node])


def spend_of(nodes: Iterable[Node]) -> dict[LlmOperator, OperatorSpend]:
    totals: dict[str, OperatorSpend] = {}
    for call in (call for node in nodes for call in node.llm_calls):
        entry = totals.get(call.operator) or OperatorSpend()
        totals[call.operator] = OperatorSpend(calls=entry.calls + 1, failed=entry.failed + (not call.ok),
                                              unpriced=entry.unpriced + (not call.priced),
                                              usd=entry.usd + call.cost_usd)
    return {op: totals[op] for op in get_args(LlmOperator) if op in totals}
