"""`poise bench chaos`: faults injected into a tiny distributed run, and what the archive holds afterwards.

One trial (`run_trial`) starts nats-server and the six services, each its own process (app/cluster.py), posts a
tiny run and, at a moment drawn from the trial's seed, injects one fault:

- kill: SIGKILL of one service (the archive included), started again after a drawn delay;
- stop: SIGSTOP of one service for longer than the ack wait, then SIGCONT;
- nats: nats-server stopped and started again on the same port and store after a drawn delay.

The moment is a point in the run's progress, not in time (`progress`: the pipeline steps its nodes have taken
plus their fresh-seed evaluations, read through the archive's API), plus a drawn offset of a few seconds, so a
schedule lands at the same stage of the run on a fast machine and a slow one. After the run the archive is
checked (`archive_verdict`): every node reflected or failed with a reason, no node lost (every id the API ever
listed is still there, and no number is skipped), none duplicated (no algorithm proposed twice, no seed
evaluated twice on one node), the budget evaluated, the root's and the best's seeds present, lineage sound, the
store's counters equal to its documents, and every document valid against poise/contracts.py. Recovery is the
time from the fault to the next progress the API shows.

`embedded_kills` is the embedded mode's guarantee: a tiny `poise run --parallel 1` SIGKILLed at drawn moments
and resumed after each ends with the same archive (node ids, statuses, parents, scores, curves) as an
uninterrupted run of the same seed. (`--parallel` above 1 is not reproducible message for message,
poise/bus.py.)
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from app.cluster import ACK_WAIT_S, Cluster, ClusterError
from app.reports import invoked_command, write_json_report
from poise.contracts import PIPELINE, ROOT_ID, Node, NodeStatus, node_number
from poise.description.proposals import description_key
from poise.settings import SERVICES

FAULT_KINDS = ("kill", "stop", "nats")
# The smallest run that exercises every path: the root's extra seed, two children side by side, the best's
# fresh-seed confirmation.
TINY_RUN = {"protocol": "tiny", "budget": 2, "parallel": 2, "root_seeds": 2, "replicate_seeds": 1}
RUN_ID = "chaos"
TRIAL_TIMEOUT_S = 900.0
POLL_S = 0.25
OFFSET_S = (0.0, 2.0)   # after the drawn progress, the fault waits this long (uniform)
DOWN_S = (0.5, 5.0)     # kill, nats: the piece is down this long before it starts again (uniform)
STOP_PAST_ACK_S = (2.0, 8.0)  # stop: the pause lasts the ack wait plus this (uniform)
Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Fault:
    """One drawn fault: what is hit, when (a progress, then an offset), and for how long."""

    kind: str
    target: str          # a service, or "nats"
    after_progress: int  # strike once the run's progress reaches this ...
    offset_s: float      # ... and this long after
    down_s: float        # kill, nats: until the piece starts again; stop: how long it stays stopped

    def describe(self) -> str:
        verb = {"kill": "SIGKILL", "stop": "SIGSTOP", "nats": "restart"}[self.kind]
        back = "SIGCONT" if self.kind == "stop" else "back"
        return (f"{verb} {self.target} at progress {self.after_progress} +{self.offset_s:.1f} s, {back} after "
                f"{self.down_s:.1f} s")


def final_progress(run: dict) -> int:
    """The least progress a finished run reaches: every node through the pipeline, the root's extra seeds and
    the best's fresh seeds."""
    return (run["budget"] + 1) * len(PIPELINE) + run["root_seeds"] - 1 + run["replicate_seeds"]


def progress(nodes: Iterable[Node]) -> int:
    """How far a run has come: each node's steps through the pipeline (a failed node counts as through) plus
    its fresh-seed evaluations. It only grows while the run goes on."""
    steps = 0
    for node in nodes:
        steps += len(PIPELINE) if node.status == NodeStatus.FAILED else PIPELINE.index(node.status) + 1
        steps += len(node.replicates)
    return steps


