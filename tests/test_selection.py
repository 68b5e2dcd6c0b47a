"""Parent acquisition: each term of s(d) on hand-built archives with known answers, the GP, and the choice."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from poise.contracts import (
    Evaluation,
    Failure,
    Genealogy,
    Implementation,
    MetricKind,
    Node,
    NodeStatus,
    Objective,
    Phase,
    Proposal,
    SelectionWeights,
    SuiteResult,
    TrainingTrajectory,
)
from poise.description.mechanisms import MECHANISMS, AlgorithmDescription
from poise.description.proposals import proposal_description
from proposer import selection
from proposer.selection import (
    FEATURE_NAMES,
    PRIOR_MEAN,
    PRIOR_STD,
    DescendantGP,
    Genotype,
    UtilityGP,
    bayes_term,
    candidate_parents,
    descendant_gain,
    descendant_gains,
    genotype_features,
    metric_vectors,
    node_features,
    novelty,
    pareto_fronts,
    pareto_strength,
    score_candidates,
    seed_mean,
    seed_mean_variances,
    select_parents,
    shortlist,
    structural_distances,
)

RUN = "run-selection"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
GRPO = ("baseline:group_mean", "scale:group_std", "clip:symmetric", "agg:token-mean")
ONLY_WEIGHT = {term: SelectionWeights(**{t: float(t == term) for t in ("pareto", "perf", "div", "bayes")})
               for term in ("pareto", "perf", "div", "bayes")}


def proposal(*names: str, **hparams: float | str) -> Proposal:
    description = AlgorithmDescription.from_specs(list(names), hparams)
    return Proposal(name="+".join(description.names), rationale="test", mechanisms=description.specs(),
                    loss_agg_mode=description.loss_agg_mode, generator="test")


def evaluation(utility: float, suites: dict[str, float] | None = None, length: float = 100.0, seed: int = 0
               ) -> Evaluation:
    results = {name: SuiteResult(suite=name, kind=MetricKind.ACC_AT_1, value=value, ci_low=value, ci_high=value,
                                 n_prompts=10, n_samples=1, mean_length=length, format_valid_rate=1.0, weight=1.0)
               for name, value in (suites or {}).items()}
    return Evaluation(suites=results, overall=utility, mean_length=length, seed=seed, utility=utility)


class Archive:
    """Builds a run's nodes in creation order; a parent is named by its node id."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    def add(self, node_id: str, utility: float, parent: str | None = None, names: tuple[str, ...] = GRPO,
            suites: dict[str, float] | None = None, replicates: tuple[float, ...] = (), length: float = 100.0,
            **hparams: float | str) -> Node:
        genealogy = (Genealogy.child(node_id, [self.nodes[parent].genealogy]) if parent
                     else Genealogy(run_id=RUN, node_id=node_id))
        created = T0 + timedelta(minutes=len(self.nodes))
        node = Node(genealogy=genealogy, status=NodeStatus.EVALUATED, proposal=proposal(*names, **hparams),
                    implementation=Implementation.from_source("x = 1\n"),
                    trajectory=TrainingTrajectory(protocol="test", seed=0),
                    evaluation=evaluation(utility, suites, length),
                    replicates=[evaluation(u, suites, length, seed=i + 1) for i, u in enumerate(replicates)],
                    created_at=created, updated_at=created)
        self.nodes[node_id] = node
        return node

    def list(self) -> list[Node]:
        return list(self.nodes.values())


def by_id(selections) -> dict:
    return {s.node_id: s for s in selections}


# ------------------------------------------------------------------------------------- candidates, U_perf


def test_seed_mean_averages_the_own_evaluation_and_its_replicates() -> None:
    archive = Archive()
    node = archive.add("root", 0.30, replicates=(0.36, 0.33))
    assert seed_mean(node) == pytest.approx(0.33)


def test_only_evaluated_unfailed_nodes_are_candidates() -> None:
    archive = Archive()
    archive.add("root", 0.3)
    evaluated = archive.add("a", 0.4, parent="root")
    proposed = Node(genealogy=Genealogy.child("b", [evaluated.genealogy]), proposal=proposal(*GRPO))
    failed = Node(genealogy=Genealogy.child("c", [evaluated.genealogy]), proposal=proposal(*GRPO),
                  status=NodeStatus.FAILED, failure=Failure(phase=Phase.TRAIN, reason="diverged"))
    assert [n.node_id for n in candidate_parents([failed, proposed, *archive.list()])] == ["root", "a"]


