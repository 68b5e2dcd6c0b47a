"""A simulated landscape: the search machinery tested in seconds, without training anything.

The real loop costs minutes per node, so whether a selector finds better algorithms than another with the same
budget cannot be checked in CI. Here the evaluation is replaced by a deterministic synthetic utility over
algorithm descriptions (the mechanism library's names and constants), and everything else is the real code
path: GRPO's description as the root (`root_proposal`), contract `Node`s in an in-memory archive, the parent
selection the proposer uses (`select_parent` for random and greedy, `select_parents` for POISE), and the child
each selector's proposer makes: the baseline's one random mutation (`mutate`) for random and greedy, the
offline Phase I (`phase_one`: context, a population, screening ranked by the UtilityGP) for POISE, exactly as
`poise run --parent-selection …` does. Screening's sandboxed fingerprints are replaced by
`description_fingerprint`, which reads the description back from its stand-in source (`landscape_source`).

How the landscape is built. Two suites play the benchmarks: "easy" (greedy acc@1, like MATH-500) and "hard"
(pass@8, like AIME), Overall = their mean, and GRPO scores 0.40 / 0.14 (Overall 0.27, the CPU testbed probe's).
A description's true suite scores are

    root + Σ main effect of each mechanism + Σ interaction of each pair present − Σ hyperparameter mistuning

- Main effects (MAIN_EFFECTS), ±0.002–0.025 per suite, are the size of one good step in the paper (about a
  point of Overall) and agree in sign with the testbed probe (docs/testbed.md, "The feasibility probe": validity masking
  alone is worse than GRPO). Several trade one suite for the other (exploration helps pass@k on the hard suite
  and costs greedy accuracy), so the Pareto front holds more than one node. Most single changes hurt: from GRPO
  about one mutation in ten gains more than 0.005.
- Interactions (INTERACTIONS) are the epistasis the paper reports, through enablers: validity masking hurts
  alone but cleans the group statistics that several scale and shaping mechanisms rely on, and with the
  analytic-variance scale (which also hurts alone) gives the largest gain, the paper's VM-AV-GRPO; a KL anchor
  is conservative alone and lets CISPO, an entropy bonus or clip-higher pay off. Entropy bonus and clip-higher
  both fight entropy collapse, so together they give less than the sum. The VM-AV gain depends on two
  constants whose defaults are off their optimum, so finding the pair and then tuning it both pay.
- Mistuning (PARAM_OPTIMA) is quadratic in a parameter's position in its range (log-scaled where the library
  says so) away from an optimum; a few optima sit away from the library defaults (entropy_coef, clip_high,
  kl_coef, fail_advantage), the other parameters are flat.
- Seed noise: each suite score gets Gaussian noise of SD NOISE_SD, so that Overall's seed SD is the CPU
  testbed's measured one (TESTBED_SEED_SD, bench/results/testbed.json), a deterministic function of the world
  seed, the description and the training seed. Every child is trained with the run's seed (RUN_SEED) and the
  k-th mutation of a description draws from its own stream, so the same description in the same world gets the
  same score under every selector, and two selectors that expand a node equally often get the same children
  (common random numbers: their difference is measured more precisely, each one's outcomes are unchanged).
- `Landscape(interactions=())` is the additive control: the same main effects and noise, no epistasis.
- The budget counts trainings (the unit that costs GPU-hours), not nodes. `search(..., seeding=...)` names how
  many a node gets (`poise.racing.SEED_POLICIES`, docs/racing.md): one seed per child (the default; trainings
  are then children), a fixed 3, or racing (one, then extra seeds by the racing rule before every round of
  parents and before the report). A node's k-th seed is always training seed `replicate_seed(RUN_SEED, k)`, so
  the policies too see the same score for the same seed.

So the best descendant often does not come from the best parent (in ~55-60% of the rounds with several
parents, against the paper's 11 of 21): the big gains hide behind steps down, and noise makes the greedy parent
a lucky node as often as a good one. Nothing in the landscape knows about the GPs, the acquisition terms or
screening.

What it shows (bench/results/search_simulated.md has the numbers, commands and the checks behind this). With
the budget of 45 children in rounds of 3, over 100 worlds (seeds 200-299), best-found true Overall is random
0.2797, greedy 0.2827, POISE 0.2875: POISE beats greedy by +0.0048 (SE 0.0006) and random by +0.0078 (SE
0.0006), and the node a run would report by +0.0063 (SE 0.0010) over greedy. An ablation on the same worlds
(`app.bench.bench_search_ablation`) splits the gain: Phase I's screening makes about two thirds of the
best-found gain (+0.0033, SE 0.0007, with greedy's parents), POISE's parent selection the rest (+0.0015, SE
0.0006, with Phase I's children; +0.0033 on the reported node). Most single changes hurt, and the UtilityGP
learns from the archive which ones, so the best of 4 proposals by expected improvement skips most of them.
Parent selection has less to find: near the top of a search, what children can gain differs between nodes by
less than the seed noise, and the deceptive local optima are deep (a hill climber reaches them after ~50
children).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cache

import numpy as np

from poise.contracts import (
    Evaluation,
    Genealogy,
    Implementation,
    MetricKind,
    Node,
    NodeStatus,
    Proposal,
    RunConfig,
    SelectionWeights,
    SuiteResult,
    TrainingTrajectory,
    sha256_hex,
)
from poise.description.mechanisms import MECHANISMS, AlgorithmDescription
from poise.description.proposals import description_key, proposal_description, root_proposal
from poise.racing import SEED_POLICIES, SeedPolicy, next_seed
from poise.scoring import pooled_sd, replicate_seed, seed_scores
from proposer.baseline import MutationError, mutate, select_parent
from proposer.fingerprint import FINGERPRINT_LENGTH, RECORDED_OFFSET, FingerprintResult
from proposer.screening import phase_one
from proposer.selection import candidate_parents, genotype_features, param_position, seed_mean, select_parents

SUITES = ("easy", "hard")
ROOT_SCORES = {"easy": 0.40, "hard": 0.14}
# The CPU testbed's measured seed SD of Overall: pooled_seed_sd of bench/results/testbed.json (the default
# protocol, 4 seeds of 9 algorithms); a test keeps the two equal.
TESTBED_SEED_SD = 0.0073
NOISE_SD = TESTBED_SEED_SD * math.sqrt(len(SUITES))  # per suite and seed, so that Overall's SD is the testbed's
ROOT_LENGTH = 300.0
PROTOCOL = "landscape"
RUN_SEED = 0  # the training seed of every node (the root's replicates add replicate_seed strides), as in a run
SELECTORS = ("random", "greedy", "poise")
GAIN_TOLERANCE = 1e-9  # a true gain above float rounding
PROPOSERS = ("mutation", "phase_one")  # how a parent gets its child: the baseline's mutation or Phase I

# (easy, hard) change of each mechanism against GRPO's own, which are 0.
MAIN_EFFECTS: dict[str, tuple[float, float]] = {
    "baseline:leave_one_out": (0.008, 0.008),
    "scale:none": (0.0, -0.008),
    "scale:batch_std": (-0.010, -0.010),
    "scale:analytic_variance": (-0.004, -0.012),  # invalid responses, scored 0, pollute the pass rate it uses
    "validity:mask": (-0.025, -0.015),  # fewer responses in the group statistics
    "failure:all_fail_penalty": (-0.006, 0.018),
    "length:correct_shorter": (0.004, -0.020),
    "length:pass_rate_conditioned": (0.004, -0.008),
    "entropy:bonus": (-0.006, 0.022),
    "clip:clip_higher": (0.004, 0.016),
    "clip:sequence_ratio": (-0.020, -0.020),
    "clip:geometric_mean": (-0.006, 0.002),
    "clip:cispo": (-0.024, -0.008),
    "kl:penalty": (0.0, -0.012),
    "agg:seq-mean-token-mean": (-0.004, -0.004),
    "agg:seq-mean-token-sum": (-0.014, -0.010),
    "agg:seq-mean-token-sum-norm": (0.006, 0.002),
}


@dataclass(frozen=True)
class Interaction:
    """An extra (easy, hard) change when every mechanism of `names` is present, scaled by how well `tuned`
    parameters ((mechanism, key) -> optimal position in range) sit: exp(−Σ (gap / TUNING_WIDTH)² / 2)."""

    names: frozenset[str]
    effect: tuple[float, float]
    tuned: dict[tuple[str, str], float] = field(default_factory=dict)


TUNING_WIDTH = 0.2
INTERACTIONS: tuple[Interaction, ...] = (
    # Validity masking is an enabler: it hurts alone (fewer responses in the group statistics) but cleans the
    # statistics every scale and shaping mechanism relies on. With the analytic-variance scale it gives the
    # paper's VM-AV gain, ~55% of its best at the defaults (variance_floor 0.01, invalid_penalty -1).
    Interaction(frozenset({"validity:mask", "scale:analytic_variance"}), (0.07, 0.07),
                {("scale:analytic_variance", "variance_floor"): 0.73, ("validity:mask", "invalid_penalty"): 0.83}),
    Interaction(frozenset({"validity:mask", "scale:batch_std"}), (0.02, 0.02)),
    Interaction(frozenset({"validity:mask", "baseline:leave_one_out"}), (0.006, 0.006)),
    Interaction(frozenset({"validity:mask", "failure:all_fail_penalty"}), (0.008, 0.012)),
    # A KL anchor is an enabler too: conservative alone, it lets aggressive updates pay off.
    Interaction(frozenset({"kl:penalty", "clip:cispo"}), (0.03, 0.03)),
    Interaction(frozenset({"kl:penalty", "entropy:bonus"}), (0.006, 0.010)),
    Interaction(frozenset({"kl:penalty", "clip:clip_higher"}), (0.004, 0.008)),
    # Entropy bonus and clip-higher both fight entropy collapse: together less than the sum.
    Interaction(frozenset({"entropy:bonus", "clip:clip_higher"}), (-0.004, -0.016)),
)

# (mechanism, key) -> (optimal position in range, loss per squared position gap), subtracted from both suites.
PARAM_OPTIMA: dict[tuple[str, str], tuple[float, float]] = {
    ("clip:symmetric", "clip_ratio"): (0.49, 0.1),
    ("clip:clip_higher", "clip_high"): (0.39, 0.2),
    ("entropy:bonus", "entropy_coef"): (0.15, 0.6),
    ("kl:penalty", "kl_coef"): (0.2, 0.16),
    ("failure:all_fail_penalty", "fail_advantage"): (0.7, 0.2),
    ("scale:analytic_variance", "variance_floor"): (0.73, 0.1),
}


def _position(description: AlgorithmDescription, mechanism: str, key: str) -> float:
    return param_position(MECHANISMS[mechanism].params[key], description.hparams[key])


@dataclass(frozen=True)
class Landscape:
    """The synthetic evaluation (module docstring) of one world: `seed` fixes its noise."""

    seed: int = 0
    noise_sd: float = NOISE_SD
    interactions: tuple[Interaction, ...] = INTERACTIONS  # () gives the additive control landscape

    def true_scores(self, description: AlgorithmDescription) -> dict[str, float]:
        names = set(description.names)
        change = [0.0, 0.0]
        for name in names:
            for i, value in enumerate(MAIN_EFFECTS.get(name, (0.0, 0.0))):
                change[i] += value
        for interaction in self.interactions:
            if interaction.names <= names:
                gaps = sum(((_position(description, *target) - optimum) / TUNING_WIDTH) ** 2
                           for target, optimum in interaction.tuned.items())
                for i, value in enumerate(interaction.effect):
                    change[i] += value * math.exp(-gaps / 2)
        mistuning = sum(loss * (_position(description, mechanism, key) - optimum) ** 2
                        for (mechanism, key), (optimum, loss) in PARAM_OPTIMA.items() if mechanism in names)
        return {suite: ROOT_SCORES[suite] + change[i] - mistuning for i, suite in enumerate(SUITES)}

    def true_utility(self, description: AlgorithmDescription) -> float:
        """Overall without noise: the mean of the suites' true scores."""
        return statistics.fmean(self.true_scores(description).values())

    def evaluate(self, proposal: Proposal, training_seed: int) -> Evaluation:
        """One noisy evaluation of `proposal` trained with `training_seed`, as the evaluator would report it."""
        description = proposal_description(proposal)
        noise = random.Random(f"{self.seed}|{description_key(proposal)}|{training_seed}")
        shaped = description.mechanism("length_shaping") is not None
        length = ROOT_LENGTH * (0.75 if shaped else 1.0) * (1 + noise.gauss(0, 0.03))
        suites = {}
        for suite, score in self.true_scores(description).items():
            value = min(max(score + noise.gauss(0, self.noise_sd), 0.0), 1.0)
            pass_at_k = suite == "hard"
            suites[suite] = SuiteResult(
                suite=suite, kind=MetricKind.PASS_AT_K if pass_at_k else MetricKind.ACC_AT_1, k=8 if pass_at_k else 1,
                value=value, ci_low=max(value - 0.03, 0.0), ci_high=min(value + 0.03, 1.0), n_prompts=100,
                n_samples=8 if pass_at_k else 1, mean_length=length, format_valid_rate=0.95, weight=0.5)
        overall = statistics.fmean(result.value for result in suites.values())
        return Evaluation(suites=suites, overall=overall, mean_length=length, seed=training_seed)


