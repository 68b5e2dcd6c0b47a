"""The simulated landscape and the selectors compared on it with equal budgets.

The comparison runs every selector in the same SEEDS worlds (common random numbers) and judges paired
differences of the best-found true (noise-free) utility: a claim holds when the mean paired difference is more
than MARGIN_SE standard errors of that mean (a one-sided paired t-test at about the 97.5% level for the 40 worlds).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from app.landscape import (
    NOISE_SD,
    RUN_SEED,
    SELECTORS,
    TESTBED_SEED_SD,
    Landscape,
    compare,
    description_fingerprint,
    landscape_source,
    paired_difference,
    search,
)
from poise.contracts import NodeStatus
from poise.description.mechanisms import AlgorithmDescription
from poise.description.proposals import description_key, proposal_description, root_proposal
from poise.racing import SEED_POLICIES, next_seed
from poise.scoring import pooled_sd, replicate_seed, seed_scores
from proposer.baseline import mutate
from proposer.fingerprint import NEAR_DUPLICATE_DISTANCE, fingerprint_distance
from proposer.screening import screen_population

# 40 worlds: over 100 other worlds (200-299) POISE − greedy was +0.0048 with a per-world SD of 0.006, and on the
# 12 worlds this test used before +0.0029 (SE 0.0025) (bench/results/search_simulated.md); 40 worlds give a 2-SE
# margin well over 95% power at the former and a fair chance at the latter.
SEEDS = range(40)
BUDGET = 45
MARGIN_SE = 2.0
GRPO = proposal_description(root_proposal())
TESTBED_REPORT = Path(__file__).resolve().parents[1] / "bench" / "results" / "testbed.json"


def with_mechanisms(*changes: str) -> AlgorithmDescription:
    """GRPO with each "family=mechanism" swapped in (or added)."""
    specs = {m.family: m.name for m in GRPO.mechanisms}
    for change in changes:
        family, name = change.split("=")
        specs[family] = name
    return AlgorithmDescription.from_specs(list(specs.values()))


def test_an_evaluation_is_deterministic_per_world_description_and_seed() -> None:
    root = root_proposal()
    assert Landscape(3).evaluate(root, 1) == Landscape(3).evaluate(root, 1)
    assert Landscape(3).evaluate(root, 1).overall != Landscape(3).evaluate(root, 2).overall
    assert Landscape(3).evaluate(root, 1).overall != Landscape(4).evaluate(root, 1).overall
    assert Landscape(3).true_utility(GRPO) == pytest.approx(0.27, abs=0.002)


def test_the_seed_noise_is_the_testbeds_measured_seed_sd() -> None:
    measured = json.loads(TESTBED_REPORT.read_text())["pooled_seed_sd"]
    assert TESTBED_SEED_SD == pytest.approx(measured, abs=5e-5)
    overall = [Landscape(0).evaluate(root_proposal(), seed).overall for seed in range(2000)]
    mean = sum(overall) / len(overall)
    sd = math.sqrt(sum((x - mean) ** 2 for x in overall) / (len(overall) - 1))
    assert sd == pytest.approx(TESTBED_SEED_SD, rel=0.05) and NOISE_SD > TESTBED_SEED_SD  # two suites averaged


def test_the_fingerprint_stand_in_passes_consistency_and_tells_descriptions_apart() -> None:
    root = root_proposal()
    child = mutate(root, random.Random(0), {description_key(root)})
    first, second = description_fingerprint(landscape_source(root)), description_fingerprint(landscape_source(child))
    assert first.ok and first.loss_agg_mode == GRPO.loss_agg_mode and first.hparams == GRPO.hparams
    assert fingerprint_distance(first.vector, first.vector) == 0
    assert fingerprint_distance(first.vector, second.vector) > 10 * NEAR_DUPLICATE_DISTANCE  # one constant moved
    parent = search("random", seed=0, budget=0).nodes[0]
    report = screen_population(parent, [child, root.model_copy(update={"name": "renamed"})], [parent],
                               description_fingerprint, source_of=landscape_source)
    assert [r.proposal.name for r in report.ranked] == [child.name]
    assert report.rejections[0].proposal_name == "renamed" and report.rejections[0].nearest_id == "n000"


def test_validity_masking_hurts_alone_and_with_analytic_variance_gives_the_largest_gain() -> None:
    landscape = Landscape()
    grpo = landscape.true_utility(GRPO)
    masked = landscape.true_utility(with_mechanisms("validity=validity:mask"))
    analytic = landscape.true_utility(with_mechanisms("scale=scale:analytic_variance"))
    both = landscape.true_utility(with_mechanisms("validity=validity:mask", "scale=scale:analytic_variance"))
    assert masked < grpo and analytic < grpo < both
    additive = Landscape(interactions=()).true_utility(
        with_mechanisms("validity=validity:mask", "scale=scale:analytic_variance"))
    assert additive < masked  # without the interaction the pair is just two losses


def test_a_search_spends_its_budget_on_new_children_of_archived_parents() -> None:
    result = search("poise", seed=5, budget=12)
    nodes = {node.node_id: node for node in result.nodes}
    assert len(nodes) == 13 and all(node.status == NodeStatus.EVALUATED for node in nodes.values())
    assert len(nodes["n000"].replicates) == 2  # the root is trained with three seeds, like a real run's
    assert len({description_key(node.proposal) for node in nodes.values()}) == 13
    for node in result.nodes[1:]:
        (parent_id,) = node.genealogy.parent_ids
        assert node.proposal.parent_ids == [parent_id]
        assert node.genealogy.depth == nodes[parent_id].genealogy.depth + 1
    assert result.best_true >= result.root_true and result.best_true >= result.reported_true


@pytest.mark.parametrize("seeding", list(SEED_POLICIES))
def test_a_search_spends_its_budget_in_trainings_under_every_seed_policy(seeding: str) -> None:
    policy = SEED_POLICIES[seeding]
    for world in (3, 4):
        result = search("greedy", seed=world, budget=20, seeding=seeding)
        seeds = [1 + len(node.replicates) for node in result.nodes[1:]]
        assert result.trainings == sum(seeds) and 20 - policy.cap < result.trainings <= 20
        assert all(policy.at_birth <= n <= policy.cap for n in seeds)
        for node in result.nodes[1:]:  # the k-th seed of every node is the run's seed k (common random numbers)
            assert [e.seed for e in (node.evaluation, *node.replicates)] == [
                replicate_seed(RUN_SEED, k) for k in range(1 + len(node.replicates))]
    if seeding == "racing":
        assert any(n > 1 for n in seeds) and any(n == 1 for n in seeds)


def test_racing_ends_before_the_report_with_nothing_left_to_decide() -> None:
    for world in range(5):
        result = search("greedy", seed=world, budget=30, seeding="racing")
        scores = {node.node_id: seed_scores(node) for node in result.nodes}
        noise = pooled_sd(list(scores.values()))
        # Either the budget is spent or the rule names no node however much were left.
        assert result.trainings == 30 or next_seed(scores, noise, SEED_POLICIES["racing"].cap, 10**6) is None


def test_searches_are_reproducible() -> None:
    first, second = search("poise", seed=2, budget=6), search("poise", seed=2, budget=6)
    assert [n.proposal for n in first.nodes] == [n.proposal for n in second.nodes]


@pytest.fixture(scope="module")
def runs() -> dict[str, list[float]]:
    results = compare(SEEDS, BUDGET)
    return {selector: [run.best_true for run in results[selector]] for selector in SELECTORS}


def test_poise_selection_finds_better_algorithms_than_random_selection(runs) -> None:
    mean, se = paired_difference(runs["poise"], runs["random"])
    assert mean > MARGIN_SE * se, (mean, se, runs)


def test_poise_selection_finds_better_algorithms_than_greedy_selection(runs) -> None:
    mean, se = paired_difference(runs["poise"], runs["greedy"])
    assert mean > MARGIN_SE * se, (mean, se, runs)


def test_bench_search_writes_the_best_found_utility_and_its_curve_per_search(tmp_path) -> None:
    from app.cli import main

    out = tmp_path / "search.json"
    assert main(["bench", "search", "--landscape", "simulated", "--selector", "random", "--budget", "10",
                 "--search-seeds", "2", "--first-seed", "7", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["selector"], report["budget"], report["search_seeds"], report["seeds"]) == ("random", 10, 2, [7, 8])
    assert len(report["best_utility"]) == 2 and len(report["curve"]) == 11  # the root, then 10 children
    for entry, best in zip(report["per_seed"], report["best_utility"], strict=True):
        curve = entry["curve"]
        assert len(curve) == 11 and curve == sorted(curve) and curve[-1] == best  # best-found never falls
        assert curve[0] == entry["root_utility"]
        assert best == search("random", entry["seed"], 10).best_true
    assert report["curve"][-1] == pytest.approx(sum(report["best_utility"]) / 2)


def test_the_ablation_crosses_parent_selection_with_phase_one_in_the_same_worlds(tmp_path) -> None:
    from app.bench import ABLATION_ARMS, bench_search_ablation

    out = tmp_path / "ablation.json"
    report = bench_search_ablation([5, 6], budget=6, json_path=out, log=lambda _: None)
    assert json.loads(out.read_text()) == report
    assert set(report["arms"]) == {f"{s}+{p}" for s, p in ABLATION_ARMS}
    # The arms that match a selector's own proposer are that selector's searches.
    for arm, selector in (("greedy+mutation", "greedy"), ("poise+phase_one", "poise")):
        assert report["arms"][arm]["best_true"]["per_seed"] == [search(selector, seed, 6).best_true for seed in (5, 6)]
    assert report["arms"]["poise+mutation"]["best_true"]["per_seed"] == [
        search("poise", seed, 6, proposer="mutation").best_true for seed in (5, 6)]
    whole = next(p for p in report["pairs"] if p["meaning"] == "whole of POISE" and p["metric"] == "best_true")
    expected = paired_difference(report["arms"]["poise+phase_one"]["best_true"]["per_seed"],
                                 report["arms"]["greedy+mutation"]["best_true"]["per_seed"])
    assert (whole["mean"], whole["se"]) == pytest.approx(expected)


def test_bench_racing_compares_the_seed_policies_in_the_same_worlds(tmp_path) -> None:
    from app.cli import main

    out = tmp_path / "racing.json"
    assert main(["bench", "racing", "--selectors", "greedy", "--budget", "9", "--worlds", "2", "--first-seed", "5",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["budget"], report["seeds"]) == (9, [5, 6])
    entry = report["selectors"]["greedy"]
    assert set(entry["policies"]) == set(SEED_POLICIES)
    for seeding, metrics in entry["policies"].items():
        runs = [search("greedy", seed, 9, seeding=seeding) for seed in (5, 6)]
        assert metrics["reported_gain"]["per_seed"] == [run.reported_true - run.root_true for run in runs]
        assert metrics["reported_better"]["per_seed"] == [float(run.reported_better) for run in runs]
        assert metrics["trainings"]["per_seed"] == [run.trainings for run in runs]
        assert metrics["overclaim"]["per_seed"] == [run.claimed_gain - run.reported_gain for run in runs]
    pair = next(p for p in entry["pairs"] if (p["a"], p["b"], p["metric"]) == ("racing", "one", "reported_gain"))
    expected = paired_difference(entry["policies"]["racing"]["reported_gain"]["per_seed"],
                                 entry["policies"]["one"]["reported_gain"]["per_seed"])
    assert (pair["mean"], pair["se"]) == pytest.approx(expected)


# Seed policies at equal trainings, greedy parents, worlds 0-99 (docs/racing.md). Racing's constants were chosen on
# worlds 1000-1099; the claims asserted here were chosen after a look at these worlds, where racing − one seed on
# the reported node's true gain was +0.0011 (SE 0.0008), too close to assert (over 200-299 it is in
# bench/results/racing_simulated.md).
RACING_WORLDS = range(100)


@pytest.fixture(scope="module")
def seeded() -> dict[str, list]:
    return {seeding: [search("greedy", world, BUDGET, seeding=seeding) for world in RACING_WORLDS]
            for seeding in SEED_POLICIES}


def test_racing_shrinks_the_winners_curse_of_one_seed_per_node(seeded) -> None:
    overclaim = {s: [run.claimed_gain - run.reported_gain for run in runs] for s, runs in seeded.items()}
    mean, se = paired_difference(overclaim["one"], overclaim["racing"])
    assert mean > MARGIN_SE * se, (mean, se)


def test_racing_reports_a_truly_better_node_than_three_seeds_per_node(seeded) -> None:
    mean, se = paired_difference([run.reported_gain for run in seeded["racing"]],
                                 [run.reported_gain for run in seeded["fixed"]])
    assert mean > MARGIN_SE * se, (mean, se)
