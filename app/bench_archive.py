"""`poise bench archive`: does the archive's work per event stay flat as the archive grows?

Builds a synthetic run of N nodes with the project's own contracts (proposals mutated by the baseline
proposer down lineages about 8 deep, verified implementations compiled from them, 40-step trajectories,
evaluations over four suites, fresh-seed replicates on a few nodes, agent-LLM requests on some, a few
failures; about 40 KB a document) in SQLite (a temporary run directory) and in mongomock, then measures

- per-event handling: after the archive service's start (a resume, timed too), `evt.proposed`,
  `evt.evaluated` and `evt.reflected` applied through `ArchiveService.handle` on an `InProcBus` whose work
  is never delivered (median, p90, max per kind);
- `run_status` (what `poise status` computes), median of a few calls;
- parent selection (`proposer.parents.choose_parent`, greedy and Phase I "poise") in a subprocess over the
  SQLite archive: load time of the run's documents, selection time, tracemalloc peak during the selection
  and the subprocess's peak RSS; a selection that runs past its timeout is reported as such.

mongomock is an in-memory stand-in whose every query scans the collection in Python, so its numbers
grow with N whatever the store does; they check that the Mongo store's queries run, not how MongoDB scales.
Run it alone on the machine: timings on a busy machine are not comparable.
"""

from __future__ import annotations

import json
import math
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from app.reports import invoked_command, write_json_report
from archive.service import ArchiveService
from archive.sqlite_store import SQLiteStore
from archive.status import run_status
from poise.bus import InProcBus
from poise.contracts import (
    ROOT_ID,
    CallRecord,
    CheckResult,
    Effect,
    Evaluation,
    EvtEvaluated,
    EvtProposed,
    EvtReflected,
    Failure,
    Genealogy,
    Implementation,
    MechanismEffect,
    MetricKind,
    Node,
    NodeStatus,
    Phase,
    Proposal,
    Reflection,
    RunConfig,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
    VerificationAttempt,
)
from poise.description.codegen import compile_proposal
from poise.description.proposals import description_key, root_proposal
from poise.metrics import OK
from poise.store import ArchiveStore

DEFAULT_SIZES = (1_000, 10_000)
BACKENDS = ("sqlite", "mongomock")
SELECTIONS = ("greedy", "poise")
RUN_ID = "bench-archive"
MAX_DEPTH = 8
STEPS = 40
SUITES = {"gsm8k": 0.4, "math": 0.3, "aime": 0.2, "format": 0.1}
EVENT_KINDS = ("evt.proposed", "evt.evaluated", "evt.reflected")


# ------------------------------------------------------------------------------------- the synthetic run


def bench_config(size: int) -> RunConfig:
    """A run in mid-search: the budget is far from spent, so every event keeps the pipeline full."""
    return RunConfig(run_id=RUN_ID, budget=2 * size, parallel=8, seed=0, protocol="tiny", root_seeds=3,
                     replicate_seeds=3)


