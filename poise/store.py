"""The archive store interface: where a run's configuration and its genealogical nodes are kept.

Every implementation (the embedded SQLite file, MongoDB in production) keeps the contracts' documents
as they are and offers the same small set of operations, checked by one contract-test suite:

- writes are idempotent: a node id is inserted once and never overwritten by a second insert;
- a node moves only by compare-and-set on its status (`transition`), so a redelivered or concurrent
  event can change a document at most once (Mongo: `find_one_and_update` with a status filter);
- listings come back in insertion order, so a resumed run sees its nodes as it made them.

The store enforces no pipeline rules; `archive.update.ArchiveUpdater` decides which transition is legal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

from poise.contracts import Node, NodeStatus, RunConfig


class ArchiveError(Exception):
    """The store could not do what was asked: storage failure, incompatible database, or a misuse of the API."""


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

    @abstractmethod
    def counts(self, run_id: str) -> dict[NodeStatus, int]:
        """How many of the run's nodes are at each status (every status present, zero included)."""

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
