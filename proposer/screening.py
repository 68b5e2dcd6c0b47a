"""Screening (Phase I): rank a parent's population before anything is trained, and say why each one fell out.

Each proposal goes through four gates, then the survivors are ranked:

    consistency  the source (compiled from the description, or an LLM's) parses, passes the structural check in
                 the sandbox (proposer/fingerprint_child.py) and declares what the proposal says: its
                 LOSS_AGG_MODE and the values of the constants both name
    novelty      its behavioural fingerprint is farther than NEAR_DUPLICATE_DISTANCE from every archived node's
                 (their sources fingerprinted once, then cached) — a renamed copy of an archived algorithm is
                 rejected with the nearest node and the distance in the reason
    no-op        on the batches a real training run produced (the recorded probes, proposer/probe_batches.py) its
                 advantages, losses and loss gradients are within NO_OP_DISTANCE of the parent's: the change would
                 train exactly like the parent, whatever it does on the synthetic probes; rejected (stage
                 "novelty", nearest_id the parent) naming the mechanisms that changed and why they do nothing
                 there (docs/screening.md)
    uniqueness   in rank order, one that behaves like a better-ranked proposal of the same population is dropped
    rank         by expected improvement from the injected predictor (the UtilityGP of proposer/selection.py in a
                 run, `phase_one`, or any callable features -> (mean, std)): EI or UCB against `incumbent` (the
                 parent's utility for the UtilityGP); ties (no predictor: all 0) go
                 to the more novel proposal (larger distance to its nearest archived node), then to population
                 order

The result is a `ScreeningReport` (JSON-serializable) with the ranked survivors, the best, and every rejection.
Candidate code runs only in the sandbox; parsing the source here executes nothing.
"""

from __future__ import annotations

import ast
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from poise.contracts import Contract, Node, Proposal, Rejection, RunConfig, ScreeningMerits, ScreeningSummary
from poise.description.codegen import compile_proposal
from poise.description.mechanisms import DescriptionError
from poise.description.proposals import description_key, proposal_description
from proposer.context import Context, build_context
from proposer.fingerprint import (
    NEAR_DUPLICATE_DISTANCE,
    NO_OP_DISTANCE,
    FingerprintResult,
    fingerprint_distance,
    fingerprint_distances,
    recorded_distance,
)
from proposer.population import generate_population
from proposer.selection import UtilityGP

Fingerprinter = Callable[[str], FingerprintResult]
SourceOf = Callable[[Proposal], str]
ACQUISITIONS = ("ei", "ucb")


class ScreenedProposal(Contract):
    """A proposal that passed every gate, with what ranked it.

    An LLM proposal with mechanisms outside the library has no offline source: `source_sha256` is None and
    `skipped` says why the consistency and novelty gates were not run (an LLM coder implements it)."""

    proposal: Proposal
    source_sha256: str | None = None
    skipped: str | None = None
    rank: int
    nearest_id: str | None = None  # the archived node it behaves most like
    distance: float | None = None  # its fingerprint distance to that node
    predicted_mean: float | None = None
    predicted_std: float | None = None
    expected_improvement: float = 0.0
    llm_score: float | None = None  # the screen LLM's mean judgement in [0, 1]; None when no LLM screened

    def merits(self) -> ScreeningMerits:
        """What ranked it (the proposal left out), as the winner's merits are kept on its proposal."""
        return ScreeningMerits(name=self.proposal.name, **self.model_dump(include=set(ScreeningMerits.model_fields)))


class ScreeningReport(Contract):
    """The outcome of screening one parent's population."""

    parent_id: str
    acquisition: str
    threshold: float
    ranked: list[ScreenedProposal] = []
    rejections: list[Rejection] = []
    wall_s: float = 0.0

    @property
    def best(self) -> ScreenedProposal | None:
        return self.ranked[0] if self.ranked else None

    def digest(self, screened_by: str | None = None, parent_utility: float | None = None) -> ScreeningSummary:
        """What the winner's proposal keeps of this report: the ranked survivors reduced to the winner's merits
        and the names of those the offline gates skipped."""
        return ScreeningSummary(
            parent_id=self.parent_id, acquisition=self.acquisition, threshold=self.threshold,
            winner=self.best.merits() if self.best else None, passed=len(self.ranked), rejections=self.rejections,
            skipped={r.proposal.name: r.skipped for r in self.ranked if r.skipped is not None},
            screened_by=screened_by, parent_utility=parent_utility)

    def summary(self) -> str:
        """One line for logs: the winner, each rejection's reason, and the proposals the offline gates skipped."""
        return self.digest().summary()


