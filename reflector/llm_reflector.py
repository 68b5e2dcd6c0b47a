"""The LLM reflector: a node's reflection r written by the agent LLM, grounded in the offline reflection.

`llm_reflect` runs the offline reflection (reflector/core.py) first and shows the model its measurements as
facts: Δz, the smoothed start/end/min/max of every training curve next to the parent's, Overall and suite
scores against the parent and the root in units of the seed noise, and the diagnosis tags. The model's part
is the explanation the thresholds cannot give: which change moved which curve, through what, what the
evidence cannot separate, and what to try next (poise/agents/prompts/reflect.md).

The answer is checked beyond its JSON shape, inside the answer schema, so a violation goes back to the model
as a repair round with the error like any schema error: every effect names a mechanism that changed from
the parent, each changed mechanism is judged once, and diagnoses are short tags.

Text that came from the candidate — its code and comments, its proposal's prose (LLM-written, and it may
quote earlier output), the training abort message from its child process — enters the prompt only through
`quote_untrusted`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from poise.agents import load_prompt
from poise.contracts import Effect, MechanismEffect, Node, Reflection, RunConfig
from poise.description.mechanisms import MECHANISMS
from poise.llm import LLMClient, LLMError, quote_untrusted
from poise.objective import describe as describe_objective
from reflector.core import (
    MAIN_CURVES,
    MechanismDelta,
    compare_overall,
    comparison_nodes,
    mechanism_delta,
    overall_noise,
    p_text,
    reflect,
    seed_overall,
    summarize_trajectory,
)

PROMPT = "reflect"

MAX_TEXT_CHARS = 4000        # eight sentences with their numbers fit in well under half of this
MAX_EVIDENCE_CHARS = 1000
MAX_SUGGESTION_CHARS = 1000
MAX_TAGS = 12
MAX_TAG_CHARS = 60           # "suite_loss_vs_root:" and a suite or mechanism name
MAX_FAILURE_CHARS = 300      # the one line a fallback reflection spends on why the LLM reflection failed

# "entropy_collapse", "suite_gain_vs_root:chain8", "hurt_by:clip:clip_higher": the offline vocabulary's shape.
Tag = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(:[A-Za-z0-9_.:+-]+)?$", max_length=MAX_TAG_CHARS)]


# ----------------------------------------------------------------------------------------------- answer


class MechanismVerdict(BaseModel):
    """The model's verdict on one changed mechanism (becomes a MechanismEffect)."""

    model_config = ConfigDict(extra="forbid")

    mechanism: str = Field(min_length=1, description="the changed mechanism's name, as the prompt writes it")
    effect: Effect
    confidence: float = Field(ge=0.0, le=1.0)
    evidence: str = Field(min_length=1, max_length=MAX_EVIDENCE_CHARS)


class ReflectionAnswer(BaseModel):
    """What the model answers; `answer_schema` binds it to one node's changed mechanisms."""

    model_config = ConfigDict(extra="forbid")

    changed: ClassVar[tuple[str, ...]] = ()

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS,
                      description="what happened and why, mechanism by mechanism, with the numbers")
    effects: list[MechanismVerdict] = Field(description="exactly one per changed mechanism")
    diagnoses: list[Tag] = Field(max_length=MAX_TAGS, description="short tags beyond the established ones")
    suggestion: str = Field(min_length=1, max_length=MAX_SUGGESTION_CHARS,
                            description="one concrete change for the next proposal, and the evidence it answers")

    @field_validator("effects")
    @classmethod
    def _one_effect_per_changed_mechanism(cls, effects: list[MechanismVerdict]) -> list[MechanismVerdict]:
        named = [effect.mechanism for effect in effects]
        problems = []
        unchanged = [name for name in named if name not in cls.changed]
        if unchanged:
            problems.append(f"{', '.join(unchanged)} did not change between the parent and this node")
        repeated = sorted({name for name in named if name in cls.changed and named.count(name) > 1})
        if repeated:
            problems.append(f"{', '.join(repeated)} judged more than once")
        missing = [name for name in cls.changed if name not in named]
        if missing:
            problems.append(f"no effect for {', '.join(missing)}")
        if problems:
            expected = ", ".join(cls.changed) if cls.changed else "none, so effects must be empty"
            raise ValueError(f"{'; '.join(problems)}. Give exactly one effect per changed mechanism: {expected}")
        return effects