def draw_fault(seed: int, kind: str, run: dict, target: str | None = None, ack_wait_s: float = 10.0) -> Fault:
    """The fault of trial `seed`: the same seed, kind and run give the same fault."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
    rng = random.Random(f"chaos/{seed}/{kind}/{target}")
    if kind == "nats":
        target = "nats"
    elif target is None:
        target = rng.choice(SERVICES)
    elif target not in SERVICES:
        raise ValueError(f"unknown service {target!r}; one of {', '.join(SERVICES)}")
    after = rng.randint(1, final_progress(run) - 2)  # the last step is often a reflection, over in a blink
    offset = round(rng.uniform(*OFFSET_S), 2)
    down = ack_wait_s + rng.uniform(*STOP_PAST_ACK_S) if kind == "stop" else rng.uniform(*DOWN_S)
    return Fault(kind, target, after, offset, round(down, 2))


def parse_kind(text: str) -> tuple[str, str | None]:
    """`kill`, `kill:trainer`, `stop:archive`, `nats`: the kind and the fixed target (None: drawn)."""
    kind, _, target = text.partition(":")
    if kind not in FAULT_KINDS or (target and (kind == "nats" or target not in SERVICES)):
        raise ValueError(f"fault {text!r}: use kill, stop or nats, optionally kill:SERVICE or stop:SERVICE with "
                         f"SERVICE one of {', '.join(SERVICES)}")
    return kind, target or None


# -------------------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    """What the archive holds after a run, against the invariants (module docstring)."""

    nodes: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.incomplete or self.problems)


def lineage_problems(nodes: list[Node]) -> list[str]:
    """Each child's genealogy agrees with its proposal and its evaluated parent."""
    by_id = {n.node_id: n for n in nodes}
    problems = []
    for node in nodes:
        g = node.genealogy
        if node.node_id == ROOT_ID:
            if g.depth != 0 or g.parent_ids:
                problems.append(f"the root has depth {g.depth} and parents {g.parent_ids}")
            continue
        if g.parent_ids != node.proposal.parent_ids or len(g.parent_ids) != 1:
            problems.append(f"{node.node_id}: genealogy parents {g.parent_ids}, proposal {node.proposal.parent_ids}")
            continue
        parent = by_id.get(g.parent_ids[0])
        if parent is None or parent.evaluation is None:
            problems.append(f"{node.node_id} was bred from {g.parent_ids[0]}, which is missing or unevaluated")
        elif g.depth != parent.genealogy.depth + 1 or g.ancestors != [*parent.genealogy.ancestors, parent.node_id]:
            problems.append(f"{node.node_id}: depth {g.depth}, ancestors {g.ancestors} do not follow {parent.node_id}")
    return problems