def test_perf_is_utility_min_max_normalized_and_one_half_when_all_equal() -> None:
    archive = Archive()
    archive.add("root", 0.2)
    archive.add("a", 0.3, parent="root")
    archive.add("b", 0.5, parent="root")
    perf = {s.node_id: s.perf for s in score_candidates(archive.list(), ONLY_WEIGHT["perf"])}
    assert perf == pytest.approx({"root": 0.0, "a": 1 / 3, "b": 1.0})

    flat = Archive()
    flat.add("root", 0.4)
    flat.add("a", 0.4, parent="root")
    assert [s.perf for s in score_candidates(flat.list(), ONLY_WEIGHT["perf"])] == [0.5, 0.5]


def test_perf_uses_the_utility_callable_given() -> None:
    archive = Archive()
    archive.add("root", 0.2, length=300.0)
    archive.add("a", 0.3, parent="root", length=100.0)
    shorter = score_candidates(archive.list(), ONLY_WEIGHT["perf"], utility=lambda n: -n.evaluation.mean_length)
    assert by_id(shorter)["a"].perf == 1.0 and by_id(shorter)["root"].perf == 0.0


# ---------------------------------------------------------------------------------------------- U_pareto


def test_a_node_that_dominates_the_others_has_the_maximal_pareto_strength() -> None:
    archive = Archive()
    archive.add("root", 0.4, suites={"easy": 0.5, "hard": 0.3})
    archive.add("a", 0.5, parent="root", suites={"easy": 0.6, "hard": 0.4})  # dominates both
    archive.add("b", 0.3, parent="root", suites={"easy": 0.4, "hard": 0.35})  # trades easy for hard with root
    pareto = {s.node_id: s.pareto for s in score_candidates(archive.list(), ONLY_WEIGHT["pareto"])}
    assert pareto == {"a": 1.0, "root": 0.0, "b": 0.0}


def test_pareto_strength_orders_by_front_then_by_share_dominated() -> None:
    vectors = np.array([[0.5, 0.5], [0.6, 0.1], [0.4, 0.4], [0.1, 0.05]])
    assert pareto_fronts(vectors).tolist() == [0, 0, 1, 2]
    # raw = (2 - front) + dominated / 3: 2 + 2/3, 2 + 1/3, 1 + 1/3, 0; divided by the largest
    assert pareto_strength(vectors) == pytest.approx([1.0, 0.875, 0.5, 0.0])


def test_pareto_strength_is_one_for_every_node_when_all_are_on_the_frontier() -> None:
    vectors = np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    assert pareto_strength(vectors).tolist() == [1.0, 1.0, 1.0]


def test_the_length_objective_adds_shortness_to_the_metric_vector() -> None:
    archive = Archive()
    archive.add("root", 0.4, suites={"easy": 0.5}, length=300.0)
    archive.add("a", 0.4, parent="root", suites={"easy": 0.5}, length=200.0)
    assert metric_vectors(archive.list()).tolist() == [[0.5], [0.5]]
    assert metric_vectors(archive.list(), objective=Objective(kind="length")).tolist() == [[0.5, -300.0],
                                                                                         [0.5, -200.0]]
    pareto = by_id(score_candidates(archive.list(), ONLY_WEIGHT["pareto"], objective=Objective(kind="length")))
    assert (pareto["a"].pareto, pareto["root"].pareto) == (1.0, 0.0)


def test_without_shared_suites_the_metric_vector_is_the_utility() -> None:
    archive = Archive()
    archive.add("root", 0.4, suites={"easy": 0.5})
    archive.add("a", 0.45, parent="root", suites={"hard": 0.2})
    assert metric_vectors(archive.list(), seed_mean).tolist() == [[0.4], [0.45]]


# ------------------------------------------------------------------------------------------------- U_div


def test_structural_distance_is_a_jaccard_distance_with_parameter_gaps() -> None:
    grpo = Genotype.of(AlgorithmDescription.from_specs(list(GRPO)))
    with_kl = Genotype.of(AlgorithmDescription.from_specs([*GRPO, "kl:penalty"]))
    wider_clip = Genotype.of(AlgorithmDescription.from_specs(list(GRPO), {"clip_ratio": 0.3}))
    distances = structural_distances([grpo, with_kl, wider_clip])
    clip_range = MECHANISMS["clip:symmetric"].params["clip_ratio"]
    gap = 0.1 / (clip_range.high - clip_range.low)
    assert distances[0, 1] == pytest.approx(1 / 5)  # one of five mechanisms differs
    assert distances[0, 2] == pytest.approx(gap / 4)  # same four mechanisms, one constant apart
    assert np.allclose(distances, distances.T) and np.allclose(np.diag(distances), 0.0)


