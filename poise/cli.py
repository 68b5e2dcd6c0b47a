"""The `poise` command line."""

from __future__ import annotations

import argparse
import sys
import time

from poise.algorithm import check_passed, describe_problems, structural_check
from poise.algorithms import REFERENCE_ALGORITHMS


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poise", description="Autonomous discovery of LLM-RL algorithms.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="grow a lineage of algorithms from GRPO (embedded mode)")
    run.set_defaults(handler=cmd_run)
    algorithms = commands.add_parser("algorithms", help="list the reference algorithms (literature priors)")
    algorithms.set_defaults(handler=cmd_algorithms)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