def archive_verdict(store_path: Path, run_id: str, run: dict, seen: set[str],
                    api_nodes: list[Node] | None = None) -> Verdict:
    """The invariants over the archive's store at `store_path` (read-only; every document validated against the
    contracts on read), `seen` the node ids listed during the run, `api_nodes` the API's final answer."""
    from archive.sqlite_store import SQLiteStore
    from poise.store import ArchiveError

    verdict = Verdict()
    try:
        with SQLiteStore(store_path, read_only=True) as store:
            config = store.get_run(run_id)
            nodes = store.nodes(run_id)
            counters = store.counters(run_id)
    except ArchiveError as err:  # a document that does not validate, or an unreadable store
        verdict.problems.append(f"the archive cannot be read against the contracts: {err}")
        return verdict
    if config is None:
        verdict.problems.append(f"run {run_id} is not in the archive")
        return verdict
    verdict.nodes = len(nodes)
    ids = [n.node_id for n in nodes]
    numbers = sorted(node_number(i) for i in ids)
    verdict.lost = sorted(seen - set(ids)) + [f"n{k:03d} (never stored)" for k in range(numbers[-1] if numbers else 0)
                                              if k not in numbers]
    if len(set(ids)) != len(ids):
        verdict.duplicated.append(f"node ids listed twice: {sorted(i for i in ids if ids.count(i) > 1)}")
    keys: dict[str, str] = {}
    for node in nodes:
        key = description_key(node.proposal)
        if key in keys:
            verdict.duplicated.append(f"{node.node_id} proposes the algorithm of {keys[key]}")
        keys.setdefault(key, node.node_id)
        seeds = [r.seed for r in node.replicates]
        if len(set(seeds)) != len(seeds) or (node.evaluation is not None and node.evaluation.seed in seeds):
            verdict.duplicated.append(f"{node.node_id} holds seeds {[node.evaluation.seed, *seeds]}")
        if node.status == NodeStatus.FAILED:
            verdict.failed += 1
            if node.failure is None or not node.failure.reason:
                verdict.incomplete.append(f"{node.node_id} failed without a reason")
        elif node.status != NodeStatus.REFLECTED:
            verdict.incomplete.append(f"{node.node_id} is {node.status}")
    verdict.problems += lineage_problems(nodes)
    verdict.problems += _budget_problems(nodes, run)
    recount = {status: sum(n.status == status for n in nodes) for status in NodeStatus}
    if ({s: counters.counts.get(s, 0) for s in NodeStatus} != recount
            or counters.evaluated != sum(n.evaluation is not None for n in nodes)
            or counters.max_number != (numbers[-1] if numbers else -1)):
        verdict.problems.append(f"the store's counters {counters.model_dump(mode='json')} disagree with its "
                                f"documents ({recount})")
    if api_nodes is not None and sorted((n.node_id, n.status) for n in api_nodes) != sorted(
            (n.node_id, n.status) for n in nodes):
        verdict.problems.append("the API lists other nodes than the store holds")
    return verdict


def _budget_problems(nodes: list[Node], run: dict) -> list[str]:
    """The budget evaluated (no more), the root's seeds and the best's fresh seeds all there."""
    problems = []
    children = [n for n in nodes if n.node_id != ROOT_ID]
    evaluated = [n for n in children if n.evaluation is not None]
    if len(evaluated) != run["budget"]:
        problems.append(f"{len(evaluated)} children evaluated for a budget of {run['budget']}")
    root = next((n for n in nodes if n.node_id == ROOT_ID), None)
    if root is None:
        problems.append("no root")
    elif len(root.replicates) != run["root_seeds"] - 1 and root.status != NodeStatus.FAILED:
        problems.append(f"the root has {1 + len(root.replicates)} of {run['root_seeds']} seeds")
    if evaluated and not any(len(n.replicates) >= run["replicate_seeds"] for n in evaluated):
        problems.append(f"no child was confirmed with {run['replicate_seeds']} fresh seed(s)")
    return problems


# ---------------------------------------------------------------------------------------- one trial


@dataclass
class TrialResult:
    seed: int
    kind: str
    fault: Fault
    injected: bool = False
    struck_at_s: float | None = None   # since the run was posted
    struck_progress: int | None = None
    after_finish: bool = False         # the run had finished when the fault struck
    recover_s: float | None = None     # from the fault to the next progress
    completed: bool = False
    stop_reason: str | None = None
    wall_s: float = 0.0                # from the post to the finish
    startup_s: float = 0.0             # the cluster's start
    verdict: Verdict = field(default_factory=Verdict)
    log_dir: str = ""

    @property
    def ok(self) -> bool:
        return self.completed and self.verdict.ok

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def line(self) -> str:
        if not self.completed:
            outcome = "did not complete"
        else:
            outcome = f"completed in {self.wall_s:.0f} s"
        recovered = f", next progress {self.recover_s:.1f} s after the fault" if self.recover_s is not None else ""
        struck = "" if self.injected else " (the fault never struck: the run ended first)"
        if self.after_finish:
            struck = " (struck after the run had finished)"
        v = self.verdict
        problems = "; ".join(v.lost + v.duplicated + v.incomplete + v.problems)
        return (f"seed {self.seed} {self.fault.describe()}{struck}: {outcome}{recovered}; {v.nodes} nodes, "
                f"{len(v.lost)} lost, {len(v.duplicated)} duplicated, {v.failed} failed"
                + (f" — {problems}" if problems else ""))


