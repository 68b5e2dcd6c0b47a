"""Every message and document that crosses a boundary in POISE, defined once.

The archive holds one `Node` per candidate algorithm: the paper's entry e_i = (z_i, ρ_i, τ_i, y_i, r_i)
is `Proposal` (z), `Implementation` (ρ), `TrainingTrajectory` (τ), `Evaluation` (y) and `Reflection` (r),
tied to the lineage by `Genealogy`. Services talk through the `Message` subclasses below, one per bus
subject; `encode` / `decode` are the only way bytes become messages and back. Messages and stored documents
carry the contract version they were written in (`Versioned`, CONTRACT_VERSION), so that two versions of POISE can
read each other during a rolling upgrade (docs/architecture.md, "Contract versions and rolling upgrades").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

MAX_MESSAGE_BYTES = 1 << 20  # results travel on the bus; checkpoints and other large artifacts go by URI
MAX_REASON_CHARS = 200

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Scalar = bool | int | float | str  # bool first: JSON true must stay a bool, 3 an int, 3.0 a float
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class ContractError(ValueError):
    """Bytes on the bus that are not a valid message of their subject, or a message that cannot be sent."""


def validation_problems(errors: ValidationError | Sequence[Mapping[str, Any]]) -> str:
    """A pydantic validation error (or its `errors()`) as one line, every problem with where it is: "budget: Input
    should be greater than or equal to 1; bogus: Extra inputs are not permitted"."""
    listed = errors.errors() if isinstance(errors, ValidationError) else errors
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in listed)


# ---------------------------------------------------------------------------------------- contract versions
# docs/architecture.md, "Contract versions and rolling upgrades". A version is MAJOR.MINOR. A minor version only
# adds fields with defaults, so every minor version of a major reads every other; any other change is a major
# version, which reads what the major before it wrote and which that one refuses.

# 2.0: documents and messages carry schema_version (1.0 refuses it as an unknown field). 2.1: racing
# (RunSettings.seeding, docs/racing.md); the selection/reporting split and the report's arms (RunSettings.split and
# report_seeds, Evaluation.half, WorkEvaluate.half, the messages' arm, Node.reported; docs/reporting.md); early
# stopping (TrainingTrajectory.stopped_early, WorkTrain.early_stop, RunSettings.early_stop; docs/early_stopping.md);
# GPU-seconds (Cost.gpu_seconds, EvtTrained.gpu_seconds) and the run's gpu_hours_budget (docs/verl.md).
CONTRACT_VERSION = "2.1"
UNVERSIONED = "1.0"  # a document or message without schema_version: written before versions existed
VERSION_PATTERN = r"^[0-9]+\.[0-9]+$"
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]


def version_key(version: str) -> tuple[int, int]:
    """"2.10" as (2, 10): versions compare by this, not as text."""
    major, _, minor = version.partition(".")
    return int(major), int(minor)


def newest(*versions: str) -> str:
    return max(versions, key=version_key)


def unreadable(version: str) -> str | None:
    """Why this POISE cannot read what contracts `version` wrote, in words that follow "holds documents of"; None
    when it can. It reads its own major version, every minor one (an older one lacks only fields with defaults, a
    newer one's unknown fields are kept), and the major version before its own."""
    major, ours = version_key(version)[0], version_key(CONTRACT_VERSION)[0]
    if major in (ours, ours - 1):
        return None
    if major > ours:
        return (f"contracts {version}, a major version this POISE (contracts {CONTRACT_VERSION}) cannot read: "
                f"run a POISE with contracts {major}.x")
    return (f"contracts {version}, older than this POISE (contracts {CONTRACT_VERSION}) reads: only a POISE with "
            f"contracts {major}.x or {major + 1}.x reads it")


class _Kept(dict):
    """The unknown fields of a model, kept because they came in a document of a newer minor version: `version` is
    that version (None while the document around them is still being read)."""

    version: str | None = None


@dataclass
class _Reading:
    pending: int = 0  # models holding unknown fields the versioned document around them has not judged yet


_READING: ContextVar[_Reading | None] = ContextVar("poise_reading", default=None)
_newest_kept: str | None = None  # the newest version whose fields this process has kept (a cheap gate for writes)


@contextmanager
def reading() -> Iterator[None]:
    """Validate what crosses a boundary: unknown fields met inside a document or message of a newer minor version
    are kept, at any depth, rather than refused. `Versioned.model_validate` and `model_validate_json` read so by
    themselves; wrap other validation of versioned documents (a TypeAdapter) in it. An unknown field that no
    versioned document judged (one outside any) raises ContractError."""
    state = _Reading()
    token = _READING.set(state)
    try:
        yield
    finally:
        _READING.reset(token)
    if state.pending:
        raise ContractError("unknown fields outside any versioned document; a document without a version keeps none")


def _keep(model: BaseModel, unknown: dict[str, Any], version: str | None) -> None:
    kept = _Kept(unknown)
    object.__setattr__(model, "__pydantic_extra__", kept)
    if version is not None:
        _kept_as(kept, version)


def _kept_as(kept: _Kept, version: str) -> None:
    global _newest_kept
    kept.version = version
    if _newest_kept is None or version_key(version) > version_key(_newest_kept):
        _newest_kept = version


def _kept_fields(value: object, loc: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], _Kept]]:
    """Every kept set of unknown fields in `value` (a contract, or lists and dicts of them), with where it is."""
    if isinstance(value, BaseModel):
        if type(value.__pydantic_extra__) is _Kept:
            yield loc, value.__pydantic_extra__
        for name, field in value.__dict__.items():
            yield from _kept_fields(field, (*loc, name))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _kept_fields(item, (*loc, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _kept_fields(item, (*loc, key))


def _newer(version: str) -> bool:
    return version_key(version) > version_key(CONTRACT_VERSION)


class Contract(BaseModel):
    """Base of every contract: unknown fields are an error, and nan/inf survive JSON.

    The one exception: inside a document or message of a newer minor version (`Versioned`), an unknown field, at any
    depth, is the newer version's data. It is kept, unread, and written back unchanged with the rest. Anywhere
    else (this version's documents and messages, an API body, a sandboxed child's report) it is the error
    pydantic's extra="forbid" gives.

    A diverging training curve is data, not an error, so floats serialize as the JSON constants
    NaN / Infinity (which Python's `json` and pydantic both read back) instead of null.
    """

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    @model_validator(mode="after")
    def _unknown_fields(self) -> Contract:
        unknown = self.__pydantic_extra__
        if not unknown or type(unknown) is _Kept:  # _Kept: a model passed in as it is, judged when it was read
            return self
        own = getattr(self, "schema_version", None) if isinstance(self, Versioned) else None
        if own is not None and _newer(own):
            _keep(self, unknown, own)
            return self
        state = _READING.get()
        if state is None:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type="extra_forbidden", loc=(name,), input=value) for name, value in unknown.items()])
        _keep(self, unknown, None)  # the versioned document around it decides (Versioned._judge_unknown_fields)
        state.pending += 1
        return self


