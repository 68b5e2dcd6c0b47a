"""`poise bench cli`: how long the first commands a person types take to answer (issue 25 asks under 1 s).

Each command runs `repeats` times as a fresh `python -m app.cli ...` process, so every run pays the interpreter's
start and every import, as a person at a shell does. `status` and `show` read `--run-dir` when given, else a small
synthetic archive (app/bench_archive.py's SyntheticRun) in a temporary directory. The machine's load average is
recorded before and after: on a shared machine the same command takes longer, and the numbers say so.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.reports import invoked_command, write_json_report

SYNTHETIC_NODES = 8
REPO_ROOT = Path(__file__).resolve().parents[1]


def commands(run_dir: Path, node_id: str) -> dict[str, list[str]]:
    return {"--help": ["--help"], "run --help": ["run", "--help"], "status": ["status", "--run-dir", str(run_dir)],
            "show": ["show", node_id, "--run-dir", str(run_dir)]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def time_command(argv: list[str]) -> float:
    """Wall seconds of one `python -m app.cli ARGV` process; RuntimeError when it fails."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "app.cli", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"`poise {' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds


def shown_node(run_dir: Path) -> str:
    """A node worth `poise show`: the first with a parent (its page compares it with the parent), else the root."""
    from archive.sqlite_store import DB_FILENAME, SQLiteStore

    with SQLiteStore(run_dir / DB_FILENAME, read_only=True) as store:
        nodes = store.nodes(store.run_ids()[0])
    return next((n.node_id for n in nodes if n.genealogy.parent_ids), nodes[0].node_id)


def write_synthetic_run(run_dir: Path, size: int = SYNTHETIC_NODES) -> None:
    from app.bench_archive import SyntheticRun
    from archive.sqlite_store import SQLiteStore

    synthetic = SyntheticRun(size, live=0)
    with SQLiteStore.in_run_dir(run_dir) as store:
        store.put_run(synthetic.config)
        store.insert_nodes(synthetic.nodes())


def bench_cli(run_dir: Path | None = None, repeats: int = 10, json_path: Path | None = None, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="poise-bench-cli-") as tmp:
        if run_dir is None:
            run_dir = Path(tmp)
            write_synthetic_run(run_dir)
            source = f"synthetic, {SYNTHETIC_NODES} nodes"
        else:
            source = str(run_dir)
        report: dict = {"command": invoked_command(), "python": sys.executable, "repeats": repeats,
                        "run_dir": source, "cpus": os.cpu_count(), "commands": {}}
        for name, argv in commands(run_dir, shown_node(run_dir)).items():
            before = load_average()
            seconds = [time_command(argv) for _ in range(repeats)]
            report["commands"][name] = {
                "argv": argv, "median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                "max_s": round(max(seconds), 3), "loadavg_before": before, "loadavg_after": load_average()}
            entry = report["commands"][name]
            log(f"poise {name:<11} median {entry['median_s']:.2f} s, min {entry['min_s']:.2f} s, "
                f"max {entry['max_s']:.2f} s over {repeats} runs (load average {before[0]:.2f} -> "
                f"{entry['loadavg_after'][0]:.2f} on {report['cpus']} CPUs)")
        write_json_report(json_path, report)
    return report
