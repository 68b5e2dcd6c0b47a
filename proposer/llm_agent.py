"""Phase I with an agent LLM: the population comes from the model, and the screen LLM judges it next to the
offline gates.

    population = llm_population(client, context, config, library_only=True, node_id=work.node_id)
    report = llm_screen(parent, population, nodes, context, config, fingerprints, screener=screen_client,
                        predictor=gp, incumbent=gp.incumbent(parent), node_id=work.node_id)

(gp: the UtilityGP of proposer/selection.py, fitted on the run's nodes.)

Population. One request (prompts/propose.md, after the cached system block of `agent_system_blocks`) asks for
`config.population_size` proposals across the directions of proposer/population.py. The answer is a
`ProposalSet`; constants travel as lists of `{name, value}` pairs rather than maps, because Anthropic's
structured-output mode closes every object and could not write free keys. With the offline implementer
(`library_only`) each proposal must be a valid description of the mechanism library (poise/description/mechanisms.py)
and the schema checks it, so an unknown mechanism or a constant out of range goes back to the model as a
repair round that names the problem. With an LLM implementer new mechanism names are allowed: the coder writes
them from the rationale.

Screening. The offline gates of proposer/screening.py (consistency in the sandbox, fingerprint novelty, GP
expected improvement) run on every proposal that compiles offline; one with mechanisms outside the library
skips them, and the report says so. The screen LLM, when the run has one, then judges the survivors
(prompts/screen.md), numbered in population order, with the offline evidence in its prompt: consistency,
feasibility, novelty and expected improvement, each in [0, 1] with a reason, and a verdict. Survivors rank by
the mean of the four judgements, ties by the offline rank; without a screen LLM the compiled survivors keep
their offline rank and the others follow in population order. Every rejection keeps its stage and reason.
One population per node: a model that proposes nothing usable costs one failed node, not a loop of paid
retries.

Errors are the client's (poise.llm): LLMAnswerError, LLMCallError, BudgetExceeded, each with its requests.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from poise.agents import load_prompt
from poise.contracts import LossAggMode, MechanismSpec, Node, Proposal, Rejection, RunConfig, Scalar
from poise.description.mechanisms import (
    MECHANISMS,
    AlgorithmDescription,
    DescriptionError,
    library_text,
    validate_description,
)
from poise.description.proposals import MAX_NAME_CHARS, proposal_description
from poise.llm import LLMAnswerError, LLMClient, LLMError
from proposer.context import Context, literature_lines, specs_text
from proposer.population import DIRECTIONS
from proposer.screening import Fingerprinter, ScreenedProposal, ScreeningReport, screen_population

MAX_TOKENS = 8192  # a population of a handful of proposals with rationales fits with room to spare

# The {{mechanism_rule}} of prompts/propose.md, by implementer: part of that prompt, so a change of meaning here
# bumps its version.
LIBRARY_RULE = (
    "Use only the mechanisms of the library, with their constants inside the allowed ranges: the offline "
    "implementer compiles each proposal from the library, so an unknown name or a value out of range is sent "
    "back to you. A required family needs exactly one mechanism, an optional one at most one, and a mechanism "
    "that works only with certain others (clip:dual) needs one of them."
)
OPEN_RULE = (
    "Prefer the library's mechanisms, with their constants inside the allowed ranges. Where the evidence calls "
    "for something the library lacks, invent a mechanism: name it `family:short_name` (a family of the library, "
    "or a new word for a new kind of change), give its constants as params, and state in the rationale exactly "
    "what it computes (the formula over the batch fields, the tensor shapes). An LLM coder implements it from "
    "your description alone. Keep one mechanism per slot."
)


# ------------------------------------------------------------------------------------- answer schemas


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NamedValue(_Answer):
    """A constant by name: lists of these stand in for maps (module docstring)."""

    name: str = Field(min_length=1)
    value: Scalar


class ProposedMechanism(_Answer):
    name: str = Field(min_length=1, description='"family:short_name", e.g. "clip:clip_higher"')
    params: list[NamedValue] = Field([], description="the constants it sets; one left out keeps its default")

    def spec(self) -> MechanismSpec:
        return MechanismSpec(name=self.name, params={p.name: p.value for p in self.params})


class ProposedAlgorithm(_Answer):
    """One proposal as the model writes it."""

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="short, readable and new")
    direction: Literal[DIRECTIONS]
    rationale: str = Field(min_length=1, description="what changes from the parent and why it should help")
    mechanisms: list[ProposedMechanism] = Field(min_length=1, description="the child's complete mechanism list")
    hparams: list[NamedValue] = Field([], description="further constants; normally empty")
    loss_agg_mode: LossAggMode

    @model_validator(mode="after")
    def _one_aggregation(self) -> ProposedAlgorithm:
        for mechanism in self.mechanisms:
            if mechanism.name.startswith("agg:") and mechanism.name != f"agg:{self.loss_agg_mode}":
                raise ValueError(f"mechanism {mechanism.name} contradicts loss_agg_mode {self.loss_agg_mode}; "
                                 "loss_agg_mode sets the aggregation, so leave agg: mechanisms out")
        return self

    def own_specs(self) -> list[MechanismSpec]:
        """The mechanisms but the aggregation, which loss_agg_mode states."""
        return [m.spec() for m in self.mechanisms if not m.name.startswith("agg:")]

    def specs(self) -> list[MechanismSpec]:
        """The mechanisms with the agg slot filled from loss_agg_mode (as proposal_description does)."""
        return [*self.own_specs(), MechanismSpec(name=f"agg:{self.loss_agg_mode}")]

    def hparam_values(self) -> dict[str, Scalar]:
        return {p.name: p.value for p in self.hparams}

    def proposal(self, generator: str, directive: str | None, parent_id: str) -> Proposal:
        """The proposal; a description of the library is written the way the offline proposers write theirs
        (every constant on its mechanism, the agg mechanism listed), anything else as the model wrote it."""
        common = {"name": self.name, "rationale": f"Direction: {self.direction}. {self.rationale}",
                  "directive": directive, "generator": generator, "parent_ids": [parent_id]}
        try:
            description = AlgorithmDescription.from_specs(self.specs(), self.hparam_values())
        except DescriptionError:
            return Proposal(**common, mechanisms=self.own_specs(), hparams=self.hparam_values(),
                            loss_agg_mode=self.loss_agg_mode)
        return Proposal(**common, mechanisms=description.specs(), loss_agg_mode=description.loss_agg_mode)


class LibraryAlgorithm(ProposedAlgorithm):
    """A proposal the offline implementer can compile: a valid description of the mechanism library."""

    @model_validator(mode="after")
    def _in_the_library(self) -> LibraryAlgorithm:
        problems = validate_description(self.specs(), self.hparam_values())
        if problems:
            raise ValueError("not a valid description of the mechanism library: " + "; ".join(problems))
        return self


class ProposalSet(_Answer):
    proposals: list[ProposedAlgorithm] = Field(min_length=1)


class LibraryProposalSet(ProposalSet):
    proposals: list[LibraryAlgorithm] = Field(min_length=1)


class Judgement(_Answer):
    score: float = Field(ge=0.0, le=1.0, description="1 is best")
    reason: str = Field(min_length=1, description="one line")


JUDGEMENTS = ("consistency", "feasibility", "novelty", "expected_improvement")


class ProposalVerdict(_Answer):
    proposal: int = Field(ge=1, description="the candidate's number")
    consistency: Judgement
    feasibility: Judgement
    novelty: Judgement
    expected_improvement: Judgement
    verdict: Literal["keep", "reject"]

    @property
    def score(self) -> float:
        """The mean of the four judgements: the screen's ranking of the candidates it keeps."""
        return sum(getattr(self, name).score for name in JUDGEMENTS) / len(JUDGEMENTS)

    def weakest(self) -> str:
        """The lowest judgement and its reason, for a rejection: "feasibility 0.20: needs a value network"."""
        name = min(JUDGEMENTS, key=lambda n: getattr(self, n).score)
        judgement: Judgement = getattr(self, name)
        return f"{name} {judgement.score:.2f}: {' '.join(judgement.reason.split())}"