class Versioned(Contract):
    """What may meet another version of POISE: a bus `Message`, a stored `Node` or `RunConfig`, and the `RunCounters`
    workers read over the archive's API.

    `schema_version` is the contract version it was written in: CONTRACT_VERSION when this code makes one from
    Python values, UNVERSIONED when JSON without one is read (written before versions existed; a store that reads
    plain dicts says so itself). A major version this POISE cannot read is refused with the reason (`unreadable`).
    Read (`reading`), a newer minor version's unknown fields are kept (`Contract`). It is written as at least this
    version (a document read in an older one is written back in this one), or as the newer version whose fields it
    holds: the one it was read in, or the one whose kept fields were moved into it (an evaluation of a newer event
    stored on a node).
    """

    # None: absent; validate_default lets _read_version tell JSON from before versions from a model made here
    schema_version: Version = Field(None, validate_default=True,  # type: ignore[assignment]
                                    description="the contract version it was written in (JSON without one: "
                                    f"{UNVERSIONED}, written before versions existed)")

    @field_validator("schema_version", mode="before")
    @classmethod
    def _read_version(cls, version: object, info: ValidationInfo) -> object:
        if version is None:
            return UNVERSIONED if info.mode == "json" else CONTRACT_VERSION
        if isinstance(version, str) and re.match(VERSION_PATTERN, version) is not None:
            problem = unreadable(version)
            if problem is not None:
                raise ValueError(f"a {cls.__name__} of {problem}")
        return version  # a malformed one fails the pattern

    @model_validator(mode="after")
    def _judge_unknown_fields(self) -> Versioned:
        """Keep the unknown fields met inside this document when it is of a newer minor version; else refuse them,
        each where it is."""
        state = _READING.get()
        if state is None or not state.pending:
            return self
        state.pending = 0
        pending = [(loc, kept) for loc, kept in _kept_fields(self) if kept.version is None]
        if not _newer(self.schema_version):
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type="extra_forbidden", loc=(*loc, name), input=value)
                for loc, kept in pending for name, value in kept.items()])
        for _, kept in pending:
            _kept_as(kept, self.schema_version)
        return self

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> Any:
        token = _READING.set(_Reading())  # reading(), less its last check: this document judges what it holds
        try:
            return super().model_validate(obj, **options)
        finally:
            _READING.reset(token)

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **options: Any) -> Any:
        token = _READING.set(_Reading())
        try:
            return super().model_validate_json(json_data, **options)
        finally:
            _READING.reset(token)

    @field_serializer("schema_version")
    def _written_version(self, version: str) -> str:
        written = version if version == CONTRACT_VERSION else newest(version, CONTRACT_VERSION)
        if _newest_kept is not None and version_key(_newest_kept) > version_key(written):  # else nothing can be newer
            kept = [kept.version for _, kept in _kept_fields(self) if kept.version is not None]
            written = newest(written, *kept)
        return written


# ---------------------------------------------------------------------------------------------- enums


class NodeStatus(StrEnum):
    """Where a node stands in the pipeline propose → implement → train → evaluate → reflect."""

    PROPOSED = "proposed"
    IMPLEMENTED = "implemented"
    TRAINED = "trained"
    EVALUATED = "evaluated"
    REFLECTED = "reflected"
    FAILED = "failed"


PIPELINE: tuple[NodeStatus, ...] = (
    NodeStatus.PROPOSED,
    NodeStatus.IMPLEMENTED,
    NodeStatus.TRAINED,
    NodeStatus.EVALUATED,
    NodeStatus.REFLECTED,
)
NEXT_STATUS: dict[NodeStatus, NodeStatus] = dict(zip(PIPELINE, PIPELINE[1:], strict=False))
TERMINAL_STATUSES: frozenset[NodeStatus] = frozenset({NodeStatus.REFLECTED, NodeStatus.FAILED})


def can_transition(current: NodeStatus, new: NodeStatus) -> bool:
    """True if a node may move from `current` to `new`: one step forward, or to failed from non-terminal.

    A repeat (current == new) is not a transition; the archive ignores it as a redelivered event.
    """
    if current in TERMINAL_STATUSES:
        return False
    return new == NodeStatus.FAILED or NEXT_STATUS.get(current) == new


class Phase(StrEnum):
    """A phase of the closed loop, as named on the bus and in costs and failures."""

    PROPOSE = "propose"
    IMPLEMENT = "implement"
    TRAIN = "train"
    EVALUATE = "evaluate"
    REFLECT = "reflect"


class LossAggMode(StrEnum):
    """How the per-token loss is reduced to a scalar; the names are VERL's `loss_agg_mode` values."""

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"


DEFAULT_LOSS_AGG_MODE = LossAggMode.TOKEN_MEAN


class KLEstimator(StrEnum):
    """The `kl_estimator` hyperparameter: a per-token estimate of KL(pi || pi_ref) (Schulman 2020); the formulas,
    and VERL's other names for them, are in poise/algorithms/common.py (kl_penalty)."""

    K1 = "k1"
    ABS = "abs"
    K2 = "k2"
    K3 = "k3"


DEFAULT_KL_ESTIMATOR = KLEstimator.K3.value


class MetricKind(StrEnum):
    """pass@k sampled at temperature 1.0 (hard suites) or greedy acc@1 (the rest)."""

    PASS_AT_K = "pass@k"
    ACC_AT_1 = "acc@1"


class Effect(StrEnum):
    """What a reflection concludes a mechanism did to the node, relative to its parent."""

    HELPED = "helped"
    HURT = "hurt"
    NEUTRAL = "neutral"
    CONTEXT_DEPENDENT = "context_dependent"


# ------------------------------------------------------------------------------------------ genealogy

ROOT_ID = "n000"  # the node id of every run's root (GRPO); children are numbered n001, n002, ...
ROOT_NAME = "grpo"  # the reference algorithm (poise/algorithms) every run's root is


def node_number(node_id: str) -> int:
    """The number of a node id "n012" (12); -1 for an id not of that form."""
    return int(node_id[1:]) if node_id[:1] == "n" and node_id[1:].isdigit() else -1


class Genealogy(Contract):
    """A node's place in the run's lineage. `ancestors` holds every node on a path to a root."""

    run_id: Id
    node_id: Id
    parent_ids: list[Id] = []
    depth: int = Field(0, ge=0)
    ancestors: list[Id] = []

    @model_validator(mode="after")
    def _check_lineage(self) -> Genealogy:
        if (self.depth == 0) != (not self.parent_ids):
            raise ValueError(
                f"node {self.node_id}: depth {self.depth} with {len(self.parent_ids)} parents; "
                "a root has depth 0 and no parents, every other node has both"
            )
        if self.node_id in self.parent_ids or self.node_id in self.ancestors:
            raise ValueError(f"node {self.node_id} is listed among its own parents or ancestors")
        missing = [p for p in self.parent_ids if p not in self.ancestors]
        if missing:
            raise ValueError(f"node {self.node_id}: parents {missing} are missing from its ancestors")
        return self

    @classmethod
    def child(cls, node_id: str, parents: list[Genealogy]) -> Genealogy:
        """The genealogy of a new node bred from `parents` (all of one run)."""
        if not parents:
            raise ValueError(f"node {node_id}: a child needs at least one parent")
        if len({p.run_id for p in parents}) > 1:
            raise ValueError(f"node {node_id}: parents come from different runs")
        ancestors = list(dict.fromkeys([a for p in parents for a in (*p.ancestors, p.node_id)]))
        return cls(
            run_id=parents[0].run_id,
            node_id=node_id,
            parent_ids=[p.node_id for p in parents],
            depth=1 + max(p.depth for p in parents),
            ancestors=ancestors,
        )