class SyntheticRun:
    """Nodes of one run, built the way the loop builds them, with reusable heavy parts (trajectories,
    compiled sources) so that building ten thousand takes seconds, not minutes."""

    def __init__(self, size: int, live: int, seed: int = 0) -> None:
        if size < 3 * live + 2:
            raise ValueError(f"{size} nodes cannot hold {live} live nodes of each kind and a root; "
                             "ask for more nodes or fewer events")
        self.size = size
        self.live = live
        self.rng = random.Random(seed)
        self.config = bench_config(size)
        self.trajectories = [self._trajectory(i) for i in range(16)]
        self.sources: dict[str, str] = {}
        self.eligible: list[Node] = []  # evaluated, not failed, shallower than MAX_DEPTH: future parents
        self.trained: list[Node] = []  # waiting for evt.evaluated
        self.evaluated: list[Node] = []  # waiting for evt.reflected

    def nodes(self) -> Iterator[Node]:
        """The root, then children in node order; the last 2 * `live` stop at trained and at evaluated."""
        root = self._finished(Node(genealogy=Genealogy(run_id=RUN_ID, node_id=ROOT_ID), proposal=root_proposal()),
                              0, replicates=2)
        self.eligible.append(root)
        yield root
        for i in range(1, self.size):
            node_id = f"n{i:03d}"
            parent = self.rng.choice(self.eligible[-200:])
            proposal = self._mutated(parent.proposal, node_id)
            node = Node(genealogy=Genealogy.child(node_id, [parent.genealogy]), proposal=proposal,
                        llm_calls=self._calls(i), created_at=root.created_at, updated_at=root.updated_at)
            if i % 4 == 0:
                node = node.model_copy(update={"cost": node.cost.model_copy(
                    update={"llm_usd": sum(c.cost_usd for c in node.llm_calls)})})
            from_end = self.size - i
            if from_end <= self.live:
                node = self._trained(node, i)
                self.trained.append(node)
            elif from_end <= 2 * self.live:
                node = self._evaluated(node, i)
                self.evaluated.append(node)
            elif i % 37 == 0:  # a candidate that never verified
                failure = Failure(phase=Phase.IMPLEMENT, reason="verification failed after 2 attempt(s): shapes")
                node = node.model_copy(update={"status": NodeStatus.FAILED, "implementation": self._implementation(
                    proposal, verified=False), "failure": failure})
            else:
                node = self._finished(node, i, replicates=2 if i % 97 == 0 else 0)
                if i % 53 == 0:  # evaluated, then the reflector gave up: spent budget, not a parent
                    failure = Failure(phase=Phase.REFLECT, reason="reflector timed out")
                    node = node.model_copy(update={"status": NodeStatus.FAILED, "reflection": None,
                                                   "failure": failure})
                elif node.genealogy.depth < MAX_DEPTH:
                    self.eligible.append(node)
            if i % 500 == 0:  # the parts were assembled without validation: spot-check the node's invariants
                Node.model_validate(node.model_dump())
            yield node

    def _mutated(self, parent: Proposal, node_id: str) -> Proposal:
        from proposer.baseline import MutationError, mutate

        try:
            child = mutate(parent, random.Random(f"{self.rng.random()}"))
        except MutationError:
            child = parent.model_copy(update={"name": f"{parent.name}-{node_id}"})
        return child.model_copy(update={"parent_ids": []})

    def _implementation(self, proposal: Proposal, verified: bool = True) -> Implementation:
        key = description_key(proposal)
        if key not in self.sources:
            self.sources[key] = compile_proposal(proposal) if len(self.sources) < 400 else next(
                iter(self.sources.values()))
        source = self.sources[key]
        checks = [CheckResult(name=name, passed=verified or name != "shapes",
                              message="" if verified else "policy_loss returned shape (8,) but (8, 37) was expected")
                  for name in ("imports", "interface", "shapes", "finite", "gradient")]
        first = VerificationAttempt(attempt=1, source=source, passed=False, duration_s=4.2, checks=[
            CheckResult(name="shapes", passed=False, message="advantages of shape (8,) where (8, 37) was expected")])
        last = VerificationAttempt(attempt=2, source=source, passed=verified, duration_s=3.9, checks=checks)
        return Implementation.from_source(source, [first, last], verified=verified)

    def _trajectory(self, i: int) -> TrainingTrajectory:
        rng = random.Random(i)
        steps = [TrainingStep(step=s, reward_mean=rng.random(), format_valid_rate=rng.random(), entropy=rng.random(),
                              response_length=rng.uniform(20, 200), kl=rng.random() / 10, grad_norm=rng.random(),
                              clip_frac=rng.random() / 5, adv_mean=rng.gauss(0, 0.1), adv_std=rng.random(),
                              step_time_s=rng.uniform(1, 3),
                              extra={f"metric_{k}": rng.random() for k in range(8)})
                 for s in range(STEPS)]
        return TrainingTrajectory(protocol="tiny", seed=0, steps=steps, checkpoint_uri="file:///runs/ckpt",
                                  wall_s=95.0)

    def _evaluation(self, seed: int) -> Evaluation:
        overall = self.rng.uniform(0.2, 0.6)
        suites = {name: SuiteResult(suite=name, kind=MetricKind.PASS_AT_K, k=8, value=overall,
                                    ci_low=max(0.0, overall - 0.05), ci_high=min(1.0, overall + 0.05), n_prompts=64,
                                    n_samples=512, mean_length=self.rng.uniform(40, 120), format_valid_rate=0.97,
                                    weight=weight)
                  for name, weight in SUITES.items()}
        return Evaluation(suites=suites, overall=overall, overall_ci=(overall - 0.03, overall + 0.03),
                          mean_length=self.rng.uniform(40, 120), seed=seed)

    def _reflection(self, proposal: Proposal) -> Reflection:
        effects = [MechanismEffect(mechanism=m.name, effect=self.rng.choice(list(Effect)),
                                   confidence=self.rng.random(),
                                   evidence="reward rose faster than the parent's over the last 20 steps while "
                                            "KL stayed under 0.05; the advantage spread narrowed")
                   for m in proposal.mechanisms]
        text = ("Compared with its parent, the candidate learned faster early and plateaued at a similar reward. "
                * 12)
        return Reflection(text=text, effects=effects, diagnoses=["slow_start", "length_drift"], generator="offline")

    def _calls(self, i: int) -> list[CallRecord]:
        if i % 4:
            return []
        return [CallRecord(provider="anthropic", model="claude-sonnet-4-5", operator=op, prompt=f"{op}@v1",
                           mode="tool", input_tokens=3000, output_tokens=600, latency_s=8.0, cost_usd=0.02, ok=ok,
                           error=None if ok else "The answer is not valid JSON")
                for op, ok in (("propose", True), ("implement", False), ("implement", True), ("reflect", True))]

    def _trained(self, node: Node, i: int) -> Node:
        trajectory = self.trajectories[i % len(self.trajectories)].model_copy(
            update={"checkpoint_uri": f"file:///runs/{RUN_ID}/nodes/{node.node_id}/ckpt"})
        return node.model_copy(update={"status": NodeStatus.TRAINED,
                                       "implementation": self._implementation(node.proposal),
                                       "trajectory": trajectory})

    def _evaluated(self, node: Node, i: int, replicates: int = 0) -> Node:
        fresh = [self._evaluation(self.config.seed + 1000 * r) for r in range(1, replicates + 1)]
        return self._trained(node, i).model_copy(update={"status": NodeStatus.EVALUATED,
                                                         "evaluation": self._evaluation(self.config.seed),
                                                         "replicates": fresh})

    def _finished(self, node: Node, i: int, replicates: int = 0) -> Node:
        return self._evaluated(node, i, replicates).model_copy(
            update={"status": NodeStatus.REFLECTED, "reflection": self._reflection(node.proposal)})

    def events(self) -> dict[str, list]:
        """`live` events of each kind: new proposals under evaluated parents, evaluations of the trained nodes,
        reflections of the evaluated ones."""
        proposed = []
        for k in range(self.live):
            parent = self.rng.choice(self.eligible[-200:])
            proposal = self._mutated(parent.proposal, f"n{self.size + k:03d}").model_copy(
                update={"parent_ids": [parent.node_id]})
            proposed.append(EvtProposed(run_id=RUN_ID, node_id=f"n{self.size + k:03d}", proposal=proposal))
        return {
            "evt.proposed": proposed,
            "evt.evaluated": [EvtEvaluated(run_id=RUN_ID, node_id=n.node_id, evaluation=self._evaluation(0))
                              for n in self.trained],
            "evt.reflected": [EvtReflected(run_id=RUN_ID, node_id=n.node_id, reflection=self._reflection(n.proposal))
                              for n in self.evaluated],
        }


