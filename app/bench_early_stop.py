"""`poise bench early-stop`: the early-stopping rule replayed on held-out archived runs (docs/early_stopping.md).

Each archive is copied (sqlite3's backup) before it is read, so a run that is still writing it is never touched. Every
evaluated child with an evaluated parent is a held-out case once: the rule is fitted on the other runs when there are
several (leave one run out), else on the run's other pairs, leaving out every pair the case's node is in as child or
parent (leave one node out); its curve is then replayed through the rule with its run's seed noise. Reported: compute
saved (the training steps a stop would not have run, over all the steps of the cases), the false-stop rate (stopped
cases whose final utility ended above their parent's, over the stopped), the rate at which a child that ended above
its parent would have been stopped, counts and 95% intervals (Wilson for rates, a bootstrap over cases for compute
saved). `--write-rule` fits the rule on every pair and stores it in the package (poise/early_stop_rules.json) with
the command that produced it.
"""

from __future__ import annotations

import json
import math
import random
import shlex
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from archive.sqlite_store import DB_FILENAME, SQLiteStore
from poise.contracts import EarlyStopPlan, Node, RunConfig
from poise.early_stop import ALPHA, MIN_PAIRS, RULES_FILE, Pair, fit_rule, noise_sd, pairs_from_nodes, replay
from poise.testbed.protocol import PROTOCOLS, protocol_sha256

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000


class BenchError(ValueError):
    """Archives the bench cannot use; the message says which and what to do."""


def read_archive(run_dir: Path) -> list[tuple[RunConfig, list[Node]]]:
    """Every run in `run_dir`'s archive with its nodes, read from a copy taken with sqlite3's backup."""
    source = run_dir / DB_FILENAME
    if not source.is_file():
        raise BenchError(f"no archive at {source}: give run directories that hold an {DB_FILENAME}")
    with tempfile.TemporaryDirectory(prefix="poise-early-stop-") as tmp:
        copy = Path(tmp) / DB_FILENAME
        with sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True) as live, sqlite3.connect(copy) as out:
            live.backup(out)
        store = SQLiteStore(copy)
        try:
            return [(config, store.nodes(run_id)) for run_id in store.run_ids()
                    if (config := store.get_run(run_id)) is not None]
        finally:
            store.close()


