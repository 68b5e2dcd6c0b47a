"""The baseline proposer: random or greedy parent selection and one random mutation of the parent's description.

Kept permanently as the yardstick for smarter selection (the acquisition function s(d) of docs/architecture.md,
"The design card") and for LLM proposals: a search that cannot beat "mutate the best (or a random) node by one
mechanism or one hyperparameter" has learned nothing. Everything here is a pure function of its arguments and the rng.

A mutation is exactly one of:
    add      a mechanism of an optional family the parent lacks, with its default parameters
    remove   an optional mechanism
    swap     a mechanism for another of its family, with the newcomer's default parameters (required families
             can only be swapped); a mechanism that works only with the one swapped out (clip:dual with a clip
             it does not support) is dropped with it, as part of the same swap, and the rationale says so
    hparam   one hyperparameter moved within its Param range: multiplicatively for log-scale parameters,
             by 10-25% of the range otherwise, to another choice for choice parameters

Children carry their parameters on their MechanismSpecs (`AlgorithmDescription.specs()`), empty `hparams`, the
agg mechanism in the list and a matching `loss_agg_mode`, so `compile_proposal` compiles them as they are.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from poise.contracts import MechanismSpec, Node, Proposal
from poise.contracts import Scalar as HParamValue
from poise.description.mechanisms import (
    FAMILIES,
    MECHANISMS,
    AlgorithmDescription,
    Mechanism,
    Param,
    mechanisms_in,
)
from poise.description.proposals import (
    MAX_NAME_CHARS,
    description_key,
    key_value,
    make_proposal,
    proposal_description,
)

SELECTION_MODES = ("random", "greedy")
# How often each kind of mutation is drawn (renormalized over the kinds the parent allows).
MUTATION_WEIGHTS: dict[str, float] = {"add": 0.25, "remove": 0.15, "swap": 0.3, "hparam": 0.3}
LOG_STEP_FACTORS = (1.5, 3.0)  # a log-scale parameter is multiplied or divided by a factor in this range
LINEAR_STEP_FRACTIONS = (0.1, 0.25)  # any other numeric parameter moves by this fraction of its range


class MutationError(RuntimeError):
    """No new description could be reached from a parent within the allowed tries."""


# ------------------------------------------------------------------------------------------ selection


def select_parent(
    candidates: Sequence[Node], mode: str, rng: random.Random, utility: Callable[[Node], float | None]
) -> Node:
    """The parent of the next child among `candidates` (already filtered by the caller to evaluated, unfailed
    nodes): uniformly at random, or greedily the highest utility (None or nan ranks below every number), ties
    going to the earliest created_at, then the smallest node_id. The result does not depend on the order of
    `candidates`; "greedy" draws nothing from `rng`."""
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown parent selection mode {mode!r}; choose one of {', '.join(SELECTION_MODES)}")
    if not candidates:
        raise ValueError(f"no candidate parents to select from (mode {mode}); evaluate the root first")
    ordered = sorted(candidates, key=lambda node: (node.created_at, node.node_id))
    if mode == "random":
        return rng.choice(ordered)

    def rank(position: int) -> tuple[bool, float, int]:
        value = utility(ordered[position])
        known = value is not None and not math.isnan(value)
        return (known, value if known else 0.0, -position)  # max: known first, then value, then earliest

    return ordered[max(range(len(ordered)), key=rank)]


# ------------------------------------------------------------------------------------------ mutation


@dataclass(frozen=True)
class _Change:
    """One mutation: the child description, a short tag for its name, and a sentence for its rationale."""

    description: AlgorithmDescription
    tag: str
    text: str


def mutate(parent: Proposal, rng: random.Random, seen: set[str] | None = None, max_tries: int = 20) -> Proposal:
    """A child of `parent` that differs from it by exactly one mutation (module docstring) and whose
    description_key is neither the parent's nor in `seen`; MutationError after `max_tries` draws that were not.
    The caller fills parent_ids."""
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries}")
    description = proposal_description(parent)
    excluded = {description_key(parent), *(seen or ())}
    available = {kind: options for kind, (list_options, _) in KINDS.items() if (options := list_options(description))}
    if not available:
        raise MutationError(f"{parent.name}: no mutation applies to its description")
    kinds = list(available)
    weights = [MUTATION_WEIGHTS[kind] for kind in kinds]
    for _ in range(max_tries):
        kind = rng.choices(kinds, weights)[0]
        change = KINDS[kind][1](description, rng.choice(available[kind]), rng)
        if change is None:
            continue
        child = make_proposal(
            change.description,
            name=child_name(parent.name, change.tag),
            rationale=f"{change.text} Baseline proposer: one random mutation of {parent.name}.",
            generator="offline",
            directive=parent.directive,
        )
        if description_key(child) not in excluded:
            return child
    raise MutationError(
        f"{parent.name}: no new description in {max_tries} mutations (each was the parent or already in the "
        "archive); raise max_tries or select another parent"
    )


# Options are what a kind can change in a description; a family is drawn before a mechanism so that the clip
# family's five members do not crowd out the two baselines.


def _addable(description: AlgorithmDescription) -> list[str]:
    names = set(description.names)
    return [family.name for family in FAMILIES.values()
            if not family.required and description.mechanism(family.name) is None
            and any(_supported(m, names) for m in mechanisms_in(family.name))]


def _add(description: AlgorithmDescription, family: str, rng: random.Random) -> _Change:
    names = set(description.names)
    new = rng.choice([m for m in mechanisms_in(family) if _supported(m, names)])
    child = AlgorithmDescription.from_specs([*description.specs(), MechanismSpec(name=new.name)])
    return _Change(child, f"+{slug(new.name)}", f"Adds {new.name}{_params_text(new, child)}: {new.description}")


def _removable(description: AlgorithmDescription) -> list[str]:
    return [m.name for m in description.mechanisms if not FAMILIES[m.family].required]


def _remove(description: AlgorithmDescription, name: str, rng: random.Random) -> _Change:
    old = MECHANISMS[name]
    kept, dropped = without_unsupported([s for s in description.specs() if s.name != name])
    family = FAMILIES[old.family]
    text = (f"Removes {name}{_params_text(old, description)}, leaving the {family.name} slot ({family.role}) "
            f"empty; it did this: {old.description}{_dropped_text(dropped)}")
    return _Change(AlgorithmDescription.from_specs(kept), f"-{slug(name)}", text)


def _swappable(description: AlgorithmDescription) -> list[str]:
    return [m.family for m in description.mechanisms if _alternatives(description, m)]


def _swap(description: AlgorithmDescription, family: str, rng: random.Random) -> _Change:
    old = description.mechanism(family)
    new = rng.choice(_alternatives(description, old))
    specs = [MechanismSpec(name=new.name) if s.name == old.name else s for s in description.specs()]
    kept, dropped = without_unsupported(specs)
    child = AlgorithmDescription.from_specs(kept)
    text = f"Swaps {old.name} for {new.name}{_params_text(new, child)}: {new.description}{_dropped_text(dropped)}"
    return _Change(child, f"~{slug(new.name)}", text)


def _alternatives(description: AlgorithmDescription, mechanism: Mechanism) -> list[Mechanism]:
    others = set(description.names) - {mechanism.name}
    return [m for m in mechanisms_in(mechanism.family) if m is not mechanism and _supported(m, others)]


def _tunable(description: AlgorithmDescription) -> list[tuple[str, str]]:
    return [(m.name, key) for m in description.mechanisms for key in m.params]


def _move(description: AlgorithmDescription, target: tuple[str, str], rng: random.Random) -> _Change | None:
    name, key = target
    param, old = MECHANISMS[name].params[key], description.hparams[key]
    new = moved_value(param, old, rng)
    if new is None:
        return None
    specs = [MechanismSpec(name=s.name, params={**s.params, key: new}) if s.name == name else s
             for s in description.specs()]
    text = f"Moves {key} of {name} from {_value_text(old)} to {_value_text(new)} ({_range_text(param)}): " \
           f"{MECHANISMS[name].description}"
    return _Change(AlgorithmDescription.from_specs(specs), f"@{key}={_value_text(new)}", text)


KINDS: dict[str, tuple[Callable[[AlgorithmDescription], list], Callable[..., _Change | None]]] = {
    "add": (_addable, _add),
    "remove": (_removable, _remove),
    "swap": (_swappable, _swap),
    "hparam": (_tunable, _move),
}
if set(KINDS) != set(MUTATION_WEIGHTS):
    raise RuntimeError(f"MUTATION_WEIGHTS names {sorted(MUTATION_WEIGHTS)} but the mutation kinds are {sorted(KINDS)}")


def moved_value(param: Param, value: HParamValue, rng: random.Random) -> HParamValue | None:
    """`value` moved one step within `param`'s range (module docstring), in a random direction unless only the
    other stays in range; None if no step changes it at KEY_SIGNIFICANT_DIGITS."""
    if param.choices:
        others = [choice for choice in param.choices if choice != value]
        return rng.choice(others) if others else None
    value = float(value)
    log_scale = param.log and param.low > 0
    if log_scale:
        factor = math.exp(rng.uniform(*map(math.log, LOG_STEP_FACTORS)))
        steps = (value * factor, value / factor)
    else:
        step = rng.uniform(*LINEAR_STEP_FRACTIONS) * (param.high - param.low)
        steps = (value + step, value - step)
    if rng.random() < 0.5:
        steps = steps[::-1]
    for candidate in steps:
        if param.low <= candidate <= param.high:
            rounded = min(max(_rounded(candidate, param, log_scale), param.low), param.high)
            if key_value(rounded) != key_value(value):
                return rounded
    return None


def _rounded(value: float, param: Param, log_scale: bool) -> float:
    # Log-scale values keep 3 significant digits; others snap to a hundredth of their range's decade, so an
    # additive step from 0.3 never lands on 0.30000000000000004 or 2.7e-17.
    if log_scale or value == 0:
        return float(f"{value:.3g}")
    return round(value, 2 - math.floor(math.log10(param.high - param.low))) + 0.0


def _supported(mechanism: Mechanism, names: set[str]) -> bool:
    return not mechanism.works_with or bool(names & set(mechanism.works_with))


def without_unsupported(specs: list[MechanismSpec]) -> tuple[list[MechanismSpec], list[Mechanism]]:
    """`specs` without the mechanisms that work only with one no longer present, and those dropped."""
    names = {s.name for s in specs}
    dropped = [MECHANISMS[s.name] for s in specs if not _supported(MECHANISMS[s.name], names)]
    return [s for s in specs if MECHANISMS[s.name] not in dropped], dropped


# -------------------------------------------------------------------------------------------- wording


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower())


def _value_text(value: HParamValue) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def _params_text(mechanism: Mechanism, description: AlgorithmDescription) -> str:
    if not mechanism.params:
        return ""
    return " (" + ", ".join(f"{key} {_value_text(description.hparams[key])}" for key in mechanism.params) + ")"


def _range_text(param: Param) -> str:
    if param.choices:
        return f"choices {'|'.join(param.choices)}"
    return f"range [{param.low:g}, {param.high:g}]{', log scale' if param.log else ''}"


def _dropped_text(dropped: list[Mechanism]) -> str:
    return "".join(f" Also drops {m.name}, which works only with {', '.join(m.works_with)}." for m in dropped)


# A change tag starts with + (add), - (remove; a letter follows), ~ (swap) or @ (hparam).
_TAG_START = re.compile(r"[+~@]|-(?=[a-z])")


def child_name(parent_name: str, tag: str) -> str:
    """The parent's name followed by the change tag ("grpo+kl_penalty@kl_coef=0.003"); past MAX_NAME_CHARS the
    root of the name, "..", and the latest whole tags that fit ("grpo..~clip_cispo@clip_high=0.5")."""
    full = parent_name + tag
    if len(full) > MAX_NAME_CHARS:
        root = _TAG_START.split(parent_name.split("..")[0], maxsplit=1)[0][:20] or "node"
        tail = full[-(MAX_NAME_CHARS - len(root) - 2):]
        start = _TAG_START.search(tail)
        full = f"{root}..{tail[start.start() if start else 0:]}"
    return full if full != parent_name else f"{full}'"


__all__ = [
    "MUTATION_WEIGHTS",
    "SELECTION_MODES",
    "MutationError",
    "KINDS",
    "child_name",
    "moved_value",
    "mutate",
    "select_parent",
    "slug",
    "without_unsupported",
]
