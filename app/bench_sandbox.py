"""`poise bench fork-storm`: a fork bomb in the sandbox, measured from outside (issue 22, docs/sandbox.md).

Each trial runs a candidate-shaped snippet that forks without end in a sandboxed probe child with a task cap
(`SandboxLimits.processes`) and a short wall deadline, while this process counts every task on the machine
(all threads of all processes, from /proc) every 20 ms. Reported per trial: the cgroup's own peak (pids.peak,
where the kernel keeps it), the machine's peak task count against its count before the trial, and how long
after the deadline the child was gone (the issue asks within 2 s). The machine's load average before and after
says how much else was running.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from app.reports import invoked_command, write_json_report
from poise.contracts import ProbePayload, ProbeReport
from poise.sandbox import Cgroup, SandboxLimits, run_sandboxed

FORK_BOMB = textwrap.dedent("""
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """)


def machine_tasks() -> int:
    """Every task (thread) of every process on the machine, as /proc shows them."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return count


def fork_storm_trial(workdir: Path, deadline_s: float, processes: int) -> dict:
    before = machine_tasks()
    peak, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], machine_tasks())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run = run_sandboxed("poise.sandbox_probe", ProbePayload(code=FORK_BOMB), workdir,
                        SandboxLimits(wall_s=deadline_s, processes=processes), threads=1, report_type=ProbeReport)
    stop.set()
    sampler.join()
    return {"timed_out": run.timed_out, "wall_s": round(run.wall_s, 3),
            "after_deadline_s": round(run.wall_s - deadline_s, 3), "cgroup_peak_tasks": run.peak_tasks,
            "machine_tasks_before": before, "machine_tasks_peak": peak[0],
            "machine_tasks_added": peak[0] - before, "reason": run.failure_reason()}


def bench_fork_storm(trials: int, deadline_s: float, processes: int, json_path: Path | None) -> dict:
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory(prefix="poise-fork-storm-") as root:
        for index in range(trials):
            result = fork_storm_trial(Path(root) / f"trial-{index}", deadline_s, processes)
            results.append(result)
            print(f"trial {index + 1}/{trials}: cgroup peak {result['cgroup_peak_tasks']} tasks (cap {processes}), "
                  f"machine +{result['machine_tasks_added']} tasks at most, gone {result['after_deadline_s']:.2f} s "
                  f"after the {deadline_s:.0f} s deadline", flush=True)
    overruns = [r["after_deadline_s"] for r in results]
    report = {"command": invoked_command(), "trials": results, "deadline_s": deadline_s, "task_cap": processes,
              "cgroup": "none: " + (Cgroup.unavailable or "?") if results[0]["cgroup_peak_tasks"] is None else "yes",
              "max_after_deadline_s": max(overruns), "median_after_deadline_s": statistics.median(overruns),
              "max_cgroup_peak_tasks": max((r["cgroup_peak_tasks"] or 0) for r in results),
              "max_machine_tasks_added": max(r["machine_tasks_added"] for r in results),
              "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    write_json_report(json_path, report)
    return report
