"""Fingerprints that see what training sees: the recorded probe batches and the no-op gate (docs/screening.md)."""

from __future__ import annotations

import json
import math
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest

from poise.contracts import Genealogy, Implementation, MechanismSpec, Node, NodeStatus
from poise.description.codegen import compile_proposal
from poise.description.mechanisms import MECHANISMS, AlgorithmDescription
from poise.description.proposals import make_proposal, proposal_description, root_proposal
from poise.testbed.protocol import get_protocol, protocol_sha256
from proposer.fingerprint import (
    FINGERPRINT_LENGTH,
    NEAR_DUPLICATE_DISTANCE,
    NO_OP_DISTANCE,
    RECORDED_OFFSET,
    FingerprintCache,
    fingerprint_distance,
    recorded_distance,
    recorded_distances,
)
from proposer.probe_batches import (
    RECORDED_PROBES,
    STEP_ARRAYS,
    load_recorded_probes,
    ratio_table,
    shaped_length_groups,
)
from proposer.screening import ScreeningReport, describe_change, screen_population

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "record_probe_batches.py"
ROOT = root_proposal()
SANDBOX_WALL_S = 600.0  # the sandbox children run at the test's low priority next to whatever else runs


def variant(name: str, replace: dict[str, MechanismSpec | None], add: tuple[MechanismSpec, ...] = ()):
    """GRPO with the mechanisms named in `replace` swapped (None: removed) and `add` appended."""
    specs = [replace.get(spec.name, spec) for spec in proposal_description(ROOT).specs()]
    specs = [spec for spec in specs if spec is not None] + list(add)
    return make_proposal(AlgorithmDescription.from_specs(specs), name=name, rationale="test", generator="test")


DUAL_5 = variant("dual-5", {"clip:dual": MechanismSpec(name="clip:dual", params={"dual_clip": 5.0})})
PASS_RATE = variant("pass-rate", {}, (MechanismSpec(name="length:pass_rate_conditioned"),))
BATCH_STD = variant("batch-std", {"scale:group_std": MechanismSpec(name="scale:batch_std")})
DUAL_15 = variant("dual-1.5", {"clip:dual": MechanismSpec(name="clip:dual", params={"dual_clip": 1.5})})
CLIP_03 = variant("clip-0.3", {"clip:symmetric": MechanismSpec(name="clip:symmetric", params={"clip_ratio": 0.3})})


def root_node() -> Node:
    """GRPO as an implemented root node n000 (screening fingerprints its implementation's source)."""
    return Node(genealogy=Genealogy(run_id="run1", node_id="n000"), status=NodeStatus.IMPLEMENTED,
                proposal=ROOT.model_copy(update={"name": "n000"}),
                implementation=Implementation.from_source(compile_proposal(ROOT), verified=True))


@pytest.fixture(scope="module")
def fingerprints(tmp_path_factory):
    base = tmp_path_factory.mktemp("fingerprints")
    return FingerprintCache(base / "cache", base / "work", wall_s=SANDBOX_WALL_S)


# ------------------------------------------------------------------------------------------- recorded probes


