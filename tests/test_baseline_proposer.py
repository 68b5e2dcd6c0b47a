"""The baseline proposer: parent selection, one-change mutations, canonical keys, and the GRPO root."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.algorithm import check_passed, describe_problems, load_candidate, structural_check
from poise.contracts import (
    Evaluation,
    Genealogy,
    Implementation,
    MechanismSpec,
    Node,
    NodeStatus,
    Proposal,
    TrainingTrajectory,
)
from poise.description.codegen import compile_proposal, describe_reference
from poise.description.mechanisms import FAMILIES, MECHANISMS, AlgorithmDescription
from poise.description.proposals import MAX_NAME_CHARS, description_key, proposal_description, root_proposal
from proposer.baseline import MUTATION_WEIGHTS, MutationError, moved_value, mutate, select_parent

ROOT = root_proposal()
PARAMS = sorted((name, key) for name, m in MECHANISMS.items() for key in m.params)


def lineage(seed: int, generations: int) -> list[Proposal]:
    """The root and `generations` successive mutations of it, drawn from Random(seed)."""
    rng, chain = random.Random(seed), [ROOT]
    for _ in range(generations):
        chain.append(mutate(chain[-1], rng))
    return chain


def parent_and_child(seed: int) -> tuple[Proposal, Proposal]:
    """A parent a few generations below the root (so every kind of mutation gets a chance) and its child."""
    chain = lineage(seed, 1 + seed % 6)
    return chain[-2], chain[-1]


def classify(parent: Proposal, child: Proposal) -> tuple[str, str]:
    """The kind of the single change from parent to child and what the rationale must start with; fails the
    test if the child differs by anything but that one change."""
    before, after = proposal_description(parent), proposal_description(child)
    was = {m.family: m for m in before.mechanisms}
    now = {m.family: m for m in after.mechanisms}
    added = [now[f] for f in now.keys() - was.keys()]
    removed = [was[f] for f in was.keys() - now.keys()]
    swapped = [(was[f], now[f]) for f in was.keys() & now.keys() if was[f] is not now[f]]

    def params_of(mechanisms) -> set[str]:
        return {key for m in mechanisms for key in m.params}

    def expect_hparams(dropped, new) -> None:
        kept = {k: v for k, v in before.hparams.items() if k not in params_of(dropped)}
        assert after.hparams == {**kept, **new.defaults()}, (parent.name, child.name)

    if not added and not removed and not swapped:
        changed = [k for k in before.hparams if before.hparams[k] != after.hparams[k]]
        assert before.hparams.keys() == after.hparams.keys() and len(changed) == 1, (before.hparams, after.hparams)
        owner = next(m for m in before.mechanisms if changed[0] in m.params)
        return "hparam", f"Moves {changed[0]} of {owner.name} from "
    if added:
        assert len(added) == 1 and not removed and not swapped, (parent.name, child.name)
        assert not FAMILIES[added[0].family].required
        expect_hparams([], added[0])
        return "add", f"Adds {added[0].name}"
    if not swapped:
        assert len(removed) == 1 and not FAMILIES[removed[0].family].required, (parent.name, child.name)
        assert after.hparams == {k: v for k, v in before.hparams.items() if k not in removed[0].params}
        return "remove", f"Removes {removed[0].name}"
    assert len(swapped) == 1, (parent.name, child.name)
    old, new = swapped[0]
    # The only companion change a swap may make: dropping clip:dual when the new clip does not support it.
    must_drop = "clip:dual" in before.names and new.family == "clip" and new.name not in MECHANISMS[
        "clip:dual"].works_with
    assert [m.name for m in removed] == (["clip:dual"] if must_drop else [])
    assert ("Also drops clip:dual, which works only with" in child.rationale) == must_drop
    expect_hparams([old, *removed], new)
    return ("swap+drop" if must_drop else "swap"), f"Swaps {old.name} for {new.name}"


def evaluated_node(node_id: str, utility: float | None, created_at: datetime) -> Node:
    """An evaluated root-level node whose evaluation carries `utility`."""
    evaluation = Evaluation(suites={}, overall=0.4, mean_length=30.0, seed=0, utility=utility)
    return Node(genealogy=Genealogy(run_id="run-baseline", node_id=node_id), status=NodeStatus.EVALUATED,
                proposal=ROOT, implementation=Implementation.from_source("x = 1\n"),
                trajectory=TrainingTrajectory(protocol="testbed-v1", seed=0), evaluation=evaluation,
                created_at=created_at, updated_at=created_at)


def node_utility(node: Node) -> float | None:
    return node.evaluation.utility


T0 = datetime(2025, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------------------- the root


def test_root_is_grpo_from_the_reference_description_and_compiles(one_thread):
    assert ROOT.name == "grpo" and ROOT.generator == "reference" and ROOT.parent_ids == [] and ROOT.hparams == {}
    assert "root" in ROOT.rationale and "baseline" in ROOT.rationale
    assert proposal_description(ROOT) == AlgorithmDescription.from_specs(*describe_reference("grpo"))
    assert ROOT.loss_agg_mode == "token-mean" and ROOT.mechanisms[-1].name == "agg:token-mean"
    results = structural_check(compile_proposal(ROOT))
    assert check_passed(results), describe_problems(results)


# -------------------------------------------------------------------------------------------- mutation


def test_every_kind_of_mutation_occurs_and_each_child_differs_by_exactly_one_change():
    kinds: Counter[str] = Counter()
    swapped_families: set[str] = set()
    for seed in range(300):
        parent, child = parent_and_child(seed)
        kind, opening = classify(parent, child)
        kinds[kind] += 1
        if kind.startswith("swap"):
            swapped_families.add(MECHANISMS[opening.split()[-1]].family)
        assert child.rationale.startswith(opening), (kind, child.rationale)
        assert child.generator == "offline" and child.parent_ids == [] and child.hparams == {}
        assert child.loss_agg_mode == proposal_description(child).loss_agg_mode
        assert [s.name for s in child.mechanisms] == proposal_description(child).names  # agg listed, in order
    assert set(kinds) == {"add", "remove", "swap", "swap+drop", "hparam"}, kinds
    assert {f.name for f in FAMILIES.values() if f.required} <= swapped_families, swapped_families


def test_kinds_are_drawn_with_the_module_weights():
    kinds = Counter(classify(ROOT, mutate(ROOT, random.Random(seed)))[0].removesuffix("+drop") for seed in range(600))
    total = sum(MUTATION_WEIGHTS.values())
    for kind, weight in MUTATION_WEIGHTS.items():  # every kind applies to GRPO, so no renormalization
        assert kinds[kind] / 600 == pytest.approx(weight / total, abs=0.06), kinds


def test_rationale_names_the_change_with_its_parameters_and_the_mechanism_description():
    for seed in range(200):
        child = mutate(ROOT, random.Random(seed))
        if "scale:analytic_variance" in proposal_description(child).names:
            break
    else:
        pytest.fail("no seed swapped in scale:analytic_variance")
    assert child.rationale.startswith("Swaps scale:group_std for scale:analytic_variance (variance_floor 0.01): "
                                      + MECHANISMS["scale:analytic_variance"].description)
    assert child.rationale.endswith("Baseline proposer: one random mutation of grpo.")
    assert child.name == "grpo~scale_analytic_variance"


def test_cispo_is_reached_from_grpo_in_one_swap_that_drops_the_dual_clip():
    children = [mutate(ROOT, random.Random(seed)) for seed in range(300)]
    cispo = next(c for c in children if "clip:cispo" in proposal_description(c).names)
    assert proposal_description(cispo).names == ["baseline:group_mean", "scale:group_std", "clip:cispo",
                                                 "agg:token-mean"]
    assert "Also drops clip:dual, which works only with clip:symmetric, clip:clip_higher, clip:sequence_ratio." \
        in cispo.rationale


def test_sampled_children_compile_and_pass_the_structural_check(one_thread):
    firsts: dict[str, Proposal] = {}
    for seed in range(100):
        parent, child = parent_and_child(seed)
        firsts.setdefault(classify(parent, child)[0], child)
    deep = lineage(7, 25)[-1]  # many mechanisms and moved values at once
    for child in [*firsts.values(), deep]:
        source = compile_proposal(child)
        results = structural_check(source)
        assert check_passed(results), f"{child.name}\n{describe_problems(results)}"
        module = load_candidate(source)
        description = proposal_description(child)
        assert module.MECHANISMS == description.names and module.HPARAMS == description.hparams
        assert module.LOSS_AGG_MODE == child.loss_agg_mode and module.NAME == child.name


def test_mutation_is_deterministic_given_the_rng():
    for seed in range(20):
        assert lineage(seed, 5) == lineage(seed, 5)
    assert len({description_key(mutate(ROOT, random.Random(seed))) for seed in range(20)}) > 10


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_seen_description_is_never_proposed_again(seed):
    first = mutate(ROOT, random.Random(seed))
    second = mutate(ROOT, random.Random(seed), seen={description_key(first)})
    assert description_key(second) not in {description_key(first), description_key(ROOT)}
    classify(ROOT, second)


def test_children_of_one_parent_stay_new_as_the_archive_grows():
    seen = {description_key(ROOT)}
    rng = random.Random(5)
    for _ in range(40):
        child = mutate(ROOT, rng, seen)
        key = description_key(child)
        assert key not in seen
        seen.add(key)


def test_mutate_raises_a_clear_error_when_every_try_is_already_seen():
    blocked = {description_key(mutate(ROOT, random.Random(3)))}
    with pytest.raises(MutationError, match="grpo: no new description in 1 mutations .* select another parent"):
        mutate(ROOT, random.Random(3), blocked, max_tries=1)
    with pytest.raises(ValueError, match="max_tries must be at least 1"):
        mutate(ROOT, random.Random(3), max_tries=0)


def test_names_are_readable_short_and_differ_from_the_parent():
    for seed in range(10):
        chain = lineage(seed, 30)
        for parent, child in zip(chain, chain[1:], strict=False):
            assert child.name != parent.name and len(child.name) <= MAX_NAME_CHARS, child.name
            assert child.name.startswith("grpo")
    assert lineage(0, 1)[1].name.startswith("grpo") and len(lineage(0, 1)[1].name) > len("grpo")


def test_a_child_of_an_llm_proposal_with_merged_hparams_keeps_its_directive():
    parent = Proposal(name="VM-AV-GRPO", rationale="variance scaling", generator="openai:qwen", directive="shorter",
                      mechanisms=[MechanismSpec(name=n) for n in ("validity:mask", "baseline:group_mean",
                                                                   "scale:analytic_variance", "clip:symmetric")],
                      hparams={"variance_floor": 0.02}, loss_agg_mode="seq-mean-token-mean")
    for seed in range(20):
        child = mutate(parent, random.Random(seed))
        classify(parent, child)
        assert child.directive == "shorter" and child.name.startswith("VM-AV-GRPO")


# ------------------------------------------------------------------------------------- hparam moves


@settings(max_examples=300, deadline=None)
@given(target=st.sampled_from(PARAMS), seed=st.integers(0, 2**32 - 1), where=st.sampled_from(["low", "high", "any"]))
def test_hparam_moves_stay_in_range_and_take_a_real_step(target, seed, where):
    param = MECHANISMS[target[0]].params[target[1]]
    rng = random.Random(seed)
    value = param.sample(rng) if param.choices or where == "any" else getattr(param, where)
    new = moved_value(param, value, rng)
    assert new is not None and param.problem(new) is None and new != value
    if param.choices:
        return
    if param.log:
        ratio = max(new, value) / min(new, value)
        assert 1.5 * 0.99 <= ratio <= 3.0 * 1.01, (value, new)
    else:
        step = abs(new - value) / (param.high - param.low)
        assert 0.1 - 0.006 <= step <= 0.25 + 0.006, (value, new)


# ------------------------------------------------------------------------------------------------ keys


def test_description_key_is_canonical_across_spellings():
    spelled = Proposal(name="other", rationale="", generator="offline", loss_agg_mode="token-mean",
                       mechanisms=[MechanismSpec(name=n) for n in ("clip:dual", "clip:symmetric", "scale:group_std",
                                                                   "baseline:group_mean")],
                       hparams={"clip_ratio": 0.2000001, "dual_clip": 3, "eps": 1e-6})
    assert description_key(spelled) == description_key(ROOT)
    assert "agg=token-mean" in description_key(ROOT)
    moved = spelled.model_copy(update={"hparams": {**spelled.hparams, "clip_ratio": 0.21}})
    other_agg = spelled.model_copy(update={"loss_agg_mode": "seq-mean-token-mean"})
    assert len({description_key(ROOT), description_key(moved), description_key(other_agg)}) == 3


# ------------------------------------------------------------------------------------------- selection


def test_greedy_takes_the_highest_utility_ties_to_the_earliest_then_the_smallest_id():
    nodes = [
        evaluated_node("n3", 0.50, T0 + timedelta(minutes=3)),
        evaluated_node("n2", 0.62, T0 + timedelta(minutes=2)),
        evaluated_node("n1", 0.62, T0 + timedelta(minutes=1)),
        evaluated_node("n0", None, T0),
    ]
    rng = random.Random(0)
    assert select_parent(nodes, "greedy", rng, node_utility).node_id == "n1"
    assert select_parent(nodes[::-1], "greedy", rng, node_utility).node_id == "n1"
    same_time = [evaluated_node(i, 0.62, T0) for i in ("nb", "na", "nc")]
    assert select_parent(same_time, "greedy", rng, node_utility).node_id == "na"
    unknown = [evaluated_node("n9", None, T0 + timedelta(1)), evaluated_node("n8", float("nan"), T0)]
    assert select_parent(unknown, "greedy", rng, node_utility).node_id == "n8"  # no utility: earliest
    assert select_parent([*unknown, evaluated_node("n7", -5.0, T0 + timedelta(2))], "greedy", rng,
                         node_utility).node_id == "n7"
    assert rng.random() == random.Random(0).random()  # greedy draws nothing


def test_random_selection_is_uniform_deterministic_and_independent_of_input_order():
    nodes = [evaluated_node(f"n{i}", float(i), T0 + timedelta(minutes=i)) for i in range(4)]
    picks = Counter(select_parent(nodes, "random", random.Random(seed), node_utility).node_id for seed in range(800))
    assert set(picks) == {"n0", "n1", "n2", "n3"} and all(abs(c / 800 - 0.25) < 0.06 for c in picks.values()), picks
    for seed in range(10):
        assert (select_parent(nodes, "random", random.Random(seed), node_utility).node_id
                == select_parent(nodes[::-1], "random", random.Random(seed), node_utility).node_id)


def test_selection_refuses_an_unknown_mode_and_no_candidates():
    node = evaluated_node("n0", 0.5, T0)
    with pytest.raises(ValueError, match="unknown parent selection mode 'best'; choose one of random, greedy"):
        select_parent([node], "best", random.Random(0), node_utility)
    with pytest.raises(ValueError, match="no candidate parents"):
        select_parent([], "greedy", random.Random(0), node_utility)


def test_proposal_description_is_resolved_per_spelling_and_hands_out_its_own_hparams():
    root = root_proposal()
    as_int = root.model_copy(update={"hparams": {"dual_clip": 3}})
    as_float = root.model_copy(update={"hparams": {"dual_clip": 3.0}})
    # 3 and 3.0 hash alike; a cached description of one must not be handed out for the other.
    assert type(proposal_description(as_int).hparams["dual_clip"]) is int
    assert type(proposal_description(as_float).hparams["dual_clip"]) is float
    edited = proposal_description(root)
    edited.hparams["eps"] = 0.5
    assert proposal_description(root).hparams["eps"] == 1e-06
    assert proposal_description(root) == AlgorithmDescription.from_specs(root.mechanisms, root.hparams)
