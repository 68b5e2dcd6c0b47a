"""The reflector's pure core: diagnoses from hand-built curves, Δz, mechanism effects, missing data."""

from __future__ import annotations

import math

import pytest

from poise.contracts import (
    Effect,
    Evaluation,
    Genealogy,
    Implementation,
    LossAggMode,
    MechanismSpec,
    MetricKind,
    Node,
    NodeStatus,
    Proposal,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
)
from reflector.core import (
    DEFAULT_NOISE_SD,
    ENTROPY_COLLAPSE_FRACTION,
    NOISE_FLOOR,
    Difference,
    Noise,
    mechanism_delta,
    overall_noise,
    reflect,
    root_noise,
    summarize_trajectory,
)

RUN = "run-reflect"
GRPO = ["baseline:group_mean", "scale:group_std", "clip:symmetric", "agg:token-mean"]
STEPS = 40


# --------------------------------------------------------------------------------------------- builders


def healthy_curves(steps: int = STEPS) -> dict[str, list[float | None]]:
    """A run like testbed GRPO: reward rising, entropy easing, length and validity steady, KL every 5 steps."""
    wiggle = [0.01 * math.sin(1.7 * i) for i in range(steps)]  # deterministic step-to-step noise
    return {
        "reward_mean": [0.30 + 0.08 * i / steps + w for i, w in enumerate(wiggle)],
        "format_valid_rate": [0.95 + w / 2 for w in wiggle],
        "entropy": [0.137 - 0.035 * i / steps + w / 10 for i, w in enumerate(wiggle)],
        "response_length": [47.0 - 4.0 * i / steps + 10 * w for i, w in enumerate(wiggle)],
        "kl": [0.03 * i / steps if i % 5 == 0 else None for i in range(steps)],
        "grad_norm": [0.9 + w for w in wiggle],
        "clip_frac": [0.0015] * steps,
    }


def trajectory(curves: dict[str, list[float | None]] | None = None, **overrides: list[float | None]):
    curves = {**(curves or healthy_curves()), **overrides}
    steps = max(len(values) for values in curves.values())
    rows = [TrainingStep(step=i, **{name: values[i] for name, values in curves.items()}) for i in range(steps)]
    return TrainingTrajectory(protocol="default", seed=0, steps=rows)


def suite(name: str, value: float, half_width: float = 0.02, weight: float = 0.5) -> SuiteResult:
    return SuiteResult(suite=name, kind=MetricKind.ACC_AT_1, value=value, ci_low=max(value - half_width, 0.0),
                       ci_high=min(value + half_width, 1.0), n_prompts=300, n_samples=300, mean_length=45.0,
                       format_valid_rate=0.95, weight=weight)


def evaluation(overall: float, suites: dict[str, float] | None = None, half_width: float | None = 0.02,
               mean_length: float = 45.0) -> Evaluation:
    suites = suites or {"easy": overall, "hard": overall}
    ci = (overall - half_width, overall + half_width) if half_width is not None else None
    return Evaluation(suites={n: suite(n, v) for n, v in suites.items()}, overall=overall, overall_ci=ci,
                      mean_length=mean_length, seed=0)


def node(node_id: str, mechanisms: list[MechanismSpec | str] | None = None, parent: Node | None = None,
         hparams: dict | None = None, trained: TrainingTrajectory | None = None, evaluated: Evaluation | None = None,
         loss_agg_mode: LossAggMode = LossAggMode.TOKEN_MEAN) -> Node:
    genealogy = Genealogy.child(node_id, [parent.genealogy]) if parent else Genealogy(run_id=RUN, node_id=node_id)
    specs = [m if isinstance(m, MechanismSpec) else MechanismSpec(name=m) for m in (mechanisms or GRPO)]
    proposal = Proposal(name=f"algo-{node_id}", rationale="test", mechanisms=specs, hparams=hparams or {},
                        loss_agg_mode=loss_agg_mode, generator="offline",
                        parent_ids=[parent.node_id] if parent else [])
    status = NodeStatus.EVALUATED if evaluated else NodeStatus.TRAINED if trained else NodeStatus.IMPLEMENTED
    return Node(genealogy=genealogy, status=status, proposal=proposal,
                implementation=Implementation.from_source("x", verified=True), trajectory=trained,
                evaluation=evaluated)


def evaluated(node_id: str, overall: float, parent: Node | None = None, **kwargs) -> Node:
    kwargs.setdefault("trained", trajectory())
    suites = kwargs.pop("suites", None)
    return node(node_id, parent=parent, evaluated=evaluation(overall, suites), **kwargs)


