"""Reflection (Phase III): a node's Δz, τ and y, contrasted with its parent and the root, as a diagnosis.

`reflect` is a pure function of nodes; the service shell only fetches them from the archive and publishes
the result. Every conclusion is a short tag in `Reflection.diagnoses` (so the archive and the proposer can
count failure modes without parsing prose) and a sentence with the numbers in `Reflection.text` (so an LLM
proposer reading it later sees why).

Training curves are means over one rollout batch per step and are noisy step to step, so start, end, min
and max are read from a moving average; spikes are read from the raw values, which averaging would hide.
Evaluation differences are measured in units of a noise scale (bootstrap CI half-widths by default).
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
    TrainingTrajectory,
)
from poise.description.mechanisms import MECHANISMS

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
# (no bootstrap) must not make every difference look real.
NOISE_FLOOR = 0.005
# With no interval on either side: the pooled seed sd of testbed Overall (bench/results/testbed.log).
DEFAULT_NOISE_SD = 0.019
# A CI half-width is about two standard errors, so one noise unit already separates a change from chance.
EFFECT_Z = 1.0


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


def overall_noise(evaluation: Evaluation, reference: Evaluation, noise_sd: float | None = None) -> float:
    """The scale an Overall difference is judged against: `noise_sd` if given, else the mean bootstrap CI
    half-width of the two evaluations (DEFAULT_NOISE_SD when neither has one), at least NOISE_FLOOR.

    A seed sd of 0 (identical seeds) is floored like a zero-width interval; a nan one counts as not given.
    """
    if noise_sd is not None:
        if noise_sd < 0:
            raise ValueError(f"noise_sd must be a non-negative standard deviation, got {noise_sd}")
        if math.isfinite(noise_sd):
            return max(noise_sd, NOISE_FLOOR)
    half_widths = [(high - low) / 2 for e in (evaluation, reference) if e.overall_ci for low, high in [e.overall_ci]]
    return max(statistics.fmean(half_widths), NOISE_FLOOR) if half_widths else DEFAULT_NOISE_SD


def compare_evaluations(evaluation: Evaluation, reference: Evaluation, against: str, noise: float) -> list[Finding]:
    """Overall and per-suite gains and losses of `evaluation` over `reference` ("parent" or "root").

    Overall is judged against `noise`; a suite against the mean of its two CI half-widths. Tags carry the
    suite name and, against the root, a "_vs_root" suffix: "suite_gain:chain8", "suite_loss_vs_root:chain5",
    "overall_loss_vs_root".
    """
    suffix = "" if against == "parent" else f"_vs_{against}"
    delta = evaluation.overall - reference.overall
    findings: list[Finding] = []
    overall = f"Overall {evaluation.overall:.3f} vs {against} {reference.overall:.3f} ({delta:+.3f}"
    if abs(delta) > EFFECT_Z * noise:
        kind = "gain" if delta > 0 else "loss"
        findings.append(Finding(f"overall_{kind}{suffix}", (
            f"{overall}, a {kind} of {abs(delta) / noise:.1f} noise units of {noise:.3f}).")))
    else:
        findings.append(Finding("", f"{overall}, within the noise of {noise:.3f})."))
    moved: dict[str, list[str]] = {"gains": [], "losses": []}
    steady: list[str] = []
    for name, suite in evaluation.suites.items():
        before = reference.suites.get(name)
        if before is None:
            continue
        suite_delta = suite.value - before.value
        suite_noise = max(((suite.ci_high - suite.ci_low) + (before.ci_high - before.ci_low)) / 4, NOISE_FLOOR)
        if abs(suite_delta) <= EFFECT_Z * suite_noise:
            steady.append(name)
            continue
        kind = "gain" if suite_delta > 0 else "loss"
        findings.append(Finding(f"suite_{kind}{suffix}:{name}"))
        moved["gains" if suite_delta > 0 else "losses"].append(
            f"{name} {before.value:.3f} -> {suite.value:.3f} ({suite_delta:+.3f}, CI half-width {suite_noise:.3f})")
    parts = [f"{kind}: {'; '.join(items)}" for kind, items in moved.items() if items]
    if steady:
        parts.append(f"within noise: {', '.join(steady)}")
    unmatched = sorted(evaluation.suites.keys() ^ reference.suites.keys())
    if unmatched:
        parts.append(f"not in both evaluations: {', '.join(unmatched)}")
    if parts:
        findings.append(Finding("", f"Suites vs {against}: {'; '.join(parts)}."))
    return findings


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


def judge_effects(delta: MechanismDelta, overall_delta: float, noise: float) -> list[MechanismEffect]:
    """One effect per mechanism added, changed or removed, judged from the Overall delta vs the parent.

    A delta beyond EFFECT_Z noise units is helped (or hurt); a removed mechanism gets the opposite verdict,
    since removing it is what moved Overall. Confidence is erf(|z| / sqrt 2), the chance a normal draw lies
    within |z| units of zero, divided by the number of simultaneous changes that share the credit.
    """
    z = overall_delta / noise
    verdict = Effect.HELPED if z > EFFECT_Z else Effect.HURT if z < -EFFECT_Z else Effect.NEUTRAL
    opposite = {Effect.HELPED: Effect.HURT, Effect.HURT: Effect.HELPED}.get(verdict, verdict)
    changes = max(delta.n_changes, 1)
    confidence = math.erf(abs(z) / math.sqrt(2)) / changes
    numbers = f"Overall {overall_delta:+.3f} vs the parent ({z:+.1f} noise units of {noise:.3f})"
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


def reflect(node: Node, parent: Node | None, root: Node | None, *, noise_sd: float | None = None) -> Reflection:
    """The reflection r of `node`: what changed from `parent` (Δz), what training did (τ), how evaluation
    compares with the parent and the root (y), per-mechanism effects, and a verdict.

    `parent` and `root` may be None (a root reflects against nothing) or the same node; missing
    trajectories and evaluations are named in the text and tags instead of failing. `noise_sd` overrides
    the Overall noise scale (see `overall_noise`).
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
    evaluation_findings, versus_parent = _evaluation_findings(node, parent, root, noise_sd)
    findings += evaluation_findings
    gap = _transfer_gap(node.trajectory, versus_parent)
    if gap:
        findings.append(gap)

    effects = judge_effects(delta, *versus_parent) if delta is not None and versus_parent is not None else []
    tags = list(dict.fromkeys(f.tag for f in findings if f.tag))
    text += [f.sentence for f in findings if f.sentence]
    text.append(_verdict(node, parent, delta, versus_parent, tags))
    return Reflection(text=" ".join(text), effects=effects, diagnoses=tags, generator=GENERATOR)


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


