"""Reflection (Phase III): a node's Δz, τ and y, contrasted with its parent and the root, as a diagnosis.

`reflect` is a pure function of nodes; the service shell only fetches them from the archive and publishes
the result. Every conclusion is a short tag in `Reflection.diagnoses` (so the archive and the proposer can
count failure modes without parsing prose) and a sentence with the numbers in `Reflection.text` (so an LLM
proposer reading it later sees why).

Training curves are means over one rollout batch per step and are noisy step to step, so start, end, min
and max are read from a moving average; spikes are read from the raw values, which averaging would hide.
An Overall difference is "within noise" unless a two-sided test at p < 0.05 says otherwise, against the
run's seed noise (the root's seed SD) where it was measured (`Difference`); a mechanism is credited or blamed
only for a difference beyond noise, with a confidence no larger than the test supports.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from poise.contracts import (
    Effect,
    Evaluation,
    MechanismEffect,
    MechanismSpec,
    Node,
    Proposal,
    Reflection,
    Scalar,
    SuiteResult,
    TrainingTrajectory,
)
from poise.description.mechanisms import MECHANISMS
from poise.scoring import ALPHA, confirmation_evaluations

GENERATOR = "offline"

# The curves summarize_trajectory reports, with the words the text uses for them.
MAIN_CURVES: dict[str, str] = {
    "reward_mean": "reward",
    "format_valid_rate": "format-valid rate",
    "entropy": "entropy",
    "response_length": "response length",
    "kl": "KL",
    "grad_norm": "grad norm",
    "clip_frac": "clip fraction",
}

# A batch mean over 128 testbed rollouts has a step-to-step sd near 0.04 for a reward around 0.3; five
# steps average that to under 0.02 and still resolve a 45-step run into start, middle and end.
SMOOTH_STEPS = 5
# ...but a window never spans more than this share of the logged points, so the start and end windows stay
# apart on short or sparsely logged curves (KL is logged only every few steps).
SMOOTH_MAX_SHARE = 0.25
# Fewer logged points than this say nothing about a trend: each one is a single batch's noise.
MIN_TREND_POINTS = 4

# Healthy GRPO in the testbed keeps about three quarters of its starting entropy (0.137 -> 0.102 over 50
# steps, docs/testbed.md, "The feasibility probe"); below half the policy has turned near-deterministic and stops
# exploring, after which a group's responses agree and its advantages vanish.
ENTROPY_COLLAPSE_FRACTION = 0.5

# Rewards are pass rates in [0, 1]; a rise smaller than the smoothed batch noise (about 0.02) is no rise.
REWARD_MIN_RISE = 0.02
# Twice that is clear learning (testbed GRPO gains about 0.06 in 50 steps), enough to expect evaluation to
# follow; when it does not, the gain is specific to the training distribution or to the reward.
REWARD_CLEAR_RISE = 0.04

# KL and grad norm drift by a factor of 2-3 over a healthy run; a single value this many times the run's
# median is an instability, not a drift (lr 1e-4 took the testbed's KL from 0 to 21.7 in one step).
SPIKE_FACTOR = 5.0
# A median needs a few points to be a baseline.
SPIKE_MIN_POINTS = 4
# A "spike" below these is within what healthy runs log (KL near 0.03 after 45 steps, pre-clip grad norm
# near 0.9), whatever its ratio to a tiny median.
SPIKE_FLOOR: dict[str, float] = {"kl": 0.1, "grad_norm": 1.0}

# Healthy testbed runs move the mean response length by under 10% (47 -> 43 tokens in 50 steps); a fifth is
# a change of behaviour (truncation, terse guessing, padding) a proposer should know about.
LENGTH_DRIFT_FRACTION = 0.2

# Healthy runs hold the format-valid rate near 0.95; a fall of 0.05 is five times its smoothed sampling sd
# (about 0.01 over 5 x 128 rollouts) and how format gaming starts (broken advantages took it 0.86 -> 0.57).
VALIDITY_DROP = 0.05

# Scores are fractions in [0, 1]; differences under half a point are immaterial, and a zero-width interval
# (no bootstrap) or identical seeds must not make every difference look real.
NOISE_FLOOR = 0.005
# With no seeds and no interval on either side: the pooled seed sd of testbed Overall (bench/results/testbed.log).
DEFAULT_NOISE_SD = 0.019


@dataclass(frozen=True)
class Finding:
    """A diagnosis tag for `Reflection.diagnoses` and/or a sentence for the text (either may be empty)."""

    tag: str
    sentence: str = ""


# --------------------------------------------------------------------------------------------- training


def summarize_trajectory(trajectory: TrainingTrajectory | None) -> dict[str, float]:
    """Start, end, min and max of each main curve (moving averages over SMOOTH_STEPS), and the step count.

    Keys are "<curve>_<stat>" (e.g. "entropy_start"); a curve with no finite value is left out.
    """
    if trajectory is None:
        return {}
    summary: dict[str, float] = {"steps": float(len(trajectory.steps))}
    for name in MAIN_CURVES:
        ends = _curve_ends([v for _, v in _finite_points(trajectory, name)])
        if ends is not None:
            summary.update({f"{name}_{stat}": value for stat, value in ends.items()})
    return summary


def diagnose_training(trajectory: TrainingTrajectory) -> list[Finding]:
    """Entropy collapse, reward stagnation, KL and grad-norm spikes, length drift, validity drops, non-finite
    values and aborts, each found only where its curve has enough logged points to tell."""
    findings: list[Finding] = []
    if trajectory.aborted:
        reason = trajectory.abort_reason or "no reason given"
        findings.append(Finding("aborted", f"Training was aborted after {len(trajectory.steps)} steps: {reason}."))
    trends = {name: _trend(trajectory, name) for name in ("entropy", "reward_mean", "response_length",
                                                          "format_valid_rate")}

    entropy = trends["entropy"]
    if entropy and entropy["start"] > 0 and entropy["min"] < ENTROPY_COLLAPSE_FRACTION * entropy["start"]:
        findings.append(Finding("entropy_collapse", (
            f"Entropy collapsed from {entropy['start']:.3g} to {entropy['min']:.3g} "
            f"({entropy['min'] / entropy['start']:.0%} of its start, below {ENTROPY_COLLAPSE_FRACTION:.0%}); "
            f"it ended at {entropy['end']:.3g}.")))

    reward = trends["reward_mean"]
    if reward and reward["end"] - reward["start"] < REWARD_MIN_RISE:
        findings.append(Finding("reward_stagnation", (
            f"Training reward did not rise: {reward['start']:.3f} -> {reward['end']:.3f} "
            f"({reward['end'] - reward['start']:+.3f}, peak {reward['max']:.3f}; "
            f"a rise under {REWARD_MIN_RISE} is batch noise).")))

    for name in SPIKE_FLOOR:
        spike = _spike(trajectory, name)
        if spike:
            findings.append(spike)

    length = trends["response_length"]
    if length and length["start"] > 0:
        drift = length["end"] / length["start"] - 1.0
        if abs(drift) > LENGTH_DRIFT_FRACTION:
            direction = "grew" if drift > 0 else "shrank"
            findings.append(Finding("length_drift", (
                f"Mean response length {direction} by {abs(drift):.0%}: {length['start']:.1f} -> "
                f"{length['end']:.1f} tokens (more than {LENGTH_DRIFT_FRACTION:.0%}).")))

    validity = trends["format_valid_rate"]
    if validity and validity["start"] - validity["min"] > VALIDITY_DROP:
        findings.append(Finding("validity_drop", (
            f"Format-valid rate fell from {validity['start']:.2f} to {validity['min']:.2f} "
            f"(-{validity['start'] - validity['min']:.2f}) and ended at {validity['end']:.2f}; the policy is "
            "losing the answer format.")))

    broken = {MAIN_CURVES[name]: step for name in MAIN_CURVES if name not in SPIKE_FLOOR
              for step in [_first_non_finite(trajectory, name)] if step is not None}
    if broken:
        where = ", ".join(f"{label} from step {step}" for label, step in broken.items())
        findings.append(Finding("non_finite_metric", f"Non-finite values (nan/inf) were logged: {where}."))
    return findings


def _finite_points(trajectory: TrainingTrajectory, name: str) -> list[tuple[int, float]]:
    return [(s.step, v) for s, v in zip(trajectory.steps, trajectory.curve(name), strict=True)
            if v is not None and math.isfinite(v)]


def _first_non_finite(trajectory: TrainingTrajectory, name: str) -> int | None:
    values = zip(trajectory.steps, trajectory.curve(name), strict=True)
    return next((s.step for s, v in values if v is not None and not math.isfinite(v)), None)


def _curve_ends(values: list[float]) -> dict[str, float] | None:
    """start / end / min / max of the moving average of `values` (full windows only)."""
    if not values:
        return None
    window = max(1, min(SMOOTH_STEPS, int(len(values) * SMOOTH_MAX_SHARE)))
    smoothed = [statistics.fmean(values[i : i + window]) for i in range(len(values) - window + 1)]
    return {"start": smoothed[0], "end": smoothed[-1], "min": min(smoothed), "max": max(smoothed)}


def _trend(trajectory: TrainingTrajectory, name: str) -> dict[str, float] | None:
    values = [v for _, v in _finite_points(trajectory, name)]
    return _curve_ends(values) if len(values) >= MIN_TREND_POINTS else None


def _spike(trajectory: TrainingTrajectory, name: str) -> Finding | None:
    label, tag = MAIN_CURVES[name][:1].upper() + MAIN_CURVES[name][1:], f"{name}_spike"
    step = _first_non_finite(trajectory, name)
    if step is not None:
        return Finding(tag, f"{label} became non-finite at step {step}.")
    points = _finite_points(trajectory, name)
    if len(points) < SPIKE_MIN_POINTS:
        return None
    median = statistics.median(v for _, v in points)
    step, peak = max(points, key=lambda point: point[1])
    if peak <= SPIKE_FLOOR[name] or peak <= SPIKE_FACTOR * median:
        return None
    ratio = f"{peak / median:.0f}x" if median > 0 else "far above"
    return Finding(tag, (f"{label} spiked to {peak:.3g} at step {step}, {ratio} the run's median {median:.3g} "
                         f"over {len(points)} logged steps."))


def _training_sentence(trajectory: TrainingTrajectory) -> str:
    summary = summarize_trajectory(trajectory)
    shown = [f"{label} {summary[f'{name}_start']:.3g} -> {summary[f'{name}_end']:.3g}"
             for name, label in MAIN_CURVES.items() if f"{name}_start" in summary]
    if not shown:
        return f"Training logged {len(trajectory.steps)} steps with no usable metrics."
    return f"Training over {len(trajectory.steps)} steps (smoothed start -> end): {', '.join(shown)}."


# -------------------------------------------------------------------------------------------------- Δz


@dataclass(frozen=True)
class MechanismDelta:
    """Δz: how a node's proposal differs from its parent's, mechanism by mechanism.

    Params are merged (library defaults <- spec params <- proposal hparams), so restating a default is no
    change. `other` holds differences no mechanism owns: unclaimed hparams and the loss aggregation mode.
    """

    added: dict[str, dict[str, Scalar]]
    removed: dict[str, dict[str, Scalar]]
    changed: dict[str, dict[str, tuple[Scalar | None, Scalar | None]]]  # mechanism -> param -> (parent, node)
    other: dict[str, tuple[Scalar | None, Scalar | None]]

    @property
    def n_changes(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed) + len(self.other)

    def describe(self, with_params: bool = True) -> str:
        """E.g. "added validity:mask (invalid_penalty=-1.0); changed clip:symmetric (clip_ratio 0.2 -> 0.3)"."""
        def detail(text: str) -> str:
            return f" ({text})" if with_params and text else ""

        parts = [f"added {name}{detail(_params_text(params))}" for name, params in self.added.items()]
        parts += [f"removed {name}{detail(_params_text(params))}" for name, params in self.removed.items()]
        parts += [f"changed {name}{detail(_changes_text(params))}" for name, params in self.changed.items()]
        if self.other:
            parts.append(f"changed {_changes_text(self.other) if with_params else ', '.join(self.other)}")
        return "; ".join(parts) if parts else "no change to mechanisms or hyperparameters"


def mechanism_delta(proposal: Proposal, parent: Proposal) -> MechanismDelta:
    """Mechanisms added, removed, and kept with changed merged params, from `parent` to `proposal`."""
    ours, theirs = _merged_mechanisms(proposal), _merged_mechanisms(parent)
    changed = {name: diff for name in ours.keys() & theirs.keys()
               for diff in [_diff(theirs[name], ours[name])] if diff}
    added = {name: params for name, params in ours.items() if name not in theirs}
    removed = {name: params for name, params in theirs.items() if name not in ours}
    other = _diff(_unclaimed_hparams(parent), _unclaimed_hparams(proposal))
    agg_swapped = any(_family(name) == "agg" for name in (*added, *removed))
    if proposal.loss_agg_mode != parent.loss_agg_mode and not agg_swapped:
        other["loss_agg_mode"] = (parent.loss_agg_mode.value, proposal.loss_agg_mode.value)
    return MechanismDelta(added=added, removed=removed, changed=dict(sorted(changed.items())), other=other)


def _merged_params(spec: MechanismSpec, hparams: Mapping[str, Scalar]) -> dict[str, Scalar]:
    known = MECHANISMS.get(spec.name)
    params: dict[str, Scalar] = dict(known.defaults()) if known else {}
    params.update(spec.params)
    params.update({key: value for key, value in hparams.items() if key in params})
    return params


def _merged_mechanisms(proposal: Proposal) -> dict[str, dict[str, Scalar]]:
    return {spec.name: _merged_params(spec, proposal.hparams) for spec in proposal.mechanisms}


def _unclaimed_hparams(proposal: Proposal) -> dict[str, Scalar]:
    claimed = {key for params in _merged_mechanisms(proposal).values() for key in params}
    return {key: value for key, value in proposal.hparams.items() if key not in claimed}


def _family(name: str) -> str | None:
    known = MECHANISMS.get(name)
    return known.family if known else None


def _diff(before: Mapping[str, Scalar], after: Mapping[str, Scalar]) -> dict[str, tuple[Scalar | None, Scalar | None]]:
    return {key: (before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)}


def _params_text(params: Mapping[str, Scalar]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in params.items())


def _changes_text(changes: Mapping[str, tuple[Scalar | None, Scalar | None]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


# ------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Noise:
    """The seed-to-seed SD of one evaluation's Overall, which Overall differences are judged against.

    `seeds`: how many of the root's seeds measured it; None when seed noise was not measured and `sd` stands
    in for it (the mean bootstrap CI half-width of the two evaluations, or DEFAULT_NOISE_SD).
    """

    sd: float
    seeds: int | None = None
    source: str = "measured"

    def text(self) -> str:
        """E.g. "noise SD 0.004 over 3 root seeds"."""
        return f"noise SD {self.sd:.3f} {self.source}"


@dataclass(frozen=True)
class Difference:
    """Overall of a node (mean over `n` seeds) minus a reference's (mean over `m` seeds), against the noise.

    The rule: every seed's Overall varies with SD σ (`noise.sd`), so the difference of the two means has the
    standard error σ·√(1/n + 1/m); it is beyond noise when a two-sided test rejects "no difference" at
    poise/scoring.py's ALPHA (0.05). With σ measured over k root seeds the test is a pooled t-test with k − 1
    degrees of freedom (3 seeds, one seed against one: |Δ| > 4.3·σ·√2); with σ not measured, a z-test
    (|Δ| > 1.96·σ·√2). `p` is that test's p-value.
    """

    delta: float
    noise: Noise
    n: int = 1
    m: int = 1

    @property
    def standard_error(self) -> float:
        return self.noise.sd * math.sqrt(1 / self.n + 1 / self.m)

    @property
    def p(self) -> float:
        statistic = abs(self.delta) / self.standard_error
        seeds = self.noise.seeds
        if seeds and seeds >= 2:
            from scipy.special import stdtr  # scipy costs a quarter second to import: only where a test is made

            return float(2 * stdtr(seeds - 1, -statistic))
        return 2 * statistics.NormalDist().cdf(-statistic)

    @property
    def beyond_noise(self) -> bool:
        return self.p < ALPHA

    @property
    def units(self) -> float:
        """The difference in units of one seed's noise SD."""
        return self.delta / self.noise.sd

    def detail(self, against: str = "") -> str:
        """E.g. "Δ +0.003 vs the parent, noise SD 0.004 over 3 root seeds, p = 0.620"."""
        versus = f" vs {against}" if against else ""
        return f"Δ {self.delta:+.3f}{versus}, {self.noise.text()}, {p_text(self.p)}"

    def text(self, against: str = "") -> str:
        """E.g. "within noise (Δ +0.003 vs the parent, noise SD 0.004 over 3 root seeds, p = 0.620)"."""
        return f"{'beyond' if self.beyond_noise else 'within'} noise ({self.detail(against)})"


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def overall_noise(evaluation: Evaluation, reference: Evaluation, noise_sd: float | None = None,
                  noise_seeds: int | None = None) -> Noise:
    """The noise an Overall difference is judged against: `noise_sd`, measured over `noise_seeds` root seeds,
    if given; else the mean bootstrap CI half-width of the two evaluations (DEFAULT_NOISE_SD when neither
    has one), taken as known. Always at least NOISE_FLOOR.

    A seed sd of 0 (identical seeds) is floored like a zero-width interval; a nan one counts as not given.
    """
    if noise_sd is not None:
        if noise_sd < 0:
            raise ValueError(f"noise_sd must be a non-negative standard deviation, got {noise_sd}")
        if math.isfinite(noise_sd):
            source = f"over {noise_seeds} root seeds" if noise_seeds else "(the run's seed noise)"
            if noise_sd < NOISE_FLOOR:
                source = f"{source} [measured {noise_sd:.4f}, raised to the floor]"
            return Noise(max(noise_sd, NOISE_FLOOR), noise_seeds, source)
    half_widths = [(high - low) / 2 for e in (evaluation, reference) if e.overall_ci for low, high in [e.overall_ci]]
    if half_widths:
        return Noise(max(statistics.fmean(half_widths), NOISE_FLOOR), None,
                     "(bootstrap CI half-width; seed noise not measured)")
    return Noise(DEFAULT_NOISE_SD, None, "(testbed default; seed noise not measured)")