# -------------------------------------------------------------------------------------- z: proposal


class MechanismSpec(Contract):
    """One named building block of an algorithm (e.g. "analytic_variance_scaling") and its constants."""

    name: str = Field(min_length=1)
    params: dict[str, Scalar] = {}


ScreeningStage = Literal["consistency", "novelty", "llm_screen"]  # llm_screen: the screen LLM's verdict


class Rejection(Contract):
    """A proposal screened out before training (proposer/screening.py): at which gate, why, and the archived
    node it is too close to."""

    proposal_name: str
    stage: ScreeningStage
    reason: str
    nearest_id: str | None = None
    distance: float | None = None


class ScreeningMerits(Contract):
    """What ranked a screened proposal: the surrogate's prediction and expected improvement, the screen LLM's
    score, its nearest archived node, or why the offline gates were skipped (an LLM coder implements it)."""

    name: str
    expected_improvement: float = 0.0
    predicted_mean: float | None = None
    predicted_std: float | None = None
    llm_score: float | None = None
    nearest_id: str | None = None
    distance: float | None = None
    skipped: str | None = None

    def summary(self) -> str:
        """"EI 0.012", "LLM screen 0.81, EI 0.012", "LLM screen 0.70, not compiled offline"."""
        offline = f"EI {self.expected_improvement:.3g}" if self.skipped is None else "not compiled offline"
        return offline if self.llm_score is None else f"LLM screen {self.llm_score:.2f}, {offline}"


class ScreeningSummary(Contract):
    """Phase I screening of the population a proposal won (proposer/screening.py), kept on the proposal: the
    parent, how survivors were ranked, what ranked the winner first, every rejected proposal with its gate and
    reason, the proposals the offline gates skipped, who screened, and the parent's utility."""

    parent_id: Id
    acquisition: str = Field(description='how survivors were ranked: "ei" or "ucb"')
    threshold: float = Field(description="the fingerprint distance under which a proposal is a near duplicate")
    winner: ScreeningMerits | None = Field(description="None only when nothing passed (no proposal carries that)")
    passed: int = Field(ge=0, description="proposals that passed every gate")
    rejections: list[Rejection] = []
    skipped: dict[str, str] = Field({}, description="proposal name -> why the offline gates did not run")
    screened_by: str | None = Field(None, description='e.g. "screened by the offline gates"')
    parent_utility: float | None = None

    def summary(self) -> str:
        """One line for logs and lists: the winner, each rejection's reason, the proposals the offline gates
        skipped, who screened and the parent's utility."""
        head = f"best {self.winner.name} ({self.winner.summary()})" if self.winner else "no proposal passed screening"
        parts = [f"parent {self.parent_id}: {head}, {self.passed} passed"]
        if self.rejections:
            parts.append("rejected " + "; ".join(f"{r.proposal_name}: {r.stage}: {r.reason}" for r in self.rejections))
        if self.skipped:
            skipped = "; ".join(f"{name}: {why}" for name, why in self.skipped.items())
            parts.append(f"offline gates skipped for {skipped}")
        if self.screened_by:
            parts.append(self.screened_by)
        if self.parent_utility is not None:
            parts.append(f"parent utility {self.parent_utility:.4f}")
        return "; ".join(parts)


class LegacyScreening(Contract):
    """Screening as archives written before it was typed hold it: one line of text (ScreeningSummary.summary's
    form), read back as it was."""

    note: str

    def summary(self) -> str:
        return self.note


class Proposal(Contract):
    """z: what the candidate algorithm is and why, as produced by the proposer."""

    name: str = Field(min_length=1)
    rationale: str
    mechanisms: list[MechanismSpec] = []
    hparams: dict[str, Scalar] = {}
    loss_agg_mode: LossAggMode = DEFAULT_LOSS_AGG_MODE
    directive: str | None = None
    generator: str = Field(min_length=1, description='"offline" or the id of the model that wrote it')
    parent_ids: list[Id] = []
    screening: ScreeningSummary | LegacyScreening | None = Field(
        None, description="Phase I screening: the winner, and every rejected proposal of its population with the "
        "stage and reason (LegacyScreening: the line of text an archive written before this was typed holds)")

    @field_validator("screening", mode="before")
    @classmethod
    def _read_legacy_screening(cls, screening: object) -> object:
        return LegacyScreening(note=screening) if isinstance(screening, str) else screening


# -------------------------------------------------------------------------------- ρ: implementation


class CheckResult(Contract):
    """The outcome of one verification check (shape, finiteness, consistency with the proposal …)."""

    name: str
    passed: bool
    message: str = ""


class VerificationAttempt(Contract):
    """One round of the bounded correction loop: the code tried and what the checks said about it."""

    attempt: int = Field(ge=1)
    source: str
    passed: bool
    checks: list[CheckResult] = []
    duration_s: NonNegative = 0.0
    error: str | None = None


class Implementation(Contract):
    """ρ: the candidate's module source under the shared algorithm interface, and how it was verified."""

    source: str
    source_sha256: Sha256Hex
    attempts: list[VerificationAttempt] = []
    verified: bool

    @model_validator(mode="after")
    def _check_sha256(self) -> Implementation:
        if self.source_sha256 != sha256_hex(self.source):
            raise ValueError("source_sha256 does not match the source; build with Implementation.from_source")
        return self

    @classmethod
    def from_source(
        cls, source: str, attempts: list[VerificationAttempt] | None = None, verified: bool = False
    ) -> Implementation:
        """The implementation of `source`, its sha256 computed here."""
        attempts = attempts or []
        return cls(source=source, source_sha256=sha256_hex(source), attempts=attempts, verified=verified)


