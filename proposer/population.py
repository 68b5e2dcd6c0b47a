"""Population generation (Phase I): N offline proposals per parent, in diverse directions, before screening.

Slots are filled in the order of DIRECTIONS, cycling over the directions the parent's context allows:

    remedy     a failure mode diagnosed in the parent's reflection (its tags) gets a known remedy from REMEDIES:
               the remedy mechanism put in its family's slot, or, when the parent already has it, strengthened
               by one step of its parameter in the remedy's direction
    repair     a mechanism the parent's reflection judged harmful is removed or swapped for another of its family;
               harmful mechanisms are drawn with weight 1 + HARM_BOOST · confidence
    crossover  one family slot (mechanism and its constants) taken from a reference of the context — complementary,
               Pareto or exploratory node, or a literature prior — never a mechanism judged harmful in the parent
    mutation   the baseline proposer's single random mutation (proposer/baseline.py), the yardstick
    hparam     one constant moved one step within its range; constants of mechanisms that helped are drawn more
               often, those of harmful ones less

A slot whose direction finds nothing new falls back to a mutation. Every proposal differs from the parent by
one change, carries a name built from the parent's and a change tag, and a rationale that starts with its
direction and names the change; no two share a description (`description_key`), none repeats the parent or
`seen`. Pure functions of their arguments and the rng.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from poise.contracts import MechanismSpec, Proposal
from poise.description.mechanisms import FAMILIES, MECHANISMS, AlgorithmDescription, DescriptionError
from poise.description.proposals import description_key, make_proposal, proposal_description
from proposer.baseline import KINDS, MutationError, child_name, moved_value, mutate, slug, without_unsupported
from proposer.context import Context, specs_text

DIRECTIONS = ("remedy", "repair", "crossover", "mutation", "hparam")
HARM_BOOST = 4.0  # a harmful mechanism judged with confidence c is drawn 1 + 4c times as often as no verdict
HELPED_WEIGHT, HURT_WEIGHT = 2.0, 0.25  # how often a constant of a mechanism that helped / hurt is tuned
# How often a crossover takes its slot from each kind of donor: contrast first, then the front.
DONOR_WEIGHTS = {"complementary": 3.0, "pareto": 2.0, "exploratory": 1.5, "literature": 1.0}
TRIES_PER_SLOT = 12
STRENGTHEN_TRIES = 8  # moved_value picks a random direction; this many draws find the wanted one


# ----------------------------------------------------------------------------------------- remedy table


@dataclass(frozen=True)
class Remedy:
    """A known counter to a diagnosed failure mode: put `mechanism` in its slot or, if the parent already has
    it, move its parameter `strengthen[0]` one step up (+1) or down (-1)."""

    mechanism: str
    why: str
    strengthen: tuple[str, int] | None = None


# Keys are the reflector's diagnosis tags (reflector/core.py diagnose_training and _transfer_gap).
REMEDIES: dict[str, tuple[Remedy, ...]] = {
    "entropy_collapse": (
        Remedy("clip:clip_higher", "a higher, decoupled upper clip lets low-probability tokens with positive "
                                   "advantage grow, which DAPO introduced against entropy collapse", ("clip_high", +1)),
        Remedy("entropy:bonus", "an entropy bonus on the advantage pays for exploring uncertain tokens",
               ("entropy_coef", +1)),
    ),
    "length_drift": (
        Remedy("length:correct_shorter", "shaping that favours the shorter correct responses of a group pushes "
                                         "length back", ("length_coef", +1)),
        Remedy("agg:seq-mean-token-sum-norm", "a constant-horizon aggregation removes token-mean's length bias "
                                              "(Dr.GRPO)"),
    ),
    "validity_drop": (
        Remedy("validity:mask", "format-invalid responses leave the group statistics and get a fixed penalty, so "
                                "losing the format always costs", ("invalid_penalty", -1)),
    ),
    "kl_spike": (
        Remedy("kl:penalty", "a KL penalty holds the policy near the reference model", ("kl_coef", +1)),
        Remedy("clip:dual", "dual clip caps the loss of negative-advantage tokens whose ratio exploded",
               ("dual_clip", -1)),
        Remedy("scale:analytic_variance", "a floored analytic variance never divides by the tiny sample std of a "
                                          "nearly uniform small group, a source of unstable advantages",
               ("variance_floor", +1)),
    ),
    "grad_norm_spike": (
        Remedy("clip:dual", "dual clip caps the loss of negative-advantage tokens whose ratio exploded",
               ("dual_clip", -1)),
        Remedy("scale:analytic_variance", "a floored analytic variance bounds the advantage scale",
               ("variance_floor", +1)),
        Remedy("scale:batch_std", "one batch-wide scale has no tiny per-group stds (REINFORCE++)"),
    ),
    "non_finite_metric": (
        Remedy("scale:analytic_variance", "a floored variance cannot divide by zero", ("variance_floor", +1)),
        Remedy("clip:dual", "dual clip bounds the loss of exploded ratios", ("dual_clip", -1)),
    ),
    "reward_stagnation": (
        Remedy("failure:all_fail_penalty", "groups in which every response failed give no gradient; a small "
                                           "negative advantage lets them teach", ("fail_advantage", -1)),
        Remedy("clip:cispo", "CISPO keeps the gradient of clipped tokens, so fewer updates are wasted",
               ("clip_high", +1)),
        Remedy("scale:group_std", "dividing by the group std up-weights nearly solved and nearly failed prompts, "
                                  "where a stuck policy still has signal"),
    ),
    "reward_up_eval_flat": (
        Remedy("kl:penalty", "anchoring to the reference limits over-fitting the training reward", ("kl_coef", +1)),
        Remedy("scale:none", "unscaled advantages stop over-weighting prompts the policy already nearly solves "
                             "(Dr.GRPO)"),
    ),
}


def _check_remedies() -> None:
    for tag, remedies in REMEDIES.items():
        for remedy in remedies:
            mechanism = MECHANISMS.get(remedy.mechanism)
            if mechanism is None:
                raise RuntimeError(f"REMEDIES[{tag!r}] names unknown mechanism {remedy.mechanism!r}")
            if remedy.strengthen and (remedy.strengthen[0] not in mechanism.params or remedy.strengthen[1] not in
                                      (-1, 1) or mechanism.params[remedy.strengthen[0]].choices):
                raise RuntimeError(f"REMEDIES[{tag!r}]: {remedy.mechanism} cannot strengthen {remedy.strengthen}")


_check_remedies()


# -------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Change:
    """One change of the parent: the child's description, a tag for its name, a sentence for its rationale."""

    description: AlgorithmDescription
    tag: str
    text: str


