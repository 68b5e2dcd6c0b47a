"""The mechanism library and offline code generation: reference parity, validation, mechanism behaviour."""

from __future__ import annotations

import ast
import random

import pytest
import torch

from poise.algorithm import (
    aggregate_loss,
    build_batch,
    check_passed,
    describe_problems,
    load_candidate,
    loss_agg_mode,
    module_hparams,
    run_advantages,
    run_policy_loss,
    structural_check,
    synthetic_rollout,
)
from poise.algorithms import REFERENCE_ALGORITHMS
from poise.contracts import MechanismSpec, Proposal
from poise.description.codegen import compile_candidate, compile_proposal, describe_reference
from poise.description.mechanisms import (
    FAMILIES,
    MECHANISMS,
    AlgorithmDescription,
    DescriptionError,
    library_text,
    random_description,
    validate_description,
)

GRPO = ["baseline:group_mean", "scale:group_std", "clip:symmetric", "clip:dual", "agg:token-mean"]
TOL = {"rtol": 0.0, "atol": 1e-9}


def compiled(mechanisms, hparams=None, name="candidate"):
    return load_candidate(compile_candidate(mechanisms, hparams or {}, name), name)


def with_mechanism(spec: MechanismSpec | str, base=GRPO) -> list:
    """GRPO with `spec` added, replacing GRPO's mechanism of the same family (and clip:dual where it cannot stay)."""
    mechanism = MECHANISMS[spec if isinstance(spec, str) else spec.name]
    kept = [name for name in base if MECHANISMS[name].family != mechanism.family]
    if mechanism.family == "clip" and mechanism.name not in MECHANISMS["clip:dual"].works_with:
        kept.remove("clip:dual")
    return [*kept, spec]


def evaluate(module, rollout, overrides=None):
    """Advantages, aggregated loss, its gradient w.r.t. log_prob, and metrics of a module on a rollout."""
    batch = {**rollout.batch, "hparams": module_hparams(module, overrides)}
    mask = batch["response_mask"]
    advantages, _ = run_advantages(module, batch)
    log_prob = rollout.log_prob.clone().requires_grad_(True)
    loss_mat, metrics = run_policy_loss(module, log_prob, rollout.old_log_prob, advantages, mask, batch)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode(module))
    (grad,) = torch.autograd.grad(loss, log_prob)
    return advantages, loss.detach(), grad, metrics


def hand_batch(scores, lengths, groups, **extra):
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).double()
    return build_batch(torch.tensor(scores, dtype=torch.float64), mask, groups, **extra)


def advantages_of(mechanisms, batch, hparams=None):
    module = compiled(mechanisms, hparams)
    return run_advantages(module, {**batch, "hparams": module_hparams(module)})[0]


# ------------------------------------------------------------------------------- reference algorithms


@pytest.mark.parametrize("name", sorted(REFERENCE_ALGORITHMS))
def test_reference_descriptions_use_the_module_tags_and_compile_to_checked_modules(name):
    specs, hparams = describe_reference(name)
    assert [s.name for s in specs] == list(REFERENCE_ALGORITHMS[name].mechanisms)
    results = structural_check(compile_candidate(specs, hparams, name))
    assert check_passed(results), describe_problems(results)