def test_the_odd_one_out_has_the_largest_diversity() -> None:
    archive = Archive()
    archive.add("root", 0.40, suites={"easy": 0.5, "hard": 0.3})
    archive.add("a", 0.41, parent="root", suites={"easy": 0.5, "hard": 0.31}, clip_ratio=0.22)
    archive.add("b", 0.40, parent="root", suites={"easy": 0.51, "hard": 0.3}, clip_ratio=0.18)
    odd = ("baseline:leave_one_out", "scale:analytic_variance", "validity:mask", "clip:cispo", "kl:penalty",
           "agg:seq-mean-token-sum-norm")
    archive.add("odd", 0.40, parent="root", names=odd, suites={"easy": 0.3, "hard": 0.5})
    div = {s.node_id: s.div for s in score_candidates(archive.list(), ONLY_WEIGHT["div"])}
    assert div["odd"] == 1.0 and max(div[n] for n in ("root", "a", "b")) < 0.5


def test_novelty_averages_the_nearest_neighbours() -> None:
    distances = np.array([[0.0, 0.1, 0.2, 0.9], [0.1, 0.0, 0.3, 0.8], [0.2, 0.3, 0.0, 0.7], [0.9, 0.8, 0.7, 0.0]])
    # mean of the 2 nearest others: 0.15, 0.2, 0.25, 0.75 -> min-max
    assert novelty(distances, neighbours=2) == pytest.approx([0.0, 0.0833333, 0.1666667, 1.0])


# ---------------------------------------------------------------------------------------- the GP target


def small_tree() -> Archive:
    """root 0.50 -> a 0.55 -> b 0.60, and root -> c 0.45."""
    archive = Archive()
    archive.add("root", 0.50)
    archive.add("a", 0.55, parent="root", clip_ratio=0.25)
    archive.add("b", 0.60, parent="a", clip_ratio=0.3)
    archive.add("c", 0.45, parent="root", clip_ratio=0.15)
    return archive


def test_descendant_gain_is_the_mean_of_the_top_k_discounted_tanh_gains() -> None:
    nodes = small_tree().nodes
    weights = SelectionWeights(gamma=0.8, top_k=2, beta=0.05)
    # root: b (two generations, +0.10) 0.64·tanh(2) = 0.617, a (+0.05) 0.8·tanh(1) = 0.609, c 0.8·tanh(-1) < 0
    expected_root = (0.64 * math.tanh(2.0) + 0.8 * math.tanh(1.0)) / 2
    gains = descendant_gains(list(nodes.values()), seed_mean, weights)
    assert gains == pytest.approx({"root": expected_root, "a": 0.8 * math.tanh(1.0)})

    top1 = descendant_gain(nodes["root"], [nodes["a"], nodes["b"], nodes["c"]], seed_mean,
                           SelectionWeights(gamma=0.8, top_k=1, beta=0.05))
    assert top1 == pytest.approx(0.64 * math.tanh(2.0))  # b's discounted term beats a's
    undiscounted = descendant_gain(nodes["root"], [nodes["a"], nodes["b"], nodes["c"]], seed_mean,
                                   SelectionWeights(gamma=1.0, top_k=3, beta=0.1))
    assert undiscounted == pytest.approx((math.tanh(1.0) + math.tanh(0.5) + math.tanh(-0.5)) / 3)


def test_a_leaf_has_no_descendant_gain() -> None:
    nodes = small_tree().nodes
    assert descendant_gain(nodes["b"], [], seed_mean, SelectionWeights()) is None


def failed_child(archive: Archive, node_id: str, parent: str, phase: Phase, reason: str) -> Node:
    """A child of `parent` that failed in `phase`, kept with the rest of the archive."""
    node = archive.add(node_id, 0.0, parent=parent)
    failed = Node(genealogy=node.genealogy, status=NodeStatus.FAILED, proposal=node.proposal,
                  failure=Failure(phase=phase, reason=reason), created_at=node.created_at, updated_at=node.created_at)
    archive.nodes[node_id] = failed
    return failed


