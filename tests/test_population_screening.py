"""Phase I after parent selection: context tiers, population directions, behavioural fingerprints, screening.

The sandboxed fingerprints (a few seconds each on a quiet machine) are computed once per module in a shared
cache: compiled GRPO (the archive root), a renamed copy of it, Dr.GRPO and a hostile module.
"""

from __future__ import annotations

import ast
import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from poise.algorithms import reference_algorithm
from poise.contracts import (
    Evaluation,
    Genealogy,
    Implementation,
    MechanismEffect,
    MechanismSpec,
    MetricKind,
    Node,
    NodeStatus,
    Objective,
    Proposal,
    Reflection,
    RunConfig,
    SuiteResult,
    TrainingTrajectory,
    sha256_hex,
)
from poise.description.codegen import compile_proposal, describe_reference
from poise.description.mechanisms import MECHANISMS
from poise.description.proposals import description_key, proposal_description, root_proposal
from poise.sandbox import SandboxResult
from proposer.context import Context, build_context, mechanism_contrast
from proposer.fingerprint import (
    FINGERPRINT_LENGTH,
    NEAR_DUPLICATE_DISTANCE,
    FingerprintCache,
    FingerprintResult,
    fingerprint_distance,
    fingerprint_distances,
    fingerprint_in_sandbox,
)
from proposer.population import DIRECTIONS, REMEDIES, generate_population
from proposer.screening import (
    ScreeningReport,
    expected_improvement,
    phase_one,
    propose_screened,
    screen_population,
    upper_confidence,
)
from proposer.selection import UtilityGP

ROOT = root_proposal()
RUN = "run1"
START = datetime(2025, 1, 1, tzinfo=UTC)
# The sandbox children run at the test's low priority next to whatever else the machine does.
SANDBOX_WALL_S = 600.0


# ----------------------------------------------------------------------------------------- archive helpers


def proposal(name: str, *mechanisms: str | MechanismSpec, base: Proposal = ROOT) -> Proposal:
    """`base` with each mechanism put in its family's slot (added, or replacing the one there); clip:dual goes
    when the clip no longer supports it."""
    specs = list(base.mechanisms)
    for item in mechanisms:
        spec = item if isinstance(item, MechanismSpec) else MechanismSpec(name=item)
        family = MECHANISMS[spec.name].family
        specs = [s for s in specs if MECHANISMS[s.name].family != family] + [spec]
    names = {s.name for s in specs}
    specs = [s for s in specs if not MECHANISMS[s.name].works_with or names & set(MECHANISMS[s.name].works_with)]
    return base.model_copy(update={"name": name, "mechanisms": specs})


def evaluation(suites: dict[str, float], length: float = 40.0) -> Evaluation:
    results = {name: SuiteResult(suite=name, kind=MetricKind.ACC_AT_1, value=value, ci_low=value, ci_high=value,
                                 n_prompts=50, n_samples=50, mean_length=length, format_valid_rate=1.0, weight=0.5)
               for name, value in suites.items()}
    return Evaluation(suites=results, overall=sum(suites.values()) / len(suites), mean_length=length, seed=0)


def node(node_id: str, prop: Proposal, suites: dict[str, float] | None, parents: list[Node] = (),
         length: float = 40.0, reflection: Reflection | None = None, source: str | None = None) -> Node:
    genealogy = (Genealogy.child(node_id, [p.genealogy for p in parents]) if parents
                 else Genealogy(run_id=RUN, node_id=node_id))
    number = int(node_id.lstrip("n") or 0)
    parts = {}
    status = NodeStatus.PROPOSED
    if source is not None or suites is not None:
        parts["implementation"] = Implementation.from_source(source or "", verified=True)
        status = NodeStatus.IMPLEMENTED
    if suites is not None:
        parts.update(trajectory=TrainingTrajectory(protocol="p", seed=0), evaluation=evaluation(suites, length))
        status = NodeStatus.EVALUATED
    if reflection is not None:
        parts["reflection"] = reflection
        status = NodeStatus.REFLECTED
    return Node(genealogy=genealogy, status=status, proposal=prop.model_copy(update={"name": node_id}),
                created_at=START + timedelta(minutes=number), **parts)