@pytest.mark.parametrize("name", sorted(REFERENCE_ALGORITHMS))
def test_compiled_reference_matches_the_hand_written_module(name):
    reference = REFERENCE_ALGORITHMS[name].module()
    module = compiled(*describe_reference(name), name=name)
    assert loss_agg_mode(module) == loss_agg_mode(reference)
    for seed in range(3):
        for pattern in ("mixed", "equal", "fail"):
            for spread in (1.0, 5.0):  # 5x wider log-ratios reach the dual clip and saturate the clips
                rollout = synthetic_rollout(groups=3 + seed, group_size=4 + seed, seed=seed, score_pattern=pattern,
                                            dtype=torch.float64)
                rollout = type(rollout)(rollout.batch, rollout.old_log_prob + spread * (
                    rollout.log_prob - rollout.old_log_prob), rollout.old_log_prob)
                ours, theirs = evaluate(module, rollout), evaluate(reference, rollout)
                where = f"{name} seed={seed} {pattern} spread={spread}"
                for label, a, b in zip(("advantages", "loss", "grad"), ours[:3], theirs[:3], strict=True):
                    torch.testing.assert_close(a, b, **TOL, msg=lambda m, at=f"{where} {label}": f"{at}: {m}")
                assert ours[3] == pytest.approx(theirs[3], abs=1e-9), where


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl_penalty_matches_the_reference_kl_option(estimator):
    reference = REFERENCE_ALGORITHMS["grpo"].module()
    module = compiled([*GRPO, MechanismSpec(name="kl:penalty", params={"kl_coef": 0.05, "kl_estimator": estimator})])
    rollout = synthetic_rollout(seed=4, dtype=torch.float64)
    ours = evaluate(module, rollout)
    theirs = evaluate(reference, rollout, {"kl_coef": 0.05, "kl_estimator": estimator})
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert ours[3]["kl"] == pytest.approx(theirs[3]["kl"])


# --------------------------------------------------------------------------------------------- library