def generate_population(
    parent: Proposal, context: Context, size: int, rng: random.Random, seen: Iterable[str] = ()
) -> list[Proposal]:
    """Up to `size` proposals, children of `context.parent` (whose proposal is `parent`), in the directions of
    the module docstring; fewer only when no new description can be reached. `seen`: description keys that are
    not new (the archive's)."""
    if size < 0:
        raise ValueError(f"population size must be at least 0, got {size}")
    description = proposal_description(parent)
    excluded = {description_key(parent), *seen}
    order = [d for d in DIRECTIONS if d == "mutation" or _MAKERS[d][0](description, context)]
    population: list[Proposal] = []
    names: set[str] = {parent.name}
    for slot in range(size):
        direction = order[slot % len(order)]
        child = _attempt(direction, parent, description, context, rng, excluded)
        if child is None and direction != "mutation":
            child = _attempt("mutation", parent, description, context, rng, excluded)
        if child is None:
            continue
        name = child.name
        while name in names:
            name += "'"
        names.add(name)
        excluded.add(description_key(child))
        population.append(child.model_copy(update={"name": name}))
    return population


def _attempt(direction: str, parent: Proposal, description: AlgorithmDescription, context: Context,
             rng: random.Random, excluded: set[str]) -> Proposal | None:
    common = {"generator": "offline", "directive": context.directive, "parent_ids": [context.parent.node_id]}
    if direction == "mutation":
        try:
            child = mutate(parent, rng, excluded, max_tries=TRIES_PER_SLOT)
        except MutationError:
            return None
        return child.model_copy(update={**common, "rationale": f"Direction: mutation. {child.rationale}"})
    make = _MAKERS[direction][1]
    for _ in range(TRIES_PER_SLOT):
        change = make(description, context, rng)
        if change is None:
            continue
        child = make_proposal(change.description, child_name(parent.name, change.tag),
                          f"Direction: {direction}. {change.text}", "offline", context.directive)
        if description_key(child) not in excluded:
            return child.model_copy(update=common)
    return None


