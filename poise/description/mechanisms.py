"""The mechanism library: named building blocks of RL algorithms, shared by the proposer and the implementer.

An algorithm description is a list of `MechanismSpec`s (poise.contracts) plus hyperparameters. Each mechanism
belongs to one family, and each family fills one slot of the compiled candidate module (poise/description/codegen.py):

    advantages  baseline -> scale -> [validity] -> [failure_shaping] -> [length_shaping] -> [entropy]
    loss        clip -> [dual_clip] -> [kl], reduced by the caller with the agg mode (LOSS_AGG_MODE)

Families in brackets are optional (at most one mechanism); the others need exactly one. A validity mechanism
also decides which responses enter the baseline and scale statistics (`counted_responses`). Names match the
MECHANISMS tags of the reference algorithms in poise/algorithms. Every mechanism carries a one-sentence
description (for prompts and reflections), its hyperparameters with defaults and the ranges a mutation may
explore (HPARAMS keys are flat, so a parameter name belongs to one family), and the code it contributes: the
function(s) its family's slot calls, written against the candidate interface (poise/algorithm.py).
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from poise.contracts import DEFAULT_KL_ESTIMATOR, KLEstimator, LossAggMode, MechanismSpec
from poise.contracts import Scalar as HParamValue


class DescriptionError(ValueError):
    """An algorithm description that cannot be compiled; the message lists every problem, one per line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid algorithm description:\n" + "\n".join(f"- {p}" for p in self.problems))


# ------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class Param:
    """A mechanism hyperparameter: its default and what a mutation may try (a closed range, or choices)."""

    default: HParamValue
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    log: bool = False  # sample log-uniformly: the range spans orders of magnitude

    def problem(self, value: object) -> str | None:
        """Why `value` is not allowed, or None."""
        if self.choices:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number in [{self.low:g}, {self.high:g}]"
        if not math.isfinite(value) or not self.low <= value <= self.high:
            return f"is out of range [{self.low:g}, {self.high:g}]"
        return None

    def sample(self, rng: random.Random) -> HParamValue:
        if self.choices:
            return rng.choice(self.choices)
        if self.log and self.low > 0:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return min(max(float(f"{value:.3g}"), self.low), self.high)

    def describe(self) -> str:
        allowed = "|".join(self.choices) if self.choices else f"[{self.low:g}, {self.high:g}]"
        return f"{self.default!r} in {allowed}"


# ------------------------------------------------------------------------------------ families, slots


@dataclass(frozen=True)
class Family:
    """One slot of the compiled module: the functions a mechanism of this family must define."""

    name: str
    required: bool
    stage: str  # "advantage" or "loss"
    functions: tuple[str, ...]
    role: str


# In pipeline order: the compiled compute_advantages / policy_loss call the slots in this order.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("baseline", True, "advantage", ("center_scores",), "what is subtracted from a response's score"),
        Family("scale", True, "advantage", ("scale_advantages",), "what the centered score is divided by"),
        Family("validity", False, "advantage", ("counted_responses", "penalize_invalid"),
               "how format-invalid responses are treated"),
        Family("failure_shaping", False, "advantage", ("shape_all_fail_groups",),
               "what groups in which every response failed learn"),
        Family("length_shaping", False, "advantage", ("shape_length",), "pressure on response length"),
        Family("entropy", False, "advantage", ("entropy_bonus",), "exploration bonus from token entropy"),
        Family("clip", True, "loss", ("surrogate_loss",), "the importance-ratio surrogate and its clipping"),
        Family("dual_clip", False, "loss", ("dual_clip",), "a cap on the loss of negative-advantage tokens"),
        Family("kl", False, "loss", ("kl_penalty",), "regularisation towards the reference policy"),
        Family("agg", True, "loss", (), "how the caller reduces the per-token loss (LOSS_AGG_MODE)"),
    )
}


