"""Pareto dominance (poise/pareto.py): the frontier of a whole archive agrees with the pairwise definition."""

from __future__ import annotations

import numpy as np
import pytest

from poise import pareto
from poise.pareto import dominance, non_dominated, pareto_fronts


def test_dominance_is_at_least_as_good_everywhere_and_better_somewhere() -> None:
    vectors = np.array([[0.5, 0.5], [0.5, 0.4], [0.5, 0.5], [0.6, 0.1]])
    beats = dominance(vectors)
    assert beats[0, 1] and beats[2, 1] and not beats[1, 0]
    assert not beats[0, 2] and not beats[2, 0]  # equal rows do not dominate each other
    assert not beats[0, 3] and not beats[3, 0]  # a trade-off
    assert not beats.diagonal().any()


@pytest.mark.parametrize("block", [1, 3, 256])
def test_the_frontier_is_the_rows_no_other_row_dominates(block: int) -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        vectors = rng.integers(0, 4, size=(rng.integers(0, 40), rng.integers(1, 4))).astype(float)
        if trial % 2:
            vectors = rng.random(vectors.shape)
        expected = ~dominance(vectors).any(0)
        assert (non_dominated(vectors, block=block) == expected).all()
        assert ((pareto_fronts(vectors) == 0) == expected).all()


def test_a_row_with_a_nan_neither_dominates_nor_is_dominated() -> None:
    vectors = np.array([[1.0, 1.0], [np.nan, 0.0], [0.0, 0.0]])
    assert non_dominated(vectors).tolist() == [True, True, False]


def test_pairwise_work_is_done_in_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = np.random.default_rng(1).random((50, 3))
    whole = dominance(vectors)
    monkeypatch.setattr(pareto, "BLOCK_ELEMENTS", 3 * 50 * 4)  # four rows a block
    assert [b.stop - b.start for b in pareto.row_blocks(50, 3)][:2] == [4, 4]
    assert (dominance(vectors) == whole).all()