# ------------------------------------------------------------------------------------------- search


@cache
def _root() -> Proposal:
    return root_proposal()  # imports torch once per process


_T0 = datetime(2025, 1, 1, tzinfo=UTC)
_RUN_ID = "landscape"


_DESCRIPTIONS: dict[str, AlgorithmDescription] = {}  # landscape_source -> the description it stands for


def landscape_source(proposal: Proposal) -> str:
    """A landscape node's stand-in for its module source: its description key as a constant (a node here is its
    description; nothing is compiled or run). `description_fingerprint` reads the description back."""
    text = f"DESCRIPTION_KEY = {description_key(proposal)!r}\n"
    _DESCRIPTIONS.setdefault(text, proposal_description(proposal))
    return text


def description_fingerprint(source: str) -> FingerprintResult:
    """The landscape's stand-in for screening's sandboxed fingerprinter, on a `landscape_source`: the description
    comes back with its declared aggregation and constants (so the consistency gate passes, as for the offline
    compiler's code) and its genotype (`genotype_features`) as the behaviour vector, in the fingerprint's layout.
    Two different descriptions are therefore never near-duplicates (nor no-ops, the genotype standing in for the
    recorded probes' sketches too) here: the landscape has no behaviour beyond the description, so the real
    fingerprint's rejections (e.g. a moved eps that changes nothing, a dual-clip move real ratios never reach) are
    not simulated, and the archive's exclusion of repeated descriptions is the only novelty gate."""
    description = _DESCRIPTIONS[source]
    vector = np.zeros(FINGERPRINT_LENGTH)
    features = genotype_features(description)
    vector[: len(features)] = features
    vector[RECORDED_OFFSET: RECORDED_OFFSET + len(features)] = features
    return FingerprintResult(source_sha256=sha256_hex(source), vector=vector, loss_agg_mode=description.loss_agg_mode,
                             hparams=dict(description.hparams))