@dataclass(frozen=True)
class Mechanism:
    """One named building block: family, one-sentence description, hyperparameters, contributed code."""

    name: str
    family: str
    description: str
    params: dict[str, Param] = field(default_factory=dict)
    code: str = ""
    works_with: tuple[str, ...] = ()  # mechanisms of another family, one of which must be present

    def defaults(self) -> dict[str, HParamValue]:
        return {key: param.default for key, param in self.params.items()}


# -------------------------------------------------------------------------------------- code snippets
# Function bodies read hyperparameters from batch["hparams"] (HPARAMS with the protocol's overrides), never
# from HPARAMS directly. Shapes: B responses, L padded response tokens.

_GROUP_MEAN = '''
def center_scores(scores, counted, batch):
    # baseline:group_mean — subtract the mean score of the counted responses in the prompt's group (GRPO).
    mean, _ = common.counted_group_mean_std(scores, batch["group_index"], counted)
    return scores - mean
'''

_LEAVE_ONE_OUT = '''
def center_scores(scores, counted, batch):
    # baseline:leave_one_out — subtract the mean score of the *other* counted responses of the group (RLOO):
    # s_i - mean_{j != i} s_j = n/(n-1) (s_i - mean_g). A group with one counted response keeps its raw score.
    return common.leave_one_out_centered(scores, batch["group_index"], counted)
'''

_GROUP_STD = '''
def scale_advantages(centered, counted, batch):
    # scale:group_std — divide by the unbiased std of the counted scores in the group (GRPO); eps keeps
    # all-equal groups (std 0) finite. One value per response, broadcast over its tokens.
    _, std = common.counted_group_mean_std(batch["scores"], batch["group_index"], counted)
    return common.token_level(centered / (std + batch["hparams"]["eps"]), batch["response_mask"])
'''

_NO_SCALE = '''
def scale_advantages(centered, counted, batch):
    # scale:none — keep the centered scores unscaled (Dr.GRPO, RLOO): a prompt weighs by its reward spread alone.
    return common.token_level(centered, batch["response_mask"])
'''

_BATCH_STD = '''
def scale_advantages(centered, counted, batch):
    # scale:batch_std — whiten the token-level advantages with the mean and std of all counted tokens of the
    # batch (REINFORCE++): longer responses weigh more in the statistics, and no tiny group std can explode.
    mask = batch["response_mask"]
    advantages = common.token_level(centered, mask)
    counted_tokens = mask * counted.unsqueeze(-1)
    if counted_tokens.sum() < 2:  # too few tokens for a std: leave the advantages unscaled
        return advantages
    return common.whiten(advantages, counted_tokens) * mask
'''

_ANALYTIC_VARIANCE = '''
def scale_advantages(centered, counted, batch):
    # scale:analytic_variance — divide by the Bernoulli std sqrt(p (1 - p)) of the group's pass rate p over
    # the counted responses, the variance floored at variance_floor so nearly-solved and nearly-failed
    # groups are not blown up the way a tiny sample std blows them up.
    index = batch["group_index"]
    count = common.group_sum(counted, index).clamp(min=1)
    pass_rate = (common.group_sum(batch["scores"] * counted, index) / count).clamp(0.0, 1.0)[index]
    variance = (pass_rate * (1.0 - pass_rate)).clamp(min=batch["hparams"]["variance_floor"])
    return common.token_level(centered / variance.sqrt(), batch["response_mask"])
'''

_VALIDITY_MASK = '''
def counted_responses(batch):
    # validity:mask — only format-valid responses enter the group statistics (baseline and scale).
    return (batch["format_valid"] > 0.5).to(batch["scores"].dtype)


def penalize_invalid(advantages, counted, batch):
    # validity:mask — a format-invalid response gets the fixed advantage invalid_penalty on every token,
    # whatever its score, instead of a value relative to its group.
    mask = batch["response_mask"]
    return torch.where(counted.unsqueeze(-1) > 0, advantages, batch["hparams"]["invalid_penalty"] * mask)
'''