# ------------------------------------------------------------------------------------------- acquisition


def expected_improvement(mean: float, std: float, incumbent: float) -> float:
    """E[max(Y − incumbent, 0)] for Y ~ N(mean, std²); max(mean − incumbent, 0) when std is 0."""
    gain = mean - incumbent
    if not std > 0:
        return max(gain, 0.0)
    z = gain / std
    cdf = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return gain * cdf + std * pdf


def upper_confidence(mean: float, std: float, incumbent: float, kappa: float) -> float:
    """mean + κ·std − incumbent: optimism in the face of uncertainty."""
    return mean + kappa * std - incumbent


def _predict(predictor: Any, features: Any) -> tuple[float, float]:
    """(mean, std) of one feature vector from a callable or an object with `.predict` (1-element arrays ok)."""
    predict = getattr(predictor, "predict", predictor)
    mean, std = predict(features)
    return float(np.asarray(mean, dtype=float).reshape(-1)[0]), float(np.asarray(std, dtype=float).reshape(-1)[0])


# --------------------------------------------------------------------------------------------- screening


def screen_population(
    parent: Node,
    proposals: Sequence[Proposal],
    archive: Sequence[Node],
    fingerprinter: Fingerprinter,
    *,
    predictor: Any = None,
    features: Callable[[Proposal], Any] | None = None,
    acquisition: str = "ei",
    incumbent: float = 0.0,
    kappa: float = 1.0,
    threshold: float = NEAR_DUPLICATE_DISTANCE,
    source_of: SourceOf = compile_proposal,
) -> ScreeningReport:
    """Screen `proposals` (children of `parent`) against `archive` (the run's nodes; the parent is added if
    missing): module docstring.

    `fingerprinter` maps a source to its sandboxed FingerprintResult (a `FingerprintCache`). `predictor` gives
    (mean, std) for `features(proposal)`; for an object with `proposal_features(proposal, parent)` (the
    DescendantGP) `features` defaults to that. `incumbent` is the predictor's value for "no improvement": 0 for
    a gain predictor like the DescendantGP, the parent's utility for a predictor of utility. `source_of` turns a
    proposal into module source (default: the offline compiler; an LLM coder plugs in here).
    """
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"unknown acquisition {acquisition!r}; choose one of {', '.join(ACQUISITIONS)}")
    if predictor is not None and features is None:
        if not hasattr(predictor, "proposal_features"):
            raise ValueError("a predictor without proposal_features needs a `features` function")
        features = lambda proposal: predictor.proposal_features(proposal, parent)  # noqa: E731
    started = time.monotonic()
    rejections: list[Rejection] = []
    passed: list[tuple[int, Proposal, FingerprintResult]] = []
    for index, proposal in enumerate(proposals):
        result, problem = _consistency(proposal, fingerprinter, source_of)
        if problem is not None:
            rejections.append(Rejection(proposal_name=proposal.name, stage="consistency", reason=problem))
        else:
            passed.append((index, proposal, result))

    archived = archive_fingerprints([*archive, parent], fingerprinter, source_of) if passed else {}
    survivors: list[_Survivor] = []
    parent_vector = archived.get(parent.node_id)
    for index, proposal, result in passed:
        nearest_id, distance = _nearest(result.vector, archived)
        if nearest_id is not None and distance <= threshold:
            rejections.append(Rejection(
                proposal_name=proposal.name, stage="novelty", nearest_id=nearest_id, distance=distance,
                reason=(f"near-duplicate of node {nearest_id}: fingerprint distance {distance:.2g} <= {threshold:g} "
                        "(same advantages, losses and gradients on the probe batches)")))
            continue
        no_op = _no_op(proposal, result, parent, parent_vector)
        if no_op is not None:
            rejections.append(no_op)
            continue
        survivor = _Survivor(index, proposal, result, nearest_id, distance)
        if predictor is not None:
            survivor.mean, survivor.std = _predict(predictor, features(proposal))
            survivor.score = (expected_improvement(survivor.mean, survivor.std, incumbent) if acquisition == "ei"
                              else upper_confidence(survivor.mean, survivor.std, incumbent, kappa))
        survivors.append(survivor)

    # Best first: expected improvement, then novelty (no archive: infinitely novel), then population order.
    survivors.sort(key=lambda s: (-s.score, -s.distance, s.index))
    ranked: list[ScreenedProposal] = []
    kept: list[tuple[str, np.ndarray]] = []  # (name, fingerprint) of the ranked proposals
    for survivor in survivors:
        name = survivor.proposal.name
        twin = next(((other, d) for other, vector in kept
                     if (d := fingerprint_distance(survivor.result.vector, vector)) <= threshold), None)
        if twin is not None:
            rejections.append(Rejection(
                proposal_name=name, stage="novelty", distance=twin[1],
                reason=f"near-duplicate of {twin[0]}, ranked above it in this population: fingerprint distance "
                       f"{twin[1]:.2g} <= {threshold:g}"))
            continue
        kept.append((name, survivor.result.vector))
        ranked.append(ScreenedProposal(
            proposal=survivor.proposal, source_sha256=survivor.result.source_sha256, rank=len(ranked) + 1,
            nearest_id=survivor.nearest_id, distance=_finite(survivor.distance), predicted_mean=survivor.mean,
            predicted_std=survivor.std, expected_improvement=survivor.score))
    order = {proposal.name: index for index, proposal in enumerate(proposals)}
    rejections.sort(key=lambda r: order.get(r.proposal_name, len(order)))
    return ScreeningReport(parent_id=parent.node_id, acquisition=acquisition, threshold=threshold, ranked=ranked,
                           rejections=rejections, wall_s=time.monotonic() - started)


