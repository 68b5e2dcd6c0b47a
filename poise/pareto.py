"""Pareto dominance over metric vectors, larger is better in every column: one row dominates another when it is at
least as good everywhere and better somewhere. Parent selection ranks candidates by their front
(proposer/selection.py, U_pareto), the proposer's context and the run report draw the frontier
(proposer/context.py, archive/report.py: Overall against −mean length).

`non_dominated` scales to a whole archive (time O(n · frontier), memory O(n)); `dominance` and `pareto_fronts`
build an (n, n) matrix and are meant for bounded sets such as selection's shortlist. A row with a NaN neither
dominates nor is dominated.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK_ELEMENTS = 1 << 18  # pairwise work is done a block of rows at a time, this many elements (2 MB of floats)


def row_blocks(n: int, width: int) -> Iterator[slice]:
    """Slices of rows of an (n, n, width) pairwise computation, each block at most BLOCK_ELEMENTS elements, so
    that its memory is O(n) per block rather than O(n² · width) at once."""
    step = max(1, BLOCK_ELEMENTS // max(n * width, 1))
    return (slice(start, start + step) for start in range(0, n, step))


def dominates(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(len(first), len(second)) booleans: row i of `first` Pareto-dominates row j of `second`."""
    first, second = first[:, None, :], second[None, :, :]
    return (first >= second).all(-1) & (first > second).any(-1)


def dominance(vectors: np.ndarray) -> np.ndarray:
    """(n, n) booleans: row i Pareto-dominates row j."""
    vectors = np.asarray(vectors, dtype=float)
    beats = np.zeros((len(vectors), len(vectors)), dtype=bool)
    for rows in row_blocks(len(vectors), vectors.shape[-1]):
        beats[rows] = dominates(vectors[rows], vectors)
    return beats


def non_dominated(vectors: np.ndarray, block: int = 256) -> np.ndarray:
    """(n,) booleans: the rows no other row dominates (the Pareto frontier).

    Rows are taken `block` at a time, best first in lexicographic order, so a row's dominators come before it or
    in its own block. A dominated row is dominated by a frontier row (dominance is transitive), so a block is
    compared with the frontier found so far, then its survivors with each other."""
    vectors = np.asarray(vectors, dtype=float)
    on_front = np.zeros(len(vectors), dtype=bool)
    front = vectors[:0]
    order = np.lexsort(-vectors.T[::-1])  # the last key (column 0) sorts first; negated: best first
    for start in range(0, len(order), block):
        rows = order[start: start + block]
        rows = rows[~dominates(front, vectors[rows]).any(0)]
        rows = rows[~dominates(vectors[rows], vectors[rows]).any(0)]
        on_front[rows] = True
        front = np.concatenate([front, vectors[rows]])
    return on_front


def pareto_fronts(vectors: np.ndarray) -> np.ndarray:
    """The non-dominated front of each row (0 = the Pareto frontier, 1 = the frontier once 0 is removed, …)."""
    beats = dominance(vectors)
    front = np.full(len(beats), -1)
    remaining = np.ones(len(beats), dtype=bool)
    level = 0
    while remaining.any():
        current = remaining & ~(beats & remaining[:, None]).any(0)
        front[current] = level
        remaining &= ~current
        level += 1
    return front


__all__ = ["BLOCK_ELEMENTS", "dominance", "dominates", "non_dominated", "pareto_fronts", "row_blocks"]