def reflection(effects: dict[str, tuple[str, float]] = (), diagnoses: list[str] = ()) -> Reflection:
    return Reflection(text="hand-written reflection", generator="test", diagnoses=list(diagnoses),
                      effects=[MechanismEffect(mechanism=m, effect=e, confidence=c, evidence="Overall moved")
                               for m, (e, c) in dict(effects).items()])


def config(kind: str = "overall", size: int = 4) -> RunConfig:
    return RunConfig(run_id=RUN, population_size=size, objective=Objective(kind=kind, directive="be brief"))


def ids(references) -> list[str]:
    return [r.node.node_id for r in references]


# -------------------------------------------------------------------------------------------------- context


def test_pareto_tier_holds_exactly_the_non_dominated_nodes():
    root = node("n000", ROOT, {"a": 0.40, "b": 0.40})
    archive = [
        root,
        node("n001", ROOT, {"a": 0.60, "b": 0.30}, [root]),
        node("n002", ROOT, {"a": 0.30, "b": 0.60}, [root]),
        node("n003", ROOT, {"a": 0.50, "b": 0.50}, [root]),
        node("n004", ROOT, {"a": 0.45, "b": 0.35}, [root]),  # dominated by n003: the parent
        node("n005", ROOT, {"a": 0.45, "b": 0.45}, [root], length=20.0),  # dominated unless length counts
    ]
    parent = archive[4]
    context = build_context(parent, archive, config(), literature=False)
    assert sorted(ids(context.tier("pareto"))) == ["n001", "n002", "n003"]
    assert all("non-dominated" in r.reason for r in context.tier("pareto"))

    by_length = build_context(parent, archive, config("length"), per_tier=5, literature=False)
    assert sorted(ids(by_length.tier("pareto"))) == ["n001", "n002", "n003", "n005"]
    assert "mean length" in by_length.tier("pareto")[0].reason

    # The parent is never its own reference, even on the front.
    on_front = build_context(archive[3], archive, config(), literature=False)
    assert sorted(ids(on_front.tier("pareto"))) == ["n001", "n002"]


def test_complementary_tier_picks_the_most_contrasting_good_nodes():
    root = node("n000", ROOT, {"a": 0.40})
    far = proposal("far", "baseline:leave_one_out", "scale:none", "clip:cispo", "agg:seq-mean-token-mean")
    archive = [
        root,
        node("n001", proposal("front", MechanismSpec(name="clip:dual", params={"dual_clip": 4.0})), {"a": 0.90},
             [root]),  # the whole front, with the parent's mechanisms
        node("n002", far, {"a": 0.50}, [root]),  # 4 of 5 families differ
        node("n003", proposal("mid", "scale:batch_std", "validity:mask"), {"a": 0.47}, [root]),
        node("n004", proposal("near", "entropy:bonus"), {"a": 0.46}, [root]),
        node("n005", proposal("bad", "baseline:leave_one_out", "scale:analytic_variance", "clip:geometric_mean",
                              "agg:seq-mean-token-sum"), {"a": 0.10}, [root]),  # most different, below the median
        node("n006", ROOT, {"a": 0.20}, [root]),
        node("n007", ROOT, {"a": 0.15}, [root]),  # with n005 and n006: the median is n004's 0.46
    ]
    parent = archive[0]
    context = build_context(parent, archive, config(), literature=False)
    assert ids(context.tier("pareto")) == ["n001"]
    complementary = ids(context.tier("complementary"))
    assert complementary == ["n002", "n003", "n004"]
    names = {n.node_id: [s.name for s in proposal_description(n.proposal).specs()] for n in archive}
    contrasts = [mechanism_contrast(names["n000"], names[i]) for i in complementary]
    assert contrasts == sorted(contrasts, reverse=True) and contrasts[-1] > 0
    assert "n005" not in complementary and "scale:none" in context.tier("complementary")[0].reason