@pytest.fixture
def root() -> Node:
    return evaluated("n0", 0.50)


# ------------------------------------------------------------------------------------- training diagnoses

TRAINING_TAGS = {"entropy_collapse", "reward_stagnation", "kl_spike", "grad_norm_spike", "length_drift",
                 "validity_drop", "non_finite_metric", "aborted", "reward_up_eval_flat"}


def test_a_healthy_run_better_than_its_parent_gets_no_training_diagnosis(root):
    child = evaluated("n1", 0.56, parent=root)
    reflection = reflect(child, root, root)
    assert not TRAINING_TAGS & set(reflection.diagnoses)
    assert "overall_gain" in reflection.diagnoses
    assert reflection.generator == "offline"


def test_entropy_collapse_fires_when_entropy_falls_below_its_fraction_of_the_start(root):
    collapsing = [0.14 * (1 - 0.9 * i / STEPS) for i in range(STEPS)]
    reflection = reflect(evaluated("n1", 0.50, parent=root, trained=trajectory(entropy=collapsing)), root, root)
    assert "entropy_collapse" in reflection.diagnoses
    assert "Entropy collapsed from 0.13" in reflection.text  # the smoothed start, quoted with its number


def test_entropy_easing_to_just_above_the_threshold_is_not_a_collapse():
    easing = [0.14 * (1 - (1 - ENTROPY_COLLAPSE_FRACTION - 0.05) * i / STEPS) for i in range(STEPS)]
    assert "entropy_collapse" not in reflect(node("n0", trained=trajectory(entropy=easing)), None, None).diagnoses


def test_flat_reward_is_stagnation_and_a_clear_rise_is_not():
    flat = [0.30 + 0.01 * math.sin(1.7 * i) for i in range(STEPS)]
    stagnant = reflect(node("n0", trained=trajectory(reward_mean=flat)), None, None)
    assert "reward_stagnation" in stagnant.diagnoses
    assert "Training reward did not rise" in stagnant.text
    assert "reward_stagnation" not in reflect(node("n0", trained=trajectory()), None, None).diagnoses


def test_a_kl_value_far_above_the_median_is_a_spike_quoting_its_step():
    kl = healthy_curves()["kl"]
    kl[25] = 0.9
    reflection = reflect(node("n0", trained=trajectory(kl=kl)), None, None)
    assert "kl_spike" in reflection.diagnoses
    assert "KL spiked to 0.9 at step 25" in reflection.text


def test_kl_growing_steadily_is_not_a_spike():
    kl = [0.05 + 0.01 * i if i % 5 == 0 else None for i in range(STEPS)]  # 0.05 -> 0.40: drift, not a spike
    assert "kl_spike" not in reflect(node("n0", trained=trajectory(kl=kl)), None, None).diagnoses


def test_a_grad_norm_jump_and_a_non_finite_grad_norm_are_spikes():
    jump = healthy_curves()["grad_norm"]
    jump[12] = 9.0
    assert "grad_norm_spike" in reflect(node("n0", trained=trajectory(grad_norm=jump)), None, None).diagnoses
    broken = healthy_curves()["grad_norm"]
    broken[30] = float("inf")
    reflection = reflect(node("n0", trained=trajectory(grad_norm=broken)), None, None)
    assert "grad_norm_spike" in reflection.diagnoses
    assert "non-finite at step 30" in reflection.text


def test_response_length_growing_by_more_than_the_drift_limit_is_length_drift():
    growing = [47.0 * (1 + 0.6 * i / STEPS) for i in range(STEPS)]
    reflection = reflect(node("n0", trained=trajectory(response_length=growing)), None, None)
    assert "length_drift" in reflection.diagnoses
    assert "grew by" in reflection.text
    shrinking = [47.0 * (1 - 0.5 * i / STEPS) for i in range(STEPS)]
    assert "shrank by" in reflect(node("n0", trained=trajectory(response_length=shrinking)), None, None).text


def test_format_valid_rate_falling_is_a_validity_drop():
    falling = [0.95 - 0.4 * i / STEPS for i in range(STEPS)]
    reflection = reflect(node("n0", trained=trajectory(format_valid_rate=falling)), None, None)
    assert "validity_drop" in reflection.diagnoses
    assert "Format-valid rate fell from 0.9" in reflection.text


def test_nan_in_a_plain_curve_is_reported_and_ignored_by_the_summary():
    entropy = healthy_curves()["entropy"]
    entropy[7] = float("nan")
    traj = trajectory(entropy=entropy)
    assert "non_finite_metric" in reflect(node("n0", trained=traj), None, None).diagnoses
    assert math.isfinite(summarize_trajectory(traj)["entropy_max"])