class ScreenSet(_Answer):
    verdicts: list[ProposalVerdict]

    count: ClassVar[int | None] = None  # set by `judging`

    @classmethod
    def judging(cls, count: int) -> type[ScreenSet]:
        """This schema for `count` candidates: each judged exactly once, so a gap is repaired, not guessed."""
        return type(cls.__name__, (cls,), {"count": count, "__module__": __name__})

    @model_validator(mode="after")
    def _each_candidate_once(self) -> ScreenSet:
        if self.count is None:
            return self
        numbers = [v.proposal for v in self.verdicts]
        missing = [n for n in range(1, self.count + 1) if n not in numbers]
        extra = sorted({n for n in numbers if n > self.count or numbers.count(n) > 1})
        if missing or extra:
            raise ValueError(f"give exactly one verdict for each candidate 1 to {self.count}: missing {missing}, "
                             f"unknown or repeated {extra}")
        return self


# ------------------------------------------------------------------------------------------- prompts


def agent_system_blocks(context: Context) -> list[str]:
    """The stable system block (prompts/agent_system.md): the interface, the library and the literature priors,
    the same for every request of a run, so the provider caches it."""
    system = load_prompt("agent_system")
    return [system.render(library=library_text(), literature="\n".join(literature_lines(context.literature)))]


