"""Racing: extra training seeds go to the nodes whose rank is both promising and uncertain (docs/racing.md).

A node's evidence is the mean of its seed scores with standard error σ/√n, σ the run's measured seed noise (the
pooled within-node SD, `poise.scoring.pooled_sd`; the root's seeds measure it first). With the half-width
h_i = z·σ/√n_i of node i's interval around its mean m_i, the leader ℓ (highest mean, the earliest on ties) and

    contenders = {ℓ} ∪ {i ≠ ℓ : m_i + h_i > m_ℓ − h_ℓ}      (only when some i ≠ ℓ qualifies)

the next seed goes to the contender with fewer than `cap` seeds whose upper bound m_i + h_i is highest (ties: fewer
seeds, then the earliest), and to none when no contender is left below the cap or no training is left. So a lucky
one-seed leader is checked before it is used as a parent or reported, a node whose upper bound cannot reach the
leader's lower bound gets nothing, and a leader whose lower bound clears every other node's upper bound is
settled. The budget counts trainings, so a policy names how many a node gets (`SeedPolicy`): one at birth and
never more, a fixed number at birth, or one at birth and up to `cap` by racing.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

RACING_Z = 0.5  # interval half-width in standard errors, chosen on pilot worlds (docs/racing.md)
SEED_CAP = 3  # most seeds a node gets, the root's number (RunConfig.root_seeds' default)


@dataclass(frozen=True)
class SeedPolicy:
    """How many trainings a node gets: `at_birth` when it is made, then up to `cap` by racing when `racing`, with
    intervals of `z` standard errors."""

    name: str
    at_birth: int
    cap: int
    racing: bool
    z: float = RACING_Z

    def affords_child(self, trainings_left: int) -> bool:
        """A new node is started only when the budget left can give it `cap` seeds, so a child made at the end of
        a run can still be raced before it is reported."""
        return trainings_left >= self.cap


SEED_POLICIES: dict[str, SeedPolicy] = {
    "one": SeedPolicy("one", at_birth=1, cap=1, racing=False),
    "fixed": SeedPolicy("fixed", at_birth=SEED_CAP, cap=SEED_CAP, racing=False),
    "racing": SeedPolicy("racing", at_birth=1, cap=SEED_CAP, racing=True),
}


def next_seed(seed_scores: Mapping[str, Sequence[float]], noise_sd: float, cap: int, trainings_left: int,
              z: float = RACING_Z, closed: Collection[str] = ()) -> str | None:
    """The node (its key in `seed_scores`, which is in creation order) that gets the next training seed, or None.

    `seed_scores` maps each node to the utility of every seed it was trained with (nodes without a finite score
    are ignored); `noise_sd` is the run's measured seed SD; `cap` the most seeds a node gets; `trainings_left` the
    budget; `closed` the nodes that take no more seeds whatever their count (the run loop's root, whose seeds the
    budget does not pay for, and a node whose extra seed kept failing), which still rank. The rule is the module
    docstring's."""
    if not math.isfinite(noise_sd) or noise_sd < 0:
        raise ValueError(f"racing needs the run's measured seed SD, a finite number >= 0; got {noise_sd}")
    if trainings_left < 1:
        return None
    scored = {key: [s for s in scores if math.isfinite(s)] for key, scores in seed_scores.items()}
    scored = {key: scores for key, scores in scored.items() if scores}
    if len(scored) < 2:
        return None
    order = {key: index for index, key in enumerate(scored)}
    mean = {key: math.fsum(scores) / len(scores) for key, scores in scored.items()}
    half = {key: z * noise_sd / math.sqrt(len(scores)) for key, scores in scored.items()}
    leader = max(scored, key=lambda key: (mean[key], -order[key]))
    floor = mean[leader] - half[leader]
    contenders = [key for key in scored if key != leader and mean[key] + half[key] > floor]
    if not contenders:
        return None  # settled: the leader's lower bound clears every other upper bound
    open_ = [key for key in (leader, *contenders) if len(scored[key]) < cap and key not in closed]
    if not open_:
        return None
    return max(open_, key=lambda key: (mean[key] + half[key], -len(scored[key]), -order[key]))


__all__ = ["RACING_Z", "SEED_CAP", "SEED_POLICIES", "SeedPolicy", "next_seed"]