_ALL_FAIL_PENALTY = '''
def shape_all_fail_groups(advantages, batch):
    # failure:all_fail_penalty — in a group where no response passed (score > 0) every advantage would be 0
    # and the prompt would teach nothing; add fail_advantage (< 0) to each of its responses instead, weighted
    # towards longer ones by fail_length_weight (length relative to the group's mean length).
    hp, index, mask = batch["hparams"], batch["group_index"], batch["response_mask"]
    passed = common.group_sum((batch["scores"] > 0).to(mask.dtype), index)[index]
    length = batch["response_length"]
    mean_length = common.group_sum(length, index)[index] / common.group_count(index, length)
    weight = hp["fail_length_weight"]
    relative_length = (1.0 - weight) + weight * length / mean_length.clamp(min=1.0)
    shaping = torch.where(passed == 0, hp["fail_advantage"] * relative_length, torch.zeros_like(length))
    return advantages + common.token_level(shaping, mask)
'''

_CORRECT_SHORTER = '''
def shape_length(advantages, batch):
    # length:correct_shorter — among a group's correct responses (score > 0), a shorter one gets a bonus and a
    # longer one a malus, length_coef * (mean correct length - length) / mean correct length; wrong responses
    # are untouched, so brevity is never rewarded at the cost of correctness.
    mask = batch["response_mask"]
    correct = (batch["scores"] > 0).to(mask.dtype)
    bonus = common.correct_length_bonus(
        batch["hparams"]["length_coef"], correct, batch["response_length"], batch["group_index"]
    )
    return advantages + common.token_level(bonus, mask)
'''

_PASS_RATE_CONDITIONED = '''
def shape_length(advantages, batch):
    # length:pass_rate_conditioned — length pressure that grows with how easy the prompt is: in a group whose
    # pass rate p is at least min_pass_rate, correct responses get length_coef * p * (mean correct length -
    # length) / mean correct length; hard prompts keep their whole length budget for reasoning.
    hp, index, mask = batch["hparams"], batch["group_index"], batch["response_mask"]
    correct = (batch["scores"] > 0).to(mask.dtype)
    length = batch["response_length"]
    pass_rate = common.group_sum(correct, index)[index] / common.group_count(index, length)
    weight = hp["length_coef"] * pass_rate * (pass_rate >= hp["min_pass_rate"]).to(mask.dtype)
    return advantages + common.token_level(common.correct_length_bonus(weight, correct, length, index), mask)
'''

_ENTROPY_BONUS = '''
def entropy_bonus(advantages, batch):
    # entropy:bonus — add entropy_coef * (old-policy token entropy) to each valid token's advantage. The loss
    # never sees the current policy's entropy, so this rewards the tokens sampled where the policy was
    # uncertain (an exploration bonus on the advantage), not the entropy of the updated policy itself.
    if "entropy" not in batch:
        raise ValueError("entropy:bonus needs batch['entropy'], the old policy's token entropy")
    return advantages + batch["hparams"]["entropy_coef"] * batch["entropy"] * batch["response_mask"]
'''

_SYMMETRIC = '''
def surrogate_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    # clip:symmetric — PPO's token-level clipped surrogate max(-A r, -A clip(r, 1 - clip_ratio, 1 + clip_ratio)),
    # r = pi / pi_old: the pessimistic bound stops a token's update once r leaves the trust region.
    clip_ratio = batch["hparams"]["clip_ratio"]
    return common.ppo_clip_surrogate(log_prob, old_log_prob, advantages, response_mask, clip_ratio, clip_ratio)
'''

_CLIP_HIGHER = '''
def surrogate_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    # clip:clip_higher — PPO's clipped surrogate with decoupled bounds [1 - clip_low, 1 + clip_high] (DAPO): a wider
    # upper bound lets unlikely tokens with positive advantage gain mass, countering entropy collapse.
    hp = batch["hparams"]
    return common.ppo_clip_surrogate(log_prob, old_log_prob, advantages, response_mask, hp["clip_low"], hp["clip_high"])
'''