def test_every_mechanism_defines_exactly_its_family_slot_functions():
    for mechanism in MECHANISMS.values():
        tree = ast.parse(mechanism.code)
        defined = tuple(node.name for node in tree.body if isinstance(node, ast.FunctionDef))
        assert sorted(defined) == sorted(FAMILIES[mechanism.family].functions), mechanism.name
        assert mechanism.description.endswith(".") and mechanism.name in library_text()
        for param in mechanism.params.values():
            assert param.problem(param.default) is None, mechanism.name


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_every_mechanism_compiles_into_grpo_and_passes_the_check(name):
    mechanisms = with_mechanism(name)
    source = compile_candidate(mechanisms, {}, f"grpo+{name}")
    results = structural_check(source)
    assert check_passed(results), describe_problems(results)
    tree = ast.parse(source)
    imports = [ast.unparse(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports == ["import torch", "from poise.algorithms import common"]
    assert f"# {name} —" in source  # each mechanism's code is labelled with its name


@pytest.mark.parametrize("seed", range(8))
def test_random_valid_descriptions_compile_to_checked_modules(seed):
    specs = random_description(random.Random(seed))
    assert validate_description(specs) == []
    results = structural_check(compile_candidate(specs, {}, f"random-{seed}", "sampled mechanisms"))
    assert check_passed(results), f"{[s.name for s in specs]}\n{describe_problems(results)}"


def test_description_merges_defaults_spec_params_and_overrides_and_round_trips():
    specs = [*GRPO[:2], MechanismSpec(name="clip:symmetric", params={"clip_ratio": 0.25}), *GRPO[3:]]
    description = AlgorithmDescription.from_specs(specs, {"dual_clip": 4.0})
    assert description.hparams == {"eps": 1e-6, "clip_ratio": 0.25, "dual_clip": 4.0}
    assert description.loss_agg_mode == "token-mean" and description.names == GRPO
    assert AlgorithmDescription.from_specs(description.specs()) == description
    module = compiled(specs, {"dual_clip": 4.0})
    assert module.HPARAMS == description.hparams and module.MECHANISMS == GRPO


def test_compile_proposal_fills_the_agg_slot_from_the_proposal():
    proposal = Proposal(name="no-agg", rationale="Dr.GRPO's horizon.\n\nTwo paragraphs, a \\ and \"\"\" quotes.",
                        mechanisms=[MechanismSpec(name=n) for n in GRPO[:4]], generator="offline",
                        loss_agg_mode="seq-mean-token-sum-norm")
    module = load_candidate(compile_proposal(proposal))
    assert module.LOSS_AGG_MODE == "seq-mean-token-sum-norm"
    assert '""" quotes' in module.__doc__ and "a \\ and" in module.__doc__


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("mechanisms", "hparams", "message"),
    [
        (["baseline:group_mena", *GRPO[1:]], {}, r"unknown mechanism 'baseline:group_mena'; did you mean "
                                                  r"baseline:group_mean\? known: baseline:group_mean, baseline:"),
        ([*GRPO, "baseline:group_mean"], {}, "baseline:group_mean is listed twice"),
        ([*GRPO, "scale:none"], {}, r"2 scale mechanisms \(scale:group_std, scale:none\) exclude each other: "
                                    "choose exactly one"),
        ([*GRPO, "length:correct_shorter", "length:pass_rate_conditioned"], {}, "choose at most one"),
        (GRPO[1:], {}, "no baseline mechanism .*: choose exactly one of baseline:group_mean, baseline:leave_one_out"),
        (GRPO[:4], {}, "no agg mechanism"),
        ([*GRPO[:2], "clip:cispo", "clip:dual", GRPO[4]], {}, "clip:dual works only with one of clip:symmetric"),
        ([MechanismSpec(name="scale:group_std", params={"eps": 0.5}), *GRPO[:1], *GRPO[2:]], {},
         r"scale:group_std parameter eps=0.5 is out of range \[1e-08, 0.01\]"),
        (GRPO, {"clip_ratio": 0.9}, r"clip:symmetric parameter clip_ratio=0.9 is out of range \[0.01, 0.5\]"),
        (GRPO, {"clip_ratio": "wide"}, r"clip_ratio='wide' must be a number in \[0.01, 0.5\]"),
        ([*GRPO, MechanismSpec(name="kl:penalty", params={"kl_estimator": "k9"})], {},
         "kl:penalty parameter kl_estimator='k9' must be one of k1, abs, k2, k3"),
        ([*GRPO[:2], MechanismSpec(name="clip:symmetric", params={"clip_high": 0.3}), *GRPO[3:]], {},
         r"clip:symmetric has no parameter 'clip_high'; its parameters: clip_ratio \(0.2 in \[0.01, 0.5\]\)"),
        (GRPO, {"lr": 1e-6}, r"hparams\['lr'\] is not a parameter of any chosen mechanism \(their parameters: eps, "
                             r"clip_ratio, dual_clip\)"),
    ],
)
def test_invalid_descriptions_are_refused_with_a_message_saying_what_to_change(mechanisms, hparams, message):
    with pytest.raises(DescriptionError, match=message):
        compile_candidate(mechanisms, hparams, "bad")


def test_every_problem_is_reported_at_once():
    problems = validate_description(["scale:group_std", "scale:none", "clip:wide"], {"eps": 1.0})
    assert len(problems) == 6, problems  # unknown clip, no baseline, two scales, no clip, no agg, eps range
    assert isinstance(DescriptionError(problems), ValueError)


# ------------------------------------------------------------------------------ mechanism behaviour


def test_validity_mask_keeps_invalid_responses_out_of_the_statistics_and_penalizes_them():
    # The last response is correct but format-invalid.
    batch = hand_batch([1, 0, 1, 1], [3, 3, 2, 3], [0, 0, 0, 0], format_valid=torch.tensor([1.0, 1, 1, 0]))
    masked = advantages_of(with_mechanism(MechanismSpec(name="validity:mask", params={"invalid_penalty": -0.5})),
                           batch)
    mask = batch["response_mask"]
    torch.testing.assert_close(masked[3], -0.5 * mask[3])
    valid = torch.tensor([1.0, 0, 1], dtype=torch.float64)  # statistics over the three valid responses only
    expected = (valid - valid.mean()) / (valid.std() + 1e-6)
    torch.testing.assert_close(masked[:3], expected.unsqueeze(-1) * mask[:3])
    assert advantages_of(GRPO, batch)[3, 0] > 0  # without masking the invalid response was rewarded


def test_all_fail_penalty_makes_all_fail_groups_negative_longer_ones_more():
    batch = hand_batch([1, 0, 0, 0, 0, 0, 0, 0], [2, 3, 4, 5, 2, 4, 6, 8], [0, 0, 0, 0, 1, 1, 1, 1])
    plain = advantages_of(GRPO, batch)
    shaped = advantages_of(with_mechanism(MechanismSpec(name="failure:all_fail_penalty",
                                                        params={"fail_advantage": -0.2, "fail_length_weight": 0.5})),
                           batch)
    assert (plain[4:] == 0).all()
    torch.testing.assert_close(shaped[:4], plain[:4])  # a group with a pass is untouched
    first_tokens = shaped[4:, 0]
    assert (first_tokens < 0).all() and (first_tokens.diff() < 0).all()  # lengths 2 < 4 < 6 < 8
    torch.testing.assert_close(first_tokens.mean(), torch.tensor(-0.2, dtype=torch.float64))


def test_correct_shorter_gives_the_shorter_correct_response_a_larger_advantage():
    batch = hand_batch([1, 1, 0, 0], [2, 6, 3, 5], [0, 0, 0, 0])
    plain = advantages_of(GRPO, batch)[:, 0]
    shaped = advantages_of(with_mechanism(MechanismSpec(name="length:correct_shorter", params={"length_coef": 0.1})),
                           batch)[:, 0]
    assert plain[0] == plain[1] and shaped[0] > shaped[1]
    torch.testing.assert_close(shaped - plain, torch.tensor([0.05, -0.05, 0, 0], dtype=torch.float64))


def test_pass_rate_conditioned_length_shaping_acts_only_on_easy_groups():
    # Group 0 passes 3/4 (easy), group 1 passes 2/4 (below min_pass_rate 0.6).
    batch = hand_batch([1, 1, 1, 0, 1, 1, 0, 0], [2, 6, 4, 4, 2, 6, 4, 4], [0, 0, 0, 0, 1, 1, 1, 1])
    spec = MechanismSpec(name="length:pass_rate_conditioned", params={"length_coef": 0.2, "min_pass_rate": 0.6})
    shift = advantages_of(with_mechanism(spec), batch)[:, 0] - advantages_of(GRPO, batch)[:, 0]
    torch.testing.assert_close(shift, 0.2 * 0.75 * torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0, 0], dtype=torch.float64))