def seed_overall(node: Node) -> tuple[float, int] | None:
    """The node's Overall as a mean over its seeds (those poise/scoring.py confirms it on: every seed of the
    root, only the fresh-seed replicates of a confirmed node), and how many; None when it is not evaluated."""
    if node.evaluation is None:
        return None
    values = [e.overall for e in confirmation_evaluations(node, node.genealogy.depth == 0) if math.isfinite(e.overall)]
    return (statistics.fmean(values), len(values)) if values else (node.evaluation.overall, 1)


def compare_overall(node: Node, reference: Node, noise: Noise) -> Difference:
    """The node's seed-mean Overall against the reference's; both must be evaluated."""
    (ours, n), (theirs, m) = seed_overall(node), seed_overall(reference)
    return Difference(ours - theirs, noise, n, m)


def suite_margin(suite: SuiteResult, before: SuiteResult, noise: Noise) -> float:
    """How far apart two single-seed scores of one suite must be to be beyond noise: the 95% interval of their
    difference, from each one's bootstrap interval (evaluation sampling) and, where measured, the run's seed
    noise (a suite's own seed noise is not measured; Overall's stands in for it). At least NOISE_FLOOR."""
    z = statistics.NormalDist().inv_cdf(1 - ALPHA / 2)
    sampling = ((suite.ci_high - suite.ci_low) / 2) ** 2 + ((before.ci_high - before.ci_low) / 2) ** 2
    seeds = 2 * noise.sd**2 if noise.seeds else 0.0
    return max(math.sqrt(sampling + z**2 * seeds), NOISE_FLOOR)


