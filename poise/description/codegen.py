"""Offline code generation: an algorithm description compiles to a readable candidate module.

The module follows the shared interface (poise/algorithm.py) and imports only torch and poise.algorithms.common.
It holds one small function per mechanism slot (each commented with the mechanism it implements), then
`compute_advantages` and `policy_loss` composing them in pipeline order (poise/description/mechanisms.py), so an LLM or
a person can read it top to bottom and change one mechanism in one place. The reference algorithms are
expressible as descriptions (`describe_reference`) and compile to modules that match them numerically.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence

from poise.contracts import MechanismSpec, Proposal
from poise.contracts import Scalar as HParamValue
from poise.description.mechanisms import FAMILIES, MECHANISMS, AlgorithmDescription, Mechanism

# Where a description has no validity mechanism, every response enters the group statistics.
_ALL_COUNTED = '''
def counted_responses(batch):
    # No validity masking: every response enters the group statistics.
    return torch.ones_like(batch["scores"])
'''

# How compute_advantages and policy_loss call the optional slots, in pipeline order.
_ADVANTAGE_CALLS = {
    "validity": "advantages = penalize_invalid(advantages, counted, batch)",
    "failure_shaping": "advantages = shape_all_fail_groups(advantages, batch)",
    "length_shaping": "advantages = shape_length(advantages, batch)",
    "entropy": "advantages = entropy_bonus(advantages, batch)",
}
_LOSS_CALLS = {
    "dual_clip": "loss, more = dual_clip(loss, advantages, response_mask, batch)",
    "kl": "loss, more = kl_penalty(loss, log_prob, batch)",
}

# clip:symmetric has one ratio; the reference modules spell it clip_low (= clip_high).
_REFERENCE_PARAM_SOURCES = {"clip_ratio": "clip_low"}
_WIDTH = 120


def compile_candidate(
    mechanisms: Sequence[MechanismSpec | str],
    hparams: Mapping[str, HParamValue] | None,
    name: str,
    rationale: str = "",
) -> str:
    """Candidate module source for a description; DescriptionError (a ValueError) if it is not valid."""
    return render(AlgorithmDescription.from_specs(mechanisms, hparams), name, rationale)


def compile_proposal(proposal: Proposal) -> str:
    """compile_candidate for a proposal; its loss_agg_mode fills the agg slot when no agg mechanism is listed."""
    specs = list(proposal.mechanisms)
    if not any(spec.name.startswith("agg:") for spec in specs):
        specs.append(MechanismSpec(name=f"agg:{proposal.loss_agg_mode}"))
    return compile_candidate(specs, proposal.hparams, proposal.name, proposal.rationale)


def describe_reference(name: str) -> tuple[list[MechanismSpec], dict[str, HParamValue]]:
    """A reference algorithm (poise.algorithms.REFERENCE_ALGORITHMS) as a description: its MECHANISMS tags
    and the values its HPARAMS give their parameters, plus kl:penalty where the module sets kl_coef > 0."""
    from poise.algorithms import reference_algorithm  # imports torch: only where a reference is asked for

    algorithm = reference_algorithm(name)
    module_hparams = dict(algorithm.module().HPARAMS)
    tags = list(algorithm.mechanisms)
    if float(module_hparams.get("kl_coef", 0.0)) > 0:
        tags.append("kl:penalty")
    if "clip:symmetric" in tags and module_hparams["clip_low"] != module_hparams["clip_high"]:
        raise ValueError(f"{name} is tagged clip:symmetric but its clip_low and clip_high differ")
    hparams: dict[str, HParamValue] = {}
    for tag in tags:
        for key, param in MECHANISMS[tag].params.items():
            hparams[key] = module_hparams.get(_REFERENCE_PARAM_SOURCES.get(key, key), param.default)
    return [MechanismSpec(name=tag) for tag in tags], hparams


# ------------------------------------------------------------------------------------------ rendering


def render(description: AlgorithmDescription, name: str, rationale: str = "") -> str:
    agg = description.mechanism("agg")
    header = "\n".join([
        _docstring(description, name, rationale),
        "",
        "import torch",
        "",
        "from poise.algorithms import common",
        "",
        _assignment("NAME", name),
        _assignment("MECHANISMS", description.names),
        "",
        *_comment(f"{agg.name} — {agg.description}", indent=""),
        _assignment("LOSS_AGG_MODE", description.loss_agg_mode),
        _assignment("HPARAMS", description.hparams),
    ])
    sections = [
        header,
        _banner("advantages"),
        *_snippets(description, "advantage"),
        _compute_advantages(description),
        _banner("loss"),
        *_snippets(description, "loss"),
        _policy_loss(description),
    ]
    return "\n\n\n".join(section.strip("\n") for section in sections) + "\n"


def _docstring(description: AlgorithmDescription, name: str, rationale: str) -> str:
    title = f"{' '.join(name.split())}: compiled from a mechanism description by poise/description/codegen.py."
    lines = [*textwrap.wrap(title, _WIDTH - 4, break_on_hyphens=False), ""]
    for paragraph in (p for p in rationale.split("\n\n") if p.strip()):
        lines += [*textwrap.wrap(" ".join(paragraph.split()), _WIDTH - 4, break_on_hyphens=False), ""]
    lines.append("Mechanisms:")
    for mechanism in description.mechanisms:
        params = ", ".join(f"{k}={description.hparams[k]!r}" for k in mechanism.params)
        text = f"{mechanism.name}{f' ({params})' if params else ''}: {mechanism.description}"
        lines += textwrap.wrap(text, _WIDTH - 4, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)
    body = "\n".join(lines).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return f'"""{body}\n"""'


def _snippets(description: AlgorithmDescription, stage: str) -> list[str]:
    mechanisms = [m for m in description.mechanisms if FAMILIES[m.family].stage == stage and m.code]
    snippets = [m.code for m in mechanisms]
    if stage == "advantage":
        # Top-down reading order: which responses count comes first, as compute_advantages asks for it first.
        validity = description.mechanism("validity")
        snippets = [validity.code if validity else _ALL_COUNTED] + [m.code for m in mechanisms if m is not validity]
    return [snippet.strip("\n") for snippet in snippets]


def _compute_advantages(description: AlgorithmDescription) -> str:
    steps = " -> ".join(m.name for m in description.mechanisms if FAMILIES[m.family].stage == "advantage")
    lines = [
        "def compute_advantages(batch):",
        *_comment(steps),
        "    counted = counted_responses(batch)  # (B,) 1 where a response enters the group statistics",
        f"    centered = center_scores(batch[\"scores\"], counted, batch)  # (B,) {_tag(description, 'baseline')}",
        f"    advantages = scale_advantages(centered, counted, batch)  # (B, L) {_tag(description, 'scale')}",
    ]
    for family, call in _ADVANTAGE_CALLS.items():
        if description.mechanism(family):
            lines.append(f"    {call}  # {_tag(description, family)}")
    lines.append("    return advantages")
    return "\n".join(lines)


def _policy_loss(description: AlgorithmDescription) -> str:
    lines = [
        "def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):",
        f"    # Per-token loss (B, L); the caller reduces it with LOSS_AGG_MODE ({_tag(description, 'agg')}).",
        "    loss, metrics = surrogate_loss(log_prob, old_log_prob, advantages, response_mask, batch)"
        f"  # {_tag(description, 'clip')}",
    ]
    for family, call in _LOSS_CALLS.items():
        if description.mechanism(family):
            lines += [f"    {call}  # {_tag(description, family)}", "    metrics.update(more)"]
    lines.append("    return loss, metrics")
    return "\n".join(lines)


def _tag(description: AlgorithmDescription, family: str) -> str:
    mechanism: Mechanism | None = description.mechanism(family)
    return mechanism.name if mechanism else ""


def _banner(title: str) -> str:
    return f"# {'-' * (_WIDTH - 4 - len(title))} {title}"


def _comment(text: str, indent: str = "    ") -> list[str]:
    return textwrap.wrap(text, _WIDTH - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                         break_on_hyphens=False)


def _literal(value: object) -> str:
    """A Python literal with double-quoted strings (JSON string syntax is valid Python)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _assignment(target: str, value: object) -> str:
    """`target = value` on one line, or one item per line when that would be too long."""
    line = f"{target} = {_literal(value)}"
    if len(line) <= _WIDTH or not isinstance(value, list | dict) or not value:
        return line
    if isinstance(value, list):
        items = [f"    {_literal(v)}," for v in value]
        return "\n".join([f"{target} = [", *items, "]"])
    items = [f"    {_literal(k)}: {_literal(v)}," for k, v in value.items()]
    return "\n".join([f"{target} = {{", *items, "}"])


__all__ = ["compile_candidate", "compile_proposal", "describe_reference", "render"]