def sha256_hex(text: str) -> str:
    """The hex sha256 of utf-8 `text`; identifies candidate source code."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -------------------------------------------------------------------------------------- τ: trajectory


class TrainingStep(Contract):
    """Metrics logged at one optimizer step. None = not measured at this step; nan/inf are real values."""

    step: int = Field(ge=0)
    reward_mean: float | None = None
    format_valid_rate: float | None = None
    entropy: float | None = None
    response_length: float | None = None
    kl: float | None = None
    grad_norm: float | None = None
    clip_frac: float | None = None
    adv_mean: float | None = None
    adv_std: float | None = None
    step_time_s: float | None = None
    extra: dict[str, float] = {}


class StopCheckpoint(Contract):
    """The early-stopping rule at one checkpoint (docs/early_stopping.md): after `step` steps, the child's final
    utility minus its parent's is predicted as intercept + slope·gap, gap being the child's mean training reward over
    those steps minus the parent's over the same steps; the prediction's spread is the fit's residual SD widened for
    a new point (x_mean and sxx: the fit's mean gap and sum of squared deviations), with n − 2 degrees of freedom."""

    step: int = Field(ge=1, description="steps run when the rule is checked")
    intercept: float
    slope: float
    residual_sd: NonNegative
    x_mean: float
    sxx: NonNegative
    n: int = Field(ge=3, description="the (child, parent) pairs the fit used")


class EarlyStopRule(Contract):
    """Fitted parameters of the early-stopping rule for one protocol: one `StopCheckpoint` per checkpoint. A child is
    stopped at a checkpoint when P(its final utility reaches its parent's) < alpha and its partial curve is below its
    parent's (docs/early_stopping.md)."""

    protocol: str
    steps: int = Field(ge=1, description="the protocol's training steps the rule was fitted for")
    metric: str = Field("reward_mean", description="the TrainingStep curve the gap is measured on")
    alpha: Unit = 0.05
    checkpoints: list[StopCheckpoint] = []
    source: str = Field("", description="what it was fitted on (runs, pairs), for the record")


class EarlyStopPlan(Contract):
    """What a trainer needs to stop a child early (WorkTrain.early_stop): the rule, the parent's curve and score,
    and the run's seed noise (the SD of the root's seed scores; the prediction's spread never goes below √2 of it)."""

    rule: EarlyStopRule
    parent_id: Id
    parent_curve: list[float | None]
    parent_utility: float
    noise_sd: NonNegative | None = None


class EarlyStop(Contract):
    """A training the trainer stopped early (TrainingTrajectory.stopped_early): where, and why."""

    steps_run: int = Field(ge=1)
    steps_planned: int = Field(ge=1)
    parent_id: Id
    parent_utility: float
    gap: float = Field(description="the child's mean training reward so far minus its parent's over the same steps")
    predicted: float = Field(description="the predicted final utility: the parent's plus the predicted difference")
    probability: Unit = Field(description="the rule's P(the child's final utility reaches its parent's)")
    reason: str


class TrainingTrajectory(Contract):
    """τ: the learning curves of one training run under a named protocol. `stopped_early`: the trainer stopped it
    at a checkpoint because it could not reach its parent (docs/early_stopping.md); it has no checkpoint."""

    protocol: str
    seed: int
    steps: list[TrainingStep] = []
    aborted: bool = False
    abort_reason: str | None = None
    checkpoint_uri: str | None = None
    wall_s: NonNegative = 0.0
    stopped_early: EarlyStop | None = None

    def curve(self, name: str) -> list[float | None]:
        """One metric over steps, from a named field or from `extra` (None where a step lacks it)."""
        if name in TrainingStep.model_fields and name != "extra":
            return [getattr(s, name) for s in self.steps]
        if any(name in s.extra for s in self.steps):
            return [s.extra.get(name) for s in self.steps]
        raise KeyError(f"no training metric {name!r}: neither a TrainingStep field nor in any step's extra")


# -------------------------------------------------------------------------------------- y: evaluation


class SuiteResult(Contract):
    """One benchmark suite's score (e.g. AIME25 pass@32) with its confidence interval."""

    suite: str = Field(min_length=1)
    kind: MetricKind
    k: int = Field(1, ge=1)
    value: Unit
    ci_low: Unit
    ci_high: Unit
    n_prompts: int = Field(ge=1)
    n_samples: int = Field(ge=1)
    mean_length: NonNegative
    format_valid_rate: Unit
    weight: NonNegative

    @model_validator(mode="after")
    def _check_consistency(self) -> SuiteResult:
        if self.kind == MetricKind.ACC_AT_1 and self.k != 1:
            raise ValueError(f"suite {self.suite}: acc@1 needs k=1, got k={self.k}")
        if self.ci_low > self.ci_high:
            raise ValueError(f"suite {self.suite}: ci_low {self.ci_low} > ci_high {self.ci_high}")
        return self


Half = Literal["all", "selection", "reporting"]  # which problems of each suite an evaluation scored (docs/reporting.md)


class Evaluation(Contract):
    """y: the metric vector of one evaluation pass (one seed) over all suites, and the run's utility U."""

    suites: dict[str, SuiteResult]
    overall: float
    overall_ci: tuple[float, float] | None = None
    mean_length: NonNegative
    seed: int
    utility: float | None = None
    constraints_satisfied: bool | None = None
    backend: str | None = Field(None, description="the evaluator backend that sampled it: testbed or vllm "
                                "(None in archives written before it was recorded)")
    archive_seq: int | None = Field(None, ge=1, description="stamped by the archive when it stores the evaluation: "
                                    "how many evaluations (replicates included) the run held then; lineage "
                                    "prioritization reads the archive as of a request's `as_of` by it")
    half: Half = Field("all", description="the problems scored: every one, or the selection or reporting half of "
                                          "each suite (docs/reporting.md)")

    @model_validator(mode="after")
    def _check_suite_keys(self) -> Evaluation:
        wrong = [key for key, result in self.suites.items() if key != result.suite]
        if wrong:
            raise ValueError(f"suites keyed by a name other than their own: {wrong}")
        return self


# -------------------------------------------------------------------------------------- r: reflection


class MechanismEffect(Contract):
    """A reflection's verdict on one mechanism, with how sure it is and the evidence (curves, metrics)."""

    mechanism: str = Field(min_length=1)
    effect: Effect
    confidence: Unit
    evidence: str


class Reflection(Contract):
    """r: the mechanism-level diagnosis of a node against its parent, fed back to later proposals."""

    text: str
    effects: list[MechanismEffect] = []
    diagnoses: list[str] = []
    generator: str = Field(min_length=1)


# ------------------------------------------------------------------------------------ failure, cost


SERVICE_ERROR = "service error"  # in the reason of a failure the service, not the candidate, caused (a dead letter)


class Failure(Contract):
    """Why a node stopped: the phase, a one-line reason for lists and logs, and the full detail."""

    phase: Phase
    reason: str
    detail: str = ""

    @field_validator("reason")
    @classmethod
    def _one_short_line(cls, reason: str) -> str:
        # Normalize rather than reject: building a Failure must never itself fail.
        lines = [line.strip() for line in reason.splitlines() if line.strip()]
        if not lines:
            raise ValueError("a failure needs a non-empty reason")
        line = lines[0]
        return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 1] + "…"


class Cost(Contract):
    """What a node (or a run) has spent: wall seconds per phase, agent-LLM usage and GPU-seconds of training."""

    phase_seconds: dict[Phase, NonNegative] = {}
    llm_input_tokens: int = Field(0, ge=0)
    llm_output_tokens: int = Field(0, ge=0)
    llm_usd: NonNegative = 0.0
    gpu_seconds: NonNegative = Field(0.0, description="GPUs held x seconds by training (VERL backend; 0 on the "
                                     "CPU testbed)")

    def add(self, other: Cost) -> Cost:
        seconds = dict(self.phase_seconds)
        for phase, s in other.phase_seconds.items():
            seconds[phase] = seconds.get(phase, 0.0) + s
        return Cost(
            phase_seconds=seconds,
            llm_input_tokens=self.llm_input_tokens + other.llm_input_tokens,
            llm_output_tokens=self.llm_output_tokens + other.llm_output_tokens,
            llm_usd=self.llm_usd + other.llm_usd,
            gpu_seconds=self.gpu_seconds + other.gpu_seconds,
        )


LlmOperator = Literal["propose", "screen", "implement", "reflect"]
MAX_LLM_ERROR_CHARS = 2000