def test_training_reward_rising_while_overall_does_not_beat_the_parent(root):
    rising = [0.30 + 0.15 * i / STEPS for i in range(STEPS)]
    child = evaluated("n1", 0.505, parent=root, trained=trajectory(reward_mean=rising))
    reflection = reflect(child, root, root)
    assert "reward_up_eval_flat" in reflection.diagnoses
    assert "did not beat the parent's" in reflection.text
    # The same curve with a clear Overall gain is learning that transferred.
    better = evaluated("n2", 0.60, parent=root, trained=trajectory(reward_mean=rising))
    assert "reward_up_eval_flat" not in reflect(better, root, root).diagnoses


# ------------------------------------------------------------------------------------------ evaluation


def test_suite_gains_and_losses_are_judged_against_their_intervals_vs_parent_and_root(root):
    parent = evaluated("n1", 0.55, parent=root, suites={"easy": 0.60, "hard": 0.50})
    child = evaluated("n2", 0.55, parent=parent, suites={"easy": 0.70, "hard": 0.41})
    tags = set(reflect(child, parent, root).diagnoses)
    assert {"suite_gain:easy", "suite_loss:hard", "suite_gain_vs_root:easy", "suite_loss_vs_root:hard"} <= tags
    within = evaluated("n3", 0.55, parent=parent, suites={"easy": 0.61, "hard": 0.49})  # inside ±0.02 CIs
    reflection = reflect(within, parent, root)
    assert not [t for t in reflection.diagnoses if t.startswith(("suite_gain:", "suite_loss:"))]
    assert "within noise: easy, hard" in reflection.text


def test_noise_is_the_mean_ci_half_width_unless_given():
    def sd(*args, **kwargs) -> float:
        return overall_noise(*args, **kwargs).sd

    assert sd(evaluation(0.5, half_width=0.02), evaluation(0.5, half_width=0.04)) == pytest.approx(0.03)
    assert sd(evaluation(0.5, half_width=None), evaluation(0.5, half_width=0.04)) == pytest.approx(0.04)
    assert sd(evaluation(0.5, half_width=None), evaluation(0.5, half_width=None)) == DEFAULT_NOISE_SD
    assert sd(evaluation(0.5), evaluation(0.5), noise_sd=0.1) == 0.1
    assert sd(evaluation(0.5), evaluation(0.5), noise_sd=0.0) == NOISE_FLOOR  # identical seeds
    assert sd(evaluation(0.5), evaluation(0.5), noise_sd=float("nan")) == pytest.approx(0.02)
    assert overall_noise(evaluation(0.5), evaluation(0.5), noise_sd=0.01, noise_seeds=3).seeds == 3
    assert overall_noise(evaluation(0.5), evaluation(0.5)).seeds is None  # an interval is not a seed measurement
    with pytest.raises(ValueError, match="non-negative"):
        overall_noise(evaluation(0.5), evaluation(0.5), noise_sd=-0.1)


def test_a_difference_is_beyond_noise_only_where_a_two_sided_test_says_so():
    measured = Noise(0.01, seeds=3)  # σ from 3 root seeds: a t-test with 2 degrees of freedom
    critical = 4.303 * 0.01 * math.sqrt(2)  # t(0.975, 2) · σ · √(1/1 + 1/1)
    assert not Difference(0.98 * critical, measured).beyond_noise
    assert Difference(1.02 * critical, measured).beyond_noise
    assert Difference(-1.02 * critical, measured).beyond_noise
    assert Difference(0.98 * critical, measured).p == pytest.approx(0.052, abs=0.002)
    # more seeds on the reference side shrink the standard error: σ·√(1/1 + 1/3)
    assert Difference(0.9 * critical, measured, n=1, m=3).beyond_noise
    # σ taken as known (not measured over seeds): a z-test, |Δ| > 1.96·σ·√2
    known = Noise(0.01)
    assert not Difference(0.027, known).beyond_noise and Difference(0.029, known).beyond_noise
    assert Difference(0.003, Noise(0.004, 3, "over 3 root seeds")).text() == (
        "within noise (Δ +0.003, noise SD 0.004 over 3 root seeds, p = 0.649)")


# ------------------------------------------------------------------------------------------------ Δz


