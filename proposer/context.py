"""The context of a parent (Phase I, context construction): what a proposer sees before it proposes children.

For a parent p the context holds p itself (description, metrics, reflection and its tags), a tiered set of
references from the archive, the literature priors and the run's directive:

    pareto         nodes on the Pareto front of the per-suite scores (and −mean length under the length
                   objective), the same front parent selection uses (proposer/selection.py)
    complementary  good nodes (utility at least the median of the archive's) whose mechanism sets differ most
                   from p's (Jaccard distance of mechanism names), so a crossover has something to take
    exploratory    the best nodes outside p's lineage (neither ancestors nor descendants), one per branch of
                   the root before a second from any branch

Each tier holds at most `per_tier` nodes, never p, and a node appears in the first tier that picks it only.
Every reference carries a one-sentence reason. The structure is a JSON-serializable pydantic model, and
`render()` writes it as prompt text for an LLM proposer; the offline population generator reads the same
fields (proposer/population.py).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np

from poise.contracts import Contract, MechanismEffect, MechanismSpec, Node, RunConfig
from poise.description.mechanisms import AlgorithmDescription, DescriptionError
from poise.description.proposals import proposal_description
from poise.pareto import non_dominated
from proposer.selection import candidate_parents, metric_vectors, seed_mean

Tier = Literal["pareto", "complementary", "exploratory"]
TIERS: tuple[Tier, ...] = ("pareto", "complementary", "exploratory")
PER_TIER = 3
MAX_PARENT_REFLECTION_CHARS = 3000  # the parent's reflection is the main evidence: keep most of it
MAX_REFERENCE_REFLECTION_CHARS = 400  # a reference's reflection is a hint: its first sentences

Utility = Callable[[Node], float | None]


class NodeSummary(Contract):
    """One archived node as a proposer needs it: its description, its scores and what its reflection said."""

    node_id: str
    name: str
    rationale: str = ""
    mechanisms: list[MechanismSpec]
    loss_agg_mode: str
    depth: int = 0
    utility: float | None = None
    overall: float | None = None
    mean_length: float | None = None
    suites: dict[str, float] = {}
    reflection: str | None = None
    diagnoses: list[str] = []
    effects: list[MechanismEffect] = []

    @property
    def mechanism_names(self) -> list[str]:
        return [spec.name for spec in self.mechanisms]

    def harmful(self) -> list[MechanismEffect]:
        """The effects that judged one of this node's own mechanisms hurt (a removed one is no longer here)."""
        names = set(self.mechanism_names)
        return [e for e in self.effects if e.effect == "hurt" and e.mechanism in names]


class Reference(Contract):
    """An archived node offered to the proposer, the tier that chose it and why."""

    tier: Tier
    reason: str
    node: NodeSummary


class LiteraturePrior(Contract):
    """A known algorithm (poise/algorithms) as a description the proposer can borrow mechanisms from."""

    name: str
    description: str
    reference: str
    mechanisms: list[MechanismSpec]


class Context(Contract):
    """Everything a proposer is shown for one parent."""

    parent: NodeSummary
    references: list[Reference] = []
    literature: list[LiteraturePrior] = []
    directive: str | None = None
    objective: Literal["overall", "length"] = "overall"

    def tier(self, tier: Tier) -> list[Reference]:
        return [r for r in self.references if r.tier == tier]

    def render(self) -> str:
        """The context as prompt text, one section per part."""
        goal = {"overall": "maximize the weighted Overall score",
                "length": "shorten responses while keeping Overall within tolerance"}[self.objective]
        lines = [f"# Objective\n{goal}." + (f" Directive: {self.directive}" if self.directive else "")]
        lines.append(f"\n# Parent {_node_heading(self.parent)}")
        lines += _node_lines(self.parent, full=True)
        for tier, title in (("pareto", "Pareto-front references"), ("complementary", "Complementary references"),
                            ("exploratory", "Exploratory references")):
            references = self.tier(tier)
            if not references:
                continue
            lines.append(f"\n# {title}")
            for reference in references:
                lines.append(f"- {_node_heading(reference.node)}. Why: {reference.reason}")
                lines += [f"  {line}" for line in _node_lines(reference.node, full=False)]
        if self.literature:
            lines.append("\n# Literature priors")
            lines += literature_lines(self.literature)
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ building


