"""Parity of the reference algorithms with VERL 0.9.1's own `core_algos` (called directly, float64).

Every algorithm VERL also implements is compared on random batches of several shapes, including groups
whose rewards are all equal, lone responses and ragged padding: advantages, the aggregated loss, its
gradient with respect to log_prob, and the clip metrics. VERL quirks are documented where a test meets
them (docs/extending.md, "VERL facts the code relies on").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from poise.algorithm import aggregate_loss, build_batch, module_hparams, run_advantages, run_policy_loss
from poise.algorithms import REFERENCE_ALGORITHMS
from poise.algorithms import common as ours

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")

pytestmark = pytest.mark.verl
TOL = dict(rtol=1e-6, atol=1e-6)
SHAPES = [(2, 4, 5), (4, 8, 11), (3, 6, 1), (5, 2, 17)]  # (groups, group size, padded length)


@dataclass
class Rollout:
    batch: dict
    uids: np.ndarray
    log_prob: torch.Tensor
    old_log_prob: torch.Tensor


def make_rollout(groups: int, group_size: int, length: int, seed: int, singleton: bool = False) -> Rollout:
    """Random float64 rollout: binary or partial scores, an all-equal group, ragged padding."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [group_size] * groups + ([1] if singleton else [])
    rows = sum(sizes)
    uids = np.array([f"prompt-{g}" for g, n in enumerate(sizes) for _ in range(n)], dtype=object)
    scores = torch.randint(0, 3, (rows,), generator=gen).double() / 2  # {0, 0.5, 1}: non-binary rewards too
    scores[:group_size] = 1.0  # first group all equal: zero variance
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).double()
    old_log_prob = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    log_prob = old_log_prob + 0.25 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    # A few tokens far off-policy, so the dual clip (ratio > 3) and the log-ratio clamps are exercised too.
    spikes = torch.rand(rows, length, generator=gen) < 0.1
    log_prob = log_prob + spikes * 1.5 * torch.sign(torch.randn(rows, length, generator=gen, dtype=torch.float64))
    batch = build_batch(scores, mask, list(uids), ref_log_prob=old_log_prob - 0.2 * torch.rand(
        rows, length, generator=gen, dtype=torch.float64))
    return Rollout(batch, uids, log_prob, old_log_prob)


def _rollouts():
    for i, shape in enumerate(SHAPES):
        yield pytest.param(make_rollout(*shape, seed=i), id="x".join(map(str, shape)))
    yield pytest.param(make_rollout(3, 4, 6, seed=99, singleton=True), id="with-lone-response")


ROLLOUTS = list(_rollouts())


def candidate(name: str, rollout: Rollout):
    module = REFERENCE_ALGORITHMS[name].module()
    rollout.batch["hparams"] = module_hparams(module)
    return module


def actor_config(module, **global_batch_info) -> verl_config.ActorConfig:
    hp = module_hparams(module)
    config = verl_config.ActorConfig(
        strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
        clip_ratio=hp["clip_low"], clip_ratio_low=hp["clip_low"], clip_ratio_high=hp["clip_high"],
        clip_ratio_c=hp.get("dual_clip", 3.0), loss_agg_mode=module.LOSS_AGG_MODE,
    )
    config.global_batch_info.update(
        {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None}
        | global_batch_info
    )
    return config


# ------------------------------------------------------------------------------------------ advantages

VERL_ADVANTAGES = {
    "grpo": lambda r, m, uids: core_algos.compute_grpo_outcome_advantage(r, m, uids, norm_adv_by_std_in_grpo=True),
    "dr_grpo": lambda r, m, uids: core_algos.compute_grpo_outcome_advantage(r, m, uids, norm_adv_by_std_in_grpo=False),
    "rloo": lambda r, m, uids: core_algos.compute_rloo_outcome_advantage(r, m, uids),
    "reinforce_pp_baseline": lambda r, m, uids: core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        r, m, uids),
}
# DAPO clip-higher, GSPO, GMPO and CISPO change the loss only; their advantages are GRPO's.
for _name in ("dapo_clip_higher", "gspo", "gmpo", "cispo"):
    VERL_ADVANTAGES[_name] = VERL_ADVANTAGES["grpo"]


def test_every_reference_algorithm_has_a_verl_counterpart():
    assert set(VERL_ADVANTAGES) == set(REFERENCE_ALGORITHMS)
    assert set(VERL_LOSSES) == set(REFERENCE_ALGORITHMS)


@pytest.mark.parametrize("rollout", ROLLOUTS)
@pytest.mark.parametrize("name", sorted(REFERENCE_ALGORITHMS))
def test_advantages_match_verl(name, rollout):
    module = candidate(name, rollout)
    batch = rollout.batch
    ours_adv, _ = run_advantages(module, batch)
    verl_adv, _ = VERL_ADVANTAGES[name](batch["token_level_rewards"].clone(), batch["response_mask"], rollout.uids)
    torch.testing.assert_close(ours_adv, verl_adv.double(), **TOL)