class RunWatch:
    """The run as seen through the archive's API: every node id ever listed, its progress, and when it moved."""

    def __init__(self, cluster: Cluster, run_id: str) -> None:
        self.cluster, self.run_id = cluster, run_id
        self.seen: set[str] = set()
        self.progress = 0
        self.moves: list[float] = []  # monotonic times at which progress grew

    def poll(self) -> None:
        try:
            nodes = self.cluster.nodes(self.run_id, timeout_s=1.0)
        except (httpx.HTTPError, ValueError):  # the archive is down, stopped or starting
            return
        self.seen |= {n.node_id for n in nodes}
        now = progress(nodes)
        if now > self.progress:
            self.progress = now
            self.moves.append(time.monotonic())

    def next_move_after(self, moment: float) -> float | None:
        return next((t - moment for t in self.moves if t > moment), None)


def strike(cluster: Cluster, fault: Fault) -> None:
    if fault.kind == "nats":
        cluster.nats.stop()
    elif fault.kind == "kill":
        cluster[fault.target].kill()
    else:
        cluster[fault.target].pause()


def restore(cluster: Cluster, fault: Fault) -> None:
    if fault.kind == "nats":
        cluster.nats.start()
    elif fault.kind == "kill":
        cluster[fault.target].start()
    else:
        cluster[fault.target].resume()


def run_trial(seed: int, kind: str, workdir: Path, target: str | None = None, run: dict | None = None,
              timeout_s: float = TRIAL_TIMEOUT_S) -> TrialResult:
    """One tiny distributed run of seed `seed` with one fault of `kind` (module docstring); the cluster's logs
    stay in `workdir`."""
    run = {**TINY_RUN, **(run or {})}
    started = time.monotonic()
    cluster = Cluster(workdir)
    fault = draw_fault(seed, kind, run, target, cluster.ack_wait_s)
    result = TrialResult(seed, kind, fault, log_dir=str(workdir))
    watch = RunWatch(cluster, RUN_ID)
    api_nodes = None
    try:
        cluster.start(SERVICES)
        result.startup_s = time.monotonic() - started
        _inject_and_wait(cluster, watch, fault, {"run_id": RUN_ID, "seed": seed, **run}, timeout_s, result)
        api_nodes = cluster.nodes(RUN_ID)
    except (ClusterError, httpx.HTTPError) as err:
        result.verdict.problems.append(f"{type(err).__name__}: {str(err)[:3000]}")
    finally:
        cluster.stop()
    store = cluster.work_dir / "archive.db"
    if result.completed or store.exists():  # a run that did not complete: what its archive holds, to diagnose
        problems = result.verdict.problems
        result.verdict = archive_verdict(store, RUN_ID, run, watch.seen, api_nodes)
        result.verdict.problems[:0] = problems
        if result.completed and result.stop_reason != "budget reached":
            result.verdict.problems.append(f"the run stopped: {result.stop_reason}")
    return result


def _inject_and_wait(cluster: Cluster, watch: RunWatch, fault: Fault, config: dict, timeout_s: float,
                     result: TrialResult) -> None:
    """Post the run, strike and restore at the fault's moment, and wait for the archive to finish the run."""
    posted = time.monotonic()
    cluster.post_run(config)
    armed = struck = restored = None
    finished_before = 0
    while True:
        watch.poll()
        now = time.monotonic()
        finished = cluster.finished_lines(RUN_ID)
        if struck is None:
            if finished:
                break  # the run ended before the fault could strike
            if watch.progress >= fault.after_progress:
                armed = armed or now
                if now - armed >= fault.offset_s:
                    finished_before = cluster.finished_lines(RUN_ID)
                    strike(cluster, fault)
                    struck, result.injected = time.monotonic(), True
                    result.struck_at_s, result.struck_progress = struck - posted, watch.progress
                    result.after_finish = finished_before > 0
        elif restored is None:
            if now - struck >= fault.down_s:
                restore(cluster, fault)
                restored = time.monotonic()
        elif finished > finished_before or result.after_finish:
            break
        for service in cluster.services.values():
            down = service.name == fault.target and struck is not None and restored is None
            if not down and not service.alive():
                raise ClusterError(f"{service.name} died:\n{service.log_text()[-3000:]}")
        if now - posted > timeout_s:
            raise ClusterError(f"run {RUN_ID} did not finish within {timeout_s:.0f} s:\n{cluster.diagnose()}")
        time.sleep(POLL_S)
    result.wall_s = time.monotonic() - posted
    if struck is not None:
        result.recover_s = watch.next_move_after(struck)
    reasons = re.findall(rf"run {RUN_ID} finished: (.*)", cluster["archive"].log_text())
    result.stop_reason = reasons[-1].strip() if reasons else None
    counts = cluster.status(RUN_ID)["counts"]
    if any(counts[s] for s in ("proposed", "implemented", "trained", "evaluated")):
        raise ClusterError(f"run {RUN_ID} finished with nodes in the pipeline: {counts}")
    watch.poll()
    result.completed = True