def build_context(
    parent: Node,
    nodes: Sequence[Node],
    config: RunConfig,
    *,
    utility: Utility = seed_mean,
    per_tier: int = PER_TIER,
    literature: bool = True,
) -> Context:
    """The context of `parent` over the archive `nodes` (the parent may be among them): module docstring.

    Deterministic: ties go to the higher utility, then the smaller node id."""
    if per_tier < 0:
        raise ValueError(f"per_tier must be at least 0, got {per_tier}")
    values = {n.node_id: utility(n) for n in (*nodes, parent)}
    pool = [n for n in candidate_parents(nodes, lambda n: values[n.node_id]) if n.node_id != parent.node_id]
    summary = summarize_node(parent, values[parent.node_id], MAX_PARENT_REFLECTION_CHARS)
    taken: set[str] = set()
    references: list[Reference] = []
    for tier, pick in (("pareto", _pareto), ("complementary", _complementary), ("exploratory", _exploratory)):
        available = [n for n in pool if n.node_id not in taken]
        for node, reason in itertools.islice(pick(parent, summary, available, pool, values, config), per_tier):
            taken.add(node.node_id)
            node_summary = summarize_node(node, values[node.node_id], MAX_REFERENCE_REFLECTION_CHARS)
            references.append(Reference(tier=tier, reason=reason, node=node_summary))
    return Context(parent=summary, references=references, literature=literature_priors() if literature else [],
                   directive=config.objective.directive, objective=config.objective.kind)


def summarize_node(node: Node, utility: float | None, max_reflection_chars: int) -> NodeSummary:
    proposal = node.proposal
    try:
        description = proposal_description(proposal)
        specs, mode = description.specs(), description.loss_agg_mode
    except DescriptionError:  # an LLM proposal outside the library: show it as written
        specs, mode = list(proposal.mechanisms), str(proposal.loss_agg_mode)
    evaluation, reflection = node.evaluation, node.reflection
    return NodeSummary(
        node_id=node.node_id,
        name=proposal.name,
        rationale=proposal.rationale,
        mechanisms=specs,
        loss_agg_mode=mode,
        depth=node.genealogy.depth,
        utility=_finite(utility),
        overall=evaluation.overall if evaluation else None,
        mean_length=evaluation.mean_length if evaluation else None,
        suites={name: suite.value for name, suite in evaluation.suites.items()} if evaluation else {},
        reflection=_clip(reflection.text, max_reflection_chars) if reflection else None,
        diagnoses=list(reflection.diagnoses) if reflection else [],
        effects=list(reflection.effects) if reflection else [],
    )


def mechanism_contrast(first: Sequence[str], second: Sequence[str]) -> float:
    """Jaccard distance of two mechanism-name sets: 0 for the same mechanisms, 1 for nothing shared."""
    a, b = set(first), set(second)
    return 1.0 - len(a & b) / len(a | b) if a | b else 0.0


@functools.cache
def _literature() -> tuple[LiteraturePrior, ...]:
    from poise.algorithms import REFERENCE_ALGORITHMS  # imports torch: only when priors are asked for
    from poise.description.codegen import describe_reference

    priors = []
    for name, algorithm in REFERENCE_ALGORITHMS.items():
        specs = AlgorithmDescription.from_specs(*describe_reference(name)).specs()
        priors.append(LiteraturePrior(name=name, description=algorithm.description, reference=algorithm.reference,
                                      mechanisms=specs))
    return tuple(priors)


def literature_priors() -> list[LiteraturePrior]:
    """The reference algorithms (GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, GSPO, GMPO, CISPO) as descriptions."""
    return list(_literature())


# ---------------------------------------------------------------------------------------------- tiers

# A tier's picker: (parent, its summary, nodes not yet in a tier, every candidate but the parent, utilities,
# config) -> (node, reason) in order of preference, lazily: only the first per_tier are asked for.
Pick = Iterator[tuple[Node, str]]


def _by_utility(nodes: Sequence[Node], values: dict[str, float | None]) -> list[Node]:
    return sorted(nodes, key=lambda n: (-(values.get(n.node_id) or -math.inf), n.node_id))


def _pareto(parent: Node, summary: NodeSummary, pool: Sequence[Node], candidates: Sequence[Node],
            values: dict[str, float | None], config: RunConfig) -> Pick:
    """Non-dominated nodes over per-suite scores (and −length), computed over every candidate and the parent."""
    if not pool:
        return
    everyone = [*candidates, parent] if parent.evaluation is not None else list(candidates)
    vectors = metric_vectors(everyone, lambda n: values.get(n.node_id), config.objective)
    available = {n.node_id for n in pool}
    rows = {id(node): row for node, row, front in zip(everyone, vectors, non_dominated(vectors), strict=True)
            if front and node.node_id in available}
    on_front = [node for node in everyone if id(node) in rows]
    best_at = {}
    suites = sorted(set.intersection(*(set(n.evaluation.suites) for n in everyone)))
    for column, suite in enumerate(suites):
        best_at[suite] = float(np.max(vectors[:, column]))
    for node in _by_utility(on_front, values):
        row = rows[id(node)]
        leads = [suite for column, suite in enumerate(suites) if row[column] >= best_at[suite]]
        objectives = f"per-suite scores ({', '.join(suites)})" if suites else "utility"
        if config.objective.kind == "length":
            objectives += " and mean length"
        reason = f"non-dominated over {objectives}"
        if leads:
            reason += f"; best in the archive on {', '.join(leads)}"
        reason += f"; utility {_number(values.get(node.node_id))} vs the parent's {_number(summary.utility)}."
        yield node, reason