def test_analytic_variance_divides_by_the_floored_bernoulli_std():
    batch = hand_batch([1, 0, 0, 0, 1, 1, 1, 1], [3] * 8, [0, 0, 0, 0, 1, 1, 1, 1])
    mechanisms = with_mechanism("scale:analytic_variance")
    advantages = advantages_of(mechanisms, batch, {"variance_floor": 0.01})[:, 0]
    centered = torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64)
    torch.testing.assert_close(advantages[:4], centered / 0.1875 ** 0.5)
    assert (advantages[4:] == 0).all()  # all-equal group: centered 0, floored variance keeps it finite
    floored = advantages_of(mechanisms, batch, {"variance_floor": 0.25})[:4, 0]
    torch.testing.assert_close(floored, centered / 0.5)


def test_kl_penalty_increases_the_loss_as_log_prob_moves_away_from_the_reference():
    rollout = synthetic_rollout(seed=2, dtype=torch.float64)
    plain, with_kl = compiled(GRPO), compiled([*GRPO, MechanismSpec(name="kl:penalty", params={"kl_coef": 0.1})])
    excess = []
    for distance in (0.0, 0.2, 0.5):
        batch = {**rollout.batch, "ref_log_prob": rollout.log_prob - distance * rollout.batch["response_mask"]}
        moved = type(rollout)(batch, rollout.log_prob, rollout.old_log_prob)
        excess.append((evaluate(with_kl, moved)[1] - evaluate(plain, moved)[1]).item())
    assert excess[0] == pytest.approx(0.0, abs=1e-12) and 0 < excess[1] < excess[2]


def test_entropy_bonus_raises_advantages_on_high_entropy_tokens():
    entropy = torch.tensor([[0.1, 2.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.0, 3.0, 0.0]])
    batch = hand_batch([1, 0, 1, 0], [2, 2, 3, 2], [0, 0, 0, 0], entropy=entropy)
    spec = MechanismSpec(name="entropy:bonus", params={"entropy_coef": 0.05})
    bonus = advantages_of(with_mechanism(spec), batch) - advantages_of(GRPO, batch)
    torch.testing.assert_close(bonus, 0.05 * batch["entropy"] * batch["response_mask"])
    assert bonus[0, 1] > bonus[0, 0] and bonus[3, 1] > 0
    assert bonus[3, 2] == 0  # padding gets nothing
