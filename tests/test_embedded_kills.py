"""The embedded mode's guarantee under SIGKILL: a tiny `poise run --parallel 1`, killed at drawn moments of its
progress and resumed after each, ends with the same archive as an uninterrupted run of the same seed: the same
node ids, statuses, parents, proposals, scores (exact), fresh-seed scores and reward curves.

CI kills it at 5 moments; `poise bench chaos --trials 0 --embedded-kills 20` runs the same code at 20
(bench/results/chaos/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bench_chaos import embedded_kills

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def test_a_run_killed_at_five_moments_and_resumed_ends_like_an_uninterrupted_one(tmp_path: Path):
    result = embedded_kills(seed=11, moments=5, workdir=tmp_path)
    print(result.line())
    assert result.kills >= 3, f"only {result.kills} of the moments struck a running process: {result.moments}"
    assert result.same, "\n".join(result.differences)