def answer_schema(changed: Sequence[str]) -> type[ReflectionAnswer]:
    """The answer schema of a node whose changed mechanisms are `changed` (empty for a root)."""
    return type(ReflectionAnswer.__name__, (ReflectionAnswer,), {"changed": tuple(changed), "__module__": __name__})


def changed_mechanisms(delta: MechanismDelta | None) -> list[str]:
    """The mechanisms that get an effect: added, removed, or kept with changed params (as `judge_effects`)."""
    return [] if delta is None else [*delta.added, *delta.changed, *delta.removed]


# ------------------------------------------------------------------------------------------- reflecting


def llm_reflect(client: LLMClient, node: Node, parent: Node | None, root: Node | None, noise_sd: float | None,
                config: RunConfig, noise_seeds: int | None = None) -> Reflection:
    """The reflection of `node` by `client`'s model; raises LLMError (its `calls` attached) when there is none.

    The stored diagnoses are the offline tags followed by the model's new ones. The archive and the proposer
    count tags (failure statistics, the proposer's remedies for a diagnosed failure mode), and a count means
    the same in every run only if a tag is a measured threshold crossing whichever reflector ran; the model
    may add tags, but cannot drop or rename a measured one.
    """
    offline = reflect(node, parent, root, noise_sd=noise_sd, noise_seeds=noise_seeds)
    parent, root = comparison_nodes(node, parent, root)
    delta = mechanism_delta(node.proposal, parent.proposal) if parent is not None else None
    changed = changed_mechanisms(delta)
    prompt = load_prompt(PROMPT)
    text = prompt.render(
        objective=describe_objective(config.objective),
        node=_node_section(node, parent, root),
        change=_change_section(delta, changed),
        training=_training_section(node, parent),
        evaluation=_evaluation_section(node, parent, root, noise_sd, noise_seeds),
        diagnoses="\n".join(f"- {tag}" for tag in offline.diagnoses) or "None.",
        changed=", ".join(changed) if changed else "none changed, so `effects` is an empty list",
    )
    answer, _ = client.complete_json([], text, answer_schema(changed), operator="reflect", run_id=node.run_id,
                                     node_id=node.node_id, prompt_id=prompt.id)
    return Reflection(
        text=f"{answer.text} Suggestion for the next proposal: {answer.suggestion}",
        effects=[MechanismEffect(**verdict.model_dump()) for verdict in answer.effects],
        diagnoses=list(dict.fromkeys([*offline.diagnoses, *answer.diagnoses])),
        generator=client.name,
    )


def fallback_reflection(offline: Reflection, error: LLMError) -> Reflection:
    """The offline reflection, its text opened by one line on why the LLM reflection failed."""
    lines = str(error).strip().splitlines()
    why = lines[0] if lines else type(error).__name__
    why = why if len(why) <= MAX_FAILURE_CHARS else why[: MAX_FAILURE_CHARS - 1] + "…"
    note = f"LLM reflection failed ({type(error).__name__}: {why}); this is the offline reflection."
    return offline.model_copy(update={"text": f"{note} {offline.text}"})


# --------------------------------------------------------------------------------------- prompt sections


def _node_section(node: Node, parent: Node | None, root: Node | None) -> str:
    lineage = ", ".join(f"{role} {other.node_id}" for role, other in (("parent", parent), ("root", root)) if other)
    lines = [f"Node {node.node_id} at depth {node.genealogy.depth}"
             + (f" ({lineage})." if lineage else ", a root with no parent."), "Mechanisms:"]
    for spec in node.proposal.mechanisms:
        known = MECHANISMS.get(spec.name)
        params = ", ".join(f"{key}={value!r}" for key, value in spec.params.items())
        lines.append(f"- {spec.name}" + (f" ({params})" if params else "")
                     + (f": {known.description}" if known else ": not in the mechanism library"))
    hparams = ", ".join(f"{key}={value!r}" for key, value in node.proposal.hparams.items()) or "none"
    lines.append(f"Loss aggregation: {node.proposal.loss_agg_mode.value}. Hyperparameters: {hparams}.")
    proposal = f"Name: {node.proposal.name}\nRationale: {node.proposal.rationale}"
    lines += ["", quote_untrusted(proposal, "the proposal as its author wrote it")]
    if node.implementation is not None:
        lines += ["", quote_untrusted(node.implementation.source, "the candidate implementation")]
    return "\n".join(lines)


def _change_section(delta: MechanismDelta | None, changed: list[str]) -> str:
    if delta is None:
        return "None: the node is a root, so there is no parent to compare with."
    change = delta.describe()
    judged = f" Mechanisms to judge: {', '.join(changed)}." if changed else " No mechanism changed."
    return f"{change[:1].upper()}{change[1:]}.{judged}"