def _node(number: int, proposal: Proposal, parents: list[Node], evaluations: list[Evaluation]) -> Node:
    node_id = f"n{number:03d}"
    genealogy = (Genealogy.child(node_id, [p.genealogy for p in parents]) if parents
                 else Genealogy(run_id=_RUN_ID, node_id=node_id))
    created = _T0 + timedelta(minutes=number)  # creation order is the order select_parent breaks ties by
    return Node(genealogy=genealogy, status=NodeStatus.EVALUATED,
                proposal=proposal.model_copy(update={"parent_ids": [p.node_id for p in parents]}),
                implementation=Implementation.from_source(landscape_source(proposal), verified=True),
                trajectory=TrainingTrajectory(protocol=PROTOCOL, seed=evaluations[0].seed),
                evaluation=evaluations[0], replicates=evaluations[1:], created_at=created, updated_at=created)


ParentPicker = Callable[[list[Node], int, random.Random], list[Node]]


def parent_picker(selector: str, weights: SelectionWeights | None = None) -> ParentPicker:
    """The k parents of a round under `selector`: "random" and "greedy" call the baseline's select_parent k times
    (as the archive does, so greedy gives the best node k children), "poise" calls select_parents once and
    cycles through its (up to k distinct) parents."""
    if selector in ("random", "greedy"):
        return lambda nodes, k, rng: [select_parent(nodes, selector, rng, seed_mean) for _ in range(k)]
    if selector == "poise":
        weights = weights or SelectionWeights()

        def poise(nodes: list[Node], k: int, rng: random.Random) -> list[Node]:
            by_id = {node.node_id: node for node in nodes}
            chosen = [by_id[s.node_id] for s in select_parents(nodes, weights, k, rng, seed_mean)]
            return [chosen[i % len(chosen)] for i in range(k)]

        return poise
    raise ValueError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")


