"""Which single moves from GRPO act on the batches real training produces (docs/screening.md, "Measured").

    python bench/scripts/no_op_moves.py [OUT.json]

Fingerprints GRPO and a set of one-mechanism changes in the sandbox (proposer/fingerprint.py, as screening does)
and prints, per move, its distance to GRPO on the synthetic probes (the novelty gate's) and on the recorded
probes (the no-op gate's, per quantity), and whether screening rejects it as a no-op.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's packages, not an installed copy

from poise.algorithms import reference_algorithm  # noqa: E402
from poise.contracts import MechanismSpec  # noqa: E402
from poise.description.codegen import compile_proposal  # noqa: E402
from poise.description.mechanisms import AlgorithmDescription  # noqa: E402
from poise.description.proposals import make_proposal, proposal_description, root_proposal  # noqa: E402
from proposer.fingerprint import (  # noqa: E402
    NEAR_DUPLICATE_DISTANCE,
    NO_OP_DISTANCE,
    FingerprintCache,
    fingerprint_distance,
    recorded_distances,
)

ROOT = root_proposal()


def variant(name: str, replace: dict[str, MechanismSpec | None], add: tuple[MechanismSpec, ...] = ()):
    """GRPO with the mechanisms named in `replace` swapped (None: removed) and `add` appended."""
    description = proposal_description(ROOT)
    specs = [replace.get(spec.name, spec) if spec.name in replace else spec for spec in description.specs()]
    specs = [spec for spec in specs if spec is not None] + list(add)
    return make_proposal(AlgorithmDescription.from_specs(specs), name=name, rationale="no-op measurement",
                         generator="bench")


def spec(name: str, **params) -> MechanismSpec:
    return MechanismSpec(name=name, params=params)


MOVES = {
    "clip:dual 3 -> 1.5": variant("dual-1.5", {"clip:dual": spec("clip:dual", dual_clip=1.5)}),
    "clip:dual 3 -> 5": variant("dual-5", {"clip:dual": spec("clip:dual", dual_clip=5.0)}),
    "clip:dual 3 -> 10": variant("dual-10", {"clip:dual": spec("clip:dual", dual_clip=10.0)}),
    "-clip:dual": variant("no-dual", {"clip:dual": None}),
    "+length:pass_rate_conditioned (defaults)": variant("prc", {}, (spec("length:pass_rate_conditioned"),)),
    "+length:pass_rate_conditioned (min_pass_rate 0)": variant(
        "prc-0", {}, (spec("length:pass_rate_conditioned", min_pass_rate=0.0),)),
    "+length:correct_shorter": variant("shorter", {}, (spec("length:correct_shorter"),)),
    "clip:symmetric 0.2 -> 0.21": variant("clip-0.21", {"clip:symmetric": spec("clip:symmetric", clip_ratio=0.21)}),
    "clip:symmetric 0.2 -> 0.3": variant("clip-0.3", {"clip:symmetric": spec("clip:symmetric", clip_ratio=0.3)}),
    "scale:group_std -> scale:batch_std": variant("batch-std", {"scale:group_std": spec("scale:batch_std")}),
    "+entropy:bonus (0.01)": variant("entropy", {}, (spec("entropy:bonus"),)),
    "+kl:penalty (1e-3, k3)": variant("kl", {}, (spec("kl:penalty"),)),
    "+failure:all_fail_penalty": variant("all-fail", {}, (spec("failure:all_fail_penalty"),)),
}


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory(prefix="poise-no-op-") as work:
        cache = FingerprintCache(None, Path(work))
        root = cache(compile_proposal(ROOT))
        if not root.ok:
            raise SystemExit(f"GRPO's fingerprint failed: {root.failure}")
        sources = {"the reference GRPO module (same computation, other code)": reference_algorithm("grpo").source(),
                   **{move: compile_proposal(proposal) for move, proposal in MOVES.items()}}
        rows = []
        for move, source in sources.items():
            result = cache(source)
            if not result.ok:
                raise SystemExit(f"{move}: fingerprint failed: {result.failure}")
            recorded = recorded_distances(result.vector, root.vector)
            rows.append({"move": move, "synthetic": fingerprint_distance(result.vector, root.vector),
                         "recorded": recorded, "no_op": max(recorded.values()) <= NO_OP_DISTANCE})
    print(f"| move | synthetic distance (novelty, threshold {NEAR_DUPLICATE_DISTANCE:g}) | recorded: advantages | "
          f"loss | grad | no-op (<= {NO_OP_DISTANCE:g}) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        r = row["recorded"]
        print(f"| {row['move']} | {row['synthetic']:.3g} | {r['advantages']:.3g} | {r['loss']:.3g} | "
              f"{r['grad']:.3g} | {'yes' if row['no_op'] else 'no'} |")
    if out:
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
