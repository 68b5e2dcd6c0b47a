"""The implementer's core: proposal → candidate source → verification in the sandbox, with bounded correction.

A `Coder` writes the module for a proposal and, given the verification report, a corrected one. The offline
coder compiles the proposal's mechanism description (poise/description/codegen.py); when the description does not
compile it repairs the description (unknown mechanisms and parameters dropped, values clamped into range,
missing required families filled with GRPO's choice) and says what it changed; compiled code that still
fails verification cannot be repaired offline, and the node fails with the report. The LLM coder
(implementer/llm_coder.py) plugs in through the same two methods, and adds a third: a coder with
`review(proposal, source) -> CheckResult` has every module that passes the sandbox checks reviewed for
fidelity to the proposal, and an unfaithful one is corrected like a module that failed a check. An agent-LLM
error (no answer, no valid answer, the run's spend cap) ends the node's implementation with that reason.

Every attempt — its source, each check and its message — is kept in the `Implementation`, verified or not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol as TypingProtocol

from poise.algorithm import check_passed, describe_problems
from poise.contracts import (
    CheckResult,
    Implementation,
    MechanismSpec,
    Proposal,
    SandboxLimits,
    VerificationAttempt,
    VerifyPayload,
    VerifyReport,
)
from poise.description.codegen import compile_proposal
from poise.description.mechanisms import FAMILIES, MECHANISMS, DescriptionError, mechanisms_in
from poise.description.proposals import root_proposal
from poise.llm import LLMError
from poise.sandbox import run_sandboxed
from poise.sandbox_audit import attempts_in, describe_attempts
from poise.testbed.protocol import Protocol, get_protocol

log = logging.getLogger("poise.implementer")

VERIFY_MODULE = "implementer.verify_child"
SMOKE_STEPS = 2  # enough for off-policy minibatch updates and an optimizer step on the real model

Verifier = Callable[[str], list[CheckResult]]


class CodegenError(Exception):
    """The coder could not produce source for this attempt; the message says why."""


class Coder(TypingProtocol):
    """Writes and corrects a proposal's module; may also have `review(proposal, source) -> CheckResult`."""

    name: str

    def write(self, proposal: Proposal) -> str: ...

    def correct(self, proposal: Proposal, source: str, report: str) -> str | None: ...


@dataclass
class OfflineCoder:
    """Compiles the mechanism description; repairs a description that does not compile."""

    name: str = "offline"
    repairs: list[str] = field(default_factory=list)

    def write(self, proposal: Proposal) -> str:
        try:
            return compile_proposal(proposal)
        except DescriptionError as err:
            raise CodegenError(str(err)) from err

    def correct(self, proposal: Proposal, source: str, report: str) -> str | None:
        repaired, changes = repair_proposal(proposal)
        if not changes:
            return None  # the description compiles as it is: offline there is nothing else to change
        self.repairs = changes
        log.info("offline repair of %s: %s", proposal.name, "; ".join(changes))
        try:
            return compile_proposal(repaired)
        except DescriptionError as err:
            raise CodegenError(f"repair did not produce a valid description ({'; '.join(changes)}): {err}") from err


def repair_proposal(proposal: Proposal) -> tuple[Proposal, list[str]]:
    """A compilable version of `proposal` and what was changed to get it (empty: nothing needed)."""
    changes: list[str] = []
    specs: list[MechanismSpec] = []
    for spec in proposal.mechanisms:
        mechanism = MECHANISMS.get(spec.name)
        if mechanism is None:
            changes.append(f"dropped unknown mechanism {spec.name}")
            continue
        if any(m.family == mechanism.family for m in (MECHANISMS[s.name] for s in specs)):
            changes.append(f"dropped {spec.name}: its family {mechanism.family} already has a mechanism")
            continue
        params = {}
        for key, value in spec.params.items():
            if key in mechanism.params:
                params[key] = _in_range(spec.name, key, value, changes)
            else:
                changes.append(f"dropped unknown parameter {spec.name}.{key}")
        specs.append(MechanismSpec(name=spec.name, params=params))
    present = {MECHANISMS[s.name].family for s in specs}
    has_agg = "agg" in present or any(s.name.startswith("agg:") for s in specs)
    for family in FAMILIES.values():
        if family.required and family.name not in present and not (family.name == "agg" and has_agg):
            if family.name == "agg":
                continue  # compile_proposal fills agg from loss_agg_mode
            root_choice = {MECHANISMS[s.name].family: s.name for s in root_proposal().mechanisms}
            choice = root_choice.get(family.name) or mechanisms_in(family.name)[0].name
            specs.append(MechanismSpec(name=choice))
            changes.append(f"added {choice}: a {family.name} mechanism is required")
    names = {s.name for s in specs}
    for spec in list(specs):
        works_with = MECHANISMS[spec.name].works_with
        if works_with and not names & set(works_with):
            specs.remove(spec)
            changes.append(f"dropped {spec.name}: it works only with {', '.join(works_with)}")
    owners = {key: s.name for s in specs for key in MECHANISMS[s.name].params}
    hparams = {}
    for key, value in proposal.hparams.items():
        if key in owners:
            hparams[key] = _in_range(owners[key], key, value, changes)
        else:
            changes.append(f"dropped hparams[{key!r}]: no chosen mechanism uses it")
    repaired = proposal.model_copy(update={"mechanisms": specs, "hparams": hparams})
    return repaired, changes