def _training_section(node: Node, parent: Node | None) -> str:
    trajectory = node.trajectory
    if trajectory is None:
        return "No training trajectory was recorded."
    wall = f", {trajectory.wall_s:.0f} s" if trajectory.wall_s else ""
    lines = [f"{len(trajectory.steps)} logged steps, protocol {trajectory.protocol}, seed {trajectory.seed}{wall}."]
    if trajectory.aborted:
        lines.append("Training was aborted before the end of the protocol.")
        if trajectory.abort_reason:
            lines.append(quote_untrusted(trajectory.abort_reason, "the training abort message"))
    ours = summarize_trajectory(trajectory)
    theirs = summarize_trajectory(parent.trajectory) if parent is not None else {}
    lines += ["", "Moving averages over a few steps (batch means are noisy step to step):", "",
              "| curve | start | end | min | max | parent start -> end |", "|---|---|---|---|---|---|"]
    for name, label in MAIN_CURVES.items():
        if f"{name}_start" not in ours:
            lines.append(f"| {label} | not logged | | | | |")
            continue
        cells = [f"{ours[f'{name}_{stat}']:.4g}" for stat in ("start", "end", "min", "max")]
        before = (f"{theirs[f'{name}_start']:.4g} -> {theirs[f'{name}_end']:.4g}" if f"{name}_start" in theirs
                  else "—")
        lines.append(f"| {label} | {' | '.join(cells)} | {before} |")
    return "\n".join(lines)


def _evaluation_section(node: Node, parent: Node | None, root: Node | None, noise_sd: float | None,
                        noise_seeds: int | None) -> str:
    evaluation = node.evaluation
    if evaluation is None:
        return "The node was not evaluated."
    references = [(role, other) for role, other in (("parent", parent), ("root", root))
                  if other is not None and other.evaluation is not None]
    differences = [compare_overall(node, other, overall_noise(evaluation, other.evaluation, noise_sd, noise_seeds))
                   for _, other in references]
    if not references:
        lines = ["There is no evaluated parent or root to compare with."]
    else:
        lines = ["An Overall difference is judged against the run's seed noise (the SD of one seed's Overall: "
                 + ", ".join(f"{d.noise.text()} vs the {role}" for (role, _), d in zip(references, differences,
                                                                                    strict=True))
                 + "): it is beyond noise only when a two-sided test gives p < 0.05, else within noise, which is "
                 "no evidence of an effect either way. A suite's difference is judged against its two CI half-widths "
                 "and the seed noise."]
    header = "| metric | node |" + "".join(f" {role} | node − {role} |" for role, _ in references)
    lines += ["", header, "|---|---|" + "---|---|" * len(references)]

    def row(label: str, ours: float | None, theirs: list[float | None]) -> str:
        cells = [f"{ours:.3f}" if ours is not None else "—"]
        for value in theirs:
            cells += ["—", "—"] if value is None or ours is None else [f"{value:.3f}", f"{ours - value:+.3f}"]
        return f"| {label} | {' | '.join(cells)} |"

    overall_cells = [f"{seed_overall(node)[0]:.3f}"]
    for (_, other), difference in zip(references, differences, strict=True):
        mean, seeds = seed_overall(other)
        overall_cells += [f"{mean:.3f}" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
                          f"{difference.delta:+.3f} ({difference.units:+.1f} noise units; "
                          f"{'beyond' if difference.beyond_noise else 'within'} noise, {p_text(difference.p)})"]
    interval = f" [{evaluation.overall_ci[0]:.3f}, {evaluation.overall_ci[1]:.3f}]" if evaluation.overall_ci else ""
    lines.append(f"| Overall{interval} | {' | '.join(overall_cells)} |")
    lines.append(row("utility", evaluation.utility, [r.evaluation.utility for _, r in references]))
    lines.append(row("mean length (tokens)", evaluation.mean_length, [r.evaluation.mean_length for _, r in references]))
    for name, suite in evaluation.suites.items():
        kind = suite.kind.value.replace("@k", f"@{suite.k}")
        label = f"{name} ({kind}, CI ±{(suite.ci_high - suite.ci_low) / 2:.3f})"
        lines.append(row(label, suite.value, [r.evaluation.suites[name].value if name in r.evaluation.suites
                                              else None for _, r in references]))
    return "\n".join(lines)