# ---------------------------------------------------------------------------------------------- remedy


def _remedy_options(description: AlgorithmDescription, context: Context) -> list[tuple[str, Remedy]]:
    """The remedies of the parent's diagnoses that can act: not a mechanism its reflection judged harmful, and
    either absent (to be added) or strengthenable."""
    names = set(description.names)
    harmful = {e.mechanism for e in context.parent.harmful()}
    return [(tag, remedy) for tag in context.parent.diagnoses for remedy in REMEDIES.get(tag, ())
            if remedy.mechanism not in harmful and (remedy.mechanism not in names or remedy.strengthen)]


def _remedy(description: AlgorithmDescription, context: Context, rng: random.Random) -> Change | None:
    tag, remedy = rng.choice(_remedy_options(description, context))
    why = f"Remedy for {tag} (diagnosed in the parent's reflection): {remedy.why}."
    if remedy.mechanism not in description.names:
        change = set_slot(description, MechanismSpec(name=remedy.mechanism))
        return None if change is None else Change(change.description, change.tag, f"{why} {change.text}")
    key, sign = remedy.strengthen
    param, old = MECHANISMS[remedy.mechanism].params[key], description.hparams[key]
    for _ in range(STRENGTHEN_TRIES):
        new = moved_value(param, old, rng)
        if new is not None and (float(new) - float(old)) * sign > 0:
            specs = [MechanismSpec(name=s.name, params={**s.params, key: new}) if s.name == remedy.mechanism else s
                     for s in description.specs()]
            text = (f"{why} The parent already has {remedy.mechanism}, so it is strengthened: {key} "
                    f"{old:g} -> {new:g}.")
            return Change(AlgorithmDescription.from_specs(specs), f"@{key}={new:g}", text)
    return None


# ---------------------------------------------------------------------------------------------- repair


def _repairable(description: AlgorithmDescription, context: Context) -> list:
    removable, swappable = set(KINDS["remove"][0](description)), set(KINDS["swap"][0](description))
    return [e for e in context.parent.harmful() if e.mechanism in removable
            or MECHANISMS[e.mechanism].family in swappable]


def _repair(description: AlgorithmDescription, context: Context, rng: random.Random) -> Change | None:
    harmful = _repairable(description, context)
    effect = rng.choices(harmful, [1.0 + HARM_BOOST * e.confidence for e in harmful])[0]
    family = MECHANISMS[effect.mechanism].family
    kinds = [(kind, option) for kind, option in (("remove", effect.mechanism), ("swap", family))
             if option in KINDS[kind][0](description)]
    kind, option = rng.choice(kinds)
    change = KINDS[kind][1](description, option, rng)
    why = (f"Repair: the parent's reflection judged {effect.mechanism} harmful (confidence {effect.confidence:.2f}: "
           f"{effect.evidence.rstrip('.')}).")
    return Change(change.description, change.tag, f"{why} {change.text}")


# ------------------------------------------------------------------------------------------- crossover


@dataclass(frozen=True)
class _Donor:
    label: str
    kind: str  # a reference tier or "literature"
    reason: str
    specs: list[MechanismSpec]