@dataclass(frozen=True)
class SearchResult:
    selector: str
    seed: int
    nodes: list[Node]
    best_true: float  # the highest true utility among the evaluated nodes: what the search found
    reported_true: float  # the true utility of the node with the highest seed mean: what a run would report
    root_true: float
    split_rounds: int  # rounds whose parents were not all one node
    best_child_elsewhere: int  # of those, rounds whose best child (observed) was not from the best parent
    seeding: str = "one"  # the seed policy's name (poise.racing.SEED_POLICIES)
    trainings: int = 0  # trainings spent on children and their extra seeds (the root's seeds not counted)

    @property
    def reported_gain(self) -> float:
        """What the reported node truly gains over the root."""
        return self.reported_true - self.root_true

    @property
    def claimed_gain(self) -> float:
        """What the run would claim the reported node gains over the root: the difference of their seed means.
        Above `reported_gain` by the winner's curse (the highest of many noisy means is biased upward)."""
        return seed_mean(reported_node(self.nodes)) - seed_mean(self.nodes[0])

    @property
    def reported_better(self) -> bool:
        """Whether the reported node is truly better than the root (by more than float rounding: a change of a
        flat constant scores exactly the root's utility)."""
        return self.reported_gain > GAIN_TOLERANCE


def search(selector: str, seed: int, budget: int = 45, parents_per_round: int = 3, root_seeds: int = 3,
           weights: SelectionWeights | None = None, landscape: Landscape | None = None,
           population_size: int | None = None, proposer: str | None = None, seeding: str | SeedPolicy = "one"
           ) -> SearchResult:
    """One simulated run in world `seed` of `landscape`: the root evaluated with `root_seeds` seeds, then rounds
    of `parents_per_round` parents, each given one child, until `budget` trainings are spent. Random and
    greedy give each parent one mutation (the baseline proposer); POISE gives it the winner of Phase I
    (`phase_one`: a population of `population_size` proposals, RunConfig's default when None, screened).
    `proposer` ("mutation" or "phase_one") overrides the selector's own, for ablations.

    `seeding` is a seed policy or its name in `poise.racing.SEED_POLICIES` (docs/racing.md): "one" seed per
    child (then trainings are children, as before), a "fixed" number per child, or "racing": one per child, and
    before every round and before the report `race` gives extra seeds until the racing rule names no node. The
    root's seeds are not counted; a child is made only while the budget left can give it its policy's cap. The
    reported node is the one with the highest seed mean (`reported_node`)."""
    proposer = proposer or ("phase_one" if selector == "poise" else "mutation")
    if proposer not in PROPOSERS:
        raise ValueError(f"unknown proposer {proposer!r}; choose one of {', '.join(PROPOSERS)}")
    if isinstance(seeding, str) and seeding not in SEED_POLICIES:
        raise ValueError(f"unknown seeding {seeding!r}; choose one of {', '.join(SEED_POLICIES)}")
    policy = SEED_POLICIES[seeding] if isinstance(seeding, str) else seeding
    landscape = replace(landscape or Landscape(), seed=seed)
    pick = parent_picker(selector, weights)
    config = RunConfig(run_id=_RUN_ID, weights=weights or SelectionWeights(),
                       **({"population_size": population_size} if population_size is not None else {}))
    selection_rng = random.Random(f"select|{seed}")
    root = _root()
    nodes = [_node(0, root, [], [landscape.evaluate(root, replicate_seed(RUN_SEED, r)) for r in range(root_seeds)])]
    seen = {description_key(root)}
    children_of: dict[str, int] = {}
    rounds = split_rounds = elsewhere = trainings = 0
    while True:
        if policy.racing:
            trainings += race(nodes, landscape, policy, budget - trainings)
        if not policy.affords_child(budget - trainings) or rounds >= 3 * budget:  # all mutations may fail
            break
        rounds += 1
        parents = pick(candidate_parents(nodes, seed_mean), parents_per_round, selection_rng)
        children = []
        for parent in parents:
            if not policy.affords_child(budget - trainings):
                break
            # The k-th mutation of a description draws from its own stream, and every child is trained with the
            # run's seed (as in a real run): two selectors that expand the same node the same number of times get
            # the same children with the same scores (common random numbers, so their difference is measured
            # more precisely; each selector's own distribution of outcomes is unchanged).
            parent_key = description_key(parent.proposal)
            k = children_of[parent_key] = children_of.get(parent_key, 0) + 1
            rng = random.Random(f"mutate|{seed}|{parent_key}|{k}")
            if proposer == "phase_one":
                child, _, _ = phase_one(parent, nodes, config, rng, description_fingerprint,
                                        source_of=landscape_source)
                if child is None:
                    continue
            else:
                try:
                    child = mutate(parent.proposal, rng, seen)
                except MutationError:
                    continue
            seen.add(description_key(child))
            evaluations = [landscape.evaluate(child, replicate_seed(RUN_SEED, r)) for r in range(policy.at_birth)]
            trainings += len(evaluations)
            children.append(_node(len(nodes), child, [parent], evaluations))
            nodes.append(children[-1])
        if len({p.node_id for p in parents}) > 1 and children:
            split_rounds += 1
            best_parent = max(parents, key=lambda p: (seed_mean(p), p.node_id))
            best_child = max(children, key=lambda c: (seed_mean(c), c.node_id))
            elsewhere += best_child.genealogy.parent_ids != [best_parent.node_id]
    true = {node.node_id: landscape.true_utility(proposal_description(node.proposal)) for node in nodes}
    reported = reported_node(nodes)
    return SearchResult(selector, seed, nodes, max(true.values()), true[reported.node_id], true[nodes[0].node_id],
                        split_rounds, elsewhere, policy.name, trainings)