class CallRecord(Contract):
    """One request to the agent LLM and what it cost, kept on the node that asked for it.

    A request includes the SDK's own transport retries (429, 5xx, timeouts), counted in `retries`;
    `attempt` numbers the answers of one structured completion: 1 is the first answer, 2 and up are the
    repair rounds that sent a validation error back. Token counts are as billed: `input_tokens` excludes
    the prompt-cache reads and writes. `priced` is False for a model with no price on file (a local
    server, an unknown model), whose `cost_usd` is then 0.
    """

    provider: Literal["anthropic", "openai"]
    model: str = Field(min_length=1)
    operator: LlmOperator
    prompt: str | None = Field(None, description="the prompt file and version that asked, e.g. propose@v1")
    mode: str = Field(description="how structure was requested: tool, output_config, json_schema, json_object, prompt")
    attempt: int = Field(1, ge=1)
    retries: int = Field(0, ge=0)
    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cache_read_tokens: int = Field(0, ge=0)
    cache_write_tokens: int = Field(0, ge=0)
    latency_s: NonNegative = 0.0
    cost_usd: NonNegative = 0.0
    priced: bool = True
    stop_reason: str | None = None
    ok: bool
    error: str | None = None
    started_at: AwareDatetime = Field(default_factory=lambda: utc_now())

    @field_validator("error")
    @classmethod
    def _bounded(cls, error: str | None) -> str | None:
        if error is None or len(error) <= MAX_LLM_ERROR_CHARS:
            return error
        return error[: MAX_LLM_ERROR_CHARS - 1] + "…"


# ------------------------------------------------------------------------------------------- the node


def utc_now() -> datetime:
    return datetime.now(UTC)


# The part of a node each pipeline status brings; a node holds the parts of every status up to its own.
STATUS_PART: dict[NodeStatus, str] = {
    NodeStatus.PROPOSED: "proposal",
    NodeStatus.IMPLEMENTED: "implementation",
    NodeStatus.TRAINED: "trajectory",
    NodeStatus.EVALUATED: "evaluation",
    NodeStatus.REFLECTED: "reflection",
}


class ReportedRun(Contract):
    """One training of a report arm on a fresh seed, scored on the reporting half (docs/reporting.md): `best` (the
    reported node's code), `grpo` (the root's), or `without <mechanism>` (an ablation)."""

    arm: str = Field(min_length=1, max_length=200)
    evaluation: Evaluation


class Node(Versioned):
    """An archive entry e_i = (z, ρ, τ, y, r) with its lineage, status, failure and cost.

    Every status on the pipeline guarantees the parts of the phases it has passed; a failed node keeps
    whatever parts it reached, and only a failed node carries a `failure`.
    """

    genealogy: Genealogy
    status: NodeStatus = NodeStatus.PROPOSED
    proposal: Proposal
    implementation: Implementation | None = None
    trajectory: TrainingTrajectory | None = None
    evaluation: Evaluation | None = None
    replicates: list[Evaluation] = []  # evaluations of fresh-seed re-trainings of the same code, for noise
    reported: list[ReportedRun] = Field([], description="the run's report, on the best node: each arm trained on "
                                        "the report's fresh seeds and scored on the reporting half "
                                        "(docs/reporting.md)")
    reflection: Reflection | None = None
    failure: Failure | None = None
    cost: Cost = Field(default_factory=Cost)
    llm_calls: list[CallRecord] = Field([], description="every agent-LLM request made for this node, in order")
    created_at: AwareDatetime = Field(default_factory=utc_now)
    updated_at: AwareDatetime = Field(default_factory=utc_now)

    @property
    def node_id(self) -> str:
        return self.genealogy.node_id

    @property
    def run_id(self) -> str:
        return self.genealogy.run_id

    @model_validator(mode="after")
    def _check_parts(self) -> Node:
        if (self.status == NodeStatus.FAILED) != (self.failure is not None):
            raise ValueError(
                f"node {self.node_id}: status {self.status} with failure={self.failure is not None}; "
                "a failed node needs a failure, and only a failed node has one"
            )
        if self.status != NodeStatus.FAILED:
            reached = PIPELINE[1 : PIPELINE.index(self.status) + 1]
            missing = [STATUS_PART[s] for s in reached if getattr(self, STATUS_PART[s]) is None]
            if missing:
                raise ValueError(f"node {self.node_id}: status {self.status} but {missing} missing")
        return self


# --------------------------------------------------------------------------------------- run config


class SelectionWeights(Contract):
    """Parent acquisition s(d) = w_pareto·U_pareto + w_perf·U_perf + w_div·U_div + w_bayes·α_GP(d).

    gamma, top_k and beta shape the GP target, the discounted top-K descendant gain
    y_d = mean_topK γ^depth · tanh((U(c) − U(d)) / β); kappa is the UCB exploration weight.
    """

    pareto: NonNegative = 1.0
    perf: NonNegative = 1.0
    div: NonNegative = 0.5
    bayes: NonNegative = 1.0
    gamma: NonNegative = 0.8
    top_k: int = Field(3, ge=1, le=1024)
    beta: NonNegative = 0.05
    kappa: NonNegative = 1.0


class Objective(Contract):
    """What the utility U rewards: weighted Overall, or shorter responses at Overall within tolerance."""

    kind: Literal["overall", "length"] = "overall"
    accuracy_tolerance: NonNegative = 0.01
    directive: str | None = None


_LLM_SPEC = re.compile(r"^(?:offline|anthropic:(?P<model>\S+)|openai:(?P<url>https?://[^\s#]+)#(?P<omodel>\S+))$")


def parse_llm_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split an agent-LLM spec into (provider, base url, model): "offline", "anthropic:<model>",
    or "openai:<url>#<model>" for any OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama)."""
    match = _LLM_SPEC.match(spec)
    if match is None:
        raise ValueError(
            f"llm {spec!r} is not one of: offline, anthropic:<model>, openai:<url>#<model> "
            "(e.g. openai:http://localhost:8000/v1#Qwen2.5-7B-Instruct)"
        )
    if match["model"]:
        return "anthropic", None, match["model"]
    if match["url"]:
        return "openai", match["url"], match["omodel"]
    return "offline", None, None


class Backends(Contract):
    """Which implementation plays each role: embedded defaults, or the production services."""

    trainer: Literal["testbed", "verl"] = "testbed"
    evaluator: Literal["testbed", "vllm"] = "testbed"
    store: Literal["sqlite", "mongo"] = "sqlite"
    bus: Literal["inproc", "nats"] = "inproc"
    llm: str = "offline"
    agents: dict[LlmOperator, str] = Field({}, description="per-operator agent LLM specs that override `llm` "
                                                           "(e.g. a strong model to propose, a cheap one to screen)")

    @field_validator("llm")
    @classmethod
    def _check_llm(cls, llm: str) -> str:
        parse_llm_spec(llm)
        return llm

    @field_validator("agents")
    @classmethod
    def _check_agents(cls, agents: dict[str, str]) -> dict[str, str]:
        for spec in agents.values():
            parse_llm_spec(spec)
        return agents

    def llm_for(self, operator: LlmOperator) -> str:
        """The agent LLM spec `operator` uses: its own setting, else the run's `llm`."""
        return self.agents.get(operator, self.llm)


# Settings a resumed run may change (a larger budget extends it, a larger cap lets it spend on); the others
# define the run, and a resume that changes them is refused.
RESUMABLE_SETTINGS = ("budget", "parallel", "llm_budget_usd", "early_stop", "gpu_hours_budget")
# Recorded by the archive (the protocol's sha256 when a run is created, the contract version a config was written in),
# never given by a caller: left out of the resume comparison.
RECORDED_SETTINGS = ("protocol_sha256", "schema_version")


