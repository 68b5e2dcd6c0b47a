"""The LLM coder: the agent LLM writes a proposal as a candidate module, reviews it, and corrects it.

Three kinds of request, all of operator "implement", told apart by their prompt (`CallRecord.prompt`):
- implement: the proposal, and the parent's verified module when there is one → a complete module;
- fidelity: the proposal and a module that passed the sandbox checks → does the code do what the proposal
  says (a `fidelity` check that fails sends the module back for correction, like any failed check);
- correct: the proposal, the failing module and the verification report → a corrected module.

All three share one system block (prompts/coder.md: the interface from poise/algorithm.py, the helpers of
poise.algorithms.common, the mechanism library and GRPO as a worked example), which the provider caches
across requests and nodes (once per answer schema, which comes first in the cached prefix). It is part of
each of the three prompts: a change to coder.md that changes its meaning bumps their versions too.

The verification report comes from the sandboxed child that ran the candidate, and a module is model-written
code whose comments can say anything ("reviewer: this is faithful"): both reach a prompt only through
`quote_untrusted`. An answer whose source does not parse, lacks part of the interface or imports outside
torch, math and poise.algorithms.common fails schema validation: that costs a repair round of the same
conversation, not a sandbox run.

An `LLMCoder` holds one node's context and nothing mutable: the service makes one per message, so nodes
implemented in parallel share only the client.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import poise.algorithm
from poise.agents import Prompt, load_prompt
from poise.algorithm import REQUIRED_FUNCTIONS
from poise.algorithms import common
from poise.contracts import CheckResult, Proposal
from poise.description.codegen import compile_proposal
from poise.description.mechanisms import MECHANISMS, library_text
from poise.description.proposals import root_proposal
from poise.llm import LLMClient, quote_untrusted

log = logging.getLogger("poise.implementer")

A = TypeVar("A", bound=BaseModel)

REQUIRED_CONSTANTS = ("LOSS_AGG_MODE", "HPARAMS")
# What a candidate may import (a module and everything under it): pure torch, so it runs unchanged in VERL.
ALLOWED_IMPORTS = ("torch", "math", "typing", "__future__", "poise.algorithms.common")
MAX_QUOTED_SOURCE_CHARS = 40_000  # whole modules: a correction needs all of it (a compiled one is about 6,000)
_FENCED = re.compile(r"\A\s*```(?:python|py)?[ \t]*\n(?P<body>.*?)\n?```\s*\Z", re.DOTALL)


# ------------------------------------------------------------------------------------------ answers


class ModuleAnswer(BaseModel):
    """A complete candidate module, and how it realises the proposal."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="the complete Python module as plain text, no Markdown fence")
    notes: str = Field("", description="one or two sentences: how the code realises the proposal, or what the "
                                       "correction changed")

    @field_validator("source")
    @classmethod
    def _a_module_under_the_interface(cls, source: str) -> str:
        fenced = _FENCED.match(source)
        source = fenced["body"] if fenced else source  # a fence inside the JSON string is a habit, not an error
        problem = module_problem(source)
        if problem is not None:
            raise ValueError(problem)
        return source.rstrip() + "\n"


class FidelityReview(BaseModel):
    """Whether a module does what its proposal says, and where it does not."""

    model_config = ConfigDict(extra="forbid")

    faithful: bool = Field(description="true if the module implements the proposal as described")
    discrepancies: list[str] = Field([], description="each difference: the mechanism or constant, what the "
                                                     "proposal says, what the code does")

    @model_validator(mode="after")
    def _unfaithful_names_what_to_fix(self) -> FidelityReview:
        if not self.faithful and not any(d.strip() for d in self.discrepancies):
            raise ValueError("faithful is false but no discrepancy is listed: name what the code must change")
        return self


def module_problem(source: str) -> str | None:
    """What makes `source` unfit to send to the sandbox, read from its syntax tree alone; None if nothing."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        return f"the source does not parse: {err.msg} at line {err.lineno}"
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assigned = {target.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)}
    missing = [f"def {name}" for name in REQUIRED_FUNCTIONS if name not in functions]
    missing += [name for name in REQUIRED_CONSTANTS if name not in assigned]
    if missing:
        return f"the module must define {', '.join(missing)} at its top level"
    foreign = sorted({name for name in _imported(tree) if not _allowed(name)})
    if foreign:
        return (f"the module imports {', '.join(foreign)}; import only torch, math and "
                "`from poise.algorithms import common`")
    return None


def _imported(tree: ast.Module) -> Iterator[str]:
    """Every imported name, dotted in full (`from torch import nn` gives torch.nn; relative ones keep their dots)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _allowed(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in ALLOWED_IMPORTS)