def propose_screened(
    parent: Node,
    nodes: Sequence[Node],
    config: RunConfig,
    rng: random.Random,
    fingerprinter: Fingerprinter,
    *,
    predictor: Any = None,
    features: Callable[[Proposal], Any] | None = None,
    incumbent: float = 0.0,
    rounds: int = 2,
    source_of: SourceOf = compile_proposal,
) -> tuple[Proposal | None, ScreeningReport, Context]:
    """Phase I for one parent: its context, a population of `config.population_size` proposals, screening; a
    fresh population (the rejected descriptions excluded) up to `rounds` times while none passes. Returns the
    best proposal (None if every round was rejected), the report (every round's rejections) and the context.
    `predictor`, `features`, `incumbent` and `source_of` are screen_population's."""
    context = build_context(parent, nodes, config)
    seen = {key for node in nodes if (key := _key(node.proposal)) is not None}
    rejections: list[Rejection] = []
    report = None
    for _ in range(max(rounds, 1)):
        population = generate_population(parent.proposal, context, config.population_size, rng, seen)
        report = screen_population(parent, population, nodes, fingerprinter, predictor=predictor, features=features,
                                   incumbent=incumbent, kappa=config.weights.kappa, source_of=source_of)
        rejections += report.rejections
        if report.best is not None or not population:
            break
        seen |= {description_key(p) for p in population}
    report = report.model_copy(update={"rejections": rejections})
    return (report.best.proposal if report.best else None), report, context


def phase_one(
    parent: Node,
    nodes: Sequence[Node],
    config: RunConfig,
    rng: random.Random,
    fingerprinter: Fingerprinter,
    *,
    source_of: SourceOf = compile_proposal,
) -> tuple[Proposal | None, ScreeningReport, Context]:
    """The offline proposer's Phase I for one parent, as the proposer service runs it (and the simulated
    landscape replays it): `propose_screened` ranked by the expected improvement of the UtilityGP's prediction
    (fitted on `nodes`) over the parent's utility."""
    gp = UtilityGP().fit(nodes)
    return propose_screened(parent, nodes, config, rng, fingerprinter, predictor=gp, incumbent=gp.incumbent(parent),
                            source_of=source_of)


