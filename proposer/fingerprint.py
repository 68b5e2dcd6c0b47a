"""Behavioural fingerprints of candidate algorithms: what a candidate computes, not how its code is spelled.

A fingerprint is the candidate's advantages, masked per-token losses and loss gradients on a fixed set of
probe rollouts (fixed seeds; mixed, all-equal and unequal-size groups, every batch padded), with the loss
evaluated at a few fixed perturbations of `log_prob` around `old_log_prob`, flattened into one vector. Two
candidates that compute the same thing under different names, comments and variable names get the same
vector; a renamed copy of an archived algorithm is caught before it costs a training run.

The vector is laid out in blocks (one per probe and quantity, `fingerprint_blocks`); `fingerprint_distance`
is the largest relative RMS difference over the quantities, so a change shows up wherever it acts (a new
clip range only in the far-off-policy losses and gradients, a new baseline already in the advantages).

The vector ends with three more blocks computed on batches a real GRPO run produced (proposer/probe_batches.py):
the candidate's advantages, per-token loss and loss gradient on every minibatch update of a few recorded steps,
each compressed to a fixed random projection of `SKETCH_SIZE` values (`recorded_blocks`). They are kept out of the
novelty distance (calibrated on the synthetic probes) and feed the no-op check instead: `recorded_distance` of a
child to its parent at most `NO_OP_DISTANCE` means the change does nothing to what training computes
(docs/screening.md).

Computing a fingerprint runs candidate code, so it only ever happens in the sandboxed child
(proposer/fingerprint_child.py), which also runs the structural check; this module is the parent side: the
probe definitions both sides share, the sandbox call, the distance, and an on-disk cache keyed by the
source's sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np

from poise.contracts import CheckResult, FingerprintPayload, FingerprintReport, SandboxLimits, sha256_hex
from poise.sandbox import run_sandboxed
from poise.sandbox_audit import attempts_in, describe_attempts
from proposer.probe_batches import RECORDED_PROBES

FINGERPRINT_MODULE = "proposer.fingerprint_child"
SANDBOX_FAILURE = "sandbox: "  # how the failure of a run that returned no result starts


@dataclass(frozen=True)
class Probe:
    """One fixed rollout: groups of the given sizes, responses of 1..max_len tokens (the first row full)."""

    name: str
    group_sizes: tuple[int, ...]
    max_len: int
    scores: str  # "mixed": every group has a pass and a fail; "equal": every group all-pass or all-fail
    seed: int

    @property
    def rows(self) -> int:
        return sum(self.group_sizes)


PROBES: tuple[Probe, ...] = (
    Probe("mixed", (4, 4, 4, 4), 8, "mixed", 101),
    Probe("equal", (4, 4, 4), 6, "equal", 202),
    Probe("ragged", (2, 5, 3, 6), 10, "mixed", 303),
)
# log_prob = old_log_prob + scale * fixed noise: on-policy (ratio 1); sequence ratios within GSPO's narrow
# clip (3e-4); token ratios inside and beyond a 0.2 clip; ratios of 4 and more (dual clip, CISPO's bounds).
PERTURBATION_SCALES: tuple[float, ...] = (0.0, 0.001, 0.1, 0.5, 1.5)

# Calibrated on the mechanism library and the offline compiler: the other reference algorithms lie 0.18 to 1.8
# from GRPO; a renamed copy, the compiled GRPO, or kl:penalty or entropy:bonus at coefficient 0 are at 0; eps
# of scale:group_std moved up to 1e-4, a GSPO clip bound moved by 1e-5, or kl:penalty at kl_coef 1e-5 change
# the fingerprint by at most 2e-4. Moves a run could notice are farther: kl:penalty at
# 1e-4 by 5.7e-4 (at its default 1e-3 by 7e-4 to 6e-3), entropy:bonus at 1e-3 by 9e-4, clip_ratio 0.2 -> 0.21
# by 0.12, a GSPO clip bound 3e-4 -> 4e-4 by 0.24. Of 300 random single mutations (proposer/baseline.py),
# 25 fell below the threshold, every one an eps move.
NEAR_DUPLICATE_DISTANCE = 5e-4
# A quantity whose RMS is below this on both sides (no loss at all) counts as equal.
ABSOLUTE_FLOOR = 1e-7
DEFAULT_WALL_S = 60.0
FINGERPRINT_MEMORY_BYTES = 4 << 30


# The recorded probes: each quantity (advantages, per-token loss, gradient of the aggregated loss, over the valid
# tokens of every recorded step and minibatch update) is projected onto SKETCH_SIZE fixed Gaussian directions
# (seed SKETCH_SEED + its position in RECORDED_QUANTITIES), scaled by 1/sqrt(SKETCH_SIZE). A projection is linear,
# so the sketch of a difference is the difference of the sketches and a relative RMS difference is estimated
# within about sqrt(2 / SKETCH_SIZE) = 9% of itself (an exact no-op stays exactly 0), in 768 values instead of the
# ~40,000 the recorded tokens hold (an archive keeps one fingerprint per node).
RECORDED = "recorded"
RECORDED_QUANTITIES: tuple[str, ...] = ("advantages", "loss", "grad")
SKETCH_SIZE = 256
SKETCH_SEED = 24_000
# A child whose recorded-probe quantities are all within this relative RMS of its parent's is a behavioural no-op.
# Measured (bench/scripts/no_op_moves.py, docs/screening.md): the compiled GRPO against the reference module, and
# dual_clip 3 -> 5 or 10, clip:dual removed, either length shaping added, are at exactly 0; the least of the moves
# that act is kl:penalty at its default 1e-3, at 2.9e-4 (clip_ratio 0.2 -> 0.21: 1.5e-2, dual_clip 3 -> 1.5:
# 8.8e-3). Effects smaller still (kl:penalty at 1e-5) are the novelty gate's: near-duplicates on the synthetic probes.
NO_OP_DISTANCE = 1e-5


def recorded_blocks() -> list[tuple[str, int]]:
    """The (name, length) blocks of the recorded probes, at the end of a fingerprint vector."""
    return [(f"{RECORDED}:{quantity}", SKETCH_SIZE) for quantity in RECORDED_QUANTITIES]


def fingerprint_blocks() -> list[tuple[str, int]]:
    """The (name, length) blocks of a fingerprint vector, in order: per synthetic probe, its (B, L) advantages,
    then per perturbation its masked (B, L) per-token loss and the (B, L) gradient of the aggregated loss; then
    the sketches of the recorded probes (`recorded_blocks`)."""
    blocks = []
    for probe in PROBES:
        size = probe.rows * probe.max_len
        blocks.append((f"{probe.name}:advantages", size))
        for scale in PERTURBATION_SCALES:
            blocks += [(f"{probe.name}:loss@{scale:g}", size), (f"{probe.name}:grad@{scale:g}", size)]
    return blocks + recorded_blocks()


def _recorded_probes_sha256() -> str:
    return hashlib.sha256(RECORDED_PROBES.read_bytes()).hexdigest() if RECORDED_PROBES.exists() else "missing"


FINGERPRINT_LENGTH = sum(size for _, size in fingerprint_blocks())
# Where the recorded probes' sketches start in the vector (they end it).
RECORDED_OFFSET = FINGERPRINT_LENGTH - sum(size for _, size in recorded_blocks())
# Changes whenever the probes change (the recorded ones included), so cached fingerprints of another layout or
# other batches are never compared.
FINGERPRINT_VERSION = hashlib.sha256(repr((PROBES, PERTURBATION_SCALES, SKETCH_SIZE, SKETCH_SEED,
                                           _recorded_probes_sha256())).encode()).hexdigest()[:12]


# -------------------------------------------------------------------------------------------- distance


def fingerprint_distance(first: np.ndarray, second: np.ndarray) -> float:
    """The largest relative RMS difference over the synthetic probes' quantities (advantages, and the loss and its
    gradient at each perturbation, each over all synthetic probes; the recorded probes are `recorded_distance`'s,
    the no-op check's): 0 for the same behaviour, 1 where one side is zero and the other
    not, up to 2 for opposite signs; inf for vectors that are not both fingerprints of this layout.

    Each quantity is compared over all probes at once, so a term that only acts where the other side is
    exactly zero (a small KL penalty on all-equal groups, which GRPO gives no loss) is weighed against the
    quantity's whole scale, not against zero.
    """
    if second.shape != (FINGERPRINT_LENGTH,):
        return math.inf
    return float(fingerprint_distances(first, second[None, :])[0])


def fingerprint_distances(vector: np.ndarray, others: np.ndarray) -> np.ndarray:
    """`fingerprint_distance` from `vector` to each row of `others` (n, FINGERPRINT_LENGTH) at once; all inf when
    `vector` is not a fingerprint of this layout."""
    others = np.atleast_2d(others)
    if vector.shape != (FINGERPRINT_LENGTH,) or others.shape[1:] != (FINGERPRINT_LENGTH,):
        return np.full(len(others), math.inf)
    # Mean squares as np.add.reduce / n: what np.mean computes, the same sums bit for bit, without its Python
    # wrapper, which cost more than the arithmetic here. One quantity at a time keeps the temporaries small.
    return _largest_relative_rms(vector, others, _NOVELTY_INDEX)


def recorded_distance(first: np.ndarray, second: np.ndarray) -> float:
    """The largest relative RMS difference over the recorded-probe quantities (advantages, loss, gradient on the
    batches a real run produced), estimated from their sketches: what the no-op check compares with
    NO_OP_DISTANCE; inf for vectors that are not both fingerprints of this layout."""
    if first.shape != (FINGERPRINT_LENGTH,) or second.shape != (FINGERPRINT_LENGTH,):
        return math.inf
    return float(_largest_relative_rms(first, second[None, :], _RECORDED_INDEX)[0])


def recorded_distances(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """`recorded_distance` per quantity ("advantages", "loss", "grad"), for reports."""
    if first.shape != (FINGERPRINT_LENGTH,) or second.shape != (FINGERPRINT_LENGTH,):
        return {quantity: math.inf for quantity in RECORDED_QUANTITIES}
    return {quantity.split(":", 1)[1]: float(_largest_relative_rms(first, second[None, :], {quantity: index})[0])
            for quantity, index in _RECORDED_INDEX.items()}


def _largest_relative_rms(vector: np.ndarray, others: np.ndarray, quantities: dict[str, np.ndarray]) -> np.ndarray:
    worst = np.zeros(len(others))
    for index in quantities.values():
        a, b = vector[index], others[:, index]
        mean_square = np.add.reduce(np.square(b - a), axis=1) / len(index)
        scale = np.sqrt(np.maximum(np.add.reduce(a * a) / len(index), np.add.reduce(b * b, axis=1) / len(index)))
        worst = np.maximum(worst, np.sqrt(mean_square) / np.maximum(scale, ABSOLUTE_FLOOR))
    return worst


def _quantity_index() -> dict[str, np.ndarray]:
    """Positions of each quantity in the vector: a synthetic one ("advantages", "loss@0.5" …) over all synthetic
    probes, a recorded one under its block name ("recorded:loss")."""
    positions: dict[str, list[np.ndarray]] = {}
    start = 0
    for name, size in fingerprint_blocks():
        quantity = name if name.startswith(f"{RECORDED}:") else name.split(":", 1)[1]
        positions.setdefault(quantity, []).append(np.arange(start, start + size))
        start += size
    return {quantity: np.concatenate(parts) for quantity, parts in positions.items()}


_QUANTITY_INDEX = _quantity_index()
_NOVELTY_INDEX = {q: index for q, index in _QUANTITY_INDEX.items() if not q.startswith(f"{RECORDED}:")}
_RECORDED_INDEX = {q: index for q, index in _QUANTITY_INDEX.items() if q.startswith(f"{RECORDED}:")}


def is_near_duplicate(distance: float, threshold: float = NEAR_DUPLICATE_DISTANCE) -> bool:
    return distance <= threshold


# ---------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class FingerprintResult:
    """What the sandboxed child reported for one source: the structural checks, and the fingerprint when they
    passed; or why nothing usable came back (`failure`, one line a person or an LLM can act on)."""

    source_sha256: str
    vector: np.ndarray | None
    checks: list[CheckResult] = field(default_factory=list)
    failure: str | None = None
    loss_agg_mode: str | None = None
    hparams: dict = field(default_factory=dict)
    wall_s: float = 0.0
    isolation: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.vector is not None

    @property
    def definitive(self) -> bool:
        """False when the sandbox itself gave no answer (deadline, signal, no result): on a loaded machine that
        may pass, so such a result is kept in memory for this process but never written to disk."""
        return self.failure is None or not self.failure.startswith(SANDBOX_FAILURE)

    def to_json(self) -> str:
        document = {
            "version": FINGERPRINT_VERSION,
            "source_sha256": self.source_sha256,
            "vector": None if self.vector is None else [float(v) for v in self.vector],
            "checks": [c.model_dump(mode="json") for c in self.checks],
            "failure": self.failure,
            "loss_agg_mode": self.loss_agg_mode,
            "hparams": self.hparams,
            "wall_s": self.wall_s,
            "isolation": self.isolation,
        }
        return json.dumps(document)

    @classmethod
    def from_json(cls, text: str) -> FingerprintResult:
        document = json.loads(text)
        if document.get("version") != FINGERPRINT_VERSION:
            raise ValueError(f"fingerprint version {document.get('version')!r}, expected {FINGERPRINT_VERSION}")
        vector = document["vector"]
        return cls(
            source_sha256=document["source_sha256"],
            vector=None if vector is None else np.asarray(vector, dtype=np.float64),
            checks=[CheckResult.model_validate(c) for c in document["checks"]],
            failure=document["failure"],
            loss_agg_mode=document["loss_agg_mode"],
            hparams=document["hparams"],
            wall_s=document["wall_s"],
            isolation=document["isolation"],
        )


# ------------------------------------------------------------------------------------------------ sandbox

_run_numbers = count(1)


def fingerprint_in_sandbox(
    source: str, workdir: Path, wall_s: float = DEFAULT_WALL_S, keep_workdir: bool = False
) -> FingerprintResult:
    """Run the structural check and, if it passes, the fingerprint probes on `source` in the sandbox.

    Never raises for anything the candidate does: a module that does not import, breaks the interface,
    returns non-finite values on a probe, hangs past `wall_s` or kills its interpreter comes back as a
    result with `failure` set. Each run gets a fresh directory under `workdir`, removed afterwards unless
    `keep_workdir`.
    """
    sha = sha256_hex(source)
    run_dir = Path(workdir) / f"fingerprint-{sha[:12]}-{next(_run_numbers)}"
    limits = SandboxLimits(wall_s=wall_s, memory_bytes=FINGERPRINT_MEMORY_BYTES)
    try:
        run = run_sandboxed(FINGERPRINT_MODULE, FingerprintPayload(source=source), run_dir, limits, threads=1,
                            report_type=FingerprintReport)
    finally:
        if not keep_workdir:
            shutil.rmtree(run_dir, ignore_errors=True)
    attempts = attempts_in(run.events)
    if attempts:  # the candidate's own doing, hence definitive
        return FingerprintResult(sha, None, failure=f"fingerprint: {describe_attempts(attempts)}", wall_s=run.wall_s)
    if run.malformed is not None:
        # The candidate shares the child's process, so the report may be forged: its own doing, hence definitive.
        return FingerprintResult(sha, None, failure=f"fingerprint: {run.failure_reason()}", wall_s=run.wall_s)
    if not run.ok or run.result is None:
        return FingerprintResult(sha, None, failure=f"{SANDBOX_FAILURE}{run.failure_reason()}", wall_s=run.wall_s)
    return _from_report(sha, run.result, run.wall_s)


def _from_report(sha: str, report: FingerprintReport, wall_s: float) -> FingerprintResult:
    failed = [c for c in report.checks if not c.passed]
    failure = f"{failed[0].name}: {failed[0].message}" if failed else report.failure
    vector = report.fingerprint
    if failure is None and (vector is None or len(vector) != FINGERPRINT_LENGTH):
        got = "no fingerprint" if vector is None else f"{len(vector)} values"
        failure = f"fingerprint: the child returned {got} instead of {FINGERPRINT_LENGTH} values"
    array = np.asarray(vector, dtype=np.float64) if failure is None else None
    if array is not None and not np.isfinite(array).all():
        array, failure = None, "fingerprint: non-finite values came back"
    return FingerprintResult(sha, array, checks=list(report.checks), failure=failure,
                             loss_agg_mode=report.loss_agg_mode, hparams=dict(report.hparams), wall_s=wall_s,
                             isolation=list(report.isolation))


class FingerprintCache:
    """Fingerprint results by source sha256, in memory and (given a directory) on disk, so an archived node is
    fingerprinted once per probe version however often the archive is screened against. Failures of the
    candidate are cached like fingerprints; a run the sandbox cut short is only remembered in memory."""

    def __init__(self, directory: Path | None = None, workdir: Path | None = None,
                 wall_s: float = DEFAULT_WALL_S) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.workdir = Path(workdir) if workdir is not None else (self.directory or Path("fingerprints")) / "work"
        self.wall_s = wall_s
        self._memory: dict[str, FingerprintResult] = {}

    def __call__(self, source: str) -> FingerprintResult:
        """The cached result for `source`, or a fresh sandboxed one (then cached)."""
        sha = sha256_hex(source)
        cached = self.get(sha)
        if cached is not None:
            return cached
        result = fingerprint_in_sandbox(source, self.workdir, self.wall_s)
        self.put(result)
        return result

    def get(self, sha: str) -> FingerprintResult | None:
        if sha in self._memory:
            return self._memory[sha]
        path = self._path(sha)
        if path is None or not path.exists():
            return None
        try:
            result = FingerprintResult.from_json(path.read_text())
        except (ValueError, KeyError, TypeError):
            return None  # a stale or damaged entry is recomputed
        self._memory[sha] = result
        return result

    def put(self, result: FingerprintResult) -> None:
        self._memory[result.source_sha256] = result
        path = self._path(result.source_sha256)
        if path is not None and result.definitive:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(result.to_json())
            temporary.replace(path)

    def _path(self, sha: str) -> Path | None:
        return self.directory / f"{FINGERPRINT_VERSION}-{sha}.json" if self.directory is not None else None


__all__ = [
    "FINGERPRINT_LENGTH",
    "FINGERPRINT_VERSION",
    "NEAR_DUPLICATE_DISTANCE",
    "NO_OP_DISTANCE",
    "PERTURBATION_SCALES",
    "PROBES",
    "RECORDED_OFFSET",
    "RECORDED_QUANTITIES",
    "SKETCH_SIZE",
    "FingerprintCache",
    "FingerprintResult",
    "Probe",
    "fingerprint_blocks",
    "fingerprint_distance",
    "fingerprint_distances",
    "fingerprint_in_sandbox",
    "is_near_duplicate",
    "recorded_blocks",
    "recorded_distance",
    "recorded_distances",
]