def compare_evaluations(node: Node, reference: Node, against: str, noise: Noise) -> tuple[list[Finding], Difference]:
    """Overall and per-suite gains and losses of `node` over `reference` ("parent" or "root"), both evaluated.

    Overall is judged by `Difference` (seed means against the noise); a suite by `suite_margin`. Tags carry
    the suite name and, against the root, a "_vs_root" suffix: "suite_gain:chain8", "suite_loss_vs_root:chain5",
    "overall_loss_vs_root".
    """
    evaluation, before_all = node.evaluation, reference.evaluation
    suffix = "" if against == "parent" else f"_vs_{against}"
    difference = compare_overall(node, reference, noise)
    findings: list[Finding] = []
    ours, theirs = (f" (mean of {k} seeds)" if k > 1 else "" for k in (difference.n, difference.m))
    overall = (f"Overall {seed_overall(node)[0]:.3f}{ours} vs {against} {seed_overall(reference)[0]:.3f}{theirs}: "
               f"{difference.text()}")
    if difference.beyond_noise:
        kind = "gain" if difference.delta > 0 else "loss"
        findings.append(Finding(f"overall_{kind}{suffix}", f"{overall}, a {kind}."))
    else:
        findings.append(Finding("", f"{overall}."))
    moved: dict[str, list[str]] = {"gains": [], "losses": []}
    steady: list[str] = []
    for name, suite in evaluation.suites.items():
        before = before_all.suites.get(name)
        if before is None:
            continue
        suite_delta = suite.value - before.value
        margin = suite_margin(suite, before, noise)
        if abs(suite_delta) <= margin:
            steady.append(name)
            continue
        kind = "gain" if suite_delta > 0 else "loss"
        findings.append(Finding(f"suite_{kind}{suffix}:{name}"))
        moved["gains" if suite_delta > 0 else "losses"].append(
            f"{name} {before.value:.3f} -> {suite.value:.3f} ({suite_delta:+.3f}, noise margin ±{margin:.3f})")
    parts = [f"{kind}: {'; '.join(items)}" for kind, items in moved.items() if items]
    if steady:
        parts.append(f"within noise: {', '.join(steady)}")
    unmatched = sorted(evaluation.suites.keys() ^ before_all.suites.keys())
    if unmatched:
        parts.append(f"not in both evaluations: {', '.join(unmatched)}")
    if parts:
        findings.append(Finding("", f"Suites vs {against}: {'; '.join(parts)}."))
    return findings, difference