def test_a_child_that_failed_by_its_own_code_lowers_its_parents_descendant_gain() -> None:
    archive = small_tree()
    weights = SelectionWeights(gamma=0.8, top_k=2, beta=0.05)
    before = descendant_gains(archive.list(), seed_mean, weights)
    failed_child(archive, "f1", "a", Phase.TRAIN, "training diverged: reward nan at step 3")
    after = descendant_gains(archive.list(), seed_mean, weights)
    # a has one evaluated child (b) and one failed: half its weight goes to -γ, the lowest a child's term can be
    assert after["a"] == pytest.approx(0.5 * before["a"] + 0.5 * -0.8)
    assert after["root"] == pytest.approx(before["root"]), "only the direct parent is judged by the failure"
    # a node whose only child failed gets -γ, where before it had no target at all
    failed_child(archive, "f2", "c", Phase.IMPLEMENT, "verification failed: policy_loss returned shape (8,)")
    assert "c" not in before and descendant_gains(archive.list(), seed_mean, weights)["c"] == pytest.approx(-0.8)


@pytest.mark.parametrize(("phase", "reason"), [
    (Phase.EVALUATE, "evaluation failed: vLLM server unreachable"),
    (Phase.REFLECT, "reflection failed"),
    (Phase.PROPOSE, "proposer failed"),
    (Phase.TRAIN, "train service error: handler crashed 3 times"),
])
def test_failures_of_the_services_say_nothing_about_the_parent(phase: Phase, reason: str) -> None:
    archive = small_tree()
    weights = SelectionWeights(gamma=0.8, top_k=2, beta=0.05)
    before = descendant_gains(archive.list(), seed_mean, weights)
    failed_child(archive, "f", "a", phase, reason)
    assert descendant_gains(archive.list(), seed_mean, weights) == pytest.approx(before)


# -------------------------------------------------------------------------------------------------- GP


def test_node_features_have_a_fixed_length_named_by_feature_names() -> None:
    archive = small_tree()
    archive.add("d", 0.5, parent="root", names=(*GRPO, "kl:penalty", "entropy:bonus"))
    lengths = {len(node_features(node, 0.5)) for node in archive.list()}
    assert lengths == {len(FEATURE_NAMES)}
    features = dict(zip(FEATURE_NAMES, node_features(archive.nodes["b"], 0.7), strict=True))
    assert features["clip:symmetric"] == 1.0 and features["kl:penalty"] == 0.0
    assert features["depth"] == pytest.approx(0.2) and features["normalized_utility"] == 0.7
    assert features["clip:symmetric.clip_ratio"] == pytest.approx(0.1 / 0.49)  # 0.3 against the default 0.2


def test_with_fewer_than_two_targets_the_gp_predicts_its_prior() -> None:
    archive = Archive()
    archive.add("root", 0.5)
    archive.add("a", 0.6, parent="root")
    gp = DescendantGP().fit(archive.list())
    assert not gp.fitted and list(gp.targets) == ["root"]
    mean, std = gp.predict(np.stack([gp.features(n) for n in archive.list()]))
    assert mean.tolist() == [PRIOR_MEAN] * 2 and std.tolist() == [PRIOR_STD] * 2
    assert len({s.bayes for s in score_candidates(archive.list(), SelectionWeights())}) == 1  # ranks nothing


def promising_kl_archive() -> Archive:
    """Three nodes with kl:penalty whose children gained a lot, three without whose children lost."""
    archive = Archive()
    archive.add("root", 0.50)
    for i, coef in enumerate((1e-3, 3e-3, 1e-2)):
        archive.add(f"kl{i}", 0.50, parent="root", names=(*GRPO, "kl:penalty"), kl_coef=coef)
        archive.add(f"kl{i}c", 0.58, parent=f"kl{i}", names=(*GRPO, "kl:penalty"), kl_coef=coef * 2)
    for i, name in enumerate(("entropy:bonus", "failure:all_fail_penalty", "length:correct_shorter")):
        archive.add(f"x{i}", 0.50, parent="root", names=(*GRPO, name))
        archive.add(f"x{i}c", 0.44, parent=f"x{i}", names=(*GRPO, name), clip_ratio=0.25)
    return archive