def test_exploratory_tier_stays_outside_the_lineage_one_branch_at_a_time():
    entropy = proposal("e", "entropy:bonus")
    root = node("n000", ROOT, {"a": 0.40})
    n1 = node("n001", entropy, {"a": 0.42}, [root])
    n2 = node("n002", entropy, {"a": 0.41}, [root])
    parent = node("n003", entropy, {"a": 0.44}, [n1])
    n4 = node("n004", entropy, {"a": 0.43}, [n2])
    n5 = node("n005", entropy, {"a": 0.90}, [parent])  # a descendant, and the whole Pareto front
    n6 = node("n006", entropy, {"a": 0.30}, [root])
    archive = [root, n1, n2, parent, n4, n5, n6]
    context = build_context(parent, archive, config(), literature=False)
    lineage = {"n000", "n001", "n005"}
    assert ids(context.tier("pareto")) == ["n005"]
    assert ids(context.tier("exploratory")) == ["n004", "n006", "n002"]  # best of branch n002, then branch n006
    assert not lineage & set(ids(context.tier("exploratory")))
    assert all("outside the parent's lineage" in r.reason for r in context.tier("exploratory"))
    assert len({r.node.node_id for r in context.references}) == len(context.references)  # one tier per node


def test_context_carries_parent_reflection_priors_and_directive_and_renders():
    root = node("n000", ROOT, {"a": 0.40})
    parent = node("n001", proposal("p", "entropy:bonus"), {"a": 0.45}, [root],
                  reflection=reflection({"entropy:bonus": ("hurt", 0.7)}, ["entropy_collapse"]))
    context = build_context(parent, [root, parent], config())
    assert context.parent.diagnoses == ["entropy_collapse"]
    assert [e.mechanism for e in context.parent.harmful()] == ["entropy:bonus"]
    assert {"grpo", "dr_grpo", "dapo_clip_higher", "rloo", "gspo", "cispo"} <= {p.name for p in context.literature}
    assert context.directive == "be brief"
    assert Context.model_validate_json(context.model_dump_json()) == context
    text = context.render()
    for expected in ("# Parent n001", "Directive: be brief", "entropy_collapse", "entropy:bonus hurt",
                     "# Literature priors", "dr_grpo"):
        assert expected in text


# ------------------------------------------------------------------------------------------------ population


def population_parent(effects=(), diagnoses=()) -> tuple[Proposal, Context]:
    """GRPO + entropy bonus + validity mask under a reflection, with one contrasting node in the archive."""
    root = node("n000", ROOT, {"a": 0.40, "b": 0.40})
    other = node("n001", proposal("o", "baseline:leave_one_out", "scale:none", "clip:cispo"), {"a": 0.3, "b": 0.6},
                 [root])
    parent = node("n002", proposal("p", "entropy:bonus", "validity:mask"), {"a": 0.45, "b": 0.45}, [root],
                  reflection=reflection(effects, diagnoses))
    return parent.proposal, build_context(parent, [root, other, parent], config())


def test_population_is_n_distinct_proposals_in_every_direction_and_deterministic():
    parent, context = population_parent({"entropy:bonus": ("hurt", 0.6)}, ["entropy_collapse"])
    population = generate_population(parent, context, 6, random.Random(3))
    assert len(population) == 6
    keys = [description_key(p) for p in population]
    assert len(set(keys)) == 6 and description_key(parent) not in keys
    assert len({p.name for p in population}) == 6
    directions = [p.rationale.split(".")[0].removeprefix("Direction: ") for p in population]
    assert set(directions) == set(DIRECTIONS)
    assert all(p.parent_ids == ["n002"] and p.directive == "be brief" and p.generator == "offline" for p in population)
    for p in population:
        compile_proposal(p)  # every proposal compiles
    again = generate_population(parent, context, 6, random.Random(3))
    assert [p.model_dump() for p in again] == [p.model_dump() for p in population]
    seen = generate_population(parent, context, 6, random.Random(3), seen=keys)
    assert not {description_key(p) for p in seen} & set(keys)