def test_delta_z_lists_added_removed_and_changed_mechanisms_with_merged_params():
    parent = node("n0", [*GRPO, MechanismSpec(name="entropy:bonus", params={"entropy_coef": 0.05})])
    child_specs = ["baseline:group_mean", "scale:analytic_variance", "clip:symmetric", "agg:token-mean",
                   "entropy:bonus", "validity:mask"]
    child = node("n1", child_specs, parent=parent, hparams={"clip_ratio": 0.3, "variance_floor": 0.05})
    delta = mechanism_delta(child.proposal, parent.proposal)
    assert delta.added == {
        "scale:analytic_variance": {"variance_floor": 0.05},  # the proposal's hparams override the default 0.01
        "validity:mask": {"invalid_penalty": -1.0},  # the library default, filled in
    }
    assert delta.removed == {"scale:group_std": {"eps": 1e-6}}
    assert delta.changed == {
        "clip:symmetric": {"clip_ratio": (0.2, 0.3)},
        "entropy:bonus": {"entropy_coef": (0.05, 0.01)},  # the parent's explicit 0.05 vs the default
    }
    assert delta.other == {}
    assert delta.n_changes == 5


def test_restating_a_default_is_no_change_but_unclaimed_hparams_and_agg_mode_are():
    parent = node("n0")
    restated = node("n1", [*GRPO[:2], MechanismSpec(name="clip:symmetric", params={"clip_ratio": 0.2}), GRPO[3]],
                    parent=parent)
    assert mechanism_delta(restated.proposal, parent.proposal).n_changes == 0
    other = node("n2", parent=parent, hparams={"lr_scale": 2.0}, loss_agg_mode=LossAggMode.SEQ_MEAN_TOKEN_MEAN)
    assert mechanism_delta(other.proposal, parent.proposal).other == {
        "loss_agg_mode": ("token-mean", "seq-mean-token-mean"),
        "lr_scale": (None, 2.0),
    }


def test_the_reflection_text_says_what_changed(root):
    child = evaluated("n1", 0.56, parent=root, mechanisms=[*GRPO, "validity:mask"])
    text = reflect(child, root, root).text
    assert "added validity:mask (invalid_penalty=-1.0)" in text
    assert "vs parent n0" in text


# ---------------------------------------------------------------------------------------------- effects


@pytest.mark.parametrize(("overall", "effect"), [(0.58, Effect.HELPED), (0.42, Effect.HURT), (0.505, Effect.NEUTRAL)])
def test_the_effect_of_an_added_mechanism_follows_the_overall_delta(root, overall, effect):
    child = evaluated("n1", overall, parent=root, mechanisms=[*GRPO, "validity:mask"])
    (verdict,) = reflect(child, root, root).effects
    assert (verdict.mechanism, verdict.effect) == ("validity:mask", effect)
    assert f"{overall - 0.5:+.3f}" in verdict.evidence


def test_a_removed_mechanism_that_hurt_is_credited_with_the_opposite_of_its_removal():
    parent = evaluated("n0", 0.50, mechanisms=[*GRPO, "entropy:bonus"])
    child = evaluated("n1", 0.58, parent=parent)
    (verdict,) = reflect(child, parent, parent).effects
    assert (verdict.mechanism, verdict.effect) == ("entropy:bonus", Effect.HURT)
    assert verdict.evidence.startswith("removed; Overall beyond noise (Δ +0.080 vs the parent")
    assert "its removal helped and the mechanism itself is judged hurt" in verdict.evidence


def test_confidence_is_one_minus_p_beyond_noise_and_is_shared_between_changes(root):
    small, large = (reflect(evaluated("n1", o, parent=root, mechanisms=[*GRPO, "validity:mask"]), root, root)
                    .effects[0].confidence for o in (0.57, 0.60))
    assert 0.95 < small < large <= 1  # beyond noise means p < 0.05
    mechanisms = [*GRPO, "validity:mask", "entropy:bonus"]
    shared = reflect(evaluated("n2", 0.60, parent=root, mechanisms=mechanisms), root, root).effects
    assert [e.confidence for e in shared] == pytest.approx([large / 2, large / 2])
    assert "one of 2 simultaneous changes" in shared[0].evidence


def test_an_explicit_noise_sd_can_turn_a_gain_into_noise(root):
    child = evaluated("n1", 0.58, parent=root, mechanisms=[*GRPO, "validity:mask"])
    assert reflect(child, root, root).effects[0].effect == Effect.HELPED  # +0.08 against half-widths of 0.02
    assert reflect(child, root, root, noise_sd=0.05).effects[0].effect == Effect.NEUTRAL