def _in_range(mechanism: str, key: str, value, changes: list[str]):
    """`value` if the parameter allows it, else the nearest allowed value (a choice resets to the default)."""
    param = MECHANISMS[mechanism].params[key]
    if param.problem(value) is None:
        return value
    if param.choices or isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        changes.append(f"reset {mechanism}.{key}={value!r} to its default {param.default!r}")
        return param.default
    clamped = min(max(float(value), param.low), param.high)
    changes.append(f"clamped {mechanism}.{key}={value!r} to {clamped:g}")
    return clamped


def implement(proposal: Proposal, coder: Coder, verifier: Verifier, max_attempts: int) -> tuple[Implementation, str]:
    """Write and verify `proposal`, correcting up to `max_attempts` times.

    Returns the implementation (verified or not, every attempt recorded) and a one-line summary: what
    passed, or why the node must fail.
    """
    attempts: list[VerificationAttempt] = []
    source: str | None = None
    report = ""
    review = getattr(coder, "review", None)
    for number in range(1, max_attempts + 1):
        started = time.perf_counter()
        try:
            new_source = coder.write(proposal) if number == 1 else coder.correct(proposal, source or "", report)
        except CodegenError as err:
            report = str(err)
            attempts.append(VerificationAttempt(attempt=number, source=source or "", passed=False, error=report,
                                                duration_s=time.perf_counter() - started))
            continue
        except LLMError as err:
            return _ended(attempts, VerificationAttempt(attempt=number, source=source or "", passed=False,
                                                        error=f"{coder.name} coder: {err}",
                                                        duration_s=time.perf_counter() - started))
        if new_source is None:
            summary = f"{coder.name} coder cannot correct the code after attempt {number - 1}: {_first_line(report)}"
            return Implementation.from_source(source or "", attempts, verified=False), summary
        source = new_source
        checks = verifier(source)
        if review is not None and check_passed(checks):
            try:
                checks.append(review(proposal, source))
            except LLMError as err:
                return _ended(attempts, VerificationAttempt(attempt=number, source=source, passed=False, checks=checks,
                                                            error=f"{coder.name} coder: {err}",
                                                            duration_s=time.perf_counter() - started))
        passed = check_passed(checks)
        attempts.append(VerificationAttempt(attempt=number, source=source, passed=passed, checks=checks,
                                            duration_s=time.perf_counter() - started))
        if passed:
            return Implementation.from_source(source, attempts, verified=True), f"verified on attempt {number}"
        report = describe_problems(checks)
    summary = f"verification failed after {len(attempts)} attempts: {_first_line(report)}"
    return Implementation.from_source(source or "", attempts, verified=False), summary


def _ended(attempts: list[VerificationAttempt], last: VerificationAttempt) -> tuple[Implementation, str]:
    """The node ends at `last`, an attempt the coder could not go on with (no answer from the agent LLM, or no
    budget left to ask for one): unverified, with the error as the summary."""
    attempts.append(last)
    summary = f"attempt {last.attempt}: {' '.join((last.error or '').split())}"
    return Implementation.from_source(last.source, attempts, verified=False), summary


def _first_line(text: str) -> str:
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    return lines[0] if lines else "no report"


# ------------------------------------------------------------------------------------- sandboxed verify


def smoke_protocol(protocol: Protocol) -> Protocol:
    """The smoke run: the tiny protocol's batch for SMOKE_STEPS steps, on the run protocol's base checkpoint."""
    tiny = get_protocol("tiny")
    return tiny.replace(name=f"smoke-{protocol.name}", steps=SMOKE_STEPS, base_checkpoint=protocol.base_checkpoint,
                        threads=protocol.threads)


def sandbox_verifier(base_path: Path, workdir: Path, protocol: Protocol, wall_s: float = 120.0,
                     smoke: bool = True) -> Verifier:
    """A verifier that runs implementer.verify_child in the sandbox, in a fresh directory per attempt."""
    counter = iter(range(1, 1 << 30))

    def verify(source: str) -> list[CheckResult]:
        attempt_dir = workdir / f"verify-{next(counter)}"
        payload = VerifyPayload(source=source, base_path=base_path.resolve(),
                                smoke_protocol=smoke_protocol(protocol).as_dict() if smoke else None)
        run = run_sandboxed(VERIFY_MODULE, payload, attempt_dir, SandboxLimits(wall_s=wall_s),
                            threads=protocol.threads, report_type=VerifyReport, fault="implementer.verify")
        checks = list(run.result.checks) if run.ok and run.result is not None else []
        if not run.ok:
            checks.append(CheckResult(name="sandbox", passed=False, message=run.failure_reason()))
        elif not checks:
            checks.append(CheckResult(name="sandbox", passed=False, message="the verifier reported no checks"))
        attempts = attempts_in(run.events)  # blocked in the child: the candidate fails, however it went on
        if attempts:
            checks.insert(0, CheckResult(name="sandbox_attempts", passed=False, message=describe_attempts(attempts)))
        return checks

    return verify