def test_grpo_lone_response_keeps_its_raw_score_like_verl():
    # VERL quirk: a prompt with a single sample gets mean 0 and std 1, so A = s / (1 + eps), not 0.
    rollout = make_rollout(1, 4, 3, seed=5, singleton=True)
    module = candidate("grpo", rollout)
    adv, _ = run_advantages(module, rollout.batch)
    lone = rollout.batch["scores"][-1]
    assert adv[-1, 0].item() == pytest.approx(lone.item() / (1 + 1e-6))


# ------------------------------------------------------------------------------------------- losses

VERL_LOSSES = {
    "grpo": "vanilla", "dr_grpo": "vanilla", "dapo_clip_higher": "vanilla", "rloo": "vanilla",
    "reinforce_pp_baseline": "vanilla", "gspo": "gspo", "gmpo": "geo_mean", "cispo": "cispo",
}
GLOBAL_INFOS = [
    pytest.param({}, id="local"),
    pytest.param({"dp_size": 2, "batch_num_tokens": 57.0, "global_batch_size": 13.0}, id="dp2-global"),
    pytest.param({"loss_scale_factor": 40.0, "global_batch_size": 9.0, "batch_num_tokens": 31.0}, id="scale40"),
]


def loss_and_grad(fn, log_prob):
    log_prob = log_prob.clone().requires_grad_(True)
    loss, metrics = fn(log_prob)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("info", GLOBAL_INFOS)
@pytest.mark.parametrize("rollout", ROLLOUTS)
@pytest.mark.parametrize("name", sorted(REFERENCE_ALGORITHMS))
def test_policy_loss_and_gradient_match_verl(name, rollout, info):
    if name == "gmpo" and info:
        pytest.skip("VERL's geo_mean ignores the global-batch normalizer; see test_gmpo_verl_quirk_*")
    module = candidate(name, rollout)
    batch, mask = rollout.batch, rollout.batch["response_mask"]
    advantages, _ = run_advantages(module, batch)
    config = actor_config(module, **info)
    global_kwargs = {
        "global_num_tokens": info.get("batch_num_tokens"), "global_batch_size": info.get("global_batch_size"),
        "dp_size": info.get("dp_size", 1), "loss_scale_factor": info.get("loss_scale_factor"),
    }

    def ours_fn(log_prob):
        loss_mat, metrics = run_policy_loss(module, log_prob, rollout.old_log_prob, advantages, mask, batch)
        return aggregate_loss(loss_mat, mask, module.LOSS_AGG_MODE, **global_kwargs), metrics

    def verl_fn(log_prob):
        return core_algos.get_policy_loss_fn(VERL_LOSSES[name])(
            old_log_prob=rollout.old_log_prob, log_prob=log_prob, advantages=advantages,
            response_mask=mask.bool(), loss_agg_mode=module.LOSS_AGG_MODE, config=config, rollout_is_weights=None)

    ours_loss, ours_grad, ours_metrics = loss_and_grad(ours_fn, rollout.log_prob)
    verl_loss, verl_grad, verl_metrics = loss_and_grad(verl_fn, rollout.log_prob)
    torch.testing.assert_close(ours_loss, verl_loss, **TOL)
    torch.testing.assert_close(ours_grad, verl_grad, **TOL)
    assert ours_metrics["clip_frac"] == pytest.approx(verl_metrics["actor/pg_clipfrac"], abs=1e-6)
    assert ours_metrics["ppo_kl"] == pytest.approx(verl_metrics["actor/ppo_kl"], abs=1e-6)
    if "clip_frac_lower" in ours_metrics:
        assert ours_metrics["clip_frac_lower"] == pytest.approx(verl_metrics["actor/pg_clipfrac_lower"], abs=1e-6)


def test_clipping_is_exercised_by_the_parity_batches():
    # Guard against a vacuous parity: the random ratios must hit the clip ranges of every clip variant.
    rollout = make_rollout(4, 8, 11, seed=1)
    for name in ("grpo", "dapo_clip_higher", "gspo", "gmpo", "cispo"):
        module = candidate(name, rollout)
        advantages, _ = run_advantages(module, rollout.batch)
        _, metrics = run_policy_loss(module, rollout.log_prob, rollout.old_log_prob, advantages,
                                     rollout.batch["response_mask"], rollout.batch)
        assert 0.0 < metrics["clip_frac"] < 1.0 or name == "gspo", (name, metrics)
        if "clip_frac_lower" in metrics:
            assert metrics["clip_frac_lower"] > 0.0, (name, metrics)