# ------------------------------------------------------------------------------------------ measurements


def _ms(seconds: Sequence[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(ordered), "median_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
            "max_ms": 1000 * ordered[-1]}


def measure_events(store: ArchiveStore, config: RunConfig, events: dict[str, list]) -> dict:
    """The archive service's start (a resume: it reads every node once), then each event through
    ArchiveService.handle, timed; kinds interleaved, as a running search mixes them."""
    service = ArchiveService(InProcBus(), store, config)
    started = time.perf_counter()
    service.start()
    start_s = time.perf_counter() - started
    times: dict[str, list[float]] = {kind: [] for kind in events}
    for batch in zip(*events.values(), strict=True):
        for event in batch:
            started = time.perf_counter()
            outcome = service.handle(event)
            times[event.subject].append(time.perf_counter() - started)
            if outcome != OK:
                raise RuntimeError(f"{event.subject} for {event.node_id} was not applied ({outcome})")
    every = [t for kind in times.values() for t in kind]
    return {"start_s": start_s, "all": _ms(every), **{kind: _ms(ts) for kind, ts in times.items()}}


def measure_status(store: ArchiveStore, run_id: str, repeats: int = 3) -> dict:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_status(store, run_id)
        times.append(time.perf_counter() - started)
    return _ms(times)


def _timed(build: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    count = build()
    return count, time.perf_counter() - started


def bench_backend(backend: str, size: int, live: int, workdir: Path, log: Callable[[str], None]) -> dict:
    """Build the synthetic run in `backend` and measure it; returns the backend's section of the report."""
    synthetic = SyntheticRun(size, live)
    store = _open(backend, workdir)
    try:
        store.put_run(synthetic.config)
        inserted, build_s = _timed(lambda: store.insert_nodes(synthetic.nodes()))
        sample = store.get_node(RUN_ID, "n001")
        log(f"{backend} {size}: built {inserted} nodes in {build_s:.1f} s "
            f"({len(sample.model_dump_json()) / 1000:.0f} KB a document)")
        counters = store.counters(RUN_ID)
        events = measure_events(store, synthetic.config, synthetic.events())
        log(f"{backend} {size}: start (resume) {events['start_s']:.1f} s; per event median "
            f"{events['all']['median_ms']:.1f} ms, p90 {events['all']['p90_ms']:.1f} ms")
        status = measure_status(store, RUN_ID)
        log(f"{backend} {size}: run_status median {status['median_ms']:.0f} ms")
        return {"nodes": inserted, "build_s": build_s, "document_bytes": len(sample.model_dump_json()),
                "depth": counters.depth, "evaluated": counters.evaluated, "per_event": events, "run_status": status}
    finally:
        store.close()


def _open(backend: str, workdir: Path) -> ArchiveStore:
    if backend == "sqlite":
        return SQLiteStore.in_run_dir(workdir)
    if backend == "mongomock":
        import mongomock

        from archive.mongo_store import MongoStore

        return MongoStore(mongomock.MongoClient())
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def measure_selection(run_dir: Path, selection: str, timeout_s: float) -> dict:
    """choose_parent over the archive in `run_dir`, in a fresh process (its peak RSS is the selection's)."""
    command = [sys.executable, "-m", "app.bench_archive", str(run_dir), selection]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "timeout_s": timeout_s}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def select_once(run_dir: Path, selection: str) -> dict:
    """The subprocess side of `measure_selection`."""
    from proposer.parents import choose_parent

    with SQLiteStore.in_run_dir(run_dir) as store:
        config = store.get_run(RUN_ID).model_copy(update={"parent_selection": selection})
        started = time.perf_counter()
        nodes = store.nodes(RUN_ID)
        load_s = time.perf_counter() - started
        loaded_rss = _rss_mb()
        node_id = f"n{len(nodes) + 7:03d}"
        started = time.perf_counter()
        parent = choose_parent(nodes, config, node_id)
        select_s = time.perf_counter() - started
        tracemalloc.start()
        choose_parent(nodes, config, node_id)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {"selection": selection, "nodes": len(nodes), "load_s": load_s, "select_s": select_s,
            "parent": parent.node_id, "select_peak_mb": peak / 2**20, "rss_after_load_mb": loaded_rss,
            "peak_rss_mb": _rss_mb()}


def _rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def bench_archive(sizes: Sequence[int] = DEFAULT_SIZES, backends: Sequence[str] = BACKENDS, live: int = 12,
                  selections: Sequence[str] = SELECTIONS, selection_timeout_s: float = 600.0,
                  json_path: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """The report: per size, per backend, the build, per-event and status timings; parent selection on SQLite."""
    report: dict = {"command": invoked_command(), "python": platform.python_version(),
                    "machine": platform.machine(), "live_events_per_kind": live, "sizes": {}}
    for size in sizes:
        entry: dict = {}
        for backend in backends:
            with tempfile.TemporaryDirectory(prefix=f"poise-bench-archive-{backend}-") as tmp:
                entry[backend] = bench_backend(backend, size, live, Path(tmp), log)
                if backend == "sqlite" and selections:
                    entry["selection"] = {}
                    for selection in selections:
                        entry["selection"][selection] = result = measure_selection(Path(tmp), selection,
                                                                                   selection_timeout_s)
                        log(f"sqlite {size}: choose_parent {selection}: {result}")
        report["sizes"][str(size)] = entry
        write_json_report(json_path, report)
    return report


if __name__ == "__main__":  # the selection subprocess: python -m app.bench_archive RUN_DIR SELECTION
    print(json.dumps(select_once(Path(sys.argv[1]), sys.argv[2])))
