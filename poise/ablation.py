"""Ablation of the reported best: each difference from GRPO undone in turn (docs/reporting.md, "The ablation").

A difference is one family of the mechanism library (poise/description/mechanisms.py) where the best and GRPO
disagree: a mechanism the best added (`minus:<name>`: the family left out, or GRPO's mechanism of it put back),
one it replaced (`minus:<name>`: GRPO's mechanism put back), one it dropped (`restore:<name>`), or the same
mechanism with other parameter values (`reset:<name>`: GRPO's values put back). Each arm is the best's description
with that one difference undone, compiled by the mechanism library (poise/description/codegen.py); the gain of the
best over an arm, on the same fresh seeds, is what that difference contributed.
"""

from __future__ import annotations

from poise.contracts import MechanismSpec, Proposal
from poise.description.codegen import compile_proposal
from poise.description.mechanisms import FAMILIES, AlgorithmDescription, DescriptionError
from poise.description.proposals import description_key, make_proposal, proposal_description


def ablation_arms(best: Proposal, grpo: Proposal) -> dict[str, Proposal]:
    """Arm name → the best's proposal with one difference from `grpo` undone, in pipeline order; arms whose
    description the library refuses (a family required by another mechanism) are left out."""
    ours, theirs = proposal_description(best), proposal_description(grpo)
    arms: dict[str, Proposal] = {}
    for family in FAMILIES:
        mine, root = ours.mechanism(family), theirs.mechanism(family)
        if mine is None and root is None:
            continue
        if mine is not None and root is not None and mine.name == root.name:
            if all(ours.hparams[key] == theirs.hparams[key] for key in mine.params):
                continue
            arm = f"reset:{mine.name}"
        else:
            arm = f"minus:{mine.name}" if mine is not None else f"restore:{root.name}"
        specs = [spec for spec in ours.specs() if spec.name != (mine.name if mine else None)]
        if root is not None:
            specs.append(MechanismSpec(name=root.name, params={k: theirs.hparams[k] for k in root.params}))
        try:
            description = AlgorithmDescription.from_specs(specs)
        except DescriptionError:
            continue
        arms[arm] = make_proposal(description, name=f"{best.name} {arm}",
                                  rationale=f"ablation of {best.name}: {arm}", generator="ablation")
    return arms


def ablation_sources(best: Proposal, best_source: str, grpo: Proposal) -> dict[str, str | None] | None:
    """Arm name → compiled source of each ablation arm, None for an arm that is GRPO's algorithm (undoing the
    best's only difference); None when the best's own code is not what the library compiles from its description
    (an LLM-written module): an arm compiled from the library would then differ from the best in more than the
    one difference it names."""
    try:
        if compile_proposal(best) != best_source:
            return None
        grpo_key = description_key(grpo)
        return {arm: None if description_key(proposal) == grpo_key else compile_proposal(proposal)
                for arm, proposal in ablation_arms(best, grpo).items()}
    except DescriptionError:
        return None


__all__ = ["ablation_arms", "ablation_sources"]