def _donors(context: Context) -> list[_Donor]:
    donors = [_Donor(f"node {r.node.node_id} ({r.node.name})", r.tier, r.reason, r.node.mechanisms)
              for r in context.references]
    donors += [_Donor(f"literature prior {prior.name}", "literature", prior.reference, prior.mechanisms)
               for prior in context.literature]
    return donors


def _crossover_options(description: AlgorithmDescription, context: Context) -> list[tuple[_Donor, MechanismSpec]]:
    ours = {spec.name: spec.params for spec in description.specs()}
    harmful = {e.mechanism for e in context.parent.harmful()}
    options = []
    for donor in _donors(context):
        for spec in donor.specs:
            if spec.name not in MECHANISMS or spec.name in harmful:
                continue
            mechanism = MECHANISMS[spec.name]
            params = {**mechanism.defaults(), **spec.params}
            if ours.get(spec.name) != params:
                options.append((donor, MechanismSpec(name=spec.name, params=params)))
    return options


def _crossover(description: AlgorithmDescription, context: Context, rng: random.Random) -> Change | None:
    options = _crossover_options(description, context)
    donor, spec = rng.choices(options, [DONOR_WEIGHTS[donor.kind] for donor, _ in options])[0]
    change = set_slot(description, spec)
    if change is None:
        return None
    source = f"{donor.label}, {donor.kind} reference" if donor.kind != "literature" else donor.label
    text = f"Crossover with {source} ({donor.reason.rstrip('.')}): {change.text}"
    return Change(change.description, change.tag, text)


# --------------------------------------------------------------------------------------------- hparam


def _hparam(description: AlgorithmDescription, context: Context, rng: random.Random) -> Change | None:
    options = KINDS["hparam"][0](description)
    verdicts = {e.mechanism: e.effect for e in context.parent.effects}
    weight = {"helped": HELPED_WEIGHT, "hurt": HURT_WEIGHT}
    target = rng.choices(options, [weight.get(str(verdicts.get(name)), 1.0) for name, _ in options])[0]
    change = KINDS["hparam"][1](description, target, rng)
    return None if change is None else Change(change.description, change.tag, change.text)


_MAKERS: dict[str, tuple[Callable[[AlgorithmDescription, Context], object],
                         Callable[[AlgorithmDescription, Context, random.Random], Change | None]]] = {
    "remedy": (_remedy_options, _remedy),
    "repair": (_repairable, _repair),
    "crossover": (_crossover_options, _crossover),
    "hparam": (lambda description, context: KINDS["hparam"][0](description), _hparam),
}


# ------------------------------------------------------------------------------------------ slot change


def set_slot(description: AlgorithmDescription, spec: MechanismSpec) -> Change | None:
    """`description` with `spec` in its family's slot (replacing what was there, or filling an empty optional
    slot), dropping a mechanism that works only with the one replaced; None if the result is not valid (the new
    mechanism itself needs one that is absent, as clip:dual does with clip:cispo)."""
    mechanism = MECHANISMS[spec.name]
    old = description.mechanism(mechanism.family)
    specs = [s for s in description.specs() if MECHANISMS[s.name].family != mechanism.family] + [spec]
    kept, dropped = without_unsupported(specs)
    if spec.name not in {s.name for s in kept}:
        return None
    try:
        child = AlgorithmDescription.from_specs(kept)
    except DescriptionError:
        return None
    family = FAMILIES[mechanism.family]
    replaced = f"replacing {old.name}" if old else f"filling the empty {family.name} slot ({family.role})"
    text = f"Sets {specs_text([spec])}, {replaced}: {mechanism.description}"
    text += "".join(f" Also drops {m.name}, which works only with {', '.join(m.works_with)}." for m in dropped)
    return Change(child, f"{'~' if old else '+'}{slug(spec.name)}", text)


__all__ = ["DIRECTIONS", "REMEDIES", "Change", "Remedy", "generate_population", "set_slot"]