_DUAL_CLIP = '''
def dual_clip(loss, advantages, response_mask, batch):
    # clip:dual — for negative advantages cap the loss at -A * dual_clip, so a token whose ratio exploded
    # cannot dominate the batch (dual-clip PPO, Ye et al. 2020).
    return common.dual_clip_loss(loss, advantages, response_mask, batch["hparams"]["dual_clip"])
'''

_SEQUENCE_RATIO = '''
def surrogate_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    # clip:sequence_ratio — GSPO: the ratio is per response, s = exp(mean_t log(pi / pi_old)), clipped to
    # [1 - clip_low, 1 + clip_high]; each token carries s in its value and its own log-prob in its gradient.
    hp = batch["hparams"]
    return common.sequence_ratio_loss(
        log_prob, old_log_prob, advantages, response_mask, hp["clip_low"], hp["clip_high"]
    )
'''

_GEOMETRIC_MEAN = '''
def surrogate_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    # clip:geometric_mean — GMPO: maximise the geometric mean of a response's token ratios times its mean
    # advantage, with a sign-aware token clip in log space to [-clip_low, clip_high] (only the side that would
    # over-optimise is clipped); one value per response, spread over its tokens.
    hp = batch["hparams"]
    return common.geometric_mean_loss(
        log_prob, old_log_prob, advantages, response_mask, hp["clip_low"], hp["clip_high"]
    )
'''

_CISPO = '''
def surrogate_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    # clip:cispo — CISPO: keep every token's REINFORCE gradient and clip only the detached importance weight,
    # loss = -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * log pi, so clipped tokens still learn.
    hp = batch["hparams"]
    return common.cispo_loss(log_prob, old_log_prob, advantages, response_mask, hp["clip_low"], hp["clip_high"])
'''

_KL_PENALTY = '''
def kl_penalty(loss, log_prob, batch):
    # kl:penalty — add kl_coef * KL(pi || pi_ref) per token with the estimator kl_estimator (k1, abs, k2, k3);
    # the protocol keeps a reference model (batch["ref_log_prob"]) because kl_coef > 0.
    return common.add_kl_penalty(loss, log_prob, batch)
'''

# ---------------------------------------------------------------------------------------------- registry

_CLIP_LOW = Param(0.2, 0.01, 0.5)
_CLIP_HIGH = Param(0.28, 0.01, 1.0)
_KL_ESTIMATOR = Param(DEFAULT_KL_ESTIMATOR, choices=tuple(estimator.value for estimator in KLEstimator))