def _no_op(proposal: Proposal, result: FingerprintResult, parent: Node,
           parent_vector: np.ndarray | None) -> Rejection | None:
    """The rejection of a proposal that computes what its parent computes on the recorded training batches, or
    None (also when the parent has no fingerprint to compare with)."""
    if parent_vector is None:
        return None
    distance = recorded_distance(result.vector, parent_vector)
    if not distance <= NO_OP_DISTANCE:
        return None
    return Rejection(
        proposal_name=proposal.name, stage="novelty", nearest_id=parent.node_id, distance=distance,
        reason=(f"behavioural no-op: {describe_change(parent.proposal, proposal)} never changes the advantages, "
                f"loss or gradient on batches real training produces (relative difference {distance:.2g} <= "
                f"{NO_OP_DISTANCE:g} from parent {parent.node_id} on {recorded_probe_summary()})"
                f"{why_inert(parent.proposal, proposal)}; it would train like its parent"))


def describe_change(parent: Proposal, proposal: Proposal) -> str:
    """What `proposal` changes in `parent`'s description, in mechanism names: "clip:dual (dual_clip 3 -> 5)",
    "+length:pass_rate_conditioned", "-clip:dual"; "its change" for code outside the library."""
    try:
        before, after = proposal_description(parent), proposal_description(proposal)
    except DescriptionError:
        return "its change"
    old = {m.name: m for m in before.mechanisms}
    new = {m.name: m for m in after.mechanisms}
    changes = [f"+{name}" for name in new if name not in old] + [f"-{name}" for name in old if name not in new]
    for name, mechanism in new.items():
        moved = [f"{key} {_value(before.hparams.get(key))} -> {_value(after.hparams[key])}"
                 for key in mechanism.params if name in old and before.hparams.get(key) != after.hparams[key]]
        if moved:
            changes.append(f"{name} ({', '.join(moved)})")
    if after.loss_agg_mode != before.loss_agg_mode and not changes:
        changes.append(f"agg {before.loss_agg_mode} -> {after.loss_agg_mode}")
    return ", ".join(changes) if changes else "its change"


def why_inert(parent: Proposal, proposal: Proposal) -> str:
    """Why the mechanisms the change touches cannot act on the recorded batches, from what the recorded run saw
    (proposer/probe_batches.py); empty when there is nothing specific to say."""
    from proposer.probe_batches import largest_negative_ratio, load_recorded_probes, ratio_table, shaped_length_groups

    try:
        before, after = proposal_description(parent), proposal_description(proposal)
        probes = load_recorded_probes()
    except (DescriptionError, FileNotFoundError, ValueError):
        return ""
    changed = {m.name for m in before.mechanisms} ^ {m.name for m in after.mechanisms}
    changed |= {m.name for m in after.mechanisms if any(before.hparams.get(k) != after.hparams[k] for k in m.params)}
    hparams = {**before.hparams, **after.hparams}
    notes = []
    if "clip:dual" in changed:
        c = float(hparams.get("dual_clip", 0.0))
        run = ratio_table(probes.meta)
        tracked = next((row for row in run if row["ratio_above"] == c), None)
        in_run = (f" (over the whole recorded run, {tracked['count_negative_advantage']} of its {tracked['tokens']} "
                  f"off-policy tokens had A < 0 and a ratio above {c:g})" if tracked else "")
        notes.append(f"dual-clip only acts on negative-advantage tokens whose ratio exceeds c={c:g}, and on the "
                     f"recorded batches the largest such ratio is {largest_negative_ratio(probes):.3g}{in_run}")
    shaping = changed & {"length:pass_rate_conditioned", "length:correct_shorter"}
    if shaping:
        min_pass_rate = float(hparams.get("min_pass_rate", 0.0)) if "length:pass_rate_conditioned" in shaping else 0.0
        shaped, groups = shaped_length_groups(probes, min_pass_rate)
        notes.append(f"the length shaping only acts on a group whose correct responses differ in length"
                     f"{f' at pass rate >= {min_pass_rate:g}' if min_pass_rate else ''}: {shaped} of the "
                     f"{groups} recorded groups")
    return ": " + "; ".join(notes) if notes else ""