@pytest.mark.parametrize("optimize", [False, True])
def test_the_gp_predicts_more_descendant_gain_near_high_target_nodes(optimize: bool) -> None:
    archive = promising_kl_archive()
    gp = DescendantGP(optimize=optimize).fit(archive.list())
    assert gp.fitted and gp.targets["kl0"] > 0.5 > -0.5 > gp.targets["x0"]
    root = archive.nodes["root"]
    near_kl = gp.proposal_features(proposal(*GRPO, "kl:penalty", kl_coef=5e-3), root)
    near_x = gp.proposal_features(proposal(*GRPO, "entropy:bonus", entropy_coef=0.02), root)
    mean, std = gp.predict(np.stack([near_kl, near_x]))
    assert mean[0] > mean[1] and np.all(std > 0)
    assert gp.ucb(near_kl) == pytest.approx(mean[0] + gp.weights.kappa * std[0])


def test_proposal_features_sit_one_generation_below_the_parent_at_its_utility() -> None:
    archive = small_tree()
    gp = DescendantGP().fit(archive.list())
    features = dict(zip(FEATURE_NAMES, gp.proposal_features(proposal(*GRPO, "kl:penalty"), archive.nodes["a"]),
                        strict=True))
    assert features["depth"] == pytest.approx(0.2)  # a is at depth 1
    assert features["normalized_utility"] == pytest.approx((0.55 - 0.45) / (0.60 - 0.45))
    assert features["kl:penalty"] == 1.0


# ---------------------------------------------------------------------------------- screening's surrogate


def harmful_cispo_archive() -> Archive:
    """GRPO and four children: the two with CISPO scored far below GRPO, the two with a KL penalty above it."""
    archive = Archive()
    archive.add("root", 0.50)
    archive.add("cispo1", 0.40, parent="root", names=("baseline:group_mean", "scale:group_std", "clip:cispo",
                                                      "agg:token-mean"))
    archive.add("cispo2", 0.41, parent="root", names=("baseline:leave_one_out", "scale:group_std", "clip:cispo",
                                                      "agg:token-mean"))
    archive.add("kl1", 0.56, parent="root", names=(*GRPO, "kl:penalty"))
    archive.add("kl2", 0.57, parent="root", names=(*GRPO, "kl:penalty"), kl_coef=3e-3)
    return archive


def test_the_utility_gp_predicts_a_child_from_what_its_mechanisms_scored_elsewhere() -> None:
    archive = harmful_cispo_archive()
    gp = UtilityGP().fit(archive.list())
    root = archive.nodes["root"]
    assert gp.fitted and gp.incumbent(root) == 0.50 and gp.incumbent(archive.nodes["kl1"]) == 0.56
    # Children of the root not yet tried anywhere: one with CISPO, one with a KL penalty at a new constant.
    cispo = gp.proposal_features(proposal("baseline:group_mean", "scale:none", "clip:cispo", "agg:token-mean"), root)
    kl = gp.proposal_features(proposal(*GRPO, "kl:penalty", kl_coef=2e-3), root)
    mean, std = gp.predict(np.stack([cispo, kl]))
    assert mean[0] < 0.50 < mean[1] and np.all(std > 0)
    # An archived description is predicted near its own score (the noise kernel keeps it from being exact).
    own, _ = gp.predict(gp.proposal_features(archive.nodes["cispo1"].proposal, root))
    assert own[0] == pytest.approx(0.40, abs=0.04)


def seeded_archive(kl1_replicates: tuple[float, ...] = ()) -> Archive:
    """GRPO trained with three seeds (σ = 0.01), a harmful CISPO child and two KL children."""
    archive = Archive()
    archive.add("root", 0.50, replicates=(0.49, 0.51))
    archive.add("cispo", 0.40, parent="root", names=("baseline:group_mean", "scale:group_std", "clip:cispo",
                                                     "agg:token-mean"))
    archive.add("kl1", 0.56, parent="root", names=(*GRPO, "kl:penalty"), replicates=kl1_replicates)
    archive.add("kl2", 0.53, parent="root", names=(*GRPO, "kl:penalty"), kl_coef=3e-3)
    return archive


def gp_rows(archive: Archive) -> np.ndarray:
    return np.stack([genotype_features(proposal_description(node.proposal)) for node in archive.list()])