def wilson(hits: int, n: int) -> tuple[float, float] | None:
    """The Wilson score 95% interval of a rate hits/n (None when n is 0)."""
    if n == 0:
        return None
    rate = hits / n
    centre = (rate + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(rate * (1 - rate) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(hits: int, n: int) -> dict:
    return {"count": hits, "of": n, "rate": hits / n if n else None, "ci95": wilson(hits, n)}


def _saved_interval(cases: list[dict], seed: int = 0) -> tuple[float, float] | None:
    """A percentile bootstrap over cases of the fraction of training steps saved."""
    if not cases:
        return None
    draw = random.Random(seed)
    fractions = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        sample = [draw.choice(cases) for _ in cases]
        fractions.append(sum(c["steps_saved"] for c in sample) / sum(c["steps_planned"] for c in sample))
    fractions.sort()
    return fractions[int(0.025 * BOOTSTRAP_RESAMPLES)], fractions[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]


def held_out_cases(runs: Sequence[tuple[RunConfig, list[Node]]], steps: int, alpha: float = ALPHA) -> list[dict]:
    """Every pair of every run replayed through a rule fitted without it (see the module docstring)."""
    pairs_of = {config.run_id: pairs_from_nodes(nodes) for config, nodes in runs}
    noise_of = {config.run_id: noise_sd(next((n for n in nodes if not n.genealogy.parent_ids), None))
                for config, nodes in runs}
    protocol = runs[0][0].protocol
    by_run = len(runs) > 1
    cases = []
    for run_id, pairs in pairs_of.items():
        for pair in pairs:
            if by_run:
                training = [p for other, ps in pairs_of.items() if other != run_id for p in ps]
            else:
                training = [p for p in pairs if pair.child_id not in (p.child_id, p.parent_id)]
            rule = fit_rule(training, protocol, steps, alpha=alpha)
            cases.append(_case(pair, rule, noise_of[run_id], steps))
    return cases


def _case(pair: Pair, rule, noise: float | None, steps: int) -> dict:
    plan = EarlyStopPlan(rule=rule, parent_id=pair.parent_id, parent_curve=list(pair.parent_curve),
                         parent_utility=pair.parent_utility, noise_sd=noise)
    stop = replay(plan, pair.child_curve, steps)
    ran = stop.steps_run if stop is not None else len(pair.child_curve)
    return {"run": pair.run_id, "node": pair.child_id, "parent": pair.parent_id,
            "child_utility": pair.child_utility, "parent_utility": pair.parent_utility,
            "ended_above_parent": pair.difference > 0, "checkpoints_fitted": [c.step for c in rule.checkpoints],
            "stopped_at": stop.steps_run if stop is not None else None,
            "probability": stop.probability if stop is not None else None,
            "predicted": stop.predicted if stop is not None else None,
            "steps_planned": len(pair.child_curve), "steps_saved": len(pair.child_curve) - ran}


def summarize_cases(cases: list[dict]) -> dict:
    stopped = [c for c in cases if c["stopped_at"] is not None]
    above = [c for c in cases if c["ended_above_parent"]]
    planned = sum(c["steps_planned"] for c in cases)
    return {
        "cases": len(cases),
        "cases_with_a_fitted_checkpoint": sum(1 for c in cases if c["checkpoints_fitted"]),
        "ended_above_parent": len(above),
        "stopped": len(stopped),
        "false_stop_rate": _rate(sum(1 for c in stopped if c["ended_above_parent"]), len(stopped)),
        "stopped_among_above_parent": _rate(sum(1 for c in above if c["stopped_at"] is not None), len(above)),
        "stopped_among_not_above": _rate(len(stopped) - sum(1 for c in stopped if c["ended_above_parent"]),
                                         len(cases) - len(above)),
        "compute_saved": {"steps_saved": sum(c["steps_saved"] for c in cases), "steps_planned": planned,
                          "fraction": sum(c["steps_saved"] for c in cases) / planned if planned else None,
                          "ci95": _saved_interval(cases)},
    }


def bench_early_stop(run_dirs: Sequence[Path], alpha: float = ALPHA, json_path: Path | None = None,
                     markdown_path: Path | None = None, write_rule: Path | None = None,
                     command: str | None = None) -> dict:
    """Replay held-out archived curves through the rule (module docstring); the report as a dict."""
    runs = [run for run_dir in run_dirs for run in read_archive(Path(run_dir))]
    if not runs:
        raise BenchError(f"no run in {', '.join(map(str, run_dirs))}")
    protocols = sorted({config.protocol for config, _ in runs})
    if len(protocols) > 1 or protocols[0] not in PROTOCOLS:
        raise BenchError(f"the runs were trained under protocols {protocols}: give runs of one testbed protocol "
                         "(a rule is fitted per protocol)")
    protocol = protocols[0]
    steps = PROTOCOLS[protocol].steps
    all_pairs = [p for _, nodes in runs for p in pairs_from_nodes(nodes)]
    cases = held_out_cases(runs, steps, alpha)
    source = f"{len(all_pairs)} (child, parent) pairs of runs {', '.join(c.run_id for c, _ in runs)}"
    in_sample = fit_rule(all_pairs, protocol, steps, source=source, alpha=alpha)
    report = {
        "command": command or shlex.join(["poise", *sys.argv[1:]]),
        "runs": [{"run_dir": str(d)} for d in run_dirs],
        "run_ids": [c.run_id for c, _ in runs],
        "protocol": protocol, "steps": steps, "alpha": alpha, "min_pairs": MIN_PAIRS,
        "held_out": "leave one run out" if len(runs) > 1 else "leave one node out (its pairs as child and parent)",
        "pairs": len(all_pairs),
        "seed_noise_sd": {c.run_id: noise_sd(next((n for n in nodes if not n.genealogy.parent_ids), None))
                          for c, nodes in runs},
        "summary": summarize_cases(cases),
        "rule_fitted_on_all": in_sample.model_dump(mode="json"),
        "cases": cases,
    }
    if write_rule is not None:
        store_rule(in_sample, report["command"], write_rule)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown(report))
    return report


def store_rule(rule, command: str, path: Path = RULES_FILE) -> None:
    """Put the rule for its protocol into the package's rules file, with the command and the protocol's sha256."""
    data = json.loads(path.read_text()) if path.is_file() else {"rules": {}}
    data["rules"][rule.protocol] = {"command": command, "protocol_sha256": protocol_sha256(rule.protocol),
                                    "rule": rule.model_dump(mode="json")}
    path.write_text(json.dumps(data, indent=1) + "\n")


def _pct(rate: dict) -> str:
    if rate["rate"] is None:
        return f"{rate['count']}/{rate['of']} (—)"
    low, high = rate["ci95"]
    return f"{rate['count']}/{rate['of']} = {100 * rate['rate']:.1f}% (95% CI {100 * low:.1f}–{100 * high:.1f}%)"


def markdown(report: dict) -> str:
    s = report["summary"]
    saved = s["compute_saved"]
    interval = (f" (95% CI {100 * saved['ci95'][0]:.1f}–{100 * saved['ci95'][1]:.1f}%)" if saved["ci95"] else "")
    fraction = f"{100 * saved['fraction']:.1f}%" if saved["fraction"] is not None else "—"
    lines = [
        "# Early stopping replayed on held-out archived runs",
        "",
        f"`{report['command']}`",
        "",
        f"Runs {', '.join(report['run_ids'])}, protocol {report['protocol']} ({report['steps']} steps), "
        f"{report['pairs']} (child, parent) pairs, held out by {report['held_out']}; alpha {report['alpha']}, "
        f"a checkpoint is fitted on {report['min_pairs']} pairs or more.",
        "",
        "| | |",
        "|---|---|",
        f"| cases replayed | {s['cases']} ({s['cases_with_a_fitted_checkpoint']} with a fitted checkpoint) |",
        f"| ended above their parent | {s['ended_above_parent']} |",
        f"| stopped | {s['stopped']} |",
        f"| false-stop rate (stopped, yet ended above the parent) | {_pct(s['false_stop_rate'])} |",
        f"| children that ended above their parent, stopped | {_pct(s['stopped_among_above_parent'])} |",
        f"| children that did not, stopped | {_pct(s['stopped_among_not_above'])} |",
        f"| compute saved (training steps) | {saved['steps_saved']}/{saved['steps_planned']} = {fraction}{interval} |",
        "",
        "Stopped cases:",
        "",
        "| run | node | parent | stopped after | P(reach parent) | predicted | final | parent's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        if c["stopped_at"] is not None:
            lines.append(f"| {c['run']} | {c['node']} | {c['parent']} | {c['stopped_at']}/{c['steps_planned']} | "
                         f"{c['probability']:.3f} | {c['predicted']:.4f} | {c['child_utility']:.4f} | "
                         f"{c['parent_utility']:.4f} |")
    rule = report["rule_fitted_on_all"]
    lines += ["", f"The rule fitted on every pair ({rule['source']}):", "",
              "| after step | intercept | slope | residual SD | pairs |", "|---|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['intercept']:+.4f} | {c['slope']:+.4f} | {c['residual_sd']:.4f} | {c['n']} |"
              for c in rule["checkpoints"]]
    return "\n".join(lines) + "\n"