# ------------------------------------------------------------------------------------------- the bench


def kind_table(trials: list[dict]) -> list[dict]:
    """Per fault kind, over trials as `TrialResult.as_dict` writes them: trials, faults that struck, runs
    completed, nodes lost, duplicated and failed, trials with other problems, and the recovery times."""
    rows = []
    for kind in dict.fromkeys(t["kind"] for t in trials):
        mine = [t for t in trials if t["kind"] == kind]
        recover = [t["recover_s"] for t in mine if t["recover_s"] is not None]
        runs = [t["wall_s"] for t in mine if t["completed"]]
        rows.append({
            "kind": kind, "trials": len(mine), "struck": sum(t["injected"] and not t["after_finish"] for t in mine),
            "completed": len(runs), "lost": sum(len(t["verdict"]["lost"]) for t in mine),
            "duplicated": sum(len(t["verdict"]["duplicated"]) for t in mine),
            "failed_nodes": sum(t["verdict"]["failed"] for t in mine),
            "other_problems": sum(bool(t["verdict"]["problems"] or t["verdict"]["incomplete"]) for t in mine),
            "recover_median_s": round(statistics.median(recover), 1) if recover else None,
            "recover_max_s": round(max(recover), 1) if recover else None,
            "run_median_s": round(statistics.median(runs), 1) if runs else None,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    def seconds(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    lines = ["| fault | trials | struck | runs completed | nodes lost | nodes duplicated | nodes failed | "
             "other problems | recovery median s | recovery max s | run median s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['kind']} | {row['trials']} | {row['struck']} | {row['completed']} | {row['lost']} | "
                     f"{row['duplicated']} | {row['failed_nodes']} | {row['other_problems']} | "
                     f"{seconds(row['recover_median_s'])} | {seconds(row['recover_max_s'])} | "
                     f"{seconds(row['run_median_s'])} |")
    return "\n".join(lines)


def bench_chaos(trials: int, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS, json_path: Path | None = None,
                work_root: Path | None = None, keep: bool = False, embedded: int = 0, resume: bool = False,
                log: Log = print) -> dict:
    """`trials` trials, the kinds in turn, seeds `seed`, `seed` + 1, ...; a trial that breaks an invariant keeps
    its logs under `work_root` (default: a temporary directory, kept then). `embedded`: also SIGKILL a tiny
    embedded run at that many moments (`embedded_kills`). `resume`: keep the trials the report at `json_path`
    holds (same seed and kinds) and run the rest."""
    parsed = [parse_kind(k) for k in kinds]
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the trial's cluster on the way out
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    root = Path(work_root) if work_root else Path(tempfile.mkdtemp(prefix="poise-chaos-"))
    report: dict = {"command": invoked_command(), "run": TINY_RUN, "ack_wait_s": ACK_WAIT_S, "seed": seed,
                    "kinds_in_turn": list(kinds), "trials": [], "kinds": []}
    if resume and json_path is not None and Path(json_path).exists():
        report["trials"] = resumable_trials(Path(json_path), seed, kinds)[:trials]
        log(f"resuming: {len(report['trials'])} trial(s) already in {json_path}")
    for i in range(len(report["trials"]), trials):
        kind_text = kinds[i % len(kinds)]
        kind, target = parsed[i % len(parsed)]
        workdir = root / f"trial-{i:03d}-{kind_text.replace(':', '-')}"
        result = run_trial(seed + i, kind, workdir, target)
        result.kind = kind_text
        log(f"trial {i + 1}/{trials} {'ok  ' if result.ok else 'FAIL'} {result.line()}")
        if result.ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        report["trials"].append(result.as_dict())
        report["kinds"] = kind_table(report["trials"])
        write_json_report(json_path, report)
    report["kinds"] = kind_table(report["trials"])
    if report["trials"]:
        log(markdown_table(report["kinds"]))
    if embedded:
        kills = embedded_kills(seed, embedded, root / "embedded")
        log(kills.line())
        report["embedded"] = asdict(kills)
        if kills.same and not keep:
            shutil.rmtree(root / "embedded", ignore_errors=True)
    write_json_report(json_path, report)
    if any(not t["ok"] for t in report["trials"]) or (embedded and not report["embedded"]["same"]):
        log(f"logs of the failing trials: {root}")
    elif not work_root:
        shutil.rmtree(root, ignore_errors=True)
    return report


def resumable_trials(json_path: Path, seed: int, kinds: tuple[str, ...]) -> list[dict]:
    """The trials of an earlier report of the same schedule; ValueError if it was another."""
    earlier = json.loads(json_path.read_text())
    if earlier.get("seed") != seed or earlier.get("kinds_in_turn") != list(kinds):
        raise ValueError(f"{json_path} holds trials of seed {earlier.get('seed')} and kinds "
                         f"{earlier.get('kinds_in_turn')}, not of seed {seed} and kinds {list(kinds)}; give another "
                         "--json or leave out --resume")
    return earlier["trials"]


# ---------------------------------------------------------------------------------------- embedded mode


EMBEDDED_RUN = {"protocol": "tiny", "budget": 2, "root_seeds": 2, "replicate_seeds": 2}
EMBEDDED_NAME = "embedded"  # both runs' directory name, hence their run id
EMBEDDED_TIMEOUT_S = 900.0


def embedded_command(run_dir: Path, seed: int, run: dict) -> list[str]:
    return [sys.executable, "-m", "app.cli", "run", "--protocol", run["protocol"], "--budget", str(run["budget"]),
            "--parallel", "1", "--root-seeds", str(run["root_seeds"]), "--replicate-seeds",
            str(run["replicate_seeds"]), "--seed", str(seed), "--run-dir", str(run_dir)]


def draw_kill_moments(seed: int, moments: int, run: dict) -> list[tuple[int, float]]:
    """`moments` (progress, offset) pairs in the order the run reaches them."""
    rng = random.Random(f"embedded-kills/{seed}")
    return sorted((rng.randint(1, final_progress(run) - 1), round(rng.uniform(*OFFSET_S), 2))
                  for _ in range(moments))


def stored_progress(run_dir: Path) -> int:
    """The progress of the run in `run_dir`, read beside the process that writes it (0 before it has a store)."""
    from archive.sqlite_store import DB_FILENAME, SQLiteStore
    from poise.store import ArchiveError

    try:
        with SQLiteStore(run_dir / DB_FILENAME, read_only=True, timeout_s=5.0) as store:
            return sum(progress(store.nodes(run_id)) for run_id in store.run_ids())
    except ArchiveError:
        return 0


def archive_digest(run_dir: Path) -> dict[str, dict]:
    """Per node what a resumed run must reproduce: status, parents, failure, every score, the reward curve."""
    from archive.sqlite_store import DB_FILENAME, SQLiteStore

    with SQLiteStore(run_dir / DB_FILENAME, read_only=True) as store:
        nodes = [n for run_id in store.run_ids() for n in store.nodes(run_id)]

    def scores(evaluation) -> dict | None:
        if evaluation is None:
            return None
        return {"seed": evaluation.seed, "overall": evaluation.overall, "archive_seq": evaluation.archive_seq,
                "suites": {name: s.value for name, s in sorted(evaluation.suites.items())}}

    return {n.node_id: {
        "status": n.status.value, "parents": n.genealogy.parent_ids, "proposal": n.proposal.name,
        "failure": n.failure.phase.value if n.failure else None, "evaluation": scores(n.evaluation),
        "replicates": [scores(r) for r in n.replicates],
        "reward_curve": [s.reward_mean for s in n.trajectory.steps] if n.trajectory else None,
    } for n in nodes}


def digest_differences(expected: dict[str, dict], actual: dict[str, dict]) -> list[str]:
    differences = []
    for node_id in sorted(set(expected) | set(actual)):
        if node_id not in actual:
            differences.append(f"{node_id} missing")
        elif node_id not in expected:
            differences.append(f"{node_id} is extra ({actual[node_id]['status']})")
        else:
            differences += [f"{node_id} {key}: {expected[node_id][key]} != {value}"
                            for key, value in actual[node_id].items() if expected[node_id][key] != value]
    return differences


@dataclass
class KillsResult:
    seed: int
    moments: list[tuple[int, float]]
    kills: int = 0                 # moments at which the run was still going and was killed
    same: bool = False
    differences: list[str] = field(default_factory=list)
    reference_s: float = 0.0
    killed_s: float = 0.0          # every process of the killed run, resumes included
    nodes: int = 0
    log_dir: str = ""

    def line(self) -> str:
        verdict = "the same archive" if self.same else f"a different archive: {'; '.join(self.differences[:10])}"
        return (f"embedded, seed {self.seed}: killed {self.kills} times at {len(self.moments)} drawn moments and "
                f"resumed, {self.nodes} nodes, {verdict} (uninterrupted {self.reference_s:.0f} s, killed and "
                f"resumed {self.killed_s:.0f} s)")


def embedded_kills(seed: int, moments: int, workdir: Path, run: dict | None = None,
                   timeout_s: float = EMBEDDED_TIMEOUT_S) -> KillsResult:
    """An uninterrupted tiny embedded run and the same run SIGKILLed at `moments` drawn moments, resumed after
    each; compares their archives (`archive_digest`)."""
    run = {**EMBEDDED_RUN, **(run or {})}
    reference, killed = workdir / "reference" / EMBEDDED_NAME, workdir / "killed" / EMBEDDED_NAME
    result = KillsResult(seed, draw_kill_moments(seed, moments, run), log_dir=str(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _run_to_end(embedded_command(reference, seed, run), workdir / "reference.log", timeout_s)
    result.reference_s = time.monotonic() - started
    started = time.monotonic()
    command = embedded_command(killed, seed, run)
    for after, offset in result.moments:
        with (workdir / "killed.log").open("ab") as out:
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            while child.poll() is None and stored_progress(killed) < after:
                _check_time(started, timeout_s)
                time.sleep(POLL_S)
            try:
                child.wait(offset)
            except subprocess.TimeoutExpired:
                child.kill()  # SIGKILL
                child.wait()
                result.kills += 1
                continue
            if child.returncode == 0:
                break  # the run finished before this moment: the later ones never come
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode != 0:
            raise ClusterError(f"`{' '.join(command)}` exited {child.returncode}; see {workdir / 'killed.log'}")
    _run_to_end(command, workdir / "killed.log", timeout_s)
    result.killed_s = time.monotonic() - started
    expected, actual = archive_digest(reference), archive_digest(killed)
    result.nodes = len(actual)
    result.differences = digest_differences(expected, actual)
    result.same = not result.differences
    return result


def _run_to_end(command: list[str], log_path: Path, timeout_s: float) -> None:
    with log_path.open("ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    if done.returncode != 0:
        raise ClusterError(f"`{' '.join(command)}` exited {done.returncode}; see {log_path}")


def _check_time(started: float, timeout_s: float) -> None:
    if time.monotonic() - started > timeout_s:
        raise ClusterError(f"the killed embedded run did not reach its moments within {timeout_s:.0f} s")