class RunSettings(Contract):
    """The settings of a search run a caller chooses: every part of `RunConfig` but the run's id and what the
    archive records itself."""

    budget: int = Field(64, ge=1, le=1_000_000, description="evaluated candidates, the paper's 64; with seeding "
                        "racing, the children's trainings (docs/racing.md)")
    parallel: int = Field(3, ge=1, le=1024, description="nodes in the pipeline at once")
    parents_per_round: int = Field(3, ge=1, le=1024)
    parent_selection: Literal["greedy", "random", "poise"] = Field(
        "greedy", description="baseline proposer: the best node by utility, or a uniformly random evaluated node; "
        "poise: Phase I acquisition (proposer/selection.py) with context, population and screening")
    population_size: int = Field(4, ge=1, le=1024, description="proposals sampled per parent before screening")
    max_correction_attempts: int = Field(3, ge=1, le=100)
    root_seeds: int = Field(3, ge=1, le=1000, description="fresh-seed evaluations of the root, the yardstick")
    replicate_seeds: int = Field(3, ge=1, le=1000, description="fresh-seed re-evaluations of a promising node")
    split: bool = Field(False, description="score selection on the selection half of each suite and the report on "
                        "the reporting half (docs/reporting.md)")
    report_seeds: int = Field(0, ge=0, le=1000, description="fresh seeds the best and GRPO are each trained with "
                              "for the report, on the same seeds (0: no report phase; docs/reporting.md)")
    seeding: Literal["one", "racing"] = Field(
        "one", description="one: a child is trained with one seed and the budget counts children; racing: extra "
        "seeds go to the nodes whose rank is promising and uncertain (poise/racing.py) before they are parents, and "
        "the budget counts the children's trainings (docs/racing.md)")
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer (what MongoDB stores)")
    protocol: str = "default"
    objective: Objective = Field(default_factory=Objective)
    weights: SelectionWeights = Field(default_factory=SelectionWeights)
    backends: Backends = Field(default_factory=Backends)
    llm_budget_usd: NonNegative | None = Field(None, description="agent-LLM spend cap in USD; the run stops "
                                                                 "proposing when its nodes have spent it")
    early_stop: bool | None = Field(None, description="stop a child's training early when it cannot reach its "
                                    "parent (docs/early_stopping.md); None: on when the package holds a rule fitted "
                                    "for the protocol")
    gpu_hours_budget: NonNegative | None = Field(None, description="training GPU-hours cap; the run stops proposing "
                                                 "when its trainings have held the GPUs this long (VERL backend)")


class RunConfig(RunSettings, Versioned):
    """Everything that defines a search run; stored with the run so it can be resumed."""

    run_id: Id
    protocol_sha256: str | None = Field(
        None, description="sha256 of the protocol's settings, recorded when the run is created; resuming under "
        "changed settings is refused (None: a run stored before this was recorded)")


class RunRequest(RunSettings):
    """The body of `POST /api/runs` (archive/api.py): start the run `run_id`, or resume the stored one.

    A new run takes the settings given and the defaults (the archive's backends) for the rest; a stored run
    keeps its settings, and only RESUMABLE_SETTINGS may differ from them (archive/runs.py). A field that is
    not a setting, including what the archive records itself (RECORDED_SETTINGS), is refused.
    """

    model_config = ConfigDict(extra="forbid")  # a body has no version: an unknown field is never kept

    run_id: Id

    def given(self) -> dict[str, Any]:
        """The settings this request sets explicitly, as JSON values (the `given` of archive/runs.py
        resolve_run); a setting left out is not in it."""
        return self.model_dump(mode="json", include=self.model_fields_set - {"run_id"})


# ------------------------------------------------------------------------------- run counters, status


class NodeScore(Contract):
    """What ranking an evaluated node needs, kept by the store beside its document (poise/store.py): U of its
    own evaluation, U of each fresh-seed replicate (nan kept), how many of those are finite (`seeds`), and
    whether it meets the objective's constraints. Only evaluated nodes that did not fail have one."""

    node_id: Id
    utility: float
    replicate_utilities: list[float] = []
    seeds: int = Field(0, ge=0)
    constraints_satisfied: bool | None = None


class OperatorSpend(Contract):
    """One operator's agent-LLM requests over a run: how many, how many failed or had no price, and the cost."""

    calls: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)
    unpriced: int = Field(0, ge=0)
    usd: NonNegative = 0.0


class RunCounters(Versioned):
    """A run's totals, kept current by the store as nodes are written, so reading them costs the same at ten
    nodes as at ten thousand. Versioned: workers read them over the archive's API (archive/client.py)."""

    counts: dict[NodeStatus, int]
    evaluated: int = Field(0, ge=0, description="nodes carrying an evaluation, failed ones included (the budget)")
    llm_usd: NonNegative = Field(0.0, description="the agent-LLM spend booked on the run's nodes")
    max_number: int = Field(-1, description="the highest node number (n012: 12); -1 when no id is numbered")
    depth: int = Field(0, ge=0, description="the deepest node")


class BudgetStatus(Contract):
    """What the budget counts and how much of it is used: evaluated children (one seed each), or with racing
    (docs/racing.md) the children's trainings, extra seeds included, in `trainings`."""

    total: int
    evaluated: int
    parallel: int
    trainings: int | None = Field(None, description="with seeding racing: the children's trainings so far")
    reached: bool = Field(False, description="no new child fits in what is left (racing: fewer than a node's cap of "
                                             "seeds)")

    @property
    def used(self) -> int:
        return self.evaluated if self.trainings is None else self.trainings

    def text(self) -> str:
        """"evaluated 12/16", or with racing "trainings 14/16, 9 children evaluated"."""
        if self.trainings is None:
            return f"evaluated {self.evaluated}/{self.total}"
        beyond = " (with the best's confirmation, outside the budget)" if self.trainings > self.total else ""
        return f"trainings {self.trainings}/{self.total}{beyond}, {self.evaluated} children evaluated"


class RootStatus(Contract):
    """The root (GRPO) and its seed scores, with their summary once it has one (mean, sd, n, ci_low, ci_high)."""

    node_id: Id
    status: NodeStatus
    scores: list[float]
    mean: float | None = None
    sd: float | None = None
    n: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None


class LeaderStatus(Contract):
    """The child with the top single-seed utility."""

    node_id: Id
    name: str
    utility: float
    seeds: int


class ArmStatus(Contract):
    """One arm of the report: its Overall per report seed (in seed order), their summary, its mean length."""

    arm: str
    seeds: list[int]
    overall: list[float]
    mean: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    mean_length: float | None = None


class Contribution(Contract):
    """What one difference of the best from GRPO contributed (docs/reporting.md, "The ablation"): the best minus
    the arm that undoes it (`arm`; "grpo" when undoing it leaves GRPO), paired over `seeds` report seeds."""

    difference: str
    arm: str
    seeds: int
    gain: float | None = None
    interval: tuple[float, float] | None = None
    p: float | None = None


class ReportStatus(Contract):
    """The report of the best against GRPO (docs/reporting.md): both trained on the same fresh seeds and scored
    on `half`; the gain is the mean of the paired per-seed differences, with its interval and paired-t p."""

    half: Half
    arms: list[ArmStatus]
    paired_seeds: int
    gain: float | None = None
    gain_interval: tuple[float, float] | None = None
    p: float | None = None
    length_change: float | None = Field(None, description="mean length, best minus GRPO, over the paired seeds")
    verdict: str
    contributions: list[Contribution] = []


