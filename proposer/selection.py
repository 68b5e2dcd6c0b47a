"""Lineage prioritization: which archive nodes become the parents of the next round.

Part of Phase I (docs/architecture.md, "The design card").

Every candidate d (an evaluated, unfailed node with a finite utility) gets the acquisition score

    s(d) = w_pareto·U_pareto(d) + w_perf·U_perf(d) + w_div·U_div(d) + w_bayes·α_GP(d)

with the weights and GP constants of `SelectionWeights`. The terms, each computed over the candidates alone:

U_perf    the node's utility U (by default `seed_mean`, the mean over every seed it was trained with) min-max
          normalized to [0, 1]; 0.5 for all when every utility is equal.
U_pareto  Pareto-frontier strength over the metric vector: the node's per-suite scores (suites every candidate
          was evaluated on, each averaged over the node's seeds), plus −mean length under the length objective;
          a candidate set with no suite in common falls back to the one-element vector (U,). Candidates are
          sorted into non-dominated fronts (front 0 = the Pareto frontier); the raw strength is
          (last front index − front) + SPEA2 strength (the share of the other candidates it dominates), which
          orders nodes by front first and by strength within a front (strength < 1, so a front is never
          overtaken by the next), min-max normalized; 1 for all when every candidate is on the frontier.
U_div     novelty: the mean distance to the DIV_NEIGHBOURS nearest other candidates, min-max normalized (0.5 for
          all when equal). The distance is the mean of a structural and a behavioural distance, both in [0, 1]:
          structural = (mechanisms in exactly one of the two + Σ over shared mechanisms of the mean gap of their
          parameters' positions in range) / mechanisms in either — a Jaccard distance in which a shared
          mechanism counts as partly different by how far its constants are apart; behavioural = the RMS gap of
          the metric vectors, each coordinate min-max scaled over the candidates.
α_GP      descendant potential, GP-UCB μ + κσ of `DescendantGP`: a Gaussian process over `node_features`
          trained on the candidates that have evaluated descendants, with target the discounted top-K
          descendant gain y_d = mean_{k∈topK} γ^depth(c_k, d) · tanh((U(c_k) − U(d)) / β) (`descendant_gain`).
          y is a gain *relative to d*, so a poor node whose children undo its mistake has a high y; the term is
          therefore put in U_perf's units (`bayes_term`: β·α, tanh's slope at 0 undone, divided by the utility
          span U_perf is normalized by, at least β), so that U_perf + α_GP reads as the expected utility of the
          node's best descendants rather than rewarding poor nodes for their room to recover (min-max
          normalizing α would make w_bayes·α_GP favour exactly those nodes). With fewer than MIN_GP_POINTS
          training nodes α is the prior PRIOR_MEAN + κ·PRIOR_STD for every node, which changes no ranking.

`select_parents` takes the k highest scores, skipping a node whose set of mechanism names is already among the
chosen parents while any node with a new set remains, so one round does not spend its parents on near-copies.
Exact score ties are broken by draws from the rng, so the choice is deterministic for a given rng state.

Bounded work on large archives: beyond SHORTLIST candidates, the terms, the choice and both GPs' training sets
are computed over a shortlist of SHORTLIST candidates (`shortlist`: a quarter from the Pareto frontier of the
per-suite scores, best utility first, a quarter more by utility, a quarter of the newest, the rest an evenly
spaced sample by age), while each descendant-gain target still counts every evaluated descendant in the archive.
Up to SHORTLIST candidates (the paper's runs have 64 nodes) the shortlist is every candidate and nothing changes.
Pairwise distances and dominance are computed a block of rows at a time (poise/pareto.py `row_blocks`), and the
descendant gains in one pass over the ancestor lists, so the 10,000-node archive takes well under a second.
Everything here is a pure function of its arguments: the GP keeps fixed kernel hyperparameters by default, and
with `optimize=True` starts its optimizer from fixed values without restarts.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import statistics
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from threadpoolctl import ThreadpoolController

from poise.contracts import SERVICE_ERROR, Node, NodeStatus, Objective, Phase, Proposal, SelectionWeights
from poise.description.mechanisms import MECHANISMS, AlgorithmDescription, Param
from poise.description.proposals import proposal_description
from poise.pareto import dominance, non_dominated, pareto_fronts, row_blocks
from poise.scoring import pooled_sd, seed_mean, seed_scores

Utility = Callable[[Node], float | None]

DIV_NEIGHBOURS = 3  # novelty is measured against the nearest few, not the whole archive (novelty search)
DEPTH_SCALE = 10.0  # depth enters the GP features as depth / DEPTH_SCALE, on the scale of the other features
MIN_GP_POINTS = 2  # below this many nodes with descendants the GP is not fitted and α is the prior
PRIOR_MEAN = 0.0  # no descendant gain expected ...
PRIOR_STD = 0.5  # ... but it could go either way: half the range of tanh
SHORTLIST = 512  # Phase I scores and fits its GPs on at most this many candidates (`shortlist`)

MECHANISM_NAMES: tuple[str, ...] = tuple(MECHANISMS)
# One column per (mechanism, parameter): parameter keys are shared within a family with different ranges.
PARAM_COLUMNS: tuple[tuple[str, str], ...] = tuple((m.name, key) for m in MECHANISMS.values() for key in m.params)
_COLUMN_MECHANISM = np.array([MECHANISM_NAMES.index(name) for name, _ in PARAM_COLUMNS], dtype=int)
# A shared mechanism's parameters share one unit of distance: each column weighs 1 / (its mechanism's params).
_COLUMN_WEIGHT = np.array([1.0 / len(MECHANISMS[name].params) for name, _ in PARAM_COLUMNS])
FEATURE_NAMES: tuple[str, ...] = (
    *MECHANISM_NAMES, *(f"{name}.{key}" for name, key in PARAM_COLUMNS), "depth", "normalized_utility")


def memoized(utility: Utility) -> Utility:
    """`utility` computed once per node id (selection asks for a node's utility many times)."""
    values: dict[str, float | None] = {}

    def cached(node: Node) -> float | None:
        key = node.node_id
        if key not in values:
            values[key] = utility(node)
        return values[key]

    return cached


def candidate_parents(nodes: Sequence[Node], utility: Utility = seed_mean) -> list[Node]:
    """The nodes that may be parents: evaluated, not failed, with a finite utility; oldest first."""
    def eligible(node: Node) -> bool:
        if node.status == NodeStatus.FAILED or node.evaluation is None:
            return False
        value = utility(node)
        return value is not None and math.isfinite(value)

    return sorted(filter(eligible, nodes), key=lambda node: (node.created_at, node.node_id))


def shortlist(candidates: Sequence[Node], utility: Utility = seed_mean, limit: int | None = None) -> list[Node]:
    """The candidates Phase I scores and trains its GPs on, in the order given (`candidates` oldest first, as
    `candidate_parents` returns them): all of them while there are at most `limit` (default SHORTLIST). Beyond,
    `limit` of them: up to a quarter from the Pareto frontier of the per-suite scores (`metric_vectors` without
    an objective), best utility first; then up to a quarter more by utility; then up to a quarter of the newest;
    the rest an evenly spaced sample of the remaining candidates by age. Time and memory are linear in the
    candidates."""
    limit = SHORTLIST if limit is None else limit
    if limit < 1:
        raise ValueError(f"the shortlist limit must be at least 1, got {limit}")
    if len(candidates) <= limit:
        return list(candidates)
    by_utility = sorted(range(len(candidates)), key=lambda i: -utility(candidates[i]))  # ties: oldest first
    on_front = non_dominated(metric_vectors(candidates, utility))
    picked: dict[int, None] = {}

    def take(indices: Iterable[int], count: int) -> None:
        for i in indices:
            if count <= 0:
                return
            if i not in picked:
                picked[i] = None
                count -= 1

    take((i for i in by_utility if on_front[i]), limit // 4)
    take(by_utility, limit // 4)
    take(range(len(candidates) - 1, -1, -1), limit // 4)
    rest = [i for i in range(len(candidates)) if i not in picked]
    slots = limit - len(picked)
    take((rest[j * len(rest) // slots] for j in range(slots)), slots)
    return [candidates[i] for i in sorted(picked)]


# ------------------------------------------------------------------------------------------- genotype


def param_position(param: Param, value: object) -> float:
    """Where `value` lies in `param`'s range, in [0, 1]: log-scaled for log parameters, the index among choices."""
    if param.choices:
        return param.choices.index(value) / max(len(param.choices) - 1, 1) if value in param.choices else 0.0
    value = float(value)
    if param.log and param.low > 0:
        low, high, value = math.log(param.low), math.log(param.high), math.log(max(value, param.low))
    else:
        low, high = param.low, param.high
    return min(max((value - low) / (high - low), 0.0), 1.0) if high > low else 0.0


@dataclass(frozen=True)
class Genotype:
    """An algorithm description as arrays: which library mechanisms it has (0/1 per MECHANISM_NAMES) and the
    position in range of each PARAM_COLUMNS parameter (0 where its mechanism is absent)."""

    present: np.ndarray  # (M,)
    positions: np.ndarray  # (C,)

    @classmethod
    def of(cls, description: AlgorithmDescription) -> Genotype:
        names = set(description.names)
        present = np.array([name in names for name in MECHANISM_NAMES], dtype=float)
        positions = np.array([param_position(MECHANISMS[name].params[key], description.hparams[key])
                              if name in names else 0.0 for name, key in PARAM_COLUMNS])
        return cls(present, positions)

    def centered(self) -> np.ndarray:
        """Positions relative to each present parameter's default (0 at the default, and where absent), so that
        adding a mechanism at its defaults moves only its one-hot entry."""
        return (self.positions - _DEFAULT_POSITIONS) * self.present[_COLUMN_MECHANISM]


_DEFAULT_POSITIONS = np.array([param_position(MECHANISMS[name].params[key], MECHANISMS[name].params[key].default)
                               for name, key in PARAM_COLUMNS])


def node_genotype(node: Node) -> Genotype:
    return Genotype.of(proposal_description(node.proposal))


def structural_distances(genotypes: Sequence[Genotype]) -> np.ndarray:
    """(n, n) structural distances (module docstring): a Jaccard distance over mechanism sets in which a shared
    mechanism adds the mean gap of its parameters' positions."""
    present = np.stack([g.present for g in genotypes])  # (n, M)
    positions = np.stack([g.positions for g in genotypes])  # (n, C)
    distances = np.empty((len(present), len(present)))
    for rows in row_blocks(len(present), len(PARAM_COLUMNS)):  # (b, n, C) at a time, not (n, n, C)
        union = np.maximum(present[rows, None, :], present[None, :, :]).sum(-1)  # (b, n)
        only_one = np.abs(present[rows, None, :] - present[None, :, :]).sum(-1)
        shared = (present[rows, None, :] * present[None, :, :])[:, :, _COLUMN_MECHANISM]  # (b, n, C)
        gaps = (np.abs(positions[rows, None, :] - positions[None, :, :]) * shared * _COLUMN_WEIGHT).sum(-1)
        distances[rows] = (only_one + gaps) / np.maximum(union, 1.0)
    return distances


# --------------------------------------------------------------------------------------- the four terms


def min_max(values: np.ndarray, constant: float = 0.5) -> np.ndarray:
    """`values` scaled to [0, 1]; `constant` for every entry when they are all equal."""
    values = np.asarray(values, dtype=float)
    span = values.max() - values.min() if values.size else 0.0
    return (values - values.min()) / span if span > 0 else np.full(values.shape, constant)


def _evaluations(node: Node) -> list:
    return ([node.evaluation] if node.evaluation is not None else []) + list(node.replicates)


def metric_vectors(nodes: Sequence[Node], utility: Utility = seed_mean, objective: Objective | None = None
                   ) -> np.ndarray:
    """(n, m) metric vectors, larger is better: the mean score per suite shared by every node, then −mean length
    under the length objective; (U,) per node when that leaves nothing."""
    suites = sorted(set(nodes[0].evaluation.suites).intersection(*(node.evaluation.suites for node in nodes))
                    ) if nodes else []
    length = objective is not None and objective.kind == "length"
    if not suites and not length:
        return np.array([utility(node) for node in nodes], dtype=float).reshape(len(nodes), 1)
    vectors = np.empty((len(nodes), len(suites) + length))
    for row, node in zip(vectors, nodes, strict=True):
        if not node.replicates:  # one seed (most nodes): its scores as they are
            scores = node.evaluation.suites
            row[: len(suites)] = [scores[suite].value for suite in suites]
        else:
            seeds = _evaluations(node)
            row[: len(suites)] = [np.mean([e.suites[suite].value for e in seeds if suite in e.suites])
                                  for suite in suites]
        if length:
            row[-1] = -np.mean([e.mean_length for e in _evaluations(node)])
    return vectors


def pareto_strength(vectors: np.ndarray) -> np.ndarray:
    """U_pareto of each row (module docstring): front first, SPEA2 strength within a front, in [0, 1]."""
    front = pareto_fronts(vectors)
    strength = dominance(vectors).sum(1) / max(len(vectors) - 1, 1)
    return min_max((front.max() - front) + strength, constant=1.0)


def novelty(distances: np.ndarray, neighbours: int = DIV_NEIGHBOURS) -> np.ndarray:
    """U_div of each row of an (n, n) distance matrix: the mean distance to its nearest `neighbours` others,
    min-max normalized."""
    n = len(distances)
    if n < 2:
        return np.full(n, 0.5)
    others = np.sort(np.where(np.eye(n, dtype=bool), np.inf, distances), axis=1)[:, : min(neighbours, n - 1)]
    return min_max(others.mean(axis=1))


def behaviour_distances(vectors: np.ndarray) -> np.ndarray:
    """(n, n) RMS gaps of the metric vectors, each coordinate min-max scaled over the rows; in [0, 1]."""
    scaled = np.column_stack([min_max(column, constant=0.0) for column in vectors.T])
    distances = np.empty((len(scaled), len(scaled)))
    for rows in row_blocks(len(scaled), scaled.shape[1]):
        distances[rows] = np.sqrt(((scaled[rows, None, :] - scaled[None, :, :]) ** 2).mean(-1))
    return distances


# ------------------------------------------------------------------------------- descendant potential


def descendant_gain(node: Node, descendants: Sequence[Node], utility: Utility, weights: SelectionWeights,
                    failed_children: int = 0) -> float | None:
    """y_d = mean over the top-K descendants of γ^(generations between them) · tanh((U(c) − U(d)) / β), top-K by
    that discounted term; None when `descendants` (evaluated descendants of `node`) is empty and no child failed.

    A child that failed by its own code (`failed_by_candidate`) is evidence against the node (docs/racing.md): with
    f the failed share of its direct children, y_d ← (1 − f)·y_d + f·(−γ), −γ being the lowest value a direct
    child's term can take, so failures only ever lower y_d; a node whose only children failed gets −γ."""
    _check_beta(weights.beta)
    own = utility(node)
    terms = sorted((weights.gamma ** (child.genealogy.depth - node.genealogy.depth)
                    * math.tanh((utility(child) - own) / weights.beta) for child in descendants), reverse=True)
    top = terms[: weights.top_k]
    gain = sum(top) / len(top) if top else None
    if not failed_children:
        return gain
    direct = sum(1 for child in descendants if child.genealogy.depth == node.genealogy.depth + 1)
    share = failed_children / (failed_children + direct)
    return (1 - share) * (gain if gain is not None else 0.0) + share * -weights.gamma


def failed_by_candidate(node: Node) -> bool:
    """A node that failed because of the candidate itself: it could not be implemented and verified, or its
    training failed or was aborted. A failure of the proposer, of evaluation or reflection, or of a service
    (a dead-lettered message) says nothing about the parent."""
    failure = node.failure
    return (node.status == NodeStatus.FAILED and failure is not None
            and failure.phase in (Phase.IMPLEMENT, Phase.TRAIN) and SERVICE_ERROR not in failure.reason)


def descendant_gains(nodes: Sequence[Node], utility: Utility, weights: SelectionWeights,
                     of: Collection[str] | None = None) -> dict[str, float]:
    """y_d of every candidate that has evaluated descendants, or children that failed by their own code
    (`failed_by_candidate`), among `nodes` (only of those whose id is in `of`, when given), by node id. One pass
    over the candidates' ancestor lists: time linear in their total length, not quadratic in the archive."""
    utility = memoized(utility)
    return _gains(candidate_parents(nodes, utility), utility, weights, of, failed_children(nodes))


def failed_children(nodes: Iterable[Node]) -> Counter:
    """How many children of each node failed by their own code (`failed_by_candidate`), by the parent's id."""
    return Counter(node.genealogy.parent_ids[0] for node in nodes
                   if node.genealogy.parent_ids and failed_by_candidate(node))


def _gains(candidates: Sequence[Node], utility: Utility, weights: SelectionWeights, of: Collection[str] | None,
           failed: Mapping[str, int] | None = None) -> dict[str, float]:
    """`descendant_gains` over `candidates` already filtered by `candidate_parents`; `failed`: each parent's
    children that failed by their own code."""
    _check_beta(weights.beta)
    failed = failed or {}
    wanted = {node.node_id for node in candidates}
    if of is not None:
        wanted &= set(of)
    descendants: dict[str, list[Node]] = {}
    for child in candidates:
        for ancestor in wanted.intersection(child.genealogy.ancestors):
            descendants.setdefault(ancestor, []).append(child)
    return {node.node_id: descendant_gain(node, descendants.get(node.node_id, []), utility, weights,
                                          failed.get(node.node_id, 0))
            for node in candidates
            if node.node_id in wanted and (node.node_id in descendants or failed.get(node.node_id, 0))}


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"SelectionWeights.beta must be positive (the gain scale of tanh), got {beta}")


def node_features(node: Node, normalized_utility: float) -> np.ndarray:
    """The GP's view of a node, FEATURE_NAMES: one-hot over the library's mechanisms, each parameter's position
    relative to its default (`Genotype.centered`), depth / DEPTH_SCALE, and the node's utility normalized over
    the archive (the caller's min-max, as `DescendantGP.features` does). The length is fixed by the library."""
    return _features(node_genotype(node), node.genealogy.depth, normalized_utility)


def _features(genotype: Genotype, depth: int, normalized_utility: float) -> np.ndarray:
    return np.concatenate([genotype.present, genotype.centered(), [depth / DEPTH_SCALE, normalized_utility]])


class KernelGP:
    """What the two GPs share: a constant times an RBF plus a WhiteKernel (seed noise makes two nodes with the same
    features disagree; or each target's own variance, `_train`'s `noise`), on normalized targets, trained on at most
    SHORTLIST rows (`shortlist`). By default the kernel keeps the fixed hyperparameters KERNEL_DEFAULTS: with the
    few dozen noisy targets of a run, maximum-likelihood estimates swing between "all noise" and "no noise" from one
    round to the next, and fitting them costs ~50× more; `optimize=True` fits them (one optimizer start from those
    values, so still deterministic). Unfitted (fewer than MIN_GP_POINTS training rows), `predict` returns
    (`prior_mean()`, PRIOR_STD) for every row."""

    # On normalized targets: unit signal variance; a length scale of about one mutation (a swap moves two one-hot
    # entries, distance √2); noise a quarter of the signal, the share seed noise takes of tanh-squashed gains.
    KERNEL_DEFAULTS = {"signal": 1.0, "length_scale": 1.5, "noise": 0.25}

    def __init__(self, optimize: bool = False):
        self.optimize = optimize
        self._regressor: GaussianProcessRegressor | None = None

    @property
    def fitted(self) -> bool:
        """True when the GP was trained (enough rows); False while `predict` returns the prior."""
        return self._regressor is not None

    def prior_mean(self) -> float:
        return PRIOR_MEAN

    def _train(self, x: Sequence[np.ndarray], y: Sequence[float], noise: Sequence[float] | None = None) -> None:
        """Fit the kernel to the rows (x, y); unfitted with fewer than MIN_GP_POINTS rows. `noise`, when given, is
        each target's own variance in the targets' units (σ²/n for a mean of n seeds) and takes the place of the
        WhiteKernel's one level."""
        self._regressor = None
        if len(y) < MIN_GP_POINTS:
            return
        hp = self.KERNEL_DEFAULTS
        kernel = ConstantKernel(hp["signal"], (1e-2, 1e2)) * RBF(hp["length_scale"], (1e-1, 1e2))
        spread = float(np.var(y))
        alpha: float | np.ndarray = 1e-10  # sklearn's default jitter
        if noise is None or spread == 0:
            kernel = kernel + WhiteKernel(hp["noise"], (1e-4, 1e1))
        else:  # normalize_y fits y / std(y), so a variance in y's units is divided by var(y)
            alpha = np.asarray(noise, dtype=float) / spread + alpha
        regressor = GaussianProcessRegressor(kernel, normalize_y=True, alpha=alpha,
                                             optimizer="fmin_l_bfgs_b" if self.optimize else None)
        with warnings.catch_warnings(), _one_blas_thread():  # a length scale at its bound is an answer here
            warnings.simplefilter("ignore", ConvergenceWarning)
            regressor.fit(np.stack(x), np.array(y, dtype=float))
        self._regressor = regressor

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior (mean, std) of the target for each row of `features` (one row: a 1-D array)."""
        x = np.atleast_2d(features)
        if self._regressor is None:
            return np.full(len(x), self.prior_mean()), np.full(len(x), PRIOR_STD)
        with _one_blas_thread():
            mean, std = self._regressor.predict(x, return_std=True)
        return np.asarray(mean, dtype=float), np.asarray(std, dtype=float)


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS on one thread: a GP of at most SHORTLIST rows is faster so, and on a busy machine several BLAS threads
    spinning for a core make its Cholesky factorization ten to fifty times slower."""
    return _blas().limit(limits=1, user_api="blas")


class DescendantGP(KernelGP):
    """The GP of α_GP: predicts a node's discounted top-K descendant gain from its features (`KernelGP`; prior
    PRIOR_MEAN).

    `fit` learns on the shortlisted candidates (`shortlist`) with evaluated descendants, each target counting
    every evaluated descendant in the archive, and remembers the archive's utility range and the shortlist's
    genotypes, which `features` and `proposal_features` use.
    """

    def __init__(self, weights: SelectionWeights | None = None, optimize: bool = False):
        super().__init__(optimize)
        self.weights = weights or SelectionWeights()
        self.targets: dict[str, float] = {}
        self.fitted_ids: frozenset[str] = frozenset()
        self.shortlisted: list[Node] = []
        self._genotypes: dict[str, Genotype] = {}
        self._utilities: dict[str, float] = {}
        self._utility_range = (0.0, 0.0)

    def fit(self, nodes: Sequence[Node], utility: Utility = seed_mean) -> DescendantGP:
        utility = memoized(utility)
        candidates = candidate_parents(nodes, utility)
        self.fitted_ids = frozenset(node.node_id for node in candidates)
        self.shortlisted = shortlist(candidates, utility)
        self._genotypes = {node.node_id: node_genotype(node) for node in self.shortlisted}
        self._utilities = {node.node_id: float(utility(node)) for node in candidates}
        values = list(self._utilities.values())
        self._utility_range = (min(values), max(values)) if values else (0.0, 0.0)
        self.targets = _gains(candidates, utility, self.weights, of={node.node_id for node in self.shortlisted},
                              failed=failed_children(nodes))
        trained = [node for node in self.shortlisted if node.node_id in self.targets]
        self._train([self.features(node) for node in trained], [self.targets[node.node_id] for node in trained])
        return self

    def normalized_utility(self, value: float) -> float:
        """`value` min-max scaled by the utilities of the archive the GP was fitted on (0.5 if they are equal)."""
        low, high = self._utility_range
        return min(max((value - low) / (high - low), 0.0), 1.0) if high > low else 0.5

    def genotype(self, node: Node) -> Genotype:
        return self._genotypes.get(node.node_id) or node_genotype(node)

    def features(self, node: Node) -> np.ndarray:
        """`node_features` with the utility normalized over the archive the GP was fitted on."""
        value = self._utilities.get(node.node_id)
        return _features(self.genotype(node), node.genealogy.depth,
                         self.normalized_utility(value) if value is not None else 0.5)

    def proposal_features(self, proposal: Proposal | AlgorithmDescription, parent: Node) -> np.ndarray:
        """Features of a not-yet-evaluated child of `parent`: the child's own mechanisms and constants, one
        generation below the parent, and the parent's normalized utility standing in for its unknown own.
        `predict` on them estimates the descendant gain a node like the child would show, not the child's own
        gain over its parent (screening ranks by the latter, with `UtilityGP`)."""
        description = proposal if isinstance(proposal, AlgorithmDescription) else proposal_description(proposal)
        value = self._utilities.get(parent.node_id)
        return _features(Genotype.of(description), parent.genealogy.depth + 1,
                         self.normalized_utility(value) if value is not None else 0.5)

    def ucb(self, features: np.ndarray) -> np.ndarray:
        """α = μ + κσ for each row of `features`."""
        mean, std = self.predict(features)
        return mean + self.weights.kappa * std


# ------------------------------------------------------------------------------ screening's surrogate


def genotype_features(description: AlgorithmDescription) -> np.ndarray:
    """A description as the UtilityGP sees it: the one-hot over the library's mechanisms and each parameter's
    position relative to its default (`Genotype.centered`)."""
    genotype = Genotype.of(description)
    return np.concatenate([genotype.present, genotype.centered()])


def seed_mean_variances(candidates: Sequence[Node], nodes: Sequence[Node]) -> list[float] | None:
    """The variance σ²/n of each of `nodes`' seed means, σ the run's measured seed SD (the pooled within-node SD
    of `candidates`, `pooled_sd`) and n the node's seeds (docs/racing.md); None while σ is unmeasured (no node
    with two seeds) or 0."""
    sd = pooled_sd([seed_scores(node) for node in candidates])
    if not sd:
        return None
    return [sd**2 / max(len(seed_scores(node)), 1) for node in nodes]


class UtilityGP(KernelGP):
    """Screening's predictor: a candidate's own utility from its mechanisms and constants (`genotype_features`),
    a GP trained on the utility (by default `seed_mean`) of the shortlisted candidate parents (`shortlist`: every
    one up to SHORTLIST).

    Screening ranks a parent's population by the expected improvement of each child's predicted utility over
    the parent's (`incumbent`), so a change the archive has already seen hurt (the same mechanism swapped in
    elsewhere) is tried last, and an untried direction keeps the GP's prior uncertainty. This is a surrogate of
    the utility itself, unlike `DescendantGP`, whose target (the gain a node's descendants show over it) says how
    promising a node is as a parent, not how good a new child will be. On the simulated landscape
    (app/landscape.py, 100 worlds) POISE with this screening (and the WhiteKernel noise term) found +0.0048
    (SE 0.0006) more true Overall than the greedy baseline; in a scratch check at the landscape's earlier
    noise, screening with the DescendantGP gained only +0.0017 (SE 0.0010, 40 worlds), this GP +0.0037 (SE
    0.0012) (bench/results/search_simulated.md).

    Same kernel as the DescendantGP (`KernelGP`), except the noise term: a target is a seed mean whose variance
    σ²/n the run knows (`seed_mean_variances`), so a node trained with more seeds (racing, docs/racing.md) pulls
    the prediction harder; the WhiteKernel's one level only while σ is unmeasured. With fewer than
    MIN_GP_POINTS candidates `predict` returns the same (mean utility of every candidate, PRIOR_STD) for every
    row, which ranks nothing, and screening falls back to novelty.
    """

    SEED_NOISE = True  # each target's noise from its seeds (`seed_mean_variances`); False: the WhiteKernel's level

    def __init__(self, optimize: bool = False):
        super().__init__(optimize)
        self.utilities: dict[str, float] = {}

    def fit(self, nodes: Sequence[Node], utility: Utility = seed_mean) -> UtilityGP:
        """Train on the shortlisted candidates' utilities. With the default `seed_mean`, each target's noise is
        its own (`seed_mean_variances`): a node trained with three seeds counts more than one trained with one."""
        per_seed = self.SEED_NOISE and utility is seed_mean
        utility = memoized(utility)
        candidates = candidate_parents(nodes, utility)
        self.utilities = {node.node_id: float(utility(node)) for node in candidates}
        trained = shortlist(candidates, utility)
        self._train([genotype_features(proposal_description(node.proposal)) for node in trained],
                    [self.utilities[node.node_id] for node in trained],
                    seed_mean_variances(candidates, trained) if per_seed else None)
        return self

    def prior_mean(self) -> float:
        return statistics.fmean(self.utilities.values()) if self.utilities else 0.0

    def incumbent(self, parent: Node) -> float:
        """What a child must beat: its parent's utility (the mean of the archive's when the parent has none)."""
        value = self.utilities.get(parent.node_id)
        return self.prior_mean() if value is None else value

    def proposal_features(self, proposal: Proposal | AlgorithmDescription, parent: Node) -> np.ndarray:
        """Features of a not-yet-evaluated child (the parent does not enter: utility depends on the description)."""
        return genotype_features(proposal if isinstance(proposal, AlgorithmDescription)
                                 else proposal_description(proposal))


# ----------------------------------------------------------------------------------------- selection


def bayes_term(alpha: np.ndarray, utilities: np.ndarray, beta: float) -> np.ndarray:
    """α in the units of U_perf: β·α is the descendant gain in utility (tanh's slope at 0 undone), divided by the
    span U_perf is normalized by, so that U_perf + α reads as the expected utility of the node's best
    descendants; a span below β counts as β, so a young archive's tiny spread does not blow α up."""
    _check_beta(beta)
    span = float(utilities.max() - utilities.min()) if utilities.size else 0.0
    return beta * alpha / max(span, beta)


@dataclass(frozen=True)
class Selection:
    """One candidate's acquisition score and its terms (unweighted), for the choice and for the run's log."""

    node_id: str
    score: float
    pareto: float
    perf: float
    div: float
    bayes: float  # α_GP = gp_mean + κ·gp_std in U_perf's units (`bayes_term`)
    gp_mean: float
    gp_std: float
    utility: float
    mechanisms: tuple[str, ...]  # the node's mechanism names, library order

    def as_dict(self) -> dict:
        return asdict(self)


def score_candidates(nodes: Sequence[Node], weights: SelectionWeights, utility: Utility = seed_mean,
                     objective: Objective | None = None, gp: DescendantGP | None = None) -> list[Selection]:
    """Every shortlisted candidate parent among `nodes` (`shortlist`: all of them up to SHORTLIST) with s(d) and
    its terms, oldest first; every term is computed over the shortlist. `gp` is reused when it was fitted on
    exactly these candidates (e.g. to share it with screening), else a new one is fitted here."""
    utility = memoized(utility)
    if gp is None or gp.fitted_ids != {node.node_id for node in candidate_parents(nodes, utility)}:
        gp = DescendantGP(weights).fit(nodes, utility)
    candidates = gp.shortlisted
    if not candidates:
        return []
    genotypes = [gp.genotype(node) for node in candidates]
    utilities = np.array([utility(node) for node in candidates], dtype=float)
    vectors = metric_vectors(candidates, utility, objective)
    perf = min_max(utilities)
    pareto = pareto_strength(vectors)
    div = novelty((structural_distances(genotypes) + behaviour_distances(vectors)) / 2)
    mean, std = gp.predict(np.stack([gp.features(node) for node in candidates]))
    bayes = bayes_term(mean + weights.kappa * std, utilities, weights.beta)
    score = weights.pareto * pareto + weights.perf * perf + weights.div * div + weights.bayes * bayes
    return [Selection(node.node_id, float(score[i]), float(pareto[i]), float(perf[i]), float(div[i]),
                      float(bayes[i]), float(mean[i]), float(std[i]), float(utilities[i]),
                      tuple(name for name, here in zip(MECHANISM_NAMES, genotypes[i].present, strict=True) if here))
            for i, node in enumerate(candidates)]


def select_parents(nodes: Sequence[Node], weights: SelectionWeights, k: int = 3, rng: random.Random | None = None,
                   utility: Utility = seed_mean, objective: Objective | None = None) -> list[Selection]:
    """The k parents of the next round, best score first (module docstring); fewer when fewer candidates exist.
    Draws one number per candidate from `rng` to break exact ties (none drawn when rng is None: the oldest
    wins)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    scored = score_candidates(nodes, weights, utility, objective)
    if not scored:
        raise ValueError("no candidate parents to select from; evaluate the root first")
    tiebreak = [rng.random() for _ in scored] if rng is not None else [0.0] * len(scored)
    order = sorted(range(len(scored)), key=lambda i: (-scored[i].score, -tiebreak[i], i))
    chosen: list[Selection] = []
    while order and len(chosen) < k:
        taken = {s.mechanisms for s in chosen}
        pick = next((i for i in order if scored[i].mechanisms not in taken), order[0])
        order.remove(pick)
        chosen.append(scored[pick])
    return chosen


__all__ = [
    "DescendantGP",
    "FEATURE_NAMES",
    "Genotype",
    "KernelGP",
    "MECHANISM_NAMES",
    "PARAM_COLUMNS",
    "Selection",
    "UtilityGP",
    "bayes_term",
    "behaviour_distances",
    "candidate_parents",
    "descendant_gain",
    "descendant_gains",
    "genotype_features",
    "dominance",
    "metric_vectors",
    "node_features",
    "novelty",
    "param_position",
    "pareto_fronts",
    "pareto_strength",
    "score_candidates",
    "seed_mean",
    "seed_mean_variances",
    "select_parents",
    "shortlist",
    "structural_distances",
]