def test_gmpo_verl_quirk_ignores_global_batch_normalizer():
    # VERL's geo_mean returns a plain mean over the micro-batch rows whatever the aggregation settings, so
    # its gradient scale depends on how a mini-batch is split into micro-batches. Ours aggregates per
    # sequence with the global normalizer like every other loss; the two agree only for a local batch.
    rollout = make_rollout(4, 8, 11, seed=2)
    module = candidate("gmpo", rollout)
    mask = rollout.batch["response_mask"]
    advantages, _ = run_advantages(module, rollout.batch)
    config = actor_config(module, global_batch_size=64.0)
    verl_loss, _ = core_algos.get_policy_loss_fn("geo_mean")(
        old_log_prob=rollout.old_log_prob, log_prob=rollout.log_prob, advantages=advantages,
        response_mask=mask.bool(), loss_agg_mode=module.LOSS_AGG_MODE, config=config)
    loss_mat, _ = run_policy_loss(module, rollout.log_prob, rollout.old_log_prob, advantages, mask, rollout.batch)
    ours_loss = aggregate_loss(loss_mat, mask, module.LOSS_AGG_MODE, global_batch_size=64.0)
    assert ours_loss.item() == pytest.approx(verl_loss.item() * mask.shape[0] / 64.0, rel=1e-6)


# --------------------------------------------------------------------------------------- aggregation

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("info", GLOBAL_INFOS + [pytest.param({"loss_scale_factor": 7.0}, id="scale7-local")])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregation_matches_verl_agg_loss(mode, info, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, length = 6 + seed, 9
    loss_mat = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    mask = (torch.rand(rows, length, generator=gen) < 0.7).double()
    mask[1] = 0.0  # a fully padded row is excluded from the sequence count
    expected = core_algos.agg_loss(loss_mat, mask, mode, **info)
    got = aggregate_loss(
        loss_mat, mask, mode, global_num_tokens=info.get("batch_num_tokens"),
        global_batch_size=info.get("global_batch_size"), dp_size=info.get("dp_size", 1),
        loss_scale_factor=info.get("loss_scale_factor"),
    )
    torch.testing.assert_close(got, expected, **TOL)


def test_seq_mean_token_sum_norm_default_horizon_is_padded_length_like_verl():
    # VERL quirk: without loss_scale_factor Dr.GRPO's horizon is this micro-batch's padded length, so the
    # loss scale changes with the longest response; protocols must pass a constant.
    mask = torch.ones(2, 5, dtype=torch.float64)
    loss_mat = torch.ones(2, 5, dtype=torch.float64)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm").item() == pytest.approx(1.0)
    wider = torch.cat([mask, torch.zeros(2, 5, dtype=torch.float64)], dim=1)
    assert aggregate_loss(torch.ones(2, 10, dtype=torch.float64), wider, "seq-mean-token-sum-norm").item() == \
        pytest.approx(0.5)


# -------------------------------------------------------------------------------------- KL estimators

@pytest.mark.parametrize("estimator", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+",
                                       "low_var_kl+", "abs+"])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])  # 30: exercises the +-20 and +-10 clamps of k3
def test_kl_estimators_match_verl(estimator, scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    ref = -torch.rand(5, 7, generator=gen, dtype=torch.float64) * 2
    log_prob = ref + scale * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    weights = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    ours_value, ours_grad, _ = loss_and_grad(
        lambda lp: ((ours.kl_penalty(lp, ref, estimator) * weights).sum(), {}), log_prob)
    verl_value, verl_grad, _ = loss_and_grad(
        lambda lp: ((core_algos.kl_penalty(lp, ref, estimator) * weights).sum(), {}), log_prob)
    torch.testing.assert_close(ours_value, verl_value, **TOL)
    torch.testing.assert_close(ours_grad, verl_grad, **TOL)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "k3+"])
def test_kl_penalty_in_loss_matches_verl_kl_loss_term(estimator):
    # VERL adds kl_loss_coef * agg_loss(kl_penalty) beside the policy loss; ours adds the penalty per token.
    rollout = make_rollout(4, 8, 11, seed=3)
    module = candidate("grpo", rollout)
    rollout.batch["hparams"].update(kl_coef=0.05, kl_estimator=estimator)
    batch, mask = rollout.batch, rollout.batch["response_mask"]
    advantages, _ = run_advantages(module, batch)
    with_kl, metrics = run_policy_loss(module, rollout.log_prob, rollout.old_log_prob, advantages, mask, batch)
    config = actor_config(module)
    pg_loss, _ = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=rollout.old_log_prob, log_prob=rollout.log_prob, advantages=advantages,
        response_mask=mask.bool(), loss_agg_mode="token-mean", config=config)
    kl = core_algos.kl_penalty(rollout.log_prob, batch["ref_log_prob"], estimator)
    expected = pg_loss + 0.05 * core_algos.agg_loss(kl, mask, "token-mean")
    torch.testing.assert_close(aggregate_loss(with_kl, mask, "token-mean"), expected, **TOL)
    assert metrics["kl"] > 0 or estimator == "k1"