def test_the_utility_gp_trusts_a_mean_of_more_seeds_more() -> None:
    one, three = seeded_archive(), seeded_archive((0.55, 0.57))  # kl1's mean is 0.56 on one seed or on three
    assert seed_mean_variances(one.list(), [one.nodes["kl1"]]) == pytest.approx([0.01**2])
    assert seed_mean_variances(three.list(), [three.nodes["kl1"]]) == pytest.approx([0.01**2 / 3])
    at_kl1 = genotype_features(proposal_description(one.nodes["kl1"].proposal))
    (mean_one,), (std_one,) = UtilityGP().fit(one.list()).predict(at_kl1)
    (mean_three,), (std_three,) = UtilityGP().fit(three.list()).predict(at_kl1)
    assert std_three < std_one and abs(mean_three - 0.56) < abs(mean_one - 0.56)


def test_without_a_measured_seed_noise_the_utility_gp_keeps_its_white_kernel(monkeypatch) -> None:
    archive = harmful_cispo_archive()  # one seed per node: σ unmeasured
    assert seed_mean_variances(archive.list(), archive.list()) is None
    features = gp_rows(archive)
    noisy = UtilityGP().fit(archive.list()).predict(features)
    monkeypatch.setattr(UtilityGP, "SEED_NOISE", False)
    assert np.array_equal(UtilityGP().fit(archive.list()).predict(features)[1], noisy[1])


def test_a_utility_other_than_the_seed_mean_keeps_the_white_kernel(monkeypatch) -> None:
    archive = seeded_archive()
    features = gp_rows(archive)
    custom = UtilityGP().fit(archive.list(), utility=lambda node: seed_mean(node)).predict(features)
    monkeypatch.setattr(UtilityGP, "SEED_NOISE", False)
    assert np.array_equal(UtilityGP().fit(archive.list()).predict(features)[1], custom[1])
    monkeypatch.setattr(UtilityGP, "SEED_NOISE", True)
    assert not np.array_equal(UtilityGP().fit(archive.list()).predict(features)[1], custom[1])


def test_an_unfitted_utility_gp_ranks_nothing() -> None:
    archive = Archive()
    archive.add("root", 0.5)
    gp = UtilityGP().fit(archive.list())
    assert not gp.fitted
    mean, std = gp.predict(np.stack([gp.proposal_features(proposal(*GRPO, "kl:penalty"), archive.nodes["root"]),
                                     gp.proposal_features(proposal(*GRPO), archive.nodes["root"])]))
    assert mean.tolist() == [0.5, 0.5] and std.tolist() == [PRIOR_STD, PRIOR_STD]


# -------------------------------------------------------------------------------------------- selection


def test_the_score_is_the_weighted_sum_of_its_terms() -> None:
    weights = SelectionWeights(pareto=0.3, perf=0.7, div=0.2, bayes=1.5, beta=0.05, kappa=2.0)
    scored = score_candidates(promising_kl_archive().list(), weights)
    span = max(s.utility for s in scored) - min(s.utility for s in scored)  # 0.58 - 0.44
    for s in scored:
        assert s.score == pytest.approx(0.3 * s.pareto + 0.7 * s.perf + 0.2 * s.div + 1.5 * s.bayes)
        assert 0.0 <= min(s.pareto, s.perf, s.div) and max(s.pareto, s.perf, s.div) <= 1.0
        assert s.bayes == pytest.approx(0.05 * (s.gp_mean + 2.0 * s.gp_std) / span) and s.gp_std > 0


def test_the_gp_term_is_a_descendant_gain_in_the_units_of_perf() -> None:
    alpha, beta = np.array([0.8, -0.2]), 0.05
    # a span of 0.1 utility maps to U_perf's [0, 1]; β·α is the gain in utility (0.04, -0.01)
    assert bayes_term(alpha, np.array([0.4, 0.5]), beta) == pytest.approx([0.4, -0.1])
    # a spread below β is taken as β, so a young archive does not blow the term up
    assert bayes_term(alpha, np.array([0.40, 0.41]), beta) == pytest.approx([0.8, -0.2])


def test_parents_are_chosen_by_score_with_distinct_mechanism_sets() -> None:
    archive = Archive()
    archive.add("root", 0.40)
    archive.add("a", 0.60, parent="root", names=(*GRPO, "kl:penalty"))
    archive.add("a2", 0.59, parent="a", names=(*GRPO, "kl:penalty"), kl_coef=2e-3)  # a's set again
    archive.add("b", 0.50, parent="root", names=(*GRPO, "entropy:bonus"))
    chosen = select_parents(archive.list(), ONLY_WEIGHT["perf"], k=3, rng=random.Random(0))
    assert [s.node_id for s in chosen] == ["a", "b", "root"]
    # when only repeats are left, the best of them comes next rather than fewer parents
    assert [s.node_id for s in select_parents(archive.list(), ONLY_WEIGHT["perf"], k=4)][-1] == "a2"


