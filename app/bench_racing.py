"""`poise bench racing`: seeds spent where they decide, against one seed or a fixed number per node (docs/racing.md).

Every seed policy of `poise.racing.SEED_POLICIES` searches the same worlds of the simulated landscape
(app/landscape.py) with each selector and the same budget of trainings. Per policy, over worlds: how often the
reported node (the highest seed mean) is truly better than the root, its true gain over the root, the true gain
of the best node the search evaluated (reported or not), by how much the gain the run would claim (the seed
means' difference) overstates the true one, and the children and trainings it spent. The paired
differences of RACING_PAIRS (mean over worlds and standard error: common random numbers, so each world's
difference is one draw) say whether racing helps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from app.landscape import SearchResult, paired_difference, search
from app.reports import invoked_command, write_json_report
from poise.racing import SEED_POLICIES, SeedPolicy

RACING_PAIRS = (("racing", "one"), ("racing", "fixed"), ("fixed", "one"))
METRICS: dict[str, Callable[[SearchResult], float]] = {
    "reported_better": lambda run: float(run.reported_better),  # a rate once averaged over worlds
    "reported_gain": lambda run: run.reported_gain,
    "best_gain": lambda run: run.best_true - run.root_true,
    "overclaim": lambda run: run.claimed_gain - run.reported_gain,  # the winner's curse, in Overall
    "children": lambda run: float(len(run.nodes) - 1),
    "trainings": lambda run: float(run.trainings),
}
PAIRED_METRICS = ("reported_better", "reported_gain", "best_gain", "overclaim")


def bench_racing(seeds: Sequence[int], budget: int = 45, selectors: Sequence[str] = ("greedy", "poise"),
                 json_path: Path | None = None, log=print, policies: Sequence[SeedPolicy] | None = None,
                 pairs: Sequence[tuple[str, str]] = RACING_PAIRS) -> dict:
    """Each selector under each seed policy (by default SEED_POLICIES; others, e.g. racing with another z or
    cap, need names of their own) in worlds `seeds` with `budget` trainings: the module docstring's report with
    the paired differences of `pairs` (policy names), logged as markdown and written to `json_path` when
    given."""
    policies = list(policies or SEED_POLICIES.values())
    started = time.perf_counter()
    report: dict = {"command": invoked_command(), "seeds": list(seeds), "budget": budget,
                    "policies": {policy.name: asdict(policy) for policy in policies}, "selectors": {}}
    for selector in selectors:
        values: dict[str, dict[str, list[float]]] = {}
        for policy in policies:
            runs = [search(selector, seed, budget, seeding=policy) for seed in seeds]
            values[policy.name] = {metric: [measure(run) for run in runs] for metric, measure in METRICS.items()}
            log(f"{selector}, {policy.name}: {len(runs)} worlds, {time.perf_counter() - started:.0f} s so far")
        summaries = {seeding: {metric: {"mean": statistics.fmean(per_seed),
                                        "sd": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                                        "per_seed": per_seed} for metric, per_seed in metrics.items()}
                     for seeding, metrics in values.items()}
        differences = []
        if len(seeds) > 1:
            for a, b in pairs:
                for metric in PAIRED_METRICS:
                    mean, se = paired_difference(values[a][metric], values[b][metric])
                    differences.append({"a": a, "b": b, "metric": metric, "mean": mean, "se": se,
                                        "z": mean / se if se > 0 else None})
        report["selectors"][selector] = {"policies": summaries, "pairs": differences}
    report["wall_s"] = time.perf_counter() - started
    log(racing_markdown(report))
    write_json_report(json_path, report)
    return report


def racing_markdown(report: dict) -> str:
    """Per selector: each policy's rate, gains, children and trainings, then the paired differences."""
    seeds = report["seeds"]
    described = ", ".join(_describe(policy) for policy in report["policies"].values())
    lines = [f"budget {report['budget']} trainings, {len(seeds)} worlds (seeds {seeds[0]}-{seeds[-1]}), "
             f"{report['wall_s']:.0f} s; seed policies: {described}"]
    for selector, entry in report["selectors"].items():
        lines += ["", f"**{selector}**", "",
                  "| seeds per node | reported truly better than root | reported node's true gain | "
                  "best-found true gain | claimed − true gain | children | trainings |", "|---" * 7 + "|"]
        for seeding, metrics in entry["policies"].items():
            lines.append(f"| {seeding} | {metrics['reported_better']['mean']:.2f} | "
                         f"{_mean_sd(metrics['reported_gain'])} | {_mean_sd(metrics['best_gain'])} | "
                         f"{_mean_sd(metrics['overclaim'])} | "
                         f"{metrics['children']['mean']:.1f} | {metrics['trainings']['mean']:.1f} |")
        lines += ["", "| paired difference | metric | mean | SE | mean / SE |", "|---|---|---|---|---|"]
        for pair in entry["pairs"]:
            z = f"{pair['z']:+.1f}" if pair["z"] is not None else "-"
            lines.append(f"| {pair['a']} − {pair['b']} | {pair['metric']} | {pair['mean']:+.4f} | "
                         f"{pair['se']:.4f} | {z} |")
    return "\n".join(lines)


def _describe(policy: dict) -> str:
    racing = f", racing at z {policy['z']}" if policy["racing"] else ""
    return f"{policy['name']} ({policy['at_birth']} at birth, cap {policy['cap']}{racing})"


def _mean_sd(metric: dict) -> str:
    return f"{metric['mean']:+.4f} ± {metric['sd']:.4f}" if metric["sd"] is not None else f"{metric['mean']:+.4f}"
