"""The `poise` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from poise.algorithm import check_passed, describe_problems, structural_check
from poise.algorithms import REFERENCE_ALGORITHMS
from poise.testbed.sft import DEFAULT_SFT_STEPS


def selfcheck() -> int:
    """Structural check of every reference algorithm; exit status 1 if any fails."""
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


def cmd_run(args: argparse.Namespace) -> int:
    print("poise run: the embedded discovery loop is not built yet; checking the reference algorithms that "
          "seed it (the search root and the literature priors).")
    return selfcheck()


def cmd_algorithms(args: argparse.Namespace) -> int:
    for algorithm in REFERENCE_ALGORITHMS.values():
        print(f"{algorithm.name}  [{', '.join(algorithm.mechanisms)}]\n  {algorithm.reference}\n"
              f"  {algorithm.description}\n")
    return 0


def cmd_testbed_build(args: argparse.Namespace) -> int:
    from poise.testbed.checkpoints import BASE_DIR
    from poise.testbed.sft import build_base_checkpoint

    out = Path(args.out) if args.out else BASE_DIR / args.name
    print(f"building the base checkpoint: seed {args.seed}, {args.steps} SFT steps -> {out}")
    path = build_base_checkpoint(out, seed=args.seed, steps=args.steps, log=print)
    recipe = json.loads((path / "recipe.json").read_text())
    print(f"done: weights sha256 {recipe['weights_sha256']}, final loss {recipe['final_loss']:.4f}")
    return 0


def cmd_bench_testbed(args: argparse.Namespace) -> int:
    from poise.bench import CONTROL, bench_testbed
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
    from poise.bench import markdown_table, resummarize

    path = Path(args.json)
    report = resummarize(json.loads(path.read_text()))
    path.write_text(json.dumps(report, indent=1))
    print(markdown_table(report))
    print(f"R = {report.get('R')}, pooled seed SD = {report.get('pooled_seed_sd')}, "
          f"significant pairs = {report.get('n_significant_pairs')}")
    return 0


def cmd_bench_sampler(args: argparse.Namespace) -> int:
    from poise.bench import sampler_speedup
    from poise.testbed.checkpoints import base_checkpoint
    from poise.testbed.protocol import get_protocol

    protocol = get_protocol(args.protocol)
    report = {"command": " ".join(["poise", *sys.argv[1:]]),
              **sampler_speedup(base_checkpoint(protocol.base_checkpoint), protocol, repeats=args.repeats)}
    for label in ("sampled", "greedy"):
        timing = report[label]
        print(f"{label}: sampler {timing['sampler']:.3f} s, HF generate {timing['hf_generate']:.3f} s, "
              f"speedup {timing['speedup']:.2f}x ({report['rows']} rows, up to {report['max_new_tokens']} tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poise", description="Autonomous discovery of LLM-RL algorithms.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="grow a lineage of algorithms from GRPO (embedded mode)")
    run.set_defaults(handler=cmd_run)
    algorithms = commands.add_parser("algorithms", help="list the reference algorithms (literature priors)")
    algorithms.set_defaults(handler=cmd_algorithms)

    testbed = commands.add_parser("testbed", help="the CPU testbed").add_subparsers(dest="testbed", required=True)
    build = testbed.add_parser("build", help="rebuild the base checkpoint deterministically from a seed")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--steps", type=int, default=DEFAULT_SFT_STEPS, help="SFT steps (a budget, never seconds)")
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
    bench_sampler.add_argument("--repeats", type=int, default=5)
    bench_sampler.add_argument("--json", help="write the report here")
    bench_sampler.set_defaults(handler=cmd_bench_sampler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