def test_fewer_candidates_than_k_gives_every_candidate_once() -> None:
    archive = Archive()
    archive.add("root", 0.4)
    assert [s.node_id for s in select_parents(archive.list(), SelectionWeights(), k=3)] == ["root"]


def test_selection_is_deterministic_for_a_given_rng_and_ties_follow_it() -> None:
    archive = Archive()
    archive.add("root", 0.40)
    for name in ("kl:penalty", "entropy:bonus", "failure:all_fail_penalty", "length:correct_shorter"):
        archive.add(name.split(":")[1], 0.40, parent="root", names=(*GRPO, name))  # all tied on every term
    weights = ONLY_WEIGHT["perf"]

    def pick(seed: int) -> list[str]:
        return [s.node_id for s in select_parents(archive.list(), weights, k=2, rng=random.Random(seed))]

    assert pick(1) == pick(1)
    assert len({tuple(pick(seed)) for seed in range(10)}) > 1
    assert [s.node_id for s in select_parents(archive.list(), weights, k=2)] == ["root", "penalty"]


def test_no_candidates_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="evaluate the root first"):
        select_parents([], SelectionWeights())
    with pytest.raises(ValueError, match="k must be at least 1"):
        select_parents(small_tree().list(), SelectionWeights(), k=0)


# ------------------------------------------------------------------------------------------- large archives


def binary_tree(n: int = 40) -> Archive:
    """n nodes, node i a child of node (i - 1) // 2, utilities scattered over [0.40, 0.60) and two suites traded
    off against each other, so the frontier holds several nodes."""
    archive = Archive()
    for i in range(n):
        value = 0.40 + 0.20 * ((i * 17) % n) / n
        suites = {"easy": value + 0.03 * (i % 3), "hard": value - 0.03 * (i % 3)}
        archive.add(f"n{i:02d}", value, parent=f"n{(i - 1) // 2:02d}" if i else None, suites=suites)
    return archive


def test_the_shortlist_is_every_candidate_up_to_its_limit() -> None:
    candidates = candidate_parents(binary_tree().list())
    assert shortlist(candidates, limit=len(candidates)) == candidates
    with pytest.raises(ValueError, match="at least 1"):
        shortlist(candidates, limit=0)


def test_beyond_its_limit_the_shortlist_keeps_the_frontier_the_best_and_the_newest() -> None:
    candidates = candidate_parents(binary_tree().list())
    chosen = shortlist(candidates, limit=12)
    ids = [node.node_id for node in chosen]
    assert len(ids) == 12 and ids == sorted(ids)  # oldest first, as given
    best = sorted(candidates, key=lambda node: -seed_mean(node))
    on_front = dict(zip((node.node_id for node in candidates), pareto_fronts(metric_vectors(candidates)) == 0,
                        strict=True))
    best_on_front = [node.node_id for node in best if on_front[node.node_id]]
    assert len(best_on_front) >= 3 and set(best_on_front[:3]) <= set(ids)  # a quarter of 12 from the frontier
    assert {node.node_id for node in best[:3]} <= set(ids)  # then the best
    assert {node.node_id for node in candidates[-3:]} <= set(ids)  # then the newest


def test_descendant_gains_of_some_nodes_count_all_their_descendants() -> None:
    nodes = list(binary_tree().nodes.values())
    every = descendant_gains(nodes, seed_mean, SelectionWeights())
    assert descendant_gains(nodes, seed_mean, SelectionWeights(), of={"n00", "n03"}) == {
        "n00": every["n00"], "n03": every["n03"]}


def test_a_large_archive_is_scored_on_its_shortlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "SHORTLIST", 12)
    nodes = binary_tree().list()
    expected = [node.node_id for node in shortlist(candidate_parents(nodes))]
    assert [s.node_id for s in score_candidates(nodes, SelectionWeights())] == expected
    gp = DescendantGP().fit(nodes)
    assert set(gp.targets) <= set(expected) and gp.fitted
    every = descendant_gains(nodes, seed_mean, SelectionWeights())
    assert gp.targets == {node_id: every[node_id] for node_id in expected if node_id in every}
    assert [s.node_id for s in select_parents(nodes, SelectionWeights(), k=3)][0] in expected