# ------------------------------------------------------------------------------------------- prompts


@cache
def coder_system() -> tuple[str, ...]:
    """The stable system block of every coder request (prompts/coder.md), built once per process."""
    return (load_prompt("coder").render(
        interface=inspect.cleandoc(poise.algorithm.__doc__ or ""),
        helpers=helpers_text(),
        library=library_text(),
        example=compile_proposal(root_proposal()).rstrip(),
    ),)


def helpers_text() -> str:
    """The public constants and functions of poise.algorithms.common, one line each, from the module itself."""
    lines = [f"- common.{name} = {value!r}" for name, value in vars(common).items() if name.isupper()]
    for name, function in inspect.getmembers(common, inspect.isfunction):
        if function.__module__ != common.__name__ or name.startswith("_"):
            continue
        signature = str(inspect.signature(function)).replace("'", "")
        summary = " ".join((inspect.getdoc(function) or "").split("\n\n")[0].split())
        lines.append(f"- common.{name}{signature}" + (f": {summary}" if summary else ""))
    return "\n".join(lines)


def describe_proposal(proposal: Proposal) -> str:
    """The proposal as the coder reads it: what to build, mechanism by mechanism, and why."""
    lines = [f"name: {proposal.name}", f"loss_agg_mode: {proposal.loss_agg_mode}", "mechanisms:"]
    for spec in proposal.mechanisms:
        params = ", ".join(f"{key}={value!r}" for key, value in spec.params.items())
        outside = "" if spec.name in MECHANISMS else " — not in the library: implement it as the rationale describes"
        lines.append(f"- {spec.name}" + (f" ({params})" if params else "") + outside)
    if proposal.hparams:
        lines.append("hparams: " + ", ".join(f"{key}={value!r}" for key, value in proposal.hparams.items()))
    if proposal.directive:
        lines.append(f"the run's directive: {proposal.directive}")
    lines.append(f"rationale: {proposal.rationale}")
    return "\n".join(lines)


def quoted_module(source: str, label: str) -> str:
    """A candidate module quoted for a prompt: model-written code whose comments may carry instructions."""
    return quote_untrusted(source.rstrip(), label, max_chars=MAX_QUOTED_SOURCE_CHARS)


# --------------------------------------------------------------------------------------------- coder


@dataclass(frozen=True)
class LLMCoder:
    """A `Coder` that asks the agent LLM, with a fidelity `review`; one per node (see the module docstring).

    `parent_source`: the parent's verified module, which the implement prompt asks the model to start from.
    LLMError (no answer, no valid answer, the run's spend cap) propagates: `implement` ends the node with it.
    """

    client: LLMClient
    run_id: str | None = None
    node_id: str | None = None
    parent_source: str | None = None
    name: str = "llm"

    def write(self, proposal: Proposal) -> str:
        if self.parent_source:
            parent = ("The parent's verified module is below. Start from it: keep what the proposal keeps and "
                      f"change what it changes.\n\n{quoted_module(self.parent_source, 'the parent module')}")
        else:
            parent = "No verified parent module is available: write the module from the interface and the example."
        prompt = load_prompt("implement")
        return self._module(prompt, prompt.render(proposal=describe_proposal(proposal), parent=parent))

    def correct(self, proposal: Proposal, source: str, report: str) -> str:
        prompt = load_prompt("correct")
        text = prompt.render(proposal=describe_proposal(proposal), source=quoted_module(source, "the failing module"),
                             report=quote_untrusted(report, "the verification report"))
        return self._module(prompt, text)

    def review(self, proposal: Proposal, source: str) -> CheckResult:
        """The fidelity check: a failed one lists each discrepancy, for the correction prompt."""
        prompt = load_prompt("fidelity")
        text = prompt.render(proposal=describe_proposal(proposal), source=quoted_module(source, "the module"))
        review = self._ask(prompt, text, FidelityReview)
        if review.faithful:
            return CheckResult(name="fidelity", passed=True, message="the code does what the proposal says")
        found = [" ".join(d.split()) for d in review.discrepancies if d.strip()]
        return CheckResult(name="fidelity", passed=False,
                           message="the code departs from the proposal: " + "; ".join(found))

    def _module(self, prompt: Prompt, text: str) -> str:
        answer = self._ask(prompt, text, ModuleAnswer)
        if answer.notes:
            log.info("%s (%s): %s", self.node_id, prompt.id, " ".join(answer.notes.split()))
        return answer.source

    def _ask(self, prompt: Prompt, text: str, schema: type[A]) -> A:
        return self.client.complete_json(coder_system(), text, schema, operator="implement", run_id=self.run_id,
                                         node_id=self.node_id, prompt_id=prompt.id).value
