"""The `poise` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sqlite3
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from app.reports import invoked_command, write_json_report
from poise.contracts import ROOT_ID, Backends, BestStatus, NodeStatus, Objective, RootStatus, RunConfig
from poise.settings import SERVICES

# torch, transformers, sklearn and scipy cost seconds to import: commands import them where they are used, so
# that --help, status and show start in a fraction of a second (tests/test_cli.py checks the module stays light).


def selfcheck() -> int:
    """Structural check of every reference algorithm; exit status 1 if any fails."""
    from poise.algorithm import check_passed, describe_problems, structural_check
    from poise.algorithms import REFERENCE_ALGORITHMS

    failed = 0
    for algorithm in REFERENCE_ALGORITHMS.values():
        started = time.perf_counter()
        results = structural_check(algorithm.source())
        ok = check_passed(results)
        failed += not ok
        status = "ok" if ok else "FAILED"
        print(f"  {algorithm.name:<24} {status:<6} {1000 * (time.perf_counter() - started):6.1f} ms  "
              f"{', '.join(algorithm.mechanisms)}")
        if not ok:
            print("    " + describe_problems(results).replace("\n", "\n    "))
    print(f"{len(REFERENCE_ALGORITHMS) - failed}/{len(REFERENCE_ALGORITHMS)} reference algorithms pass the check")
    return 1 if failed else 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    return selfcheck()


DEFAULT_RUN_DIR = "runs/default"
RUN_SETTINGS = ("budget", "parallel", "seed", "protocol", "parent_selection", "root_seeds", "replicate_seeds",
                "seeding", "split", "report_seeds", "llm_budget_usd", "early_stop", "gpu_hours_budget")
LLM_OPERATORS = ("propose", "screen", "implement", "reflect")
# The flag that sets each RunConfig field whose name is not its flag's (the others: --field-name).
FLAG_OF_FIELD = {"kind": "--objective", "agents": "--llm"}


def _run_id(run_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", run_dir.resolve().name).lstrip("-_.") or "run"
    return name[:64]


def run_config(args: argparse.Namespace, stored: RunConfig | None, run_id: str) -> RunConfig:
    """The run's config from `poise run`'s flags over the stored one (resuming) or the defaults; ValueError
    when a setting is invalid. Whether a resumed run may change a setting is the runner's decision."""
    given: dict[str, object] = {k: getattr(args, k) for k in RUN_SETTINGS if getattr(args, k) is not None}
    objective = {k: v for k, v in (("kind", args.objective), ("accuracy_tolerance", args.accuracy_tolerance),
                                   ("directive", args.directive)) if v is not None}
    if objective:
        given["objective"] = (stored.objective if stored else Objective()).model_copy(update=objective)
    backends: dict[str, object] = llm_settings(args.llm) if args.llm else {}
    trainer = getattr(args, "trainer", None)
    if trainer is not None:
        if stored is not None and stored.backends.trainer != trainer:
            raise ValueError(f"the run was trained with {stored.backends.trainer!r}; --trainer {trainer} "
                             "would make its nodes incomparable (start a run in another --run-dir)")
        backends["trainer"] = trainer
    evaluator = getattr(args, "evaluator", None)
    if evaluator is not None:
        if stored is not None and stored.backends.evaluator != evaluator:
            raise ValueError(f"the run was evaluated with {stored.backends.evaluator!r}; --evaluator {evaluator} "
                             "would make its nodes incomparable (start a run in another --run-dir)")
        backends["evaluator"] = evaluator
    if backends:
        given["backends"] = (stored.backends if stored else Backends()).model_copy(update=backends)
    try:
        config = stored.model_copy(update=given) if stored else RunConfig(run_id=run_id, **given)
        return RunConfig.model_validate(config.model_dump())
    except ValidationError as err:
        raise ValueError(settings_error_text(err)) from None


def settings_error_text(err: ValidationError) -> str:
    """pydantic's errors as `--flag: what is wrong (got VALUE)`, one per problem, without its documentation links."""
    problems = []
    for error in err.errors():
        field = str(error["loc"][-1]) if error["loc"] else ""
        flag = FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-")) if field else "settings"
        message = error["msg"].removeprefix("Value error, ")  # a validator's own message says what it got
        got = "" if error["type"] == "value_error" else f" (got {error['input']!r})"
        problems.append(f"{flag}: {message}{got}")
    return "; ".join(problems)