def _context_text(context: Context) -> str:
    """The per-request context: everything `render` shows except the priors, which are in the system block."""
    return context.model_copy(update={"literature": []}).render()


# ---------------------------------------------------------------------------------------- population


def llm_population(client: LLMClient, context: Context, config: RunConfig, *, library_only: bool,
                   node_id: str | None = None) -> list[Proposal]:
    """Up to `config.population_size` proposals from the model, children of `context.parent`, with distinct
    names (none the parent's), `generator` the model's id; LLMError when no valid answer came back."""
    prompt = load_prompt("propose")
    text = prompt.render(context=_context_text(context), size=config.population_size,
                         mechanism_rule=LIBRARY_RULE if library_only else OPEN_RULE)
    schema = LibraryProposalSet if library_only else ProposalSet
    answer, _ = client.complete_json(agent_system_blocks(context), text, schema, operator="propose",
                                     max_tokens=MAX_TOKENS, run_id=config.run_id, node_id=node_id, prompt_id=prompt.id)
    population: list[Proposal] = []
    names = {context.parent.name}
    for item in answer.proposals[: config.population_size]:
        proposal = item.proposal(client.name, context.directive, context.parent.node_id)
        name = proposal.name
        while name in names:
            name += "'"
        names.add(name)
        population.append(proposal.model_copy(update={"name": name}))
    return population


# ----------------------------------------------------------------------------------------- screening


def llm_screen(
    parent: Node,
    proposals: Sequence[Proposal],
    nodes: Sequence[Node],
    context: Context,
    config: RunConfig,
    fingerprinter: Fingerprinter,
    *,
    screener: LLMClient | None = None,
    predictor: Any = None,
    incumbent: float = 0.0,
    node_id: str | None = None,
) -> ScreeningReport:
    """Screen an LLM population (module docstring): the offline gates where a proposal compiles, then the screen
    LLM's verdicts if `screener` is given. `predictor` and `incumbent` are screen_population's."""
    started = time.monotonic()
    compiled, skipped = [], []
    for proposal in proposals:
        try:
            proposal_description(proposal)
            compiled.append(proposal)
        except DescriptionError as err:
            skipped.append(ScreenedProposal(proposal=proposal, skipped=_not_compiled(proposal, err), rank=0))
    offline = screen_population(parent, compiled, nodes, fingerprinter, predictor=predictor, incumbent=incumbent,
                                kappa=config.weights.kappa)
    passed = {c.proposal.name: c for c in [*offline.ranked, *skipped]}  # offline rank order, the skipped last
    position = {name: index for index, name in enumerate(passed)}
    ranked = list(passed.values())
    rejections = list(offline.rejections)
    if screener is not None and passed:
        candidates = [passed[p.name] for p in proposals if p.name in passed]  # numbered in population order
        kept = []
        for candidate, verdict in zip(candidates, _judge(screener, context, candidates, config, node_id), strict=True):
            if verdict.verdict == "reject":
                rejections.append(Rejection(proposal_name=candidate.proposal.name, stage="llm_screen",
                                            reason=verdict.weakest()))
            else:
                kept.append(candidate.model_copy(update={"llm_score": verdict.score}))
        ranked = sorted(kept, key=lambda c: (-c.llm_score, position[c.proposal.name]))
    order = {proposal.name: index for index, proposal in enumerate(proposals)}
    rejections.sort(key=lambda r: order.get(r.proposal_name, len(order)))
    return ScreeningReport(
        parent_id=parent.node_id, acquisition=offline.acquisition, threshold=offline.threshold,
        ranked=[c.model_copy(update={"rank": rank}) for rank, c in enumerate(ranked, 1)],
        rejections=rejections, wall_s=time.monotonic() - started)