def _evaluation_sentence(evaluation: Evaluation) -> str:
    interval = f" [{evaluation.overall_ci[0]:.3f}, {evaluation.overall_ci[1]:.3f}]" if evaluation.overall_ci else ""
    suites = ", ".join(f"{name} {suite.value:.3f}" for name, suite in evaluation.suites.items())
    utility = f", utility {evaluation.utility:.3f}" if evaluation.utility is not None else ""
    return (f"Evaluation: Overall {evaluation.overall:.3f}{interval}{utility}, mean length "
            f"{evaluation.mean_length:.1f} tokens; {suites or 'no suites'}.")


def _length_sentence(evaluation: Evaluation, reference: Evaluation, against: str) -> str:
    if reference.mean_length <= 0:
        return ""
    change = evaluation.mean_length / reference.mean_length - 1.0
    return (f"Mean evaluation length {evaluation.mean_length:.1f} vs {against} {reference.mean_length:.1f} "
            f"tokens ({change:+.0%}).")


# ---------------------------------------------------------------------------------------------- effects


def judge_effects(delta: MechanismDelta, difference: Difference) -> list[MechanismEffect]:
    """One effect per mechanism added, changed or removed, judged from the Overall difference vs the parent.

    A difference beyond noise (`Difference`) is helped (or hurt), with confidence 1 − p divided by the number of
    simultaneous changes that share the credit; a removed mechanism gets the opposite verdict, since removing
    it is what moved Overall. A difference within noise is neutral with confidence 0: the data cannot tell an
    effect from none, so the verdict claims nothing.
    """
    if difference.beyond_noise:
        verdict = Effect.HELPED if difference.delta > 0 else Effect.HURT
    else:
        verdict = Effect.NEUTRAL
    opposite = {Effect.HELPED: Effect.HURT, Effect.HURT: Effect.HELPED}.get(verdict, verdict)
    changes = max(delta.n_changes, 1)
    confidence = (1 - difference.p) / changes if difference.beyond_noise else 0.0
    numbers = f"Overall {difference.text('the parent')}"
    shared = f"; one of {changes} simultaneous changes, which share the credit" if changes > 1 else ""
    removal = {Effect.HELPED: "its removal helped", Effect.HURT: "its removal hurt",
               Effect.NEUTRAL: "its removal made no measurable difference"}[verdict]
    effects = [MechanismEffect(mechanism=name, effect=verdict, confidence=confidence,
                               evidence=f"added ({_params_text(params) or 'no params'}); {numbers}{shared}.")
               for name, params in delta.added.items()]
    effects += [MechanismEffect(mechanism=name, effect=verdict, confidence=confidence,
                                evidence=f"params changed ({_changes_text(params)}); {numbers}{shared}.")
                for name, params in delta.changed.items()]
    effects += [MechanismEffect(mechanism=name, effect=opposite, confidence=confidence,
                                evidence=(f"removed; {numbers}, so {removal} and the mechanism itself is judged "
                                          f"{opposite.value}{shared}."))
                for name in delta.removed]
    return effects