def test_mechanism_reflected_as_harmful_is_removed_or_swapped_more_often():
    parent, context = population_parent({"entropy:bonus": ("hurt", 0.6)})
    dropped = Counter()
    for seed in range(60):
        for child in generate_population(parent, context, 4, random.Random(seed)):
            names = {s.name for s in child.mechanisms}
            dropped.update(m for m in ("entropy:bonus", "validity:mask") if m not in names)
    # Same kind of slot (optional, one member): only the reflection tells them apart.
    assert dropped["entropy:bonus"] >= 60
    assert dropped["entropy:bonus"] > 3 * dropped["validity:mask"], dropped


@pytest.mark.parametrize("tag", sorted(REMEDIES))
def test_diagnosed_failure_mode_yields_one_of_its_remedies(tag):
    parent, context = population_parent(diagnoses=[tag])
    remedies = {r.mechanism for r in REMEDIES[tag]}
    for seed in range(5):
        population = generate_population(parent, context, 4, random.Random(seed))
        remedied = [p for p in population if p.rationale.startswith(f"Direction: remedy. Remedy for {tag}")]
        assert remedied, [p.rationale[:80] for p in population]
        names = {s.name for s in remedied[0].mechanisms}
        assert names & remedies, (tag, names)


def test_harmful_mechanism_is_never_a_remedy_or_a_crossover_donation():
    parent, context = population_parent({"clip:symmetric": ("hurt", 0.9), "entropy:bonus": ("hurt", 0.5)},
                                        ["entropy_collapse"])
    directed = 0
    for seed in range(20):
        for child in generate_population(parent, context, 5, random.Random(seed)):
            if not child.rationale.startswith(("Direction: remedy", "Direction: crossover")):
                continue
            directed += 1
            description = proposal_description(child)
            # entropy:bonus is entropy_collapse's second remedy, and donors carry clip:symmetric at other ratios.
            assert description.hparams.get("entropy_coef", 0.01) == 0.01, child.rationale
            assert description.hparams.get("clip_ratio", 0.2) == 0.2, child.rationale
    assert directed >= 40


# ---------------------------------------------------------------------------------------------- fingerprints

# Helper functions and local variables renamed, comments and docstrings dropped, functions in reverse order:
# the interface (compute_advantages, policy_loss and its keyword parameters) stays as it must.
RENAMES = {
    "counted_responses": "rows_in_stats", "center_scores": "subtract_baseline", "scale_advantages": "normalise",
    "surrogate_loss": "ppo_term", "dual_clip": "cap_negatives", "counted": "included", "centered": "shifted",
    "mean": "avg", "std": "spread", "hp": "cfg", "log_ratio": "lr_", "ratio": "rho", "unclipped": "plain",
    "clipped": "bounded", "metrics": "stats", "cap": "ceiling", "lower": "hit", "capped": "limited",
    "loss": "objective", "more": "extra", "scores": "rewards",
}


class _Rename(ast.NodeTransformer):
    def visit_FunctionDef(self, fn):
        fn.name = RENAMES.get(fn.name, fn.name)
        if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant):
            fn.body = fn.body[1:]
        return self.generic_visit(fn)

    def visit_Name(self, name):
        name.id = RENAMES.get(name.id, name.id)
        return name

    def visit_arg(self, arg):
        arg.arg = RENAMES.get(arg.arg, arg.arg)
        return arg


