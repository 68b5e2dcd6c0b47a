"""Is a PPO clip ratio of 0.3 better than GRPO's 0.2 on the default testbed protocol? (issue 24)

Both arms are GRPO compiled by the mechanism library, differing only in `clip:symmetric`'s clip_ratio, trained
on the same seeds one after the other (seed k: 0.2 then 0.3), each evaluated on every problem of the six suites
with the training seed. The paired per-seed differences give the answer with a paired t-test; the JSON is
rewritten after every training, so a run cut short still holds every completed pair.

    python bench/scripts/clip_question.py --seeds 0 1 2 3 --json bench/results/clip_question.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app.bench import run_arm
from poise.description.codegen import compile_proposal
from poise.description.mechanisms import AlgorithmDescription
from poise.description.proposals import make_proposal, proposal_description, root_proposal
from poise.scoring import paired_p, summarize
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.protocol import get_protocol


def grpo_with_clip(clip_ratio: float) -> str:
    grpo = proposal_description(root_proposal())
    specs = [spec if spec.name != "clip:symmetric" else spec.model_copy(update={"params": {"clip_ratio": clip_ratio}})
             for spec in grpo.specs()]
    return compile_proposal(make_proposal(AlgorithmDescription.from_specs(specs), name=f"grpo-clip-{clip_ratio}",
                                          rationale="clip question", generator="offline"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--clips", type=float, nargs=2, default=(0.2, 0.3))
    parser.add_argument("--protocol", default="default")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    protocol = get_protocol(args.protocol)
    base = base_checkpoint(protocol.base_checkpoint)
    arms = {f"clip {c:g}": grpo_with_clip(c) for c in args.clips}
    results: dict[str, dict[int, float]] = {name: {} for name in arms}
    report = {"command": "python bench/scripts/clip_question.py " + " ".join(sys.argv[1:]), "protocol": protocol.name,
              "arms": list(arms), "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for name, source in arms.items():
                started = time.perf_counter()
                record = run_arm(name, source, protocol, seed, base, Path(scratch) / f"{name}-{seed}".replace(" ", "-"))
                record["wall_s"] = time.perf_counter() - started
                report["runs"].append({"arm": name, "seed": seed, "overall": record.get("overall"),
                                       "mean_length": record.get("mean_length"), "wall_s": record["wall_s"]})
                if record.get("overall") is not None:
                    results[name][seed] = record["overall"]
                report["summary"] = summary(results)
                args.json.write_text(json.dumps(report, indent=1))
                print(f"seed {seed} {name}: Overall {record.get('overall')} ({record['wall_s']:.0f} s)", flush=True)
    print(json.dumps(report["summary"], indent=1))
    return 0


def summary(results: dict[str, dict[int, float]]) -> dict:
    (low, low_runs), (high, high_runs) = results.items()
    seeds = sorted(set(low_runs) & set(high_runs))
    differences = [high_runs[s] - low_runs[s] for s in seeds]
    diff = summarize(differences)
    out = {name: {"n": len(runs), "mean": statistics.fmean(runs.values()) if runs else None,
                  "sd": statistics.stdev(runs.values()) if len(runs) > 1 else None} for name, runs in results.items()}
    out["paired"] = {"seeds": seeds, "difference": f"{high} - {low}",
                     "mean": diff.mean if diff else None, "sd": diff.sd if diff else None,
                     "ci95": [diff.ci_low, diff.ci_high] if diff and diff.ci_low is not None else None,
                     "p": paired_p(differences)}
    if diff and diff.sd:
        # seeds per arm for a paired test to detect a 0.01 difference at alpha 0.05 with 80% power
        out["paired"]["seeds_for_0.01"] = math.ceil(((1.96 + 0.84) * diff.sd / 0.01) ** 2)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