def test_a_difference_within_the_runs_seed_noise_is_neutral_with_no_confidence(root):
    """The tiny protocol's case: a few thousandths between nodes whose seeds differ by as much."""
    seeded = root.model_copy(update={"replicates": [evaluation(0.497), evaluation(0.503)]})
    child = evaluated("n1", 0.506, parent=seeded, mechanisms=[*GRPO, "validity:mask"])
    reflection = reflect(child, seeded, seeded, noise_sd=0.004, noise_seeds=3)
    (verdict,) = reflection.effects
    assert (verdict.effect, verdict.confidence) == (Effect.NEUTRAL, 0.0)
    assert ("within noise (Δ +0.006 vs the parent, noise SD 0.005 over 3 root seeds [measured 0.0040, raised to "
            "the floor], p = " in verdict.evidence)
    assert "vs parent 0.500 (mean of 3 seeds)" in reflection.text  # the root's seed mean, not its first seed
    assert "Verdict: within noise of the parent (Overall Δ +0.006" in reflection.text
    assert not [t for t in reflection.diagnoses if t.startswith("overall_")]


def test_the_run_noise_is_the_sd_of_the_roots_overall_over_its_seeds(root):
    assert root_noise(root) == (None, None)  # one seed measures no noise
    seeded = root.model_copy(update={"replicates": [evaluation(0.49), evaluation(0.51)]})
    assert root_noise(seeded) == (pytest.approx(0.01), 3)
    assert root_noise(None) == (None, None)


def test_a_changed_param_gets_an_effect():
    parent = evaluated("n0", 0.50)
    child = evaluated("n1", 0.44, parent=parent, hparams={"clip_ratio": 0.4})
    (verdict,) = reflect(child, parent, parent).effects
    assert (verdict.mechanism, verdict.effect) == ("clip:symmetric", Effect.HURT)
    assert "clip_ratio 0.2 -> 0.4" in verdict.evidence


# ------------------------------------------------------------------------------------ roots, missing data


def test_a_root_reflects_against_nothing(root):
    for reflection in (reflect(root, None, None), reflect(root, None, root)):
        assert reflection.effects == []
        assert not [t for t in reflection.diagnoses if t.startswith(("overall_", "suite_"))]
        assert "a root with no parent" in reflection.text
        assert "yardstick" in reflection.text


def test_a_node_without_evaluation_or_training_still_gets_a_reflection_naming_what_is_missing(root):
    bare = node("n1", [*GRPO, "validity:mask"], parent=root)
    reflection = reflect(bare, root, root)
    assert {"missing_trajectory", "missing_evaluation"} <= set(reflection.diagnoses)
    assert reflection.effects == []
    assert "added validity:mask" in reflection.text
    assert "unknown until the node is evaluated" in reflection.text


def test_a_parent_without_evaluation_gives_no_effects(root):
    parent = node("n1", parent=root, trained=trajectory())
    child = evaluated("n2", 0.6, parent=parent, mechanisms=[*GRPO, "validity:mask"])
    reflection = reflect(child, parent, root)
    assert "missing_parent_evaluation" in reflection.diagnoses
    assert reflection.effects == []
    assert "overall_gain_vs_root" in reflection.diagnoses  # the root comparison still stands


def test_sparse_and_empty_curves_are_summarized_without_inventing_values():
    assert summarize_trajectory(None) == {}
    empty = TrainingTrajectory(protocol="default", seed=0, steps=[], aborted=True, abort_reason="non-finite loss")
    assert summarize_trajectory(empty) == {"steps": 0.0}
    reflection = reflect(node("n0", trained=empty), None, None)
    assert {"missing_trajectory", "aborted"} <= set(reflection.diagnoses)
    assert "non-finite loss" in reflection.text
    short = trajectory({"reward_mean": [0.3, 0.3], "kl": [None, 5.0]})  # too few points to judge a trend
    assert not TRAINING_TAGS & set(reflect(node("n0", trained=short), None, None).diagnoses)


def test_the_summary_smooths_start_and_end_over_several_steps():
    values = [0.0] * 5 + [1.0] * 30 + [2.0] * 5
    summary = summarize_trajectory(trajectory({"reward_mean": values}))
    assert summary["reward_mean_start"] == 0.0 and summary["reward_mean_end"] == 2.0
    noisy = trajectory({"reward_mean": [0.5 + (0.2 if i % 2 else -0.2) for i in range(STEPS)]})
    noisy_summary = summarize_trajectory(noisy)
    assert noisy_summary["reward_mean_max"] - noisy_summary["reward_mean_min"] < 0.1  # the raw swing is 0.4
    assert set(noisy_summary) == {"steps", "reward_mean_start", "reward_mean_end", "reward_mean_min",
                                  "reward_mean_max"}