_LIBRARY = (
    Mechanism("baseline:group_mean", "baseline",
              "Subtract the mean score of the prompt's group of G responses (GRPO); no value network.",
              code=_GROUP_MEAN),
    Mechanism("baseline:leave_one_out", "baseline",
              "Subtract the mean score of the other G-1 responses of the group (RLOO), an unbiased baseline "
              "equal to G/(G-1) times the group-mean-centered score.",
              code=_LEAVE_ONE_OUT),
    Mechanism("scale:group_std", "scale",
              "Divide by the group's unbiased score std plus eps (GRPO), which up-weights nearly-solved and "
              "nearly-failed prompts.",
              {"eps": Param(1e-6, 1e-8, 1e-2, log=True)}, _GROUP_STD),
    Mechanism("scale:none", "scale",
              "Leave the centered scores unscaled (Dr.GRPO, RLOO), so a prompt weighs by its reward spread alone.",
              code=_NO_SCALE),
    Mechanism("scale:batch_std", "scale",
              "Whiten the token-level advantages with the mean and std of all valid tokens of the batch "
              "(REINFORCE++), a global scale with no tiny per-group stds.",
              code=_BATCH_STD),
    Mechanism("scale:analytic_variance", "scale",
              "Divide by the analytic Bernoulli std sqrt(p(1-p)) of the group's pass rate p, with the variance "
              "floored at variance_floor, a smoother scale than the sample std of a small group.",
              {"variance_floor": Param(0.01, 1e-4, 0.25, log=True)}, _ANALYTIC_VARIANCE),
    Mechanism("validity:mask", "validity",
              "Compute the group statistics over format-valid responses only and give every format-invalid "
              "response the fixed advantage invalid_penalty.",
              {"invalid_penalty": Param(-1.0, -3.0, 0.0)}, _VALIDITY_MASK),
    Mechanism("failure:all_fail_penalty", "failure_shaping",
              "Give the responses of a group in which none passed a small negative advantage fail_advantage "
              "(instead of 0), weighted towards longer responses by fail_length_weight.",
              {"fail_advantage": Param(-0.1, -1.0, 0.0), "fail_length_weight": Param(0.0, 0.0, 1.0)},
              _ALL_FAIL_PENALTY),
    Mechanism("length:correct_shorter", "length_shaping",
              "Among a group's correct responses, give shorter ones a bonus and longer ones a malus of "
              "length_coef times their relative length difference; wrong responses are untouched.",
              {"length_coef": Param(0.1, 0.0, 1.0)}, _CORRECT_SHORTER),
    Mechanism("length:pass_rate_conditioned", "length_shaping",
              "Shorter-correct length shaping weighted by the group's pass rate and applied only to groups with "
              "pass rate >= min_pass_rate, so only easy prompts are pushed towards brevity.",
              {"length_coef": Param(0.1, 0.0, 1.0), "min_pass_rate": Param(0.5, 0.0, 1.0)}, _PASS_RATE_CONDITIONED),
    Mechanism("entropy:bonus", "entropy",
              "Add entropy_coef times the old policy's token entropy to each token's advantage, an exploration "
              "bonus on uncertain tokens (the loss does not see the current policy's entropy).",
              {"entropy_coef": Param(0.01, 0.0, 0.2)}, _ENTROPY_BONUS),
    Mechanism("clip:symmetric", "clip",
              "PPO's token-level clipped surrogate with the ratio clipped to [1 - clip_ratio, 1 + clip_ratio].",
              {"clip_ratio": Param(0.2, 0.01, 0.5)}, _SYMMETRIC),
    Mechanism("clip:clip_higher", "clip",
              "PPO clip with decoupled bounds [1 - clip_low, 1 + clip_high], usually clip_high > clip_low (DAPO), "
              "so low-probability tokens with positive advantage can grow, countering entropy collapse.",
              {"clip_low": _CLIP_LOW, "clip_high": _CLIP_HIGH}, _CLIP_HIGHER),
    Mechanism("clip:sequence_ratio", "clip",
              "GSPO: one importance ratio per response (geometric mean of its token ratios) clipped to the "
              "narrow range [1 - clip_low, 1 + clip_high], matching the sequence-level reward.",
              {"clip_low": Param(3e-4, 1e-5, 0.05, log=True), "clip_high": Param(4e-4, 1e-5, 0.05, log=True)},
              _SEQUENCE_RATIO),
    Mechanism("clip:geometric_mean", "clip",
              "GMPO: maximise the geometric mean of a response's token ratios times its advantage, with a "
              "sign-aware log-space token clip to [-clip_low, clip_high], robust to outlier tokens.",
              {"clip_low": Param(0.4, 0.05, 1.0), "clip_high": Param(0.4, 0.05, 1.0)}, _GEOMETRIC_MEAN),
    Mechanism("clip:cispo", "clip",
              "CISPO: keep every token's REINFORCE gradient and clip only the detached importance weight to "
              "[1 - clip_low, 1 + clip_high], so rare high-ratio tokens still learn.",
              {"clip_low": Param(1.0, 0.0, 1.0), "clip_high": Param(0.28, 0.01, 5.0)}, _CISPO),
    Mechanism("clip:dual", "dual_clip",
              "Dual-clip PPO: for negative advantages cap the loss at -A * dual_clip, so a token whose ratio "
              "exploded cannot dominate the batch.",
              {"dual_clip": Param(3.0, 1.5, 10.0)}, _DUAL_CLIP,
              works_with=("clip:symmetric", "clip:clip_higher", "clip:sequence_ratio")),
    Mechanism("kl:penalty", "kl",
              "Add kl_coef times a per-token estimate (k1, abs, k2 or k3) of KL(pi || pi_ref) to the loss, which "
              "keeps the policy near the reference model.",
              {"kl_coef": Param(0.001, 1e-5, 1.0, log=True), "kl_estimator": _KL_ESTIMATOR},
              _KL_PENALTY),
    *(Mechanism(f"agg:{mode}", "agg", description) for mode, description in {
        LossAggMode.TOKEN_MEAN:
            "Average the per-token loss over all valid tokens of the batch, so long responses count per token.",
        LossAggMode.SEQ_MEAN_TOKEN_SUM: "Sum the per-token loss over each response, then average over responses.",
        LossAggMode.SEQ_MEAN_TOKEN_MEAN:
            "Average the per-token loss within each response, then over responses, so every response counts "
            "equally whatever its length.",
        LossAggMode.SEQ_MEAN_TOKEN_SUM_NORM:
            "Sum over each response's tokens and divide by a constant horizon (Dr.GRPO), with no length bias.",
    }.items()),
)


