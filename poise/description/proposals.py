"""Proposals as algorithm descriptions: the GRPO root, a proposal's validated description, its canonical key.

Shared by every service that reads a proposal (the proposer mutates and screens them, the implementer compiles
them, the reflector and the archive describe them); see docs/architecture.md, "The algorithm-description
library".
"""

from __future__ import annotations

import functools
from dataclasses import replace

from poise.contracts import ROOT_NAME, LossAggMode, MechanismSpec, Proposal
from poise.contracts import Scalar as HParamValue
from poise.description.mechanisms import AlgorithmDescription

KEY_SIGNIFICANT_DIGITS = 4  # descriptions whose values agree to this many digits are the same description
MAX_NAME_CHARS = 60



def root_proposal() -> Proposal:
    """GRPO as the root proposal of a run, the baseline every candidate is measured against."""
    from poise.description.codegen import describe_reference  # imports torch: only when a root is asked for

    description = AlgorithmDescription.from_specs(*describe_reference(ROOT_NAME))
    return make_proposal(
        description,
        name=ROOT_NAME,
        rationale="The root of the search and the baseline every candidate is compared against: GRPO "
        f"({', '.join(description.names)}).",
        generator="reference",
    )


def proposal_description(proposal: Proposal) -> AlgorithmDescription:
    """The validated description of a proposal, its loss_agg_mode filling the agg slot when no agg mechanism is
    listed (as compile_proposal does); DescriptionError if it is not valid.

    Resolved once per distinct (mechanisms, hparams, loss_agg_mode): a search asks for the same few dozen
    descriptions thousands of times (screening, the GPs' features, duplicate keys). Each call gets its own
    hparams dict, so a caller that edits it changes nothing cached."""
    described = _described(tuple((spec.name, _typed(spec.params)) for spec in proposal.mechanisms),
                           _typed(proposal.hparams), proposal.loss_agg_mode)
    return replace(described, hparams=dict(described.hparams))


def _typed(items: dict[str, HParamValue]) -> tuple:
    """A hashable key of a dict: its items in order (the order reaches the description's hparams), each value
    tagged with its type (1, 1.0 and True hash alike, but a description built from one must not be handed out
    for another)."""
    return tuple((key, type(value).__name__, value) for key, value in items.items())


@functools.lru_cache(maxsize=4096)
def _described(mechanisms: tuple, hparams: tuple, loss_agg_mode: LossAggMode) -> AlgorithmDescription:
    specs = [MechanismSpec(name=name, params={key: value for key, _, value in params}) for name, params in mechanisms]
    if not any(spec.name.startswith("agg:") for spec in specs):
        specs.append(MechanismSpec(name=f"agg:{loss_agg_mode}"))
    return AlgorithmDescription.from_specs(specs, {key: value for key, _, value in hparams})


def description_key(proposal: Proposal) -> str:
    """A canonical key of the algorithm a proposal describes, whatever its name, rationale or spelling (params
    on specs or in hparams, agg mechanism or loss_agg_mode): sorted mechanism names, the merged hyperparameters
    rounded to KEY_SIGNIFICANT_DIGITS, and the agg mode."""
    description = proposal_description(proposal)
    hparams = ",".join(f"{key}={key_value(description.hparams[key])}" for key in sorted(description.hparams))
    return f"{'+'.join(sorted(description.names))}|{hparams}|agg={description.loss_agg_mode}"


def key_value(value: HParamValue) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return repr(value)
    return f"{float(value) + 0.0:.{KEY_SIGNIFICANT_DIGITS}g}"  # + 0.0 turns -0.0 into 0.0



def make_proposal(
    description: AlgorithmDescription, name: str, rationale: str, generator: str, directive: str | None = None
) -> Proposal:
    return Proposal(name=name, rationale=rationale, mechanisms=description.specs(), hparams={},
                    loss_agg_mode=description.loss_agg_mode, directive=directive, generator=generator)




__all__ = ["KEY_SIGNIFICANT_DIGITS", "MAX_NAME_CHARS", "description_key", "key_value",
           "make_proposal", "proposal_description", "root_proposal"]