class BestStatus(Contract):
    """The node reported as the best: the top confirmed node (fresh-seed mean), else the top single seed."""

    node_id: Id
    name: str
    mechanisms: list[str]
    utility: float
    interval: tuple[float, float] | None
    seeds: int
    scores: list[float]
    selection_score: float | None
    confirmed: bool
    gain_over_root: float | None
    p_vs_root: float | None
    verdict: str
    overall: float | None
    mean_length: float | None
    constraints_satisfied: bool | None
    report: ReportStatus | None = None


class LlmSpendStatus(Contract):
    """The run's agent-LLM requests and spend per operator, against its cap, and the agent each operator uses."""

    agents: dict[str, str]
    calls: int
    usd: float
    unpriced_calls: int
    cap_usd: float | None
    per_operator: dict[str, OperatorSpend]


class ObjectiveStatus(Objective):
    description: str


class ConstraintsStatus(Contract):
    satisfied: list[Id]
    violated: list[Id]


class RunStatus(Contract):
    """Where a run stands (archive/status.py): counts, budget, root, leader, best with its seed interval, spend.
    `constraints` only for an objective with constraints."""

    run_id: Id
    protocol: str
    seed: int
    counts: dict[NodeStatus, int]
    budget: BudgetStatus
    depth: int
    root: RootStatus | None
    objective: ObjectiveStatus
    best: BestStatus | None = None
    leader: LeaderStatus | None = None
    llm: LlmSpendStatus
    constraints: ConstraintsStatus | None = None


# ------------------------------------------------------------------------------------------ messages


class Message(Versioned):
    """A bus message about one node. `attempt` counts retries of the same work for the same node."""

    subject: ClassVar[str]

    run_id: Id
    node_id: Id
    attempt: int = Field(1, ge=1)

    @property
    def msg_id(self) -> str:
        """Deterministic id for publish dedupe (NATS `Nats-Msg-Id`); ids never contain '/'."""
        return "/".join((self.subject, self.run_id, self.node_id, str(self.attempt), *self._dedupe_extra()))

    def _dedupe_extra(self) -> tuple[str, ...]:
        return ()


class _ReplicableMessage(Message):
    """A message that may belong to a fresh-seed replicate evaluation, which needs its own msg_id."""

    replicate: int = Field(0, ge=0, description="0 = the node's own evaluation, i >= 1 = the i-th replicate")
    arm: str | None = Field(None, min_length=1, max_length=200,
                            description="a report arm's training (ReportedRun.arm; replicate: its seed's index)")

    def _dedupe_extra(self) -> tuple[str, ...]:
        return ((f"r{self.replicate}",) if self.replicate else ()) + ((f"arm:{self.arm}",) if self.arm else ())


class WorkPropose(Message):
    """Ask the proposer for one screened child; `node_id` is the child's pre-assigned id. The proposer chooses
    the parent by the run's parent selection (lineage prioritization is part of the proposal operator) unless
    `parent_ids` names it."""

    subject: ClassVar[str] = "work.propose"
    parent_ids: list[Id] = Field(default_factory=list, description="empty: the proposer chooses the parent")
    as_of: int | None = Field(None, ge=0, description="the run's stored evaluations when the archive asked: the "
                              "proposer chooses the parent from the archive as it stood then (Evaluation.archive_seq)")
    round: int = Field(0, ge=0)


class WorkImplement(Message):
    """Write and verify the module for `proposal`, with bounded correction."""

    subject: ClassVar[str] = "work.implement"
    proposal: Proposal


class WorkTrain(_ReplicableMessage):
    """Train the verified `source` under `protocol` with `seed` (replicate >= 1: a fresh-seed re-training)."""

    subject: ClassVar[str] = "work.train"
    source: str
    protocol: str
    seed: int
    early_stop: EarlyStopPlan | None = Field(None, description="stop the training early by this plan "
                                             "(docs/early_stopping.md); None: train every step")


class WorkEvaluate(_ReplicableMessage):
    """Evaluate the checkpoint at `checkpoint_uri` on the protocol's suites with `seed`."""

    subject: ClassVar[str] = "work.evaluate"
    checkpoint_uri: str
    protocol: str
    seed: int
    half: Half = "all"


class WorkReflect(Message):
    """The reflector reads the node and its parents from the archive; the message only names them."""

    subject: ClassVar[str] = "work.reflect"
    parent_ids: list[Id] = []


class _LlmMessage(Message):
    """An event from a phase that may have asked the agent LLM: the requests it made, booked on the node."""

    llm_calls: list[CallRecord] = []


class EvtProposed(_LlmMessage):
    """The proposer's screened proposal for the pre-assigned node."""

    subject: ClassVar[str] = "evt.proposed"
    proposal: Proposal


class EvtImplemented(_LlmMessage):
    """The implementation, verified or not: an unverified one fails the node in phase implement, with every
    attempt and its report kept on it."""

    subject: ClassVar[str] = "evt.implemented"
    implementation: Implementation


class EvtTrained(_ReplicableMessage):
    """The training trajectory and, in it, the checkpoint URI (an aborted run is still a trajectory).

    With replicate >= 1 it is a fresh-seed re-training of an evaluated node: the node is unchanged and the
    replicate's checkpoint goes on to a replicate evaluation."""

    subject: ClassVar[str] = "evt.trained"
    trajectory: TrainingTrajectory
    gpu_seconds: NonNegative = Field(0.0, description="GPUs held x seconds by this training, booked on the node's "
                                     "cost (0 on the CPU testbed)")


class EvtEvaluated(_ReplicableMessage):
    """One evaluation: the node's own (replicate 0) or a fresh-seed replicate."""

    subject: ClassVar[str] = "evt.evaluated"
    evaluation: Evaluation


class EvtReflected(_LlmMessage):
    """The reflection that closes the node's pass through the loop."""

    subject: ClassVar[str] = "evt.reflected"
    reflection: Reflection


class EvtFailed(_ReplicableMessage, _LlmMessage):
    """A phase failed. With replicate >= 1 only that replicate evaluation failed, not the node.

    A failed proposal names the parents it was for, so that one which cost agent-LLM requests becomes a failed
    node carrying them (its spend is then counted like every other node's)."""

    subject: ClassVar[str] = "evt.failed"
    failure: Failure
    parent_ids: list[Id] = []


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.subject: cls
    for cls in (
        WorkPropose,
        WorkImplement,
        WorkTrain,
        WorkEvaluate,
        WorkReflect,
        EvtProposed,
        EvtImplemented,
        EvtTrained,
        EvtEvaluated,
        EvtReflected,
        EvtFailed,
    )
}

EVENT_STATUS: dict[str, NodeStatus] = {
    EvtProposed.subject: NodeStatus.PROPOSED,
    EvtImplemented.subject: NodeStatus.IMPLEMENTED,
    EvtTrained.subject: NodeStatus.TRAINED,
    EvtEvaluated.subject: NodeStatus.EVALUATED,
    EvtReflected.subject: NodeStatus.REFLECTED,
    EvtFailed.subject: NodeStatus.FAILED,
}


def encode(msg: Message) -> bytes:
    """The message as utf-8 JSON, refused if over MAX_MESSAGE_BYTES."""
    data = msg.model_dump_json().encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ContractError(
            f"{msg.subject} for node {msg.node_id}: {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte "
            "message limit; put large artifacts in storage and send their URI"
        )
    return data


