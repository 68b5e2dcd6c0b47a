"""Regenerate proposer/probe_batches.npz, the probe batches recorded from a real GRPO run (docs/screening.md).

    /work/main/.venv/bin/python scripts/record_probe_batches.py                 # the committed file
    python scripts/record_probe_batches.py --protocol tiny --steps 0 2 --out /tmp/probes.npz

Trains GRPO (trusted reference code, in this process) under the protocol and seed given, keeps the batches of the
steps given and prints the ratio table of the run (docs/screening.md, "How far real ratios go").
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from proposer.probe_batches import RECORDED_PROBES, describe_ratio_table, record_probe_batches  # noqa: E402


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="default", help="testbed protocol (poise/testbed/protocol.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 20, 39],
                        help="0-based training steps whose batches are kept (default: early, middle, last)")
    parser.add_argument("--out", type=Path, default=RECORDED_PROBES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    command = shlex.join(["python", "scripts/record_probe_batches.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="poise-probes-") as workdir:
        probes = record_probe_batches(args.protocol, args.seed, args.steps, args.out, command, Path(workdir))
    rows = sum(len(step.scores) for step in probes.steps)
    print(f"recorded steps {probes.meta['steps']} of GRPO ({args.protocol}, seed {args.seed}): {rows} rows, "
          f"{args.out.stat().st_size / 1024:.0f} KiB at {args.out} in {time.monotonic() - started:.0f} s")
    print(describe_ratio_table(probes.meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