MECHANISMS: dict[str, Mechanism] = {m.name: m for m in _LIBRARY}


def mechanisms_in(family: str) -> list[Mechanism]:
    return [m for m in MECHANISMS.values() if m.family == family]


def _check_library() -> None:
    if {m.name for m in mechanisms_in("agg")} != {f"agg:{mode}" for mode in LossAggMode}:
        raise RuntimeError("the agg mechanisms must be one per poise.contracts.LossAggMode")
    # HPARAMS are flat: a parameter name may be shared only by mechanisms of one family (which exclude each other).
    owner: dict[str, str] = {}
    for mechanism in MECHANISMS.values():
        if mechanism.family not in FAMILIES:
            raise RuntimeError(f"{mechanism.name}: unknown family {mechanism.family!r}")
        for key in mechanism.params:
            if owner.setdefault(key, mechanism.family) != mechanism.family:
                raise RuntimeError(f"parameter {key!r} is used by the {owner[key]} and {mechanism.family} families")


_check_library()


# --------------------------------------------------------------------------------------- descriptions


def as_spec(spec: MechanismSpec | str) -> MechanismSpec:
    return spec if isinstance(spec, MechanismSpec) else MechanismSpec(name=spec)


@dataclass(frozen=True)
class AlgorithmDescription:
    """A validated description: one mechanism per required family, at most one per optional family, in
    pipeline order, and the merged hyperparameters (defaults <- spec params <- hparams overrides)."""

    mechanisms: tuple[Mechanism, ...]
    hparams: dict[str, HParamValue]

    @classmethod
    def from_specs(
        cls, specs: Sequence[MechanismSpec | str], hparams: Mapping[str, HParamValue] | None = None
    ) -> AlgorithmDescription:
        """The description of `specs`, or DescriptionError listing every problem in words an LLM can act on."""
        mechanisms, merged, problems = _resolve(specs, hparams)
        if problems:
            raise DescriptionError(problems)
        order = list(FAMILIES)
        return cls(tuple(sorted(mechanisms, key=lambda m: order.index(m.family))), merged)

    def mechanism(self, family: str) -> Mechanism | None:
        return next((m for m in self.mechanisms if m.family == family), None)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.mechanisms]

    @property
    def loss_agg_mode(self) -> str:
        return self.mechanism("agg").name.removeprefix("agg:")

    def specs(self) -> list[MechanismSpec]:
        """Each mechanism with the values of its own parameters."""
        return [MechanismSpec(name=m.name, params={k: self.hparams[k] for k in m.params}) for m in self.mechanisms]


def validate_description(
    specs: Sequence[MechanismSpec | str], hparams: Mapping[str, HParamValue] | None = None
) -> list[str]:
    """Every problem with a description, one sentence each; empty when it compiles."""
    return _resolve(specs, hparams)[2]