def _complementary(parent: Node, summary: NodeSummary, pool: Sequence[Node], candidates: Sequence[Node],
                   values: dict[str, float | None], config: RunConfig) -> Pick:
    """Good nodes with the most different mechanism sets."""
    if not pool:
        return
    good_bar = float(np.median([values[n.node_id] for n in candidates]))
    ours = set(summary.mechanism_names)
    scored = []
    for node in pool:
        if values[node.node_id] < good_bar:
            continue
        theirs = _mechanism_names(node)
        contrast = mechanism_contrast(sorted(ours), theirs)
        if contrast > 0:
            scored.append((contrast, node, theirs))
    scored.sort(key=lambda item: (-item[0], -(values.get(item[1].node_id) or -math.inf), item[1].node_id))
    for contrast, node, theirs in scored:
        has = [name for name in theirs if name not in ours]
        lacks = [name for name in summary.mechanism_names if name not in theirs]
        reason = (f"structural contrast {contrast:.2f} (Jaccard distance of mechanisms) among nodes at or above the "
                  f"median utility {good_bar:.3f}: it has {', '.join(has) or 'nothing new'}"
                  f"{'; lacks ' + ', '.join(lacks) if lacks else ''}; utility {_number(values.get(node.node_id))}.")
        yield node, reason


def _exploratory(parent: Node, summary: NodeSummary, pool: Sequence[Node], candidates: Sequence[Node],
                 values: dict[str, float | None], config: RunConfig) -> Pick:
    """The best nodes outside the parent's lineage, one per branch of the root first."""
    ancestors = set(parent.genealogy.ancestors)
    outside = [n for n in pool if n.node_id not in ancestors and parent.node_id not in n.genealogy.ancestors]
    first, rest, branches = [], [], set()
    for node in _by_utility(outside, values):
        branch = _branch(node)
        (rest if branch in branches else first).append(node)
        branches.add(branch)
    ours = set(summary.mechanism_names)
    for node in first + rest:
        new = [name for name in _mechanism_names(node) if name not in ours]
        reason = (f"outside the parent's lineage (branch {_branch(node)}, depth {node.genealogy.depth}); utility "
                  f"{_number(values.get(node.node_id))}; mechanisms the parent lacks: {', '.join(new) or 'none'}.")
        yield node, reason


def _branch(node: Node) -> str:
    """The child of the root this node descends from (itself at depth 1; the root is its own branch)."""
    ancestors = node.genealogy.ancestors
    return ancestors[1] if len(ancestors) > 1 else node.node_id


def _mechanism_names(node: Node) -> list[str]:
    try:
        return proposal_description(node.proposal).names
    except DescriptionError:
        return [spec.name for spec in node.proposal.mechanisms]


# -------------------------------------------------------------------------------------------- wording


def specs_text(specs: Sequence[MechanismSpec]) -> str:
    """"clip:symmetric(clip_ratio=0.2), agg:token-mean"."""
    def one(spec: MechanismSpec) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in spec.params.items())
        return f"{spec.name}({params})" if params else spec.name

    return ", ".join(map(one, specs)) or "none"


def literature_lines(priors: Sequence[LiteraturePrior]) -> list[str]:
    """Each prior as prompt text: its name, reference and description, then its mechanisms."""
    lines = []
    for prior in priors:
        lines.append(f"- {prior.name} ({prior.reference}): {prior.description}")
        lines.append(f"  Mechanisms: {specs_text(prior.mechanisms)}")
    return lines


def _node_heading(node: NodeSummary) -> str:
    return f"{node.node_id} ({node.name}), utility {_number(node.utility)}"


def _node_lines(node: NodeSummary, full: bool) -> list[str]:
    lines = [f"Mechanisms: {specs_text(node.mechanisms)}"]
    if node.overall is not None:
        suites = ", ".join(f"{name} {value:.3f}" for name, value in node.suites.items())
        lines.append(f"Evaluation: Overall {node.overall:.3f}, mean length {node.mean_length:.1f}"
                     f"{'; ' + suites if suites else ''}")
    if full and node.rationale:
        lines.append(f"Rationale: {node.rationale}")
    if node.reflection:
        lines.append(f"Reflection: {node.reflection}")
    if node.diagnoses:
        lines.append(f"Diagnoses: {', '.join(node.diagnoses)}")
    if full:
        lines += [f"Effect: {e.mechanism} {e.effect} (confidence {e.confidence:.2f}): {e.evidence}"
                  for e in node.effects]
    return lines


def _number(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


__all__ = [
    "PER_TIER",
    "TIERS",
    "Context",
    "LiteraturePrior",
    "NodeSummary",
    "Reference",
    "build_context",
    "literature_lines",
    "literature_priors",
    "mechanism_contrast",
    "specs_text",
    "summarize_node",
]