def reported_node(nodes: Sequence[Node]) -> Node:
    """The node a run reports as its best: the highest seed mean (the latest on ties)."""
    return max(nodes, key=lambda node: (seed_mean(node), node.node_id))


def race(nodes: list[Node], landscape: Landscape, policy: SeedPolicy, trainings_left: int) -> int:
    """Give extra seeds (replicates, the k-th trained with `replicate_seed(RUN_SEED, k)`, so every policy sees
    the same score for the same seed) to the nodes `next_seed` names under `policy`, with the archive's pooled
    seed SD as the run's noise, until it names none; the nodes are replaced in `nodes`. Returns the trainings
    spent."""
    spent = 0
    index = {node.node_id: i for i, node in enumerate(nodes)}
    while True:
        scores = {node.node_id: seed_scores(node) for node in nodes}
        noise = pooled_sd(list(scores.values()))
        if noise is None:
            return spent  # nothing measures the noise yet (a root with one seed): nothing to race on
        chosen = next_seed(scores, noise, policy.cap, trainings_left - spent, policy.z)
        if chosen is None:
            return spent
        node = nodes[index[chosen]]
        extra = landscape.evaluate(node.proposal, replicate_seed(RUN_SEED, 1 + len(node.replicates)))
        nodes[index[chosen]] = node.model_copy(update={"replicates": [*node.replicates, extra]})
        spent += 1


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the per-world differences a − b (a and b in the same worlds, same order)."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    if len(differences) < 2:
        raise ValueError(f"a paired difference needs at least 2 worlds, got {len(differences)}")
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


def compare(seeds: Sequence[int], budget: int = 45, selectors: tuple[str, ...] = SELECTORS,
            weights: SelectionWeights | None = None, landscape: Landscape | None = None
            ) -> dict[str, list[SearchResult]]:
    """Each selector's runs in the same worlds, with the same budget."""
    return {selector: [search(selector, seed, budget, weights=weights, landscape=landscape) for seed in seeds]
            for selector in selectors}


__all__ = [
    "INTERACTIONS",
    "Landscape",
    "MAIN_EFFECTS",
    "SELECTORS",
    "SearchResult",
    "compare",
    "description_fingerprint",
    "landscape_source",
    "paired_difference",
    "parent_picker",
    "race",
    "reported_node",
    "search",
]