# -------------------------------------------------------------------------------------------- reflection


def reflect(node: Node, parent: Node | None, root: Node | None, *, noise_sd: float | None = None,
            noise_seeds: int | None = None) -> Reflection:
    """The reflection r of `node`: what changed from `parent` (Δz), what training did (τ), how evaluation
    compares with the parent and the root (y), per-mechanism effects, and a verdict.

    `parent` and `root` may be None (a root reflects against nothing) or the same node; missing
    trajectories and evaluations are named in the text and tags instead of failing. `noise_sd` is the run's
    seed SD of Overall, measured over `noise_seeds` root seeds (see `overall_noise`).
    """
    parent, root = comparison_nodes(node, parent, root)
    header = f"Node {node.node_id} ({node.proposal.name})"
    if parent is None:
        mechanisms = ", ".join(s.name for s in node.proposal.mechanisms) or "none listed"
        text = [f"{header}, a root with no parent. Mechanisms: {mechanisms}."]
        delta = None
    else:
        delta = mechanism_delta(node.proposal, parent.proposal)
        text = [f"{header} vs parent {parent.node_id} ({parent.proposal.name}). Change: {delta.describe()}."]

    findings = _training_findings(node.trajectory)
    evaluation_findings, versus_parent = _evaluation_findings(node, parent, root, noise_sd, noise_seeds)
    findings += evaluation_findings
    gap = _transfer_gap(node.trajectory, versus_parent)
    if gap:
        findings.append(gap)

    effects = judge_effects(delta, versus_parent) if delta is not None and versus_parent is not None else []
    tags = list(dict.fromkeys(f.tag for f in findings if f.tag))
    text += [f.sentence for f in findings if f.sentence]
    text.append(_verdict(node, parent, delta, versus_parent, tags))
    return Reflection(text=" ".join(text), effects=effects, diagnoses=tags, generator=GENERATOR)


