"""The shared algorithm interface: batch builder, properties of the reference algorithms, structural check."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.algorithm import (
    CandidateError,
    aggregate_loss,
    build_batch,
    check_passed,
    describe_problems,
    load_candidate,
    module_hparams,
    run_advantages,
    run_policy_loss,
    structural_check,
)
from poise.algorithms import REFERENCE_ALGORITHMS, reference_algorithm
from poise.contracts import ROOT_NAME

# ------------------------------------------------------------------------------------------ batch


def test_build_batch_group_statistics_and_token_rewards():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    batch = build_batch(scores, mask, ["b", "b", "a", "a", "a"], hparams={"x": 1})
    assert batch["group_index"].tolist() == [0, 0, 1, 1, 1]  # first appearance order
    assert batch["group_size"].tolist() == [2, 2, 3, 3, 3]
    torch.testing.assert_close(batch["group_mean_score"], torch.tensor([0.5, 0.5, 2 / 3, 2 / 3, 2 / 3]))
    assert batch["response_length"].tolist() == [2, 1, 3, 2, 1]
    # VERL's token_level_rewards: the score sits on the last valid response token.
    assert batch["token_level_rewards"].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert batch["format_valid"].tolist() == [1, 1, 1, 1, 1]
    assert batch["hparams"] == {"x": 1}


def test_build_batch_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="response_mask must have shape"):
        build_batch(torch.zeros(3), torch.ones(2, 4), [0, 0, 1])
    with pytest.raises(ValueError, match="entropy must have shape"):
        build_batch(torch.zeros(2), torch.ones(2, 4), [0, 0], entropy=torch.ones(2, 3))


# ---------------------------------------------------------------------------------- properties

groups_strategy = st.lists(
    st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=2, max_size=8), min_size=1, max_size=6
)


def batch_from_groups(groups: list[list[float]], length: int, seed: int):
    scores = torch.tensor([s for g in groups for s in g], dtype=torch.float64)
    index = [i for i, g in enumerate(groups) for _ in g]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (len(scores),), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).double()
    return build_batch(scores, mask, index), gen


@settings(max_examples=60, deadline=None)
@given(groups=groups_strategy, length=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_grpo_advantages_have_zero_group_mean_and_vanish_on_equal_groups(groups, length, seed):
    batch, _ = batch_from_groups(groups, length, seed)
    module = reference_algorithm(ROOT_NAME).module()
    batch["hparams"] = module_hparams(module)
    advantages, _ = run_advantages(module, batch)
    per_response = advantages[:, 0]  # every response has at least one token
    for g, scores in enumerate(groups):
        in_group = per_response[batch["group_index"] == g]
        assert abs(in_group.mean().item()) < 1e-9
        if len(set(scores)) == 1:
            assert in_group.abs().max().item() == 0.0
    assert (advantages[batch["response_mask"] == 0] == 0).all()


@settings(max_examples=25, deadline=None)
@given(groups=groups_strategy, length=st.integers(1, 9), seed=st.integers(0, 10_000),
       name=st.sampled_from(sorted(REFERENCE_ALGORITHMS)))
def test_on_policy_loss_equals_aggregated_negative_advantage(groups, length, seed, name):
    """At log_prob == old_log_prob every ratio is 1: the loss is the aggregated -A, and its gradient is the
    REINFORCE gradient of the aggregated -A * log_prob (CISPO's loss value is -A * log_prob by design)."""
    batch, gen = batch_from_groups(groups, length, seed)
    module = REFERENCE_ALGORITHMS[name].module()
    batch["hparams"] = module_hparams(module)
    mask, mode = batch["response_mask"], module.LOSS_AGG_MODE
    advantages, _ = run_advantages(module, batch)
    old = -torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 2
    log_prob = old.clone().requires_grad_(True)
    loss_mat, _ = run_policy_loss(module, log_prob, old, advantages, mask, batch)
    loss = aggregate_loss(loss_mat, mask, mode)
    reinforce = -advantages * (log_prob if name == "cispo" else torch.ones_like(log_prob))
    torch.testing.assert_close(loss, aggregate_loss(reinforce, mask, mode))
    (grad,) = torch.autograd.grad(loss, log_prob)
    reference = log_prob.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(aggregate_loss(-advantages * reference, mask, mode), reference)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("name", sorted(REFERENCE_ALGORITHMS))
def test_gradients_flow_to_log_prob_only(name):
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    batch = build_batch(scores, mask, [0, 0, 0, 1, 1, 1], ref_log_prob=torch.full((6, 3), -1.0))
    module = REFERENCE_ALGORITHMS[name].module()
    batch["hparams"] = module_hparams(module, {"kl_coef": 0.1})
    advantages, _ = run_advantages(module, batch)
    assert not advantages.requires_grad  # advantages are constants of the loss
    old = torch.full((6, 3), -1.2)
    log_prob = (old + 0.1).requires_grad_(True)
    loss = aggregate_loss(run_policy_loss(module, log_prob, old, advantages, mask, batch)[0], mask,
                          module.LOSS_AGG_MODE)
    loss.backward()
    assert log_prob.grad is not None and log_prob.grad[mask > 0].abs().sum() > 0
    assert (log_prob.grad[mask == 0] == 0).all()
    assert scores.grad is None and not old.requires_grad


def test_reference_algorithms_carry_literature_metadata_and_pass_the_check():
    assert {"grpo", "dr_grpo", "dapo_clip_higher", "rloo", "reinforce_pp_baseline", "gspo", "gmpo",
            "cispo"} == set(REFERENCE_ALGORITHMS)
    for algorithm in REFERENCE_ALGORITHMS.values():
        assert len(algorithm.description) > 150 and "arXiv" in algorithm.reference and algorithm.mechanisms
        results = structural_check(algorithm.source())
        assert check_passed(results), describe_problems(results)


def test_unknown_reference_algorithm_names_the_known_ones():
    with pytest.raises(KeyError, match="known: grpo"):
        reference_algorithm("ppo-ultra")


# ------------------------------------------------------------------------------ structural check

GOOD = '''
import torch
LOSS_AGG_MODE = "token-mean"
HPARAMS = {"scale": 1.0}

def compute_advantages(batch):
    return batch["scores"] - batch["group_mean_score"]

def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return -advantages * torch.exp(log_prob - old_log_prob)
'''


def broken(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


def failure(source: str) -> str:
    results = structural_check(textwrap.dedent(source))
    assert not check_passed(results), "the broken candidate passed the structural check"
    return describe_problems(results)


def test_check_accepts_a_minimal_correct_candidate():
    results = structural_check(GOOD)
    assert check_passed(results), describe_problems(results)
    assert [r.name for r in results] == ["import", "interface", "advantages[mixed]", "advantages[equal]",
                                         "advantages[fail]", "policy_loss"]


def test_check_reports_syntax_error_with_line():
    assert "does not parse" in failure(broken("def policy_loss(", "def policy_loss((")) and "line 9" in failure(
        broken("def policy_loss(", "def policy_loss(("))


def test_check_reports_exception_at_import_at_the_candidates_own_line():
    # The innermost frame is importlib's ("<frozen importlib._bootstrap>", line ~1140), not the candidate's.
    assert failure("import math\n\nimport not_a_module\n" + GOOD) == (
        "import: importing the module raised ModuleNotFoundError at line 3 of the candidate: "
        "\"No module named 'not_a_module'\"")


def test_check_reports_missing_function():
    assert "must define a function `policy_loss`" in failure(broken("def policy_loss(", "def the_loss("))


def test_check_reports_bad_loss_agg_mode():
    assert "LOSS_AGG_MODE must be one of" in failure(broken('"token-mean"', '"token-median"'))


def test_check_reports_bad_hparams():
    assert "HPARAMS must be a dict" in failure(broken('{"scale": 1.0}', '[1.0]'))


def test_check_reports_wrong_signature():
    problem = failure(broken("response_mask, batch):", "mask, batch):"))
    assert "`policy_loss` must accept the arguments (log_prob, old_log_prob, advantages, response_mask" in problem


def test_check_reports_wrong_advantage_shape():
    problem = failure(broken('return batch["scores"] - batch["group_mean_score"]',
                             'return batch["scores"][:3]'))
    assert "compute_advantages returned shape (3,) but (16,) or (16, 7) was expected" in problem


def test_check_reports_wrong_loss_shape():
    problem = failure(broken("return -advantages * torch.exp(log_prob - old_log_prob)",
                             "return (-advantages * torch.exp(log_prob - old_log_prob)).sum(-1)"))
    assert "policy_loss returned shape (16,) but (16, 7) was expected" in problem
    assert "aggregates it with LOSS_AGG_MODE" in problem


def test_check_reports_non_finite_advantages_on_equal_groups():
    problem = failure(broken(
        'return batch["scores"] - batch["group_mean_score"]',
        'd = batch["scores"] - batch["group_mean_score"]\n    return d / (d.abs() * 0)'))
    assert "non-finite values" in problem and "zero group std" in problem


def test_check_reports_advantage_on_padding():
    problem = failure(broken(
        'return batch["scores"] - batch["group_mean_score"]',
        'return (batch["scores"] - batch["group_mean_score"]).unsqueeze(-1).expand(-1, 7) + 0.0'))
    assert "non-zero advantages on padding tokens" in problem


def test_check_reports_loss_without_gradient():
    problem = failure(broken("torch.exp(log_prob - old_log_prob)", "torch.exp(log_prob.detach() - old_log_prob)"))
    assert "no gradient" in problem


def test_check_reports_non_finite_loss():
    problem = failure(broken("return -advantages * torch.exp(log_prob - old_log_prob)",
                             "return -advantages * torch.log(log_prob)"))
    assert "policy_loss returned non-finite values" in problem


def test_check_reports_exception_inside_a_function_with_its_line():
    problem = failure(broken('return batch["scores"] - batch["group_mean_score"]', 'return batch["reward"]'))
    assert "compute_advantages raised KeyError at line 7 of the candidate: \"'reward'\"" in problem


def test_check_reports_non_tensor_return():
    assert "policy_loss returned float; a torch.Tensor was expected" in failure(
        broken("return -advantages * torch.exp(log_prob - old_log_prob)", "return 0.0"))


def test_load_candidate_does_not_register_the_module():
    import sys

    module = load_candidate(GOOD, name="cand_test_registry")
    assert module.HPARAMS == {"scale": 1.0} and "cand_test_registry" not in sys.modules
    with pytest.raises(CandidateError, match="does not parse"):
        load_candidate("def (")
