"""Pilot (2026-11-29): re-evaluate the checkpoints of an `ema` benchmark with ONE evaluation seed for all.

Question: is the seed noise of the `ema` protocol evaluation noise that a fixed evaluation seed (common
random numbers) would cancel? Answer in bench/results/eval_seed_pilot.json and poise/testbed/README.md: no.

    python bench/scripts/eval_seed_pilot.py EVAL_SEED WORKDIR REPORT OUT
    # e.g. 0 /tmp/poise-bench-xhv92_iz bench/results/testbed_ema.json bench/results/eval_seed_pilot.json

WORKDIR is the bench's working directory (it keeps every run's checkpoint under <algorithm>-s<seed>/policy),
REPORT the bench's JSON report (for the algorithm names and the per-run Overall it measured).
"""

import json
import sys
import time
from pathlib import Path

from app.bench import summarize
from evaluator.testbed import evaluate_checkpoint
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import protocol_from_dict


def main() -> None:
    eval_seed, workdir, report_path, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    report = json.loads(report_path.read_text())
    protocol = protocol_from_dict(report["protocol"])
    started = time.perf_counter()
    result = {"eval_seed": eval_seed, "workdir": str(workdir), "report": str(report_path),
              "base": evaluate_checkpoint(base_checkpoint(protocol.base_checkpoint), protocol, eval_seed)[0].overall}
    arms: dict[str, list[dict]] = {}
    for name, arm in report["algorithms"].items():
        arms[name] = []
        for seed, measured in enumerate(arm["overall"]):
            evaluation, _ = evaluate_checkpoint(workdir / f"{name}-s{seed}" / "policy", protocol, eval_seed)
            arms[name].append({"overall": evaluation.overall, "overall_with_run_seed": measured})
            print(f"{name:<24} seed {seed}: fixed evaluation seed {evaluation.overall:.4f}, run seed {measured:.4f}",
                  flush=True)
    result["runs"] = arms
    result["summary"] = summarize(arms, result["base"])
    result["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