def root_noise(root: Node | None) -> tuple[float | None, int | None]:
    """(seed SD of Overall, seeds) over the root's seeds (its own and its replicates); (None, None) with fewer
    than two: the noise `reflect` judges differences against."""
    if root is None:
        return None, None
    overall = [e.overall for e in confirmation_evaluations(root, True) if math.isfinite(e.overall)]
    return (statistics.stdev(overall), len(overall)) if len(overall) >= 2 else (None, None)


def comparison_nodes(node: Node, parent: Node | None, root: Node | None) -> tuple[Node | None, Node | None]:
    """The parent and the root `node` is compared with: None where there is none or it is the node itself, and
    a root that is the parent adds nothing beyond the parent comparison."""
    parent = parent if parent is not None and parent.node_id != node.node_id else None
    if root is not None and root.node_id in {node.node_id, parent.node_id if parent else None}:
        root = None
    return parent, root


def _training_findings(trajectory: TrainingTrajectory | None) -> list[Finding]:
    if trajectory is None or not trajectory.steps:
        missing = Finding("missing_trajectory", "No training curves were recorded, so training cannot be diagnosed.")
        return [missing, *diagnose_training(trajectory)] if trajectory else [missing]  # an abort still says why
    return [Finding("", _training_sentence(trajectory)), *diagnose_training(trajectory)]