def decode(subject: str, data: bytes) -> Message:
    """The message of type `subject` in `data`, or ContractError saying what is wrong with it."""
    cls = MESSAGE_TYPES.get(subject)
    if cls is None:
        raise ContractError(f"unknown subject {subject!r}; known subjects: {', '.join(MESSAGE_TYPES)}")
    try:
        return cls.model_validate_json(data)
    except ValidationError as err:
        raise ContractError(f"invalid {subject} message: {err}") from err


# -------------------------------------------------------------------------------- sandboxed children
# What a parent sends a sandboxed child on stdin (a `SandboxPayload`) and what the child's result line holds
# (a `SandboxReport`); poise/sandbox.py carries them. The candidate runs inside the child's process and can
# print a result line of its own, so the parent validates every result against its report type and treats
# one that does not validate as a failed run.


class SandboxLimits(Contract):
    """The limits of one sandboxed child: deadlines the parent enforces from outside, rlimits the child sets."""

    model_config = ConfigDict(frozen=True)

    wall_s: float = Field(600.0, gt=0, description="the hard wall-clock deadline, whatever the child reports")
    stall_s: float | None = Field(None, gt=0, description="also killed when no event or result line came for "
                                                          "this long (None: never)")
    cpu_s: int = Field(3600, ge=1, description="CPU seconds over all threads; the wall deadline is the real bound")
    memory_bytes: int = Field(8 << 30, ge=1, description="address space: torch reserves a lot of virtual memory")
    file_bytes: int = Field(256 << 20, ge=1, description="largest file the child may write (a checkpoint is ~4 MB)")
    open_files: int = Field(256, ge=1)
    processes: int = Field(512, ge=8, description="tasks (processes and threads) of the whole sandbox: a cgroup "
                                                   "limit where one can be made, else RLIMIT_NPROC of its uid")
    allow_weak: bool = Field(False, description="run the candidate even when the boundary cannot be built "
                                                "(POISE_SANDBOX_ALLOW_WEAK=1; docs/sandbox.md)")


class SandboxPayload(Contract):
    """Base of every payload: the limits the child applies to itself (set by poise.sandbox.run_sandboxed)."""

    limits: SandboxLimits = Field(default_factory=SandboxLimits)

    def read_only_paths(self) -> list[Path]:
        """Files or directories outside the working directory the child must read (bound read-only into its
        filesystem view, poise/sandbox.py); the interpreter, its libraries and the harness are always there."""
        return []


class PhaseEvent(Contract):
    """A line a harness prints before it runs candidate code and after it gets control back
    (poise/integrity.py), so that the parent can say where a child that ended without a result was: an exit at
    the candidate's import reads differently from one in the middle of a call. Only these phases are taken."""

    phase: Literal["importing the candidate", "calling compute_advantages", "calling policy_loss",
                   "back in the harness"]


class SandboxReport(Contract):
    """Base of every result a sandboxed child reports."""

    isolation: list[str] = Field([], description="the sandbox layers that could not be applied (poise/sandbox.py)")
    traceback: str | None = Field(None, description="the harness's own traceback (its tail) when it failed")


class VerifyPayload(SandboxPayload):
    """implementer/verify_child.py: check one candidate module, and smoke-train it when a protocol is given."""

    source: str
    base_path: Path = Field(description="the base checkpoint the smoke run starts from")
    smoke_protocol: dict[str, Any] | None = Field(None, description="Protocol.as_dict() (poise/testbed/protocol.py) "
                                                                    "of the smoke run; None: no smoke run")
    seed: int = 0

    def read_only_paths(self) -> list[Path]:
        return [self.base_path]


class VerifyReport(SandboxReport):
    """What implementer/verify_child.py found: every check, in order."""

    checks: list[CheckResult] = []


class FingerprintPayload(SandboxPayload):
    """proposer/fingerprint_child.py: the structural check and behavioural fingerprint of one candidate."""

    source: str


class FingerprintReport(SandboxReport):
    """What proposer/fingerprint_child.py found: the structural checks and, when they passed, the module's
    declarations and its fingerprint vector (proposer/fingerprint.py), or why there is none."""

    checks: list[CheckResult] = []
    loss_agg_mode: str | None = None
    hparams: dict[str, Scalar] = {}
    fingerprint: list[float] | None = None
    failure: str | None = None


class TrainPayload(SandboxPayload):
    """trainer/testbed_child.py: train one candidate under a testbed protocol with one seed."""

    protocol: dict[str, Any] = Field(description="Protocol.as_dict() (poise/testbed/protocol.py)")
    seed: int
    source: str
    name: str = Field("candidate", min_length=1, description="the module name the candidate is loaded under")
    base_path: Path = Field(description="the base checkpoint training starts from")
    out_dir: Path = Field(description="where the checkpoint is written: the child's working directory")

    def read_only_paths(self) -> list[Path]:
        return [self.base_path]


class TrainStepEvent(Contract):
    """A progress line of trainer/testbed_child.py: one optimizer step's metrics, sent as soon as it is logged."""

    step: TrainingStep


class SandboxAttempt(Contract):
    """An act no honest candidate needs, blocked and recorded in the child (poise/sandbox_audit.py): a network call,
    a process, a write outside the working directory, a read of a protected path, a libc function looked up through
    ctypes."""

    kind: Literal["network", "process", "write", "read", "native"]
    what: str = Field(min_length=1, max_length=300, description="what was attempted, e.g. 'connect to `1.2.3.4:443`'")


class SandboxAttemptEvent(Contract):
    """The line a sandboxed child sends for an attempt, as it happens (before the candidate can do anything else)."""

    sandbox_attempt: SandboxAttempt


class TrainReport(SandboxReport):
    """How trainer/testbed_child.py ended: "ok" with the trajectory, or the candidate's error ("candidate_error":
    it broke the interface) or any other error, with the steps logged before it."""

    status: Literal["ok", "candidate_error", "error"]
    reason: str | None = None
    steps: list[TrainingStep] = []
    trajectory: TrainingTrajectory | None = None

    @model_validator(mode="after")
    def _check_outcome(self) -> TrainReport:
        if (self.status == "ok") != (self.trajectory is not None):
            raise ValueError(f"status {self.status!r} with trajectory={self.trajectory is not None}; "
                             "a trajectory comes with status ok, and only with it")
        if self.status != "ok" and not self.reason:
            raise ValueError(f"status {self.status!r} needs a reason")
        return self


class ProbePayload(SandboxPayload):
    """poise/sandbox_probe.py (the sandbox tests' diagnostic child): a snippet to run inside the sandbox. Any
    further field is handed to the snippet, with `code`, as the dict `payload`."""

    model_config = ConfigDict(extra="allow")

    code: str
    readable: list[Path] = Field([], description="bound read-only into the child's view (read_only_paths)")

    def read_only_paths(self) -> list[Path]:
        return list(self.readable)

    @model_validator(mode="after")
    def _unknown_fields(self) -> ProbePayload:  # replaces Contract's: every further field is the snippet's
        return self


class ProbeReport(Contract):
    """What poise/sandbox_probe.py saw: the isolation notes, whether the snippet raised (the exception's type,
    errno and message), and the JSON value it left in its variable `result`."""

    notes: list[str]
    raised: str | None = None
    errno: int | None = None
    message: str = ""
    result: Any = None