def _not_compiled(proposal: Proposal, err: DescriptionError) -> str:
    new = [spec.name for spec in proposal.mechanisms if spec.name not in MECHANISMS]
    if new:
        return f"new mechanisms {', '.join(new)} (the LLM coder implements them)"
    return f"its description does not compile offline ({err.problems[0]}); the LLM coder implements it"


def _judge(screener: LLMClient, context: Context, candidates: Sequence[ScreenedProposal], config: RunConfig,
           node_id: str | None) -> list[ProposalVerdict]:
    """The screen LLM's verdicts, one per candidate in order."""
    prompt = load_prompt("screen")
    text = prompt.render(context=_context_text(context), count=len(candidates),
                         proposals="\n\n".join(_candidate_text(n, c) for n, c in enumerate(candidates, 1)))
    answer, _ = screener.complete_json(agent_system_blocks(context), text, ScreenSet.judging(len(candidates)),
                                       operator="screen", max_tokens=MAX_TOKENS, run_id=config.run_id,
                                       node_id=node_id, prompt_id=prompt.id)
    by_number = {verdict.proposal: verdict for verdict in answer.verdicts}
    return [by_number[number] for number in range(1, len(candidates) + 1)]


def _candidate_text(number: int, candidate: ScreenedProposal) -> str:
    proposal = candidate.proposal
    lines = [f"## Candidate {number}: {proposal.name}",
             f"Mechanisms: {specs_text(proposal.mechanisms)}; loss_agg_mode {proposal.loss_agg_mode}"]
    if proposal.hparams:
        lines.append(f"Further constants: {', '.join(f'{k}={v!r}' for k, v in proposal.hparams.items())}")
    lines.append(f"Rationale: {proposal.rationale}")
    if candidate.skipped is not None:
        lines.append(f"Offline screening: not run, {candidate.skipped}.")
        return "\n".join(lines)
    evidence = ["passed the sandbox check of the interface"]
    nearest, distance = candidate.nearest_id, candidate.distance
    if nearest is not None and distance is not None:
        evidence.append(f"nearest archived node {nearest} at fingerprint distance {distance:.3g}")
    mean, std = candidate.predicted_mean, candidate.predicted_std
    if mean is not None and std is not None:
        evidence.append(f"GP predicted descendant gain {mean:+.3g} ± {std:.3g} "
                        f"(expected improvement {candidate.expected_improvement:.3g})")
    lines.append(f"Offline screening: {'; '.join(evidence)}.")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- errors


def failure_reason(err: LLMError) -> str:
    """One line for the node's failure. The client's own message already names the model, the operator and what
    to do, except for an answer that never validated, whose first problem is further down; this puts it first:
    "propose LLM anthropic:claude-sonnet-4-5 gave no valid answer after 3 answers: proposals.0: ..."."""
    last = err.calls[-1] if err.calls else None
    if isinstance(err, LLMAnswerError) and last is not None and last.error:
        problems = last.error.splitlines()
        first = next((line.removeprefix("- ") for line in problems if line.startswith("- ")), problems[0])
        return (f"{last.operator} LLM {last.provider}:{last.model} gave no valid answer after {last.attempt} "
                f"answers: {first}")
    return str(err).splitlines()[0]


__all__ = [
    "JUDGEMENTS",
    "LibraryProposalSet",
    "ProposalSet",
    "ProposalVerdict",
    "ScreenSet",
    "agent_system_blocks",
    "failure_reason",
    "llm_population",
    "llm_screen",
]