def _evaluation_findings(node: Node, parent: Node | None, root: Node | None, noise_sd: float | None,
                         noise_seeds: int | None) -> tuple[list[Finding], Difference | None]:
    """Findings about y, and the Overall difference from the parent where both were evaluated."""
    evaluation = node.evaluation
    if evaluation is None:
        return [Finding("missing_evaluation", "The node has no evaluation, so no mechanism can be credited or "
                                              "blamed.")], None
    findings = [Finding("", _evaluation_sentence(evaluation))]
    versus_parent = None
    if parent is not None and parent.evaluation is None:
        findings.append(Finding("missing_parent_evaluation",
                                f"Parent {parent.node_id} has no evaluation to compare against."))
    elif parent is not None:
        noise = overall_noise(evaluation, parent.evaluation, noise_sd, noise_seeds)
        parent_findings, versus_parent = compare_evaluations(node, parent, "parent", noise)
        findings += parent_findings
        findings.append(Finding("", _length_sentence(evaluation, parent.evaluation, "parent")))
    if root is not None and root.evaluation is not None:
        noise = overall_noise(evaluation, root.evaluation, noise_sd, noise_seeds)
        findings += compare_evaluations(node, root, "root", noise)[0]
    return findings, versus_parent


def _transfer_gap(trajectory: TrainingTrajectory | None, versus_parent: Difference | None) -> Finding | None:
    """Training reward rose clearly, but Overall did not beat the parent's beyond noise."""
    reward = _trend(trajectory, "reward_mean") if trajectory else None
    if reward is None or versus_parent is None:
        return None
    rise = reward["end"] - reward["start"]
    if rise < REWARD_CLEAR_RISE or (versus_parent.beyond_noise and versus_parent.delta > 0):
        return None
    return Finding("reward_up_eval_flat", (
        f"Training reward rose by {rise:+.3f} ({reward['start']:.3f} -> {reward['end']:.3f}) but Overall did not "
        f"beat the parent's: {versus_parent.text()}; the gain is specific to the training prompts or to the "
        "reward."))


def _verdict(node: Node, parent: Node | None, delta: MechanismDelta | None,
             versus_parent: Difference | None, tags: list[str]) -> str:
    training = [t for t in tags if not t.startswith(("overall_", "suite_", "missing_"))]
    flags = f" Flags: {', '.join(training)}." if training else ""
    if node.evaluation is None:
        return f"Verdict: unknown until the node is evaluated.{flags}"
    if parent is None:
        return (f"Verdict: a root; its Overall {node.evaluation.overall:.3f} is the yardstick for its "
                f"descendants.{flags}")
    if versus_parent is None:
        return f"Verdict: no comparison with the parent is possible.{flags}"
    if versus_parent.beyond_noise:
        outcome = f"{'better' if versus_parent.delta > 0 else 'worse'} than the parent"
    else:
        outcome = "within noise of the parent"
    outcome += f" (Overall {versus_parent.detail()})"
    cause = f", after it {delta.describe(with_params=False)}" if delta is not None and delta.n_changes else ""
    return f"Verdict: {outcome}{cause}.{flags}"