def _resolve(
    specs: Sequence[MechanismSpec | str], hparams: Mapping[str, HParamValue] | None
) -> tuple[list[Mechanism], dict[str, HParamValue], list[str]]:
    problems: list[str] = []
    chosen: list[Mechanism] = []
    values: dict[str, HParamValue] = {}
    for spec in map(as_spec, specs):
        mechanism = MECHANISMS.get(spec.name)
        if mechanism is None:
            problems.append(_unknown_name(spec.name))
            continue
        if mechanism in chosen:
            problems.append(f"{spec.name} is listed twice; list each mechanism once")
            continue
        chosen.append(mechanism)
        values.update(mechanism.defaults())
        for key, value in spec.params.items():
            if key in mechanism.params:
                values[key] = value
            else:
                problems.append(f"{spec.name} has no parameter {key!r}; {_parameters_of(mechanism)}")
    problems += _family_problems(chosen)
    owners = {key: m for m in chosen for key in m.params}
    for key, value in (hparams or {}).items():
        if key in owners:
            values[key] = value
        else:
            known = ", ".join(owners) or "none"
            problems.append(f"hparams[{key!r}] is not a parameter of any chosen mechanism (their parameters: {known}); "
                            "add the mechanism that uses it or drop it")
    for key, value in values.items():
        reason = owners[key].params[key].problem(value)
        if reason:
            problems.append(f"{owners[key].name} parameter {key}={value!r} {reason}")
    return chosen, values, problems


def _family_problems(chosen: Sequence[Mechanism]) -> list[str]:
    problems = []
    for family in FAMILIES.values():
        members = [m.name for m in chosen if m.family == family.name]
        if family.required and not members:
            options = ", ".join(m.name for m in mechanisms_in(family.name))
            problems.append(f"no {family.name} mechanism ({family.role}): choose exactly one of {options}")
        elif len(members) > 1:
            how_many = "exactly" if family.required else "at most"
            problems.append(f"{len(members)} {family.name} mechanisms ({', '.join(members)}) exclude each other: "
                            f"choose {how_many} one")
    names = {m.name for m in chosen}
    for mechanism in chosen:
        if mechanism.works_with and not names & set(mechanism.works_with):
            problems.append(f"{mechanism.name} works only with one of {', '.join(mechanism.works_with)}; "
                            f"drop {mechanism.name} or switch to one of those")
    return problems


def _unknown_name(name: str) -> str:
    family = name.split(":", 1)[0]
    pool = [m.name for m in MECHANISMS.values() if m.name.startswith(family + ":")] or list(MECHANISMS)
    close = difflib.get_close_matches(name, list(MECHANISMS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown mechanism {name!r}; {hint}known: {', '.join(pool)}"


def _parameters_of(mechanism: Mechanism) -> str:
    if not mechanism.params:
        return "it takes no parameters"
    return "its parameters: " + ", ".join(f"{k} ({p.describe()})" for k, p in mechanism.params.items())


# ------------------------------------------------------------------------------- sampling, prompt text


def random_description(rng: random.Random, optional_rate: float = 0.5) -> list[MechanismSpec]:
    """A random valid description: one mechanism per required family, each optional family with probability
    `optional_rate`, parameters sampled in their ranges."""
    specs: list[MechanismSpec] = []
    for family in FAMILIES.values():
        names = {s.name for s in specs}
        options = [m for m in mechanisms_in(family.name) if not m.works_with or names & set(m.works_with)]
        if not options or (not family.required and rng.random() >= optional_rate):
            continue
        mechanism = rng.choice(options)
        specs.append(MechanismSpec(name=mechanism.name,
                                   params={k: p.sample(rng) for k, p in mechanism.params.items()}))
    return specs


def library_text() -> str:
    """The library as prompt text: each family's slot and rule, then its mechanisms with parameters."""
    lines = []
    for family in FAMILIES.values():
        rule = "required, exactly one" if family.required else "optional, at most one"
        lines.append(f"{family.name} ({rule}): {family.role}")
        for mechanism in mechanisms_in(family.name):
            params = f" Parameters: {_parameters_of(mechanism).removeprefix('its parameters: ')}." \
                if mechanism.params else ""
            lines.append(f"  - {mechanism.name}: {mechanism.description}{params}")
    return "\n".join(lines)