def recorded_probe_summary() -> str:
    """"steps 2, 20, 39 of a default-protocol GRPO run (seed 0)": where the recorded probes come from."""
    from proposer.probe_batches import load_recorded_probes

    try:
        meta = load_recorded_probes().meta
    except (FileNotFoundError, ValueError):
        return "the recorded probe batches"
    return (f"steps {', '.join(str(s) for s in meta['steps'])} of a {meta['protocol']}-protocol GRPO run "
            f"(seed {meta['seed']})")


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _key(proposal: Proposal) -> str | None:
    try:
        return description_key(proposal)
    except DescriptionError:
        return None


def archive_fingerprints(nodes: Sequence[Node], fingerprinter: Fingerprinter,
                         source_of: SourceOf = compile_proposal) -> dict[str, np.ndarray]:
    """Fingerprint per node id for every node with a source: its implementation's, else its compiled proposal's
    (a node still in the pipeline). Nodes whose source fails the check are left out."""
    fingerprints: dict[str, np.ndarray] = {}
    for node in {n.node_id: n for n in nodes}.values():
        source = node_source(node, source_of)
        if source is None:
            continue
        result = fingerprinter(source)
        if result.ok:
            fingerprints[node.node_id] = result.vector
    return fingerprints


def node_source(node: Node, source_of: SourceOf = compile_proposal) -> str | None:
    if node.implementation is not None and node.implementation.source.strip():
        return node.implementation.source
    try:
        return source_of(node.proposal)
    except (DescriptionError, ValueError):
        return None


def _consistency(proposal: Proposal, fingerprinter: Fingerprinter,
                 source_of: SourceOf) -> tuple[FingerprintResult | None, str | None]:
    try:
        source = source_of(proposal)
    except (DescriptionError, ValueError) as err:
        return None, f"no source: {' '.join(str(err).split())}"
    try:
        ast.parse(source)
    except SyntaxError as err:
        return None, f"the module does not parse: {err.msg} at line {err.lineno}"
    result = fingerprinter(source)
    if not result.ok:
        return result, result.failure or "no fingerprint came back"
    try:
        intent = proposal_description(proposal)
    except DescriptionError:
        return result, None  # mechanisms outside the library (an LLM's): nothing to compare the code with
    if result.loss_agg_mode != intent.loss_agg_mode:
        return result, (f"the proposal aggregates with {intent.loss_agg_mode} but the code declares LOSS_AGG_MODE "
                        f"{result.loss_agg_mode!r}")
    differing = [key for key in intent.hparams if key in result.hparams and result.hparams[key] != intent.hparams[key]]
    if differing:
        key = differing[0]
        return result, (f"the proposal sets {key}={intent.hparams[key]!r} but the code's HPARAMS has "
                        f"{result.hparams[key]!r}")
    return result, None


@dataclass
class _Survivor:
    """A proposal past the consistency and novelty gates, while it is ranked."""

    index: int
    proposal: Proposal
    result: FingerprintResult
    nearest_id: str | None
    distance: float
    mean: float | None = None
    std: float | None = None
    score: float = 0.0


def _nearest(vector: np.ndarray, archived: dict[str, np.ndarray]) -> tuple[str | None, float]:
    """The archived node nearest to `vector` and its distance (the first of equals); (None, inf) when none is
    comparable."""
    usable = {node_id: other for node_id, other in archived.items() if other.shape == vector.shape}
    if not usable:
        return None, math.inf
    distances = fingerprint_distances(vector, np.stack(list(usable.values())))
    best = int(np.argmin(distances))
    return (list(usable)[best], float(distances[best])) if math.isfinite(distances[best]) else (None, math.inf)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


__all__ = [
    "ACQUISITIONS",
    "Rejection",
    "ScreenedProposal",
    "ScreeningReport",
    "archive_fingerprints",
    "describe_change",
    "expected_improvement",
    "node_source",
    "phase_one",
    "propose_screened",
    "screen_population",
    "upper_confidence",
]