def test_the_committed_probes_are_default_protocol_grpo_batches_of_the_right_shapes():
    assert RECORDED_PROBES.stat().st_size < 2 << 20
    probes = load_recorded_probes()
    meta, protocol = probes.meta, get_protocol("default")
    # Recorded under the default protocol as this code defines it: a changed protocol means regenerating them.
    assert meta["protocol"] == "default" and meta["protocol_sha256"] == protocol_sha256("default")
    assert meta["algorithm"] == "grpo" and meta["max_new_tokens"] == protocol.max_new_tokens
    assert [s.step for s in probes.steps] == meta["steps"] and len(meta["steps"]) >= 3
    assert meta["steps"][0] < protocol.steps // 4 and meta["steps"][-1] == protocol.steps - 1  # early ... last
    assert len(meta["update_statistics"]) == protocol.steps * protocol.minibatches * protocol.epochs
    for step in probes.steps:
        rows = protocol.rollouts_per_step()
        mask = step.mask
        assert step.scores.shape == step.format_valid.shape == step.group.shape == step.length.shape == (rows,)
        for name in ("old_log_prob", "log_prob", "entropy", "ref_log_prob"):
            values = getattr(step, name)
            assert values.shape == mask.shape and values.dtype == np.float32, name
            assert not values[mask == 0].any(), f"{name} holds values on padding"
        assert mask.shape[1] <= protocol.max_new_tokens and mask.shape[1] == step.length.max()
        assert (step.old_log_prob[mask > 0] <= 0).all() and (step.entropy[mask > 0] >= 0).all()
        assert set(np.unique(step.scores)) <= {0.0, 1.0}
        assert np.bincount(np.unique(step.group, return_inverse=True)[1]).tolist() == \
            [protocol.group_size] * protocol.prompts_per_step
        assert step.minibatch_sizes.tolist() == [rows // protocol.minibatches] * protocol.minibatches
        first, *later = step.minibatches()
        # The first update of a step is on-policy; the later ones are not.
        assert np.abs(step.log_prob[first] - step.old_log_prob[first]).max() < 1e-4
        assert max(np.abs(step.log_prob[rows] - step.old_log_prob[rows]).max() for rows in later) > 1e-3


def test_the_committed_recipe_is_the_scripts_own_command_line():
    meta = load_recorded_probes().meta
    words = shlex.split(meta["command"])
    assert words[:2] == ["python", "scripts/record_probe_batches.py"]
    namespace = runpy.run_path(str(SCRIPT))
    parsed = namespace["parse_arguments"](words[2:])
    assert (parsed.protocol, parsed.seed, sorted(parsed.steps)) == (meta["protocol"], meta["seed"], meta["steps"])


def test_the_script_records_a_tiny_run_in_the_committed_layout(tmp_path, capsys):
    out = tmp_path / "probes.npz"
    namespace = runpy.run_path(str(SCRIPT))
    assert namespace["main"](["--protocol", "tiny", "--steps", "0", "2", "--out", str(out)]) == 0
    assert "ratio r >" in capsys.readouterr().out
    small, committed = load_recorded_probes(out), load_recorded_probes()
    assert set(small.meta) == set(committed.meta)
    assert small.meta["steps"] == [0, 2] and small.meta["protocol"] == "tiny" and small.meta["seed"] == 0
    with np.load(out) as mine, np.load(RECORDED_PROBES) as theirs:
        assert sorted(mine) == sorted(["meta", *(f"s{i}_{name}" for i in range(2) for name in STEP_ARRAYS)])
        assert {name: mine[f"s0_{name}"].dtype for name in STEP_ARRAYS} == \
            {name: theirs[f"s0_{name}"].dtype for name in STEP_ARRAYS}
    protocol = get_protocol("tiny")
    step = small.steps[0]
    assert len(step.scores) == protocol.rollouts_per_step()
    first = step.minibatches()[0]
    assert np.abs(step.log_prob[first] - step.old_log_prob[first]).max() < 1e-4


def test_ratio_table_counts_the_off_policy_updates():
    meta = load_recorded_probes().meta
    rows = ratio_table(meta)
    shares = [row["share"] for row in rows]
    assert shares == sorted(shares, reverse=True) and 0 < shares[0] < 1
    assert all(row["count_negative_advantage"] <= row["count"] for row in rows)
    protocol = get_protocol("default")
    updates = [s for s in meta["update_statistics"] if s["update"] > 0]
    assert len(updates) == protocol.steps * (protocol.minibatches - 1)
    assert rows[0]["tokens"] == sum(s["tokens"] for s in updates)


# ------------------------------------------------------------------------------------------------ distances


def test_recorded_blocks_feed_the_no_op_distance_and_not_the_novelty_distance():
    vector = np.random.default_rng(0).normal(size=FINGERPRINT_LENGTH)
    moved = vector.copy()
    moved[RECORDED_OFFSET:] *= 2  # only the recorded sketches differ
    assert fingerprint_distance(vector, moved) == 0.0
    assert recorded_distance(vector, moved) == pytest.approx(0.5)
    assert recorded_distances(vector, moved) == pytest.approx({"advantages": 0.5, "loss": 0.5, "grad": 0.5})
    synthetic = vector.copy()
    synthetic[:RECORDED_OFFSET] *= -1  # only the synthetic probes differ
    assert recorded_distance(vector, synthetic) == 0.0 and fingerprint_distance(vector, synthetic) == pytest.approx(2)
    assert recorded_distance(vector, vector[:-1]) == math.inf


def test_describe_change_names_the_mechanisms_that_changed():
    assert describe_change(ROOT, DUAL_5) == "clip:dual (dual_clip 3 -> 5)"
    assert describe_change(ROOT, PASS_RATE) == "+length:pass_rate_conditioned"
    assert describe_change(ROOT, BATCH_STD) == "+scale:batch_std, -scale:group_std"
    assert describe_change(ROOT, ROOT) == "its change"


# ---------------------------------------------------------------------------------------------- the no-op gate


def test_dual_clip_and_pass_rate_length_shaping_are_no_ops_on_real_batches(fingerprints):
    root = root_node()
    report = screen_population(root, [DUAL_5, PASS_RATE, BATCH_STD, CLIP_03], [root], fingerprints)
    rejected = {r.proposal_name: r for r in report.rejections}
    assert set(rejected) == {"dual-5", "pass-rate"}, report.summary()
    assert sorted(r.proposal.name for r in report.ranked) == ["batch-std", "clip-0.3"]
    dual, pass_rate = rejected["dual-5"], rejected["pass-rate"]
    for rejection in (dual, pass_rate):
        assert rejection.stage == "novelty" and rejection.nearest_id == "n000"
        assert rejection.distance <= NO_OP_DISTANCE and "behavioural no-op" in rejection.reason
        assert "batches real training produces" in rejection.reason
    assert dual.reason.startswith("behavioural no-op: clip:dual (dual_clip 3 -> 5) never changes")
    assert "whose ratio exceeds c=5, and on the recorded batches the largest such ratio is" in dual.reason
    assert "off-policy tokens had A < 0 and a ratio above 5)" in dual.reason
    assert pass_rate.reason.startswith("behavioural no-op: +length:pass_rate_conditioned never changes")
    assert "0 of the" in pass_rate.reason
    assert ScreeningReport.model_validate_json(report.model_dump_json()) == report
    # On the synthetic probes both act: only the recorded batches show they do nothing in training.
    grpo = fingerprints(compile_proposal(ROOT)).vector
    for proposal in (DUAL_5, PASS_RATE):
        assert fingerprint_distance(fingerprints(compile_proposal(proposal)).vector, grpo) > NEAR_DUPLICATE_DISTANCE


def test_mechanisms_that_act_on_real_batches_are_not_no_ops(fingerprints):
    grpo = fingerprints(compile_proposal(ROOT)).vector
    # dual-clip at c=1.5 reaches tokens real runs produce: only the larger constants are no-ops.
    for proposal in (BATCH_STD, CLIP_03, DUAL_15):
        distances = recorded_distances(fingerprints(compile_proposal(proposal)).vector, grpo)
        assert max(distances.values()) > 100 * NO_OP_DISTANCE, (proposal.name, distances)
    # batch_std rescales every advantage; a wider clip only changes the loss where ratios leave [0.8, 1.2].
    assert recorded_distances(fingerprints(compile_proposal(BATCH_STD)).vector, grpo)["advantages"] > 0.1
    assert recorded_distances(fingerprints(compile_proposal(CLIP_03)).vector, grpo)["advantages"] == 0.0


def test_recorded_groups_explain_why_length_shaping_is_inert():
    probes = load_recorded_probes()
    min_pass_rate = MECHANISMS["length:pass_rate_conditioned"].defaults()["min_pass_rate"]
    shaped, groups = shaped_length_groups(probes, min_pass_rate)
    assert groups == len(probes.steps) * get_protocol("default").prompts_per_step
    assert shaped == 0
    assert json.loads(json.dumps(probes.meta)) == probes.meta  # the metadata is plain JSON