def llm_settings(values: list[str]) -> dict[str, object]:
    """`--llm SPEC` (every operator) and `--llm OPERATOR=SPEC` (one operator) as Backends fields; ValueError
    for an unknown operator or a malformed spec."""
    llm: str | None = None
    agents: dict[str, str] = {}
    for value in values:
        operator, sep, spec = value.partition("=")
        if not sep:
            llm = value
        elif operator in LLM_OPERATORS:
            agents[operator] = spec
        else:
            raise ValueError(f"--llm {value!r}: {operator!r} is not an operator ({', '.join(LLM_OPERATORS)})")
    settings: dict[str, object] = {"agents": agents} if agents else {}
    if llm is not None:
        settings["llm"] = llm
    try:
        Backends.model_validate(settings)  # each spec is checked here, with the spec's own error message
    except ValidationError as err:
        raise ValueError(settings_error_text(err)) from None
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from app.runner import RunError, run
    from archive.sqlite_store import SQLiteStore
    from poise.testbed.protocol import PROTOCOLS

    if args.protocol is not None and args.protocol not in PROTOCOLS:
        print(f"unknown protocol {args.protocol!r}; known: {', '.join(PROTOCOLS)}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    stored = None
    if (run_dir / "archive.db").exists():
        with SQLiteStore.in_run_dir(run_dir) as store:
            ids = store.run_ids()
            stored = store.get_run(ids[0]) if ids else None
    try:
        config = run_config(args, stored, _run_id(run_dir))
    except ValueError as err:
        print(f"invalid run settings: {err}", file=sys.stderr)
        return 2
    problem = _run_dir_problem(run_dir)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    evaluator = _evaluator(args, config.backends.evaluator, run_dir.resolve(),
                           startup_timeout_s=args.vllm_startup_timeout)
    if evaluator is None:
        return 2
    verl = None
    if config.backends.trainer == "verl":
        verl = _verl_trainer()
        if verl is None:
            evaluator.close()
            return 2
    try:
        summary = run(config, run_dir, stream=sys.stdout, evaluator=evaluator, force=args.force, verl=verl)
    except RunError as err:
        print(str(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; `poise run --run-dir {run_dir}` resumes the run where it stopped", file=sys.stderr)
        return 130
    _print_outcome(summary)
    shortfall = _shortfall(summary)
    if shortfall:
        print(shortfall, file=sys.stderr)
        return 1
    _print_next(args.run_dir)
    return 0


def _print_next(run_dir: str) -> None:
    """What to look at after a run, as commands the user can paste: `bin/poise` when started through it."""
    prog = os.environ.get("POISE_PROG") or "poise"
    if os.path.isabs(prog) and Path(prog).is_relative_to(Path.cwd()):
        prog = str(Path(prog).relative_to(Path.cwd()))
    where = "" if run_dir == DEFAULT_RUN_DIR else f" --run-dir {shlex.quote(run_dir)}"
    print("next:")
    for command, what in (("status", "where the run stands"), ("show best", "the best node: proposal, code, curves, "
                                                                            "metrics, reflection"),
                          ("report", "an HTML report with the lineage and the figures"),
                          ("ui", "the web UI, live beside a running `poise run`")):
        print(f"  {prog} {command}{where}   # {what}")


def _run_dir_problem(run_dir: Path) -> str | None:
    """Why `poise run` cannot write in `run_dir` (made when missing), or None. A path that is a file is left to the
    runner's check of the directory (app/rundir.py), which says so."""
    import tempfile

    if run_dir.exists() and not run_dir.is_dir():
        return None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):  # as root, os.access says yes even on a read-only filesystem
            pass
    except OSError as err:
        return f"cannot write in --run-dir {run_dir} ({err.strerror or err}); choose another --run-dir"
    return None


def _shortfall(summary) -> str | None:
    """Why a finished run did not do its job, or None: its root failed, every proposal failed, or it stopped
    before its budget was evaluated (the agent-LLM cost cap excepted: that stop is the user's own setting)."""
    from archive.sqlite_store import DB_FILENAME, SQLiteStore

    status = summary.status
    if status.root is not None and status.root.status == NodeStatus.FAILED:
        return f"the run could not start: {summary.stop_reason}"
    proposals = sum(status.counts.values()) - 1
    if proposals and status.counts.get(NodeStatus.FAILED, 0) == proposals:
        with SQLiteStore(summary.run_dir / DB_FILENAME, read_only=True) as store:
            failed = store.nodes(summary.run_id, status=NodeStatus.FAILED)
        reasons = Counter(n.failure.reason for n in failed if n.failure) or Counter({"no reason recorded": proposals})
        reason, times = reasons.most_common(1)[0]
        return f"every proposal failed: {reason}" + (f" ({times} of {proposals})" if times < proposals else "")
    budget, llm = status.budget, status.llm
    capped = llm.cap_usd is not None and llm.usd >= llm.cap_usd
    if not budget.reached and not capped:
        used = (f"{budget.evaluated} of {budget.total} candidates evaluated" if budget.trainings is None
                else f"{budget.trainings} of {budget.total} trainings spent")
        return f"the run stopped with {used}: {summary.stop_reason}"
    return None


def _print_outcome(summary) -> None:
    best, root = summary.status.best, summary.status.root
    if summary.work_s > summary.wall_s > 0:  # --parallel: phases ran side by side
        print(f"wall {summary.wall_s:.0f} s, phase work {summary.work_s:.0f} s done side by side "
              f"({summary.work_s / summary.wall_s:.1f} phases at once on average), depth {summary.status.depth}")
    else:
        print(f"wall {summary.wall_s:.0f} s, inside phase work {summary.work_s:.0f} s "
              f"(orchestration overhead {100 * summary.overhead_fraction:.2f}%), depth {summary.status.depth}")
    if root and root.mean is not None:
        print(f"GRPO (root): {_interval_text(root)}")
    if best:
        print(f"best: {best.node_id} {best.name} [{', '.join(best.mechanisms)}]: {_interval_text(best)} "
              f"— {best.verdict}")
        if best.report is not None:
            print(report_text(best.report))


def _interval_text(entry: RootStatus | BestStatus) -> str:
    if isinstance(entry, RootStatus):
        mean, seeds = entry.mean, entry.n
        interval = (entry.ci_low, entry.ci_high) if entry.ci_low is not None else None
    else:
        mean, seeds, interval = entry.utility, entry.seeds, entry.interval
    if interval is None:
        return f"{mean:.4f} (1 seed)"
    return f"{mean:.4f} ± {(interval[1] - interval[0]) / 2:.4f} (95% CI over {seeds} seeds)"


def _open_run_store(run_dir: Path):
    from archive.sqlite_store import SQLiteStore

    if not (run_dir / "archive.db").exists():
        raise SystemExit(f"no run in {run_dir}: start one with `poise run --run-dir {run_dir}`")
    store = SQLiteStore.in_run_dir(run_dir)
    ids = store.run_ids()
    if not ids:
        store.close()
        raise SystemExit(f"{run_dir} holds an archive without a run")
    return store, ids[0]


def cmd_status(args: argparse.Namespace) -> int:
    from archive.status import run_status

    store, run_id = _open_run_store(Path(args.run_dir))
    with store:
        status = run_status(store, run_id)
    if args.json:
        print(json.dumps(status.model_dump(), indent=1))
        return 0
    counts = ", ".join(f"{k} {v}" for k, v in status.counts.items() if v)
    print(f"run {run_id}: protocol {status.protocol}, seed {status.seed}, depth {status.depth}")
    print(f"{status.budget.text()} ({counts or 'no nodes yet'})")
    print(f"objective: {status.objective.description}")
    if status.constraints is not None:
        met = status.constraints.satisfied
        print(f"meet the objective's constraints: {', '.join(met) if met else 'none yet'}")
    root = status.root
    if root and root.mean is not None:
        print(f"GRPO (root): {_interval_text(root)}")
    if status.leader:
        leader = status.leader
        print(f"top single seed: {leader.node_id} {leader.name} {leader.utility:.4f}")
    if status.best:
        best = status.best
        print(f"best: {best.node_id} {best.name}: {_interval_text(best)} — {best.verdict}")
        if best.constraints_satisfied is not None:
            print(f"  Overall {best.overall:.4f}, mean length {best.mean_length:.1f}, constraints "
                  f"{'met' if best.constraints_satisfied else 'NOT met'}")
        if best.report is not None:
            print(report_text(best.report))
    llm = status.llm
    if llm.calls:
        cap = f" of the ${llm.cap_usd:.2f} cap" if llm.cap_usd is not None else ""
        per = ", ".join(f"{op} ${v.usd:.4f} ({v.calls} requests, {v.failed} failed)"
                        for op, v in llm.per_operator.items())
        print(f"agent LLM: ${llm.usd:.4f}{cap} in {llm.calls} requests — {per}")
    return 0


def report_text(report) -> str:
    """The report's lines (docs/reporting.md): each arm on the fresh seeds, then the paired gain and verdict."""
    lines = [f"report ({'reporting half' if report.half == 'reporting' else 'every problem'}, fresh seeds):"]
    for arm in report.arms:
        interval = (f" [{arm.ci_low:.4f}, {arm.ci_high:.4f}]" if arm.ci_low is not None else "")
        lines.append(f"  {arm.arm}: Overall {arm.mean:.4f}{interval} over {len(arm.seeds)} seeds, mean length "
                     f"{arm.mean_length:.1f}")
    if report.gain is not None:
        interval = (f" [{report.gain_interval[0]:+.4f}, {report.gain_interval[1]:+.4f}]"
                    if report.gain_interval else "")
        lines.append(f"  best − GRPO: {report.gain:+.4f}{interval} Overall, {report.length_change:+.1f} tokens, "
                     f"over {report.paired_seeds} paired seeds")
    lines.append(f"  {report.verdict}")
    for part in report.contributions:  # the ablation: what undoing each difference costs the best
        if part.gain is None:
            lines.append(f"  {part.difference}: no paired seeds yet")
            continue
        interval = f" [{part.interval[0]:+.4f}, {part.interval[1]:+.4f}]" if part.interval else ""
        p = f", paired t p = {part.p:.3f}" if part.p is not None else ""
        lines.append(f"  {part.difference}: best − that arm {part.gain:+.4f}{interval} over {part.seeds} seeds{p}")
    return "\n".join(lines)


def cmd_ui(args: argparse.Namespace) -> int:
    from app.serve import ServeError
    from app.ui import serve_ui
    from poise.store import ArchiveError

    if not 0 <= args.port <= 65535:
        print(f"--port {args.port}: a port is 0-65535", file=sys.stderr)
        return 2

    def ready(address: str) -> None:
        print(f"POISE UI of {args.run_dir}: {address}  (Ctrl-C stops it)", flush=True)

    try:
        serve_ui(Path(args.run_dir), args.host, args.port, on_ready=ready)
    except (ArchiveError, ServeError) as err:
        print(str(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _verl_trainer():
    """The VERL trainer from the POISE_VERL_* / POISE_BASE_MODEL settings (docs/verl.md), or None after saying
    what is wrong; a machine that cannot train yet (no GPUs, no data) is told so and goes on, failing each node."""
    from poise.settings import SettingsError, load_settings
    from trainer.service import VerlSetupError, VerlTrainerSetup

    try:
        setup = VerlTrainerSetup.from_settings(load_settings())
    except (SettingsError, VerlSetupError) as err:
        print(f"--trainer verl: {err}", file=sys.stderr)
        return None
    print(f"VERL trainer: {setup.describe()}")
    problem = setup.problem()
    if problem is not None:
        print(f"warning: the VERL trainer cannot train here yet: {problem}; each node will fail with this reason",
              file=sys.stderr)
    return setup


def _evaluator(args: argparse.Namespace, kind: str, work_dir: Path, **settings):
    """The evaluator backend `kind` with the --vllm-* flags, checked before anything runs (evaluator/backends.py);
    None after printing what is wrong with the flags or the installation."""
    from evaluator.backends import build_evaluator, preflight
    from evaluator.vllm_server import ServerError

    if (args.vllm_url or args.vllm_command) and kind != "vllm":
        print("--vllm-url and --vllm-command need --evaluator vllm", file=sys.stderr)
        return None
    try:
        backend = build_evaluator(kind, work_dir, vllm_url=args.vllm_url, vllm_command=args.vllm_command, **settings)
        preflight(backend)
    except (ValueError, ServerError) as err:
        print(f"invalid evaluator settings: {err}", file=sys.stderr)
        return None
    return backend


def cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from poise.testbed.protocol import PROTOCOLS

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        print(f"no checkpoint folder at {checkpoint}", file=sys.stderr)
        return 2
    if args.evaluator == "testbed" and args.protocol not in PROTOCOLS:
        print(f"the testbed evaluator scores testbed protocols ({', '.join(PROTOCOLS)}); benchmark protocols such "
              f"as {args.protocol!r} need --evaluator vllm", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="poise-evaluate-") as work:
        backend = _evaluator(args, args.evaluator, Path(work), bench_data=args.bench_data)
        if backend is None:
            return 2
        try:
            evaluation = backend.evaluate(checkpoint.resolve(), args.protocol, args.seed)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            print(f"evaluation failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        finally:
            backend.close()
    if args.json:
        print(evaluation.model_dump_json(indent=1))
        return 0
    print(f"{checkpoint} under {args.protocol} ({evaluation.backend}, seed {evaluation.seed}):")
    for name, suite in evaluation.suites.items():
        metric = f"pass@{suite.k}" if suite.kind == "pass@k" else "acc@1"
        print(f"  {name:<14} {metric:<8} {suite.value:.4f} [{suite.ci_low:.4f}, {suite.ci_high:.4f}]  "
              f"{suite.n_prompts} prompts x {suite.n_samples}, mean length {suite.mean_length:.1f}, "
              f"format-valid {suite.format_valid_rate:.3f}, weight {suite.weight:g}")
    low, high = evaluation.overall_ci or (float("nan"), float("nan"))
    print(f"  Overall {evaluation.overall:.4f} [{low:.4f}, {high:.4f}], mean length {evaluation.mean_length:.1f}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from app.doctor import doctor

    return doctor(Path(args.run_dir), repair_archive=args.repair)


def cmd_show(args: argparse.Namespace) -> int:
    from archive.report import render_node_text

    store, run_id = _open_run_store(Path(args.run_dir))
    with store:
        node_id = _named_node(store, run_id, args.node)
        node = store.get_node(run_id, node_id) if node_id else None
        if node is None and args.node in ("best", "root"):
            print(f"run {run_id} has no {args.node} node yet; `poise status` says where it stands", file=sys.stderr)
            return 2
        if node is None:
            known = ", ".join(n.node_id for n in store.nodes(run_id)) or "none"
            print(f"no node {args.node!r} in run {run_id}; nodes: {known}", file=sys.stderr)
            return 2
        parent = store.get_node(run_id, node.genealogy.parent_ids[0]) if node.genealogy.parent_ids else None
        root = store.get_node(run_id, ROOT_ID) if node.reported else None
    if args.json:
        print(node.model_dump_json(indent=1))
    else:
        print(render_node_text(node, parent))
        if node.reported:
            from archive.status import report_status

            print("\n" + report_text(report_status(node, root)))
    return 0


def _named_node(store, run_id: str, name: str) -> str | None:
    """`root`, `best` (the confirmed best, else the leader on one seed) or a node id, as a node id."""
    if name == "root":
        return ROOT_ID
    if name == "best":
        from archive.status import run_status

        status = run_status(store, run_id)
        best = status.best or status.leader
        return best.node_id if best else None
    return name


def cmd_report(args: argparse.Namespace) -> int:
    from archive.report import write_report
    from archive.status import run_status

    run_dir = Path(args.run_dir)
    store, run_id = _open_run_store(run_dir)
    out = Path(args.out) if args.out else run_dir / "report.html"
    with store:
        status = run_status(store, run_id)
        best, root = status.best, status.root
        summary = {"GRPO (root)": _interval_text(root) if root and root.mean is not None else "not evaluated"}
        if best:
            summary["best node"] = f"{best.node_id} {best.name}"
            summary["best Overall"] = _interval_text(best)
            summary["verdict"] = best.verdict
        summary["depth reached"] = str(status.depth)
        path = write_report(store, run_id, out, summary=summary)
    print(f"report written to {path}")
    return 0


def cmd_algorithms(args: argparse.Namespace) -> int:
    from poise.algorithms import REFERENCE_ALGORITHMS

    for algorithm in REFERENCE_ALGORITHMS.values():
        print(f"{algorithm.name}  [{', '.join(algorithm.mechanisms)}]\n  {algorithm.reference}\n"
              f"  {algorithm.description}\n")
    return 0


def cmd_testbed_build(args: argparse.Namespace) -> int:
    from poise.testbed.checkpoints import BASE_DIR
    from poise.testbed.sft import DEFAULT_SFT_STEPS, build_base_checkpoint

    out = Path(args.out) if args.out else BASE_DIR / args.name
    steps = DEFAULT_SFT_STEPS if args.steps is None else args.steps
    print(f"building the base checkpoint: seed {args.seed}, {steps} SFT steps -> {out}")
    path = build_base_checkpoint(out, seed=args.seed, steps=steps, log=print)
    recipe = json.loads((path / "recipe.json").read_text())
    print(f"done: weights sha256 {recipe['weights_sha256']}, final loss {recipe['final_loss']:.4f}")
    return 0


def cmd_bench_testbed(args: argparse.Namespace) -> int:
    from app.bench import CONTROL, bench_testbed
    from poise.algorithms import REFERENCE_ALGORITHMS
    from poise.testbed.protocol import get_protocol

    algorithms = args.algorithms or [*REFERENCE_ALGORITHMS, CONTROL]
    unknown = [a for a in algorithms if a not in REFERENCE_ALGORITHMS and a != CONTROL]
    if unknown:
        print(f"unknown algorithms: {', '.join(unknown)}; known: {', '.join(REFERENCE_ALGORITHMS)}, {CONTROL}",
              file=sys.stderr)
        return 2
    protocol = get_protocol(args.protocol)
    report = bench_testbed(protocol, args.seeds, algorithms, Path(args.json) if args.json else None)
    print(f"R = {report.get('R')}, pooled seed SD = {report.get('pooled_seed_sd')}, "
          f"significant pairs = {report.get('n_significant_pairs')}")
    return 0


def cmd_bench_summarize(args: argparse.Namespace) -> int:
    from app.bench import markdown_table, resummarize

    path = Path(args.json)
    report = resummarize(json.loads(path.read_text()))
    path.write_text(json.dumps(report, indent=1))
    print(markdown_table(report))
    print(f"R = {report.get('R')}, pooled seed SD = {report.get('pooled_seed_sd')}, "
          f"significant pairs = {report.get('n_significant_pairs')}")
    return 0


def cmd_bench_sampler(args: argparse.Namespace) -> int:
    from app.bench import sampler_speedup
    from poise.testbed.checkpoints import base_checkpoint
    from poise.testbed.protocol import get_protocol

    protocol = get_protocol(args.protocol)
    report = {"command": invoked_command(),
              **sampler_speedup(base_checkpoint(protocol.base_checkpoint), protocol, repeats=args.repeats)}
    for label in ("sampled", "greedy"):
        timing = report[label]
        print(f"{label}: sampler {timing['sampler']:.3f} s, HF generate {timing['hf_generate']:.3f} s, "
              f"(best of {report['repeats']}), speedup {timing['speedup']:.2f}x (median of the paired ratios; "
              f"best-of {timing['speedup_best_of']:.2f}x, of medians {timing['speedup_of_medians']:.2f}x; "
              f"{report['rows']} rows, up to {report['max_new_tokens']} tokens)")
    write_json_report(args.json, report)
    return 0


def cmd_bench_evaluator(args: argparse.Namespace) -> int:
    from app.bench_evaluator import bench_evaluator
    from evaluator.vllm_server import ServerError

    if args.repeats < 1 or args.threads < 1 or args.concurrency < 1:
        print("--repeats, --threads and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        report = bench_evaluator(args.protocol, args.repeats, args.threads, args.concurrency, args.vllm_command,
                                 Path(args.json) if args.json else None)
    except (ServerError, KeyError) as err:
        print(f"bench evaluator: {err}", file=sys.stderr)
        return 1
    print(f"testbed sampler {report['testbed_median_tokens_per_s']:.0f} tok/s, "
          f"vLLM {report['vllm_median_tokens_per_s']:.0f} tok/s (medians of {args.repeats}; "
          f"vLLM/testbed {report['vllm_over_testbed_median']:.2f}x); vLLM start-up "
          f"{report['vllm_startup_s']:.1f} s once, weight reload {max(report['vllm_reload_s']):.2f} s per checkpoint")
    return 0


def cmd_bench_ui(args: argparse.Namespace) -> int:
    from app.bench_ui import bench_ui

    if args.repeats < 1 or any(n < 40 for n in args.nodes):
        print("--repeats must be at least 1 and every --nodes at least 40", file=sys.stderr)
        return 2
    bench_ui(args.nodes, args.repeats, Path(args.json) if args.json else None)
    return 0


def cmd_bench_fork_storm(args: argparse.Namespace) -> int:
    from app.bench_sandbox import bench_fork_storm

    if args.trials < 1 or args.deadline <= 0 or args.processes < 8:
        print("--trials must be at least 1, --deadline positive and --processes at least 8", file=sys.stderr)
        return 2
    report = bench_fork_storm(args.trials, args.deadline, args.processes, Path(args.json) if args.json else None)
    print(f"worst: {report['max_after_deadline_s']:.2f} s after the deadline; cgroup peak "
          f"{report['max_cgroup_peak_tasks']} tasks (cap {args.processes}); "
          f"machine +{report['max_machine_tasks_added']} tasks at most")
    return 0 if report["max_after_deadline_s"] < 2.0 else 1


def cmd_bench_loop(args: argparse.Namespace) -> int:
    """A fresh run in a temporary directory: how much of the wall time is orchestration, not phase work."""
    import tempfile

    from app.runner import run
    from poise.contracts import RunConfig

    with tempfile.TemporaryDirectory(prefix="poise-bench-loop-") as tmp:
        config = RunConfig(run_id="bench-loop", budget=args.budget, protocol=args.protocol, seed=args.seed,
                           root_seeds=args.root_seeds, replicate_seeds=args.replicate_seeds, parallel=1)
        summary = run(config, Path(tmp), stream=sys.stdout)
    report = {"command": invoked_command(), **summary.as_dict()}
    print(f"wall {summary.wall_s:.1f} s, phase work {summary.work_s:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in summary.phase_seconds.items())}), "
          f"orchestration overhead {summary.wall_s - summary.work_s:.2f} s = {100 * summary.overhead_fraction:.2f}%")
    write_json_report(args.json, report)
    return 0


def cmd_bench_archive(args: argparse.Namespace) -> int:
    """Per-event handling, status and parent selection on synthetic archives of each size (app/bench_archive.py)."""
    from app.bench_archive import bench_archive

    bench_archive(args.nodes, args.backends, live=args.events, selections=args.selections,
                  selection_timeout_s=args.selection_timeout, json_path=Path(args.json) if args.json else None)
    return 0


def cmd_bench_early_stop(args: argparse.Namespace) -> int:
    """The early-stopping rule replayed on held-out archived runs (app/bench_early_stop.py)."""
    from app.bench_early_stop import BenchError, bench_early_stop, markdown

    try:
        report = bench_early_stop([Path(d) for d in args.runs], args.alpha, Path(args.json) if args.json else None,
                                  Path(args.markdown) if args.markdown else None,
                                  write_rule=Path(args.write_rule) if args.write_rule else None)
    except BenchError as err:
        print(f"bench early-stop: {err}", file=sys.stderr)
        return 2
    print(markdown(report), end="")
    return 0


def cmd_bench_cli(args: argparse.Namespace) -> int:
    """Start-up time of the first commands a person types, each a fresh process (app/bench_cli.py)."""
    from app.bench_cli import bench_cli

    bench_cli(Path(args.run_dir) if args.run_dir else None, args.repeats, Path(args.json) if args.json else None)
    return 0


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    """Faults injected into tiny distributed runs, the archive checked after each (app/bench_chaos.py); exit 1
    when a trial lost, duplicated or left a node unfinished, or broke another invariant."""
    from app.bench_chaos import bench_chaos, parse_kind

    try:
        for kind in args.kinds:
            parse_kind(kind)
    except ValueError as err:
        print(f"bench chaos: {err}", file=sys.stderr)
        return 2
    if args.trials < 0 or args.embedded_kills < 0 or not (args.trials or args.embedded_kills):
        print("bench chaos: --trials and --embedded-kills count (0 or more), and one must be above 0", file=sys.stderr)
        return 2
    if args.resume and not args.json:
        print("bench chaos: --resume continues the report of --json; give it", file=sys.stderr)
        return 2
    try:
        report = bench_chaos(args.trials, args.seed, tuple(args.kinds), Path(args.json) if args.json else None,
                             Path(args.work_dir) if args.work_dir else None, args.keep, args.embedded_kills,
                             args.resume)
    except ValueError as err:  # --resume on a report of another schedule
        print(f"bench chaos: {err}", file=sys.stderr)
        return 2
    broken = [t for t in report["trials"] if not t["ok"]]
    if args.embedded_kills and not report["embedded"]["same"]:
        broken.append(report["embedded"])
    return 1 if broken else 0


def cmd_bench_search(args: argparse.Namespace) -> int:
    from app.bench import selector_search

    report = selector_search(args.selector, args.budget, args.search_seeds, args.first_seed, args.landscape,
                             args.protocol, Path(args.run_root))
    curve = report["curve"]
    print(f"{args.selector}, {args.landscape} landscape, budget {args.budget}, {args.search_seeds} searches: "
          f"best-found utility {report['best_utility_mean']:.4f}"
          + (f" ± {report['best_utility_sd']:.4f} (SD over searches)" if report["best_utility_sd"] else "")
          + (f"; mean best-found after 0/{len(curve) // 2}/{len(curve) - 1} children: "
             + " / ".join(f"{curve[i]:.4f}" for i in (0, len(curve) // 2, len(curve) - 1)) if curve else ""))
    write_json_report(args.json, report)
    return 0


def cmd_bench_racing(args: argparse.Namespace) -> int:
    from app.bench_racing import bench_racing

    bench_racing(range(args.first_seed, args.first_seed + args.worlds), args.budget, args.selectors,
                 Path(args.json) if args.json else None)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.serve import run_service

    return run_service(args.service)


def cmd_secrets(args: argparse.Namespace) -> int:
    from poise.credentials import write_secrets

    directory = Path(args.directory)
    written = write_secrets(directory, rotate=args.rotate)
    kept = "" if args.rotate else " (files that existed are kept; --rotate makes new values)"
    print(f"wrote {len(written)} file(s) in {directory}{kept}:")
    for path in written:
        print(f"  {path}")
    print("docker compose mounts ./secrets; k8s mounts k8s/base/secrets (`poise secrets k8s/base/secrets`). "
          "docs/operations.md, \"Authentication\", says which service gets which file.")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with a usage error in two lines, what was wrong and where the options are: the full usage of
    `poise run` is a screenful. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n(`{self.prog} --help` lists the options)\n")


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="poise", description="Autonomous discovery of LLM-RL algorithms.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error, and libraries' warnings")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="grow a lineage of algorithms from GRPO (embedded mode); resumes a run")
    run.add_argument("--budget", type=positive_int, help="evaluated candidates, the root excluded (default 64)")
    run.add_argument("--parallel", type=positive_int,
                     help="candidates in the pipeline at once (default 3); in this embedded mode, up to that many "
                          "trainings (as many as the cores hold at the protocol's threads: one on 2 cores) run side by "
                          "side with one verification and one evaluation; 1: one step at a time, reproducible "
                          "message for message")
    run.add_argument("--seed", type=int, help="the run's seed: proposals, training and evaluation (default 0)")
    run.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"where the archive lives (default {DEFAULT_RUN_DIR})")
    run.add_argument("--protocol", help="testbed protocol: default; ema or iterate (the earlier defaults, 45 steps "
                     "of 16 prompts, evaluating the averaged weights or the last iterate); tiny for tests "
                     "(default: default)")
    run.add_argument("--parent-selection", choices=("greedy", "random", "poise"),
                     help="greedy or random: the baseline proposer (default greedy); poise: Phase I acquisition "
                          "over Pareto strength, utility, diversity and a descendant-gain GP, and per parent a "
                          "population screened by fingerprint novelty and a utility GP's expected improvement")
    run.add_argument("--root-seeds", type=positive_int, help="seeds the root (GRPO) is trained with, for the noise (3)")
    run.add_argument("--replicate-seeds", type=positive_int, help="fresh seeds a node is re-trained with before it is "
                                                          "reported as the best (3)")
    run.add_argument("--seeding", choices=("one", "racing"),
                     help="one: one training seed per child, the budget counts children (default); racing: extra "
                          "seeds go to the nodes whose rank is promising and uncertain, up to 3 per node, before "
                          "they are parents, and the budget counts the children's trainings (docs/racing.md)")
    run.add_argument("--split", action="store_const", const=True,
                     help="selection, racing and the best's confirmation score the selection half of each suite; the "
                          "report scores the other half (docs/reporting.md)")
    run.add_argument("--report-seeds", type=int, metavar="N",
                     help="at the end, train the best and GRPO on the same N fresh seeds and report the paired gain "
                          "(on the reporting half with --split; default 0: no report phase)")
    run.add_argument("--objective", choices=("overall", "length"),
                     help="utility: the weighted Overall (default), or shorter responses at Overall within "
                          "--accuracy-tolerance of GRPO")
    run.add_argument("--accuracy-tolerance", type=float,
                     help="length objective: how far below GRPO's Overall a node may fall (default 0.01)")
    run.add_argument("--directive", help="what the search should aim for, in words; stored on the run and shown "
                                         "to the agents")
    run.add_argument("--llm", action="append", metavar="[OPERATOR=]SPEC",
                     help="agent LLM: offline (default), anthropic:MODEL or openai:URL#MODEL (any OpenAI-compatible "
                          "server); OPERATOR=SPEC sets one of propose, screen, implement, reflect; repeatable, e.g. "
                          "--llm anthropic:claude-opus-5 --llm screen=anthropic:claude-haiku-4-5")
    run.add_argument("--llm-budget-usd", type=float,
                     help="stop proposing once the agent LLM has cost this much (default: no cap)")
    run.add_argument("--early-stop", action=argparse.BooleanOptionalAction,
                     help="stop a child's training at 25/50/75%% of its steps when its curve says it cannot reach its "
                          "parent (docs/early_stopping.md), by the rule POISE holds for the protocol or the run's "
                          "own once its archive holds 12 (child, parent) pairs; default: on when POISE holds a rule "
                          "for the protocol (none yet), else off; a resumed run may change it")
    run.add_argument("--gpu-hours-budget", type=float,
                     help="stop proposing once training has held GPUs this many GPU-hours (VERL trainer; default: "
                          "no cap)")
    run.add_argument("--trainer", choices=("testbed", "verl"),
                     help="who trains candidates: the CPU testbed in this process's sandbox (default), or VERL on "
                          "this machine's GPUs under the GPU protocol POISE_VERL_PROTOCOL, with POISE_BASE_MODEL and "
                          "POISE_VERL_TRAIN_FILES (recorded with the run; docs/verl.md)")
    run.add_argument("--evaluator", choices=("testbed", "vllm"),
                     help="who scores checkpoints: the testbed sampler in this process (default), or a vLLM server "
                          "(recorded with the run; docs/evaluation.md)")
    run.add_argument("--vllm-url", help="--evaluator vllm: a vLLM server you run (VLLM_SERVER_DEV_MODE=1, able to "
                                        "read the run directory); default: POISE starts its own")
    run.add_argument("--vllm-command", help="--evaluator vllm: the command that starts a server, with {python} "
                                            "{model} {port} {served_name} (default: evaluator/vllm_server.py)")
    run.add_argument("--vllm-startup-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="how long a started vLLM server may take to answer (default 600)")
    run.add_argument("--force", action="store_true", help="start a run in a directory that holds other files")
    run.set_defaults(handler=cmd_run)
    for name, handler, text in (("status", cmd_status, "where a run stands"),
                                ("report", cmd_report, "write a self-contained HTML report of a run")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
        sub.set_defaults(handler=handler)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="machine-readable")
        else:
            sub.add_argument("--out", help="default: RUN_DIR/report.html")
    show = commands.add_parser("show", help="one node: proposal, code, verification, curves, metrics, reflection")
    show.add_argument("node", help="a node id (n003), root, or best (the confirmed best, else the leader)")
    show.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)
    doctor = commands.add_parser("doctor", help="check a run directory: lock, archive and backup integrity; "
                                                "--repair restores a damaged archive")
    doctor.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    doctor.add_argument("--repair", action="store_true", help="move a damaged archive.db aside and restore the "
                                                              "backup, with the newer work still readable in it")
    doctor.set_defaults(handler=cmd_doctor)
    serve = commands.add_parser("serve", help="run one service of the distributed mode (settings: POISE_* "
                                              "variables; see app/serve.py)")
    serve.add_argument("service", choices=SERVICES)
    serve.set_defaults(handler=cmd_serve)
    secrets = commands.add_parser("secrets", help="write the distributed mode's credentials: the archive API's "
                                                  "tokens, each service's NATS password, the NATS users' config")
    secrets.add_argument("directory", nargs="?", default="secrets",
                         help="where (default ./secrets, what docker-compose.yml mounts; k8s: k8s/base/secrets)")
    secrets.add_argument("--rotate", action="store_true", help="new values for every secret (restart everything)")
    secrets.set_defaults(handler=cmd_secrets)
    check = commands.add_parser("selfcheck", help="structural check of the reference algorithms")
    check.set_defaults(handler=cmd_selfcheck)
    algorithms = commands.add_parser("algorithms", help="list the reference algorithms (literature priors)")
    algorithms.set_defaults(handler=cmd_algorithms)

    ui = commands.add_parser("ui", help="the web UI of a run directory's runs, live beside a running `poise run`")
    ui.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"(default {DEFAULT_RUN_DIR})")
    ui.add_argument("--port", type=int, default=8420, help="HTTP port (default 8420; 0 picks a free one)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.set_defaults(handler=cmd_ui)
    evaluate = commands.add_parser("evaluate", help="score one checkpoint under a protocol (testbed suites, or the "
                                                    "paper's six benchmarks with --protocol paper --evaluator vllm)")
    evaluate.add_argument("checkpoint", help="a checkpoint folder in the Hugging Face layout")
    evaluate.add_argument("--protocol", default="default", help="a testbed protocol, or a benchmark protocol name or "
                                                                 "TOML file (paper: poise/benchmarks/paper.toml)")
    evaluate.add_argument("--evaluator", choices=("testbed", "vllm"), default="testbed")
    evaluate.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    evaluate.add_argument("--vllm-url", help="a vLLM server you run (VLLM_SERVER_DEV_MODE=1); default: start one")
    evaluate.add_argument("--vllm-command", help="the command that starts a vLLM server (docs/evaluation.md)")
    evaluate.add_argument("--bench-data", help="directory of the benchmark files (default: POISE_BENCH_DATA, else "
                                               "the hub)")
    evaluate.add_argument("--json", action="store_true", help="print the Evaluation as JSON")
    evaluate.set_defaults(handler=cmd_evaluate)
    testbed = commands.add_parser("testbed", help="the CPU testbed").add_subparsers(dest="testbed", required=True)
    build = testbed.add_parser("build", help="rebuild the base checkpoint deterministically from a seed")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--steps", type=int, help="SFT steps, a budget, never seconds (default: the base recipe's, "
                                                 "poise/testbed/sft.py)")
    build.add_argument("--name", default="default", help="checkpoint name under poise/testbed/base/")
    build.add_argument("--out", help="write somewhere else instead")
    build.set_defaults(handler=cmd_testbed_build)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench_testbed = bench.add_parser("testbed", help="reference algorithms x seeds: learning and sensitivity")
    bench_testbed.add_argument("--seeds", type=int, default=4)
    bench_testbed.add_argument("--algorithms", nargs="*", help="default: every reference algorithm + the control")
    bench_testbed.add_argument("--protocol", default="default")
    bench_testbed.add_argument("--json", help="write the report here (updated after every run)")
    bench_testbed.set_defaults(handler=cmd_bench_testbed)
    bench_summarize = bench.add_parser("summarize", help="recompute the summary of a saved testbed report")
    bench_summarize.add_argument("json")
    bench_summarize.set_defaults(handler=cmd_bench_summarize)
    bench_sampler = bench.add_parser("sampler", help="the KV-cache sampler vs HF generate on one rollout batch")
    bench_sampler.add_argument("--protocol", default="default")
    bench_sampler.add_argument("--repeats", type=int, default=9)
    bench_sampler.add_argument("--json", help="write the report here")
    bench_sampler.set_defaults(handler=cmd_bench_sampler)
    bench_evaluator = bench.add_parser("evaluator", help="tokens/s of the vLLM backend vs the testbed sampler on "
                                       "the same checkpoint and prompts (needs vLLM: scripts/vllm_venv.sh)")
    bench_evaluator.add_argument("--protocol", default="default", help="testbed protocol whose suites are sampled")
    bench_evaluator.add_argument("--repeats", type=int, default=3, help="evaluation passes per backend (default 3)")
    bench_evaluator.add_argument("--threads", type=int, default=2, help="CPU threads of each backend (default 2)")
    bench_evaluator.add_argument("--concurrency", type=int, default=8, help="vLLM requests in flight (default 8)")
    bench_evaluator.add_argument("--vllm-command", help="the server command (default: eager mode on CPU)")
    bench_evaluator.add_argument("--json", help="write the report here")
    bench_evaluator.set_defaults(handler=cmd_bench_evaluator)
    bench_ui = bench.add_parser("ui", help="response times of the web UI's live endpoints on synthetic archives")
    bench_ui.add_argument("--nodes", type=int, nargs="+", default=[1_000, 10_000], help="archive sizes")
    bench_ui.add_argument("--repeats", type=int, default=7, help="timed requests per endpoint (default 7)")
    bench_ui.add_argument("--json", help="write the report here")
    bench_ui.set_defaults(handler=cmd_bench_ui)
    storm = bench.add_parser("fork-storm",
                             help="a fork bomb in the sandbox: task peak and kill time after the deadline")
    storm.add_argument("--trials", type=int, default=5, help="fork bombs, one after the other (default 5)")
    storm.add_argument("--deadline", type=float, default=10.0, help="each one's wall deadline in seconds (default 10)")
    storm.add_argument("--processes", type=int, default=512, help="the task cap (default: SandboxLimits' 512)")
    storm.add_argument("--json", help="write the report here")
    storm.set_defaults(handler=cmd_bench_fork_storm)
    bench_search = bench.add_parser("search", help="whole searches with one parent selector: best-found utility "
                                                   "per budget")
    bench_search.add_argument("--selector", choices=("poise", "greedy", "random"), default="poise")
    bench_search.add_argument("--budget", type=int, default=16, help="children per search (default 16)")
    bench_search.add_argument("--search-seeds", type=int, default=10, help="searches, one per seed (default 10)")
    bench_search.add_argument("--first-seed", type=int, default=0)
    bench_search.add_argument("--landscape", choices=("simulated", "testbed"), default="testbed",
                              help="testbed: real runs of the embedded loop (hours per search on 2 cores); "
                                   "simulated: app/landscape.py, seconds")
    bench_search.add_argument("--protocol", default="default", help="testbed protocol (default: default)")
    bench_search.add_argument("--run-root", default="runs/bench-search",
                              help="testbed: where each search's run directory goes (resumable)")
    bench_search.add_argument("--json", help="write the report here")
    bench_search.set_defaults(handler=cmd_bench_search)
    racing = bench.add_parser("racing", help="seed policies on the simulated landscape at equal trainings: "
                                             "racing vs one seed vs a fixed 3 seeds per node (docs/racing.md)")
    racing.add_argument("--selectors", nargs="+", choices=("poise", "greedy", "random"), default=["greedy", "poise"])
    racing.add_argument("--budget", type=int, default=45, help="trainings per search (default 45)")
    racing.add_argument("--worlds", type=int, default=100, help="worlds, one per seed (default 100)")
    racing.add_argument("--first-seed", type=int, default=200)
    racing.add_argument("--json", help="write the report here")
    racing.set_defaults(handler=cmd_bench_racing)
    bench_loop = bench.add_parser("loop", help="orchestration overhead of the embedded loop on a fresh run")
    bench_loop.add_argument("--budget", type=int, default=4)
    bench_loop.add_argument("--protocol", default="tiny")
    bench_loop.add_argument("--seed", type=int, default=0)
    bench_loop.add_argument("--root-seeds", type=int, default=2)
    bench_loop.add_argument("--replicate-seeds", type=int, default=2)
    bench_loop.add_argument("--json", help="write the report here")
    bench_loop.set_defaults(handler=cmd_bench_loop)
    bench_archive = bench.add_parser("archive", help="per-event work, status and parent selection against the "
                                                     "archive's size (synthetic archives)")
    bench_archive.add_argument("--nodes", type=int, nargs="+", default=[1_000, 10_000],
                               help="archive sizes (default 1000 10000)")
    bench_archive.add_argument("--backends", nargs="+", choices=("sqlite", "mongomock"),
                               default=["sqlite", "mongomock"])
    bench_archive.add_argument("--events", type=int, default=12, help="events timed per kind (default 12)")
    bench_archive.add_argument("--selections", nargs="*", choices=("greedy", "poise"), default=["greedy", "poise"],
                               help="parent selections to time on the SQLite archive (none: skip)")
    bench_archive.add_argument("--selection-timeout", type=float, default=600.0,
                               help="seconds before a selection is reported as timed out (default 600)")
    bench_archive.add_argument("--json", help="write the report here")
    bench_archive.set_defaults(handler=cmd_bench_archive)
    early = bench.add_parser("early-stop", help="the early-stopping rule replayed on held-out archived runs: compute "
                                                "saved and the rate it stops a child that ended above its parent")
    early.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="run directories (their archive.db is "
                                                                                "copied, never written)")
    early.add_argument("--alpha", type=float, default=0.05, help="stop when P(reach parent) is below this (0.05)")
    early.add_argument("--json", help="write the report here")
    early.add_argument("--markdown", help="write the report as markdown here")
    early.add_argument("--write-rule", metavar="FILE", help="fit the rule on every pair and store it for the protocol "
                                                            "in FILE (the package's: poise/early_stop_rules.json)")
    early.set_defaults(handler=cmd_bench_early_stop)
    bench_cli = bench.add_parser("cli", help="start-up time of --help, run --help, status and show, each a fresh "
                                             "process")
    bench_cli.add_argument("--repeats", type=positive_int, default=10, help="runs of each command (default 10)")
    bench_cli.add_argument("--run-dir", help="the run status and show read (default: a small synthetic archive)")
    bench_cli.add_argument("--json", help="write the report here")
    bench_cli.set_defaults(handler=cmd_bench_cli)
    bench_chaos = bench.add_parser("chaos", help="faults (SIGKILL, SIGSTOP, a NATS restart) injected into tiny "
                                                 "distributed runs: nodes lost, duplicated, time to recover")
    bench_chaos.add_argument("--trials", type=int, default=30, help="tiny runs, one fault each (default 30; 0 with "
                                                                    "--embedded-kills: only those)")
    bench_chaos.add_argument("--seed", type=int, default=0, help="the first trial's seed; trial i has seed + i")
    bench_chaos.add_argument("--kinds", nargs="+", default=["kill", "stop", "nats"],
                             help="fault kinds taken in turn: kill, stop, nats; kill:SERVICE or stop:SERVICE fixes "
                                  "the service (else each trial draws it) (default: kill stop nats)")
    bench_chaos.add_argument("--embedded-kills", type=int, default=0, metavar="N",
                             help="also SIGKILL a tiny embedded run at N drawn moments, resuming after each, and "
                                  "compare its archive with an uninterrupted run's (default 0: skip)")
    bench_chaos.add_argument("--work-dir", help="where each trial's cluster and logs go (default: a temporary "
                                                "directory, kept when a trial fails)")
    bench_chaos.add_argument("--keep", action="store_true", help="keep the logs of trials that passed too")
    bench_chaos.add_argument("--json", help="write the report here (updated after every trial)")
    bench_chaos.add_argument("--resume", action="store_true", help="keep the trials already in --json (same --seed "
                                                                   "and --kinds) and run the rest")
    bench_chaos.set_defaults(handler=cmd_bench_chaos)
    return parser


# Where poise's own warnings come from; every other module's are libraries', shown only with --debug.
OWN_MODULES = r"(app|archive|evaluator|implementer|poise|proposer|reflector|trainer)(\.|$)"


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. An expected failure is a line or two on stderr (the command's own, or
    here: a damaged archive, or any other error as its type and message); --debug lets the traceback through."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.filterwarnings("ignore")
                warnings.filterwarnings("default", module=OWN_MODULES)
            return args.handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(failure_text(err, getattr(args, "run_dir", None)), file=sys.stderr)
        return 1


def failure_text(err: Exception, run_dir: str | None) -> str:
    """What `main` prints for an error no command handled."""
    from poise.store import ArchiveError

    if isinstance(err, ArchiveError):  # its message names the archive and, for a damaged file, `poise doctor`
        return f"poise: {err}"
    if isinstance(err, sqlite3.DatabaseError):
        where = f" --run-dir {run_dir}" if run_dir else ""
        return (f"poise: the archive cannot be read ({err}); run `poise doctor{where}` to check it and restore the "
                "last good copy")
    return f"poise: {type(err).__name__}: {err}\n(run `poise --debug ...` for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