def _evaluation_findings(node: Node, parent: Node | None, root: Node | None,
                         noise_sd: float | None) -> tuple[list[Finding], tuple[float, float] | None]:
    """Findings about y, and (Overall delta, noise) against the parent where both were evaluated."""
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
        noise = overall_noise(evaluation, parent.evaluation, noise_sd)
        versus_parent = (evaluation.overall - parent.evaluation.overall, noise)
        findings += compare_evaluations(evaluation, parent.evaluation, "parent", noise)
        findings.append(Finding("", _length_sentence(evaluation, parent.evaluation, "parent")))
    if root is not None and root.evaluation is not None:
        noise = overall_noise(evaluation, root.evaluation, noise_sd)
        findings += compare_evaluations(evaluation, root.evaluation, "root", noise)
    return findings, versus_parent


def _transfer_gap(trajectory: TrainingTrajectory | None, versus_parent: tuple[float, float] | None) -> Finding | None:
    """Training reward rose clearly, but Overall did not beat the parent's by more than the noise."""
    reward = _trend(trajectory, "reward_mean") if trajectory else None
    if reward is None or versus_parent is None:
        return None
    rise = reward["end"] - reward["start"]
    overall_delta, noise = versus_parent
    if rise < REWARD_CLEAR_RISE or overall_delta > EFFECT_Z * noise:
        return None
    return Finding("reward_up_eval_flat", (
        f"Training reward rose by {rise:+.3f} ({reward['start']:.3f} -> {reward['end']:.3f}) but Overall did not "
        f"beat the parent's ({overall_delta:+.3f} against noise {noise:.3f}): the gain is specific to the "
        "training prompts or to the reward."))


def _verdict(node: Node, parent: Node | None, delta: MechanismDelta | None,
             versus_parent: tuple[float, float] | None, tags: list[str]) -> str:
    training = [t for t in tags if not t.startswith(("overall_", "suite_", "missing_"))]
    flags = f" Flags: {', '.join(training)}." if training else ""
    if node.evaluation is None:
        return f"Verdict: unknown until the node is evaluated.{flags}"
    if parent is None:
        return (f"Verdict: a root; its Overall {node.evaluation.overall:.3f} is the yardstick for its "
                f"descendants.{flags}")
    if versus_parent is None:
        return f"Verdict: no comparison with the parent is possible.{flags}"
    overall_delta, noise = versus_parent
    z = overall_delta / noise
    if z > EFFECT_Z:
        outcome = f"better than the parent by {overall_delta:+.3f} Overall ({z:.1f} noise units)"
    elif z < -EFFECT_Z:
        outcome = f"worse than the parent by {overall_delta:+.3f} Overall ({z:.1f} noise units)"
    else:
        outcome = f"within noise of the parent ({overall_delta:+.3f} Overall, {z:+.1f} noise units)"
    cause = f", after it {delta.describe(with_params=False)}" if delta is not None and delta.n_changes else ""
    return f"Verdict: {outcome}{cause}.{flags}"