def renamed_copy(source: str) -> str:
    tree = _Rename().visit(ast.parse(source))
    body = [s for s in tree.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    functions = [s for s in body if isinstance(s, ast.FunctionDef)]
    tree.body = [s for s in body if not isinstance(s, ast.FunctionDef)] + functions[::-1]
    return ast.unparse(tree)


GRPO_SOURCE = compile_proposal(ROOT)
RENAMED_SOURCE = renamed_copy(GRPO_SOURCE)
DR_GRPO_SOURCE = reference_algorithm("dr_grpo").source()
HOSTILE_SOURCE = "import os\nos._exit(3)\n"


@pytest.fixture(scope="module")
def fingerprints(tmp_path_factory):
    """One cache for the module: each source is fingerprinted in the sandbox once."""
    base = tmp_path_factory.mktemp("fingerprints")
    return FingerprintCache(base / "cache", base / "work", wall_s=SANDBOX_WALL_S)


def test_renamed_copy_really_is_renamed():
    assert "center_scores" not in RENAMED_SOURCE and "#" not in RENAMED_SOURCE and RENAMED_SOURCE != GRPO_SOURCE
    assert "def compute_advantages(batch)" in RENAMED_SOURCE


def test_fingerprint_is_deterministic_across_sandbox_runs(fingerprints, tmp_path):
    first = fingerprints(GRPO_SOURCE)
    assert first.ok, first.failure
    assert first.vector.shape == (FINGERPRINT_LENGTH,) and np.isfinite(first.vector).all()
    assert first.loss_agg_mode == "token-mean" and first.hparams["clip_ratio"] == 0.2
    assert [c.name for c in first.checks][:2] == ["import", "interface"] and all(c.passed for c in first.checks)
    second = fingerprint_in_sandbox(GRPO_SOURCE, tmp_path, wall_s=SANDBOX_WALL_S)
    assert np.array_equal(first.vector, second.vector)


def test_renamed_grpo_is_a_near_duplicate_and_dr_grpo_is_not(fingerprints):
    grpo, renamed, dr_grpo = (fingerprints(s) for s in (GRPO_SOURCE, RENAMED_SOURCE, DR_GRPO_SOURCE))
    assert renamed.ok and dr_grpo.ok, (renamed.failure, dr_grpo.failure)
    assert fingerprint_distance(grpo.vector, renamed.vector) <= NEAR_DUPLICATE_DISTANCE
    assert fingerprint_distance(grpo.vector, dr_grpo.vector) > 100 * NEAR_DUPLICATE_DISTANCE


def test_fingerprint_cache_persists_definitive_results_only(fingerprints, monkeypatch):
    fingerprints(GRPO_SOURCE)
    monkeypatch.setattr("proposer.fingerprint.fingerprint_in_sandbox",
                        lambda *a, **k: pytest.fail("a cached source went back to the sandbox"))
    reopened = FingerprintCache(fingerprints.directory, fingerprints.workdir)
    assert np.array_equal(reopened(GRPO_SOURCE).vector, fingerprints(GRPO_SOURCE).vector)
    cut_short = FingerprintResult(sha256_hex("x"), None, failure="sandbox: killed after the 60 s wall-clock deadline")
    reopened.put(cut_short)
    assert reopened.get(sha256_hex("x")) is cut_short  # remembered in memory ...
    assert FingerprintCache(fingerprints.directory).get(sha256_hex("x")) is None  # ... never on disk


@pytest.mark.parametrize("forged", [
    {"checks": [1]},
    {"checks": [], "fingerprint": "zeros"},
    {"checks": [], "fingerprint": [0.0] * FINGERPRINT_LENGTH, "hparams": ["not", "a", "dict"]},
    {"checks": [], "fingerprint": [math.nan] * FINGERPRINT_LENGTH},
])
def test_a_forged_child_report_is_a_failure_not_a_crash(forged, monkeypatch, tmp_path):
    # The candidate shares the child's stdout: it can print a result line of its own and exit 0.
    def forging_child(*args, report_type, **kwargs) -> SandboxResult:
        run = SandboxResult(returncode=0, wall_s=0.1, result=None)
        run.record_result(forged, report_type)  # what run_sandboxed does with the child's result line
        return run

    monkeypatch.setattr("proposer.fingerprint.run_sandboxed", forging_child)
    result = fingerprint_in_sandbox("x = 1", tmp_path)
    assert not result.ok and result.failure.startswith("fingerprint: ")


def test_fingerprint_distance_is_relative_per_quantity():
    vector = np.random.default_rng(0).normal(size=FINGERPRINT_LENGTH)
    assert fingerprint_distance(vector, vector) == 0.0
    assert fingerprint_distance(vector, 2 * vector) == pytest.approx(0.5)
    assert fingerprint_distance(vector, -vector) == pytest.approx(2.0)
    assert fingerprint_distance(vector, np.zeros(FINGERPRINT_LENGTH)) == pytest.approx(1.0)
    assert fingerprint_distance(np.zeros(FINGERPRINT_LENGTH), np.zeros(FINGERPRINT_LENGTH)) == 0.0
    assert fingerprint_distance(vector, vector[:-1]) == math.inf



def test_distances_to_many_fingerprints_at_once_are_the_pairwise_distances():
    rng = np.random.default_rng(1)
    vector = rng.normal(size=FINGERPRINT_LENGTH)
    others = np.stack([vector, 2 * vector, -vector, np.zeros(FINGERPRINT_LENGTH), rng.normal(size=FINGERPRINT_LENGTH)])
    assert fingerprint_distances(vector, others).tolist() == pytest.approx(
        [fingerprint_distance(vector, other) for other in others])
    assert fingerprint_distances(vector[:-1], others).tolist() == [math.inf] * 5


# ------------------------------------------------------------------------------------------------- screening


def as_proposal(name: str, source: str, reference: str | None = None) -> Proposal:
    """A proposal whose description is GRPO's (or a reference's): what an LLM might claim for `source`."""
    specs, hparams = describe_reference(reference or "grpo")
    return Proposal(name=name, rationale="test", mechanisms=specs, hparams=hparams, generator="test")


def sources_by_name(pairs: dict[str, str]):
    def source_of(prop: Proposal) -> str:
        return pairs[prop.name] if prop.name in pairs else compile_proposal(prop)
    return source_of


def test_screening_rejects_a_renamed_copy_of_an_archived_algorithm(fingerprints):
    root = node("n000", ROOT, {"a": 0.4}, source=GRPO_SOURCE)
    sources = {"novel-idea": RENAMED_SOURCE, "dr": DR_GRPO_SOURCE}
    proposals = [as_proposal("novel-idea", RENAMED_SOURCE), as_proposal("dr", DR_GRPO_SOURCE, "dr_grpo")]
    report = screen_population(root, proposals, [root], fingerprints, source_of=sources_by_name(sources))
    assert [r.proposal.name for r in report.ranked] == ["dr"]
    (rejection,) = report.rejections
    assert rejection.proposal_name == "novel-idea" and rejection.stage == "novelty"
    assert rejection.nearest_id == "n000" and rejection.distance <= NEAR_DUPLICATE_DISTANCE
    assert "near-duplicate of node n000" in rejection.reason and "fingerprint distance" in rejection.reason
    assert report.best.nearest_id == "n000" and report.best.distance > NEAR_DUPLICATE_DISTANCE
    assert ScreeningReport.model_validate_json(report.model_dump_json()) == report


def test_hostile_and_broken_candidates_fail_consistency_without_crashing_the_screener(fingerprints):
    root = node("n000", ROOT, {"a": 0.4}, source=GRPO_SOURCE)
    sources = {"hostile": HOSTILE_SOURCE, "garbled": "def compute_advantages(batch:\n", "dr": DR_GRPO_SOURCE}
    proposals = [as_proposal("hostile", HOSTILE_SOURCE), as_proposal("garbled", ""),
                 ROOT.model_copy(update={"name": "unknown", "mechanisms": [MechanismSpec(name="clip:magic")]}),
                 as_proposal("dr", DR_GRPO_SOURCE, "dr_grpo"),
                 as_proposal("liar", DR_GRPO_SOURCE)]  # claims GRPO's token-mean, the code is Dr.GRPO's
    sources["liar"] = DR_GRPO_SOURCE
    report = screen_population(root, proposals, [root], fingerprints, source_of=sources_by_name(sources))
    assert report.best.proposal.name == "dr"
    reasons = {r.proposal_name: r.reason for r in report.rejections}
    assert all(r.stage == "consistency" for r in report.rejections)
    assert set(reasons) == {"hostile", "garbled", "unknown", "liar"}
    assert reasons["hostile"].startswith("sandbox: child exited with status 3")
    assert reasons["garbled"].startswith("the module does not parse")
    assert "unknown mechanism 'clip:magic'" in reasons["unknown"]
    assert "LOSS_AGG_MODE 'seq-mean-token-sum-norm'" in reasons["liar"]


class FakeFingerprints:
    """A fingerprinter without a sandbox: a vector per description, derived from its key (same key, same
    vector), and the agg mode and constants the proposal declares."""

    def __init__(self, proposals, twins: dict[str, str] = ()):
        self.by_sha = {}
        for prop in proposals:
            description = proposal_description(prop)
            key = dict(twins).get(prop.name, description_key(prop))
            seed = int(sha256_hex(key)[:8], 16)
            self.by_sha[sha256_hex(compile_proposal(prop))] = (description, seed)

    def __call__(self, source: str) -> FingerprintResult:
        sha = sha256_hex(source)
        description, seed = self.by_sha[sha]
        vector = np.random.default_rng(seed).normal(size=FINGERPRINT_LENGTH)
        return FingerprintResult(sha, vector, loss_agg_mode=description.loss_agg_mode, hparams=description.hparams)


def test_screening_ranks_by_expected_improvement_from_the_predictor():
    root = node("n000", ROOT, {"a": 0.4}, source=GRPO_SOURCE)
    candidates = [proposal(f"c{i}", m) for i, m in
                  enumerate(["entropy:bonus", "validity:mask", "kl:penalty", "scale:none"])]
    twin = proposal("twin", "clip:clip_higher")
    fake = FakeFingerprints([ROOT, *candidates, twin], twins={"twin": description_key(candidates[0])})
    predictions = {"c0": (0.05, 0.01), "c1": (0.0, 0.3), "c2": (-0.2, 0.01), "c3": (0.02, 0.01), "twin": (0.0, 0.0)}

    def predictor(name):
        return np.array([predictions[name][0]]), np.array([predictions[name][1]])

    report = screen_population(root, [*candidates, twin], [root], fake, predictor=predictor, features=lambda p: p.name)
    expected = sorted(predictions, key=lambda n: -expected_improvement(*predictions[n], 0.0))
    expected.remove("twin")  # behaves like c0, which ranks above it
    assert [r.proposal.name for r in report.ranked] == expected == ["c1", "c0", "c3", "c2"]
    assert [r.rank for r in report.ranked] == [1, 2, 3, 4]
    assert report.ranked[0].expected_improvement == pytest.approx(0.3 / math.sqrt(2 * math.pi))
    (rejection,) = report.rejections
    assert rejection.proposal_name == "twin" and "near-duplicate of c0, ranked above it" in rejection.reason

    ucb = screen_population(root, candidates, [root], fake, predictor=predictor, features=lambda p: p.name,
                            acquisition="ucb", kappa=0.1)
    assert [r.proposal.name for r in ucb.ranked] == ["c0", "c1", "c3", "c2"]  # 0.051, 0.03, 0.021, -0.199
    assert upper_confidence(0.05, 0.01, 0.0, 0.1) == pytest.approx(0.051)

    blind = screen_population(root, candidates, [root], fake)  # no predictor: the most novel first
    distances = [r.distance for r in blind.ranked]
    assert distances == sorted(distances, reverse=True) and all(r.expected_improvement == 0 for r in blind.ranked)


def literal_fingerprints(source: str) -> FingerprintResult:
    """A fingerprinter without a sandbox for any compiled source: LOSS_AGG_MODE and HPARAMS read as literals
    (nothing executed), a vector per source."""
    constants = {s.targets[0].id: ast.literal_eval(s.value) for s in ast.parse(source).body
                 if isinstance(s, ast.Assign) and s.targets[0].id in ("LOSS_AGG_MODE", "HPARAMS")}
    sha = sha256_hex(source)
    vector = np.random.default_rng(int(sha[:8], 16)).normal(size=FINGERPRINT_LENGTH)
    return FingerprintResult(sha, vector, loss_agg_mode=constants["LOSS_AGG_MODE"], hparams=constants["HPARAMS"])


def test_propose_screened_returns_the_best_screened_child_of_the_parent():
    root = node("n000", ROOT, {"a": 0.40, "b": 0.40}, source=GRPO_SOURCE)
    parent = node("n001", proposal("p", "entropy:bonus"), {"a": 0.45, "b": 0.42}, [root],
                  reflection=reflection({"entropy:bonus": ("helped", 0.4)}, ["length_drift"]))
    other = node("n002", proposal("o", "scale:none"), {"a": 0.35, "b": 0.50}, [root])
    best, report, context = propose_screened(parent, [root, parent, other], config(size=5), random.Random(0),
                                             literal_fingerprints, predictor=lambda name: (len(name) / 100, 0.0),
                                             features=lambda p: p.name)
    assert context.parent.node_id == "n001" and ids(context.tier("pareto"))
    assert len(report.ranked) + len(report.rejections) == 5 and report.best.proposal == best
    assert best.parent_ids == ["n001"] and best.name == max((r.proposal.name for r in report.ranked), key=len)
    assert report.summary().startswith(f"parent n001: best {best.name}")


def test_phase_one_ranks_the_population_by_the_utility_gps_improvement_over_the_parent():
    root = node("n000", ROOT, {"a": 0.40, "b": 0.40}, source=GRPO_SOURCE)
    children = [node("n001", proposal("x", "clip:cispo"), {"a": 0.30, "b": 0.32}, [root]),
                node("n002", proposal("y", "kl:penalty"), {"a": 0.46, "b": 0.44}, [root]),
                node("n003", proposal("z", "scale:none"), {"a": 0.41, "b": 0.40}, [root])]
    nodes = [root, *children]
    parent = children[1]
    best, report, _ = phase_one(parent, nodes, config(size=6), random.Random(3), literal_fingerprints)
    gp = UtilityGP().fit(nodes)
    assert len(report.ranked) >= 2 and best == report.best.proposal and best.parent_ids == ["n002"]
    for screened in report.ranked:
        mean, std = gp.predict(gp.proposal_features(screened.proposal, parent))
        assert screened.predicted_mean == pytest.approx(mean[0]) and screened.predicted_std == pytest.approx(std[0])
        assert screened.expected_improvement == pytest.approx(expected_improvement(mean[0], std[0], 0.45))
    scores = [r.expected_improvement for r in report.ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]


def test_expected_improvement_matches_the_normal_formula():
    assert expected_improvement(0.0, 1.0, 0.0) == pytest.approx(1 / math.sqrt(2 * math.pi))
    assert expected_improvement(0.3, 0.0, 0.1) == pytest.approx(0.2)
    assert expected_improvement(-0.3, 0.0, 0.1) == 0.0
    assert expected_improvement(1.0, 0.1, 0.0) == pytest.approx(1.0, abs=1e-6)
