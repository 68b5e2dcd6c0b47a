"""The verl plugin (trainer/verl/, docs/verl.md) through verl 0.9.1's own call sites.

Every reference algorithm, served by the plugin as a candidate file, gives through verl's advantage dispatch
(`ray_trainer.compute_advantage`) and the actor's loss entry (`engine_workers.ppo_loss`, the function the FSDP
worker binds) what the testbed trainer computes with `run_advantages` / `run_policy_loss` / `aggregate_loss` on the
same float64 batch. The plugin is also resolved by name inside the processes of a local Ray cluster, the V1 trainer
extension hands the estimator the testbed's batch keys, malformed candidates are refused, and the reward function
grades with the shared grader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from poise.algorithm import (
    aggregate_loss,
    build_batch,
    load_candidate,
    module_hparams,
    run_advantages,
    run_policy_loss,
)
from poise.algorithms import REFERENCE_ALGORITHMS

plugin = pytest.importorskip("trainer.verl.plugin")  # imports verl; registers `poise` in this process
engine_workers = pytest.importorskip("verl.workers.engine_workers")
from omegaconf import OmegaConf  # noqa: E402 - verl's dependency: only once verl is known to be installed
from test_verl_parity import GLOBAL_INFOS, ROLLOUTS, TOL, Rollout, make_rollout  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from trainer.verl.batch import advantage_batch, reward_columns, step_fields  # noqa: E402
from trainer.verl.reward import compute_score  # noqa: E402

pytestmark = pytest.mark.verl
REPO = Path(__file__).resolve().parents[1]
ALGORITHMS_DIR = REPO / "poise" / "algorithms"


def candidate_file(name: str) -> Path:
    return ALGORITHMS_DIR / f"{REFERENCE_ALGORITHMS[name].module_name}.py"


@pytest.fixture
def serve(monkeypatch):
    """Point the plugin at a candidate file (and hparam overrides), as POISE_CANDIDATE_MODULE does in a verl job."""

    def serve(path: Path, overrides: dict | None = None) -> types.ModuleType:
        monkeypatch.setenv(plugin.CANDIDATE_ENV, str(path))
        if overrides:
            monkeypatch.setenv(plugin.HPARAMS_ENV, json.dumps(overrides))
        else:
            monkeypatch.delenv(plugin.HPARAMS_ENV, raising=False)
        module, _ = plugin.candidate()
        return module

    yield serve
    plugin.clear_step_fields()


def candidate_in_testbed(name: str, rollout: Rollout, overrides: dict | None = None) -> types.ModuleType:
    """The testbed's side: the same source loaded as the testbed child loads it, hparams in the batch."""
    module = load_candidate(candidate_file(name).read_text(), name)
    rollout.batch["hparams"] = module_hparams(module, overrides)
    return module


# ------------------------------------------------------------------------------- verl's own call sites


def verl_advantages(rollout: Rollout) -> torch.Tensor:
    """Advantages through verl's estimator dispatch, as the V1 trainer calls it for any estimator but "grpo"."""
    ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")  # needs cachetools (pyproject's test extra)
    batch = rollout.batch
    data = DataProto.from_dict(
        tensors={"token_level_rewards": batch["token_level_rewards"].clone(),
                 "response_mask": batch["response_mask"].long()},  # int64, as TransferQueue delivers it
        non_tensors={"uid": rollout.uids})
    config = OmegaConf.create({"adv_estimator": plugin.ADV_ESTIMATOR, "gamma": 1.0, "lam": 1.0,
                               "norm_adv_by_std_in_grpo": True, "use_kl_in_reward": False})
    out = ray_trainer.compute_advantage(data, adv_estimator=plugin.ADV_ESTIMATOR, num_repeat=4, config=config)
    return out.batch["advantages"]


def nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def actor_micro_batch(rollout: Rollout, advantages: torch.Tensor, info: dict, with_ref: bool = True):
    """The micro-batch an FSDP actor worker hands `ppo_loss`: jagged prompt/response fields (no padding) and global
    batch info; `log_probs_of(lp)` lays (B, L) response log-probs out as the model's flat per-sequence output."""
    mask = rollout.batch["response_mask"]
    lengths = mask.sum(-1).long().tolist()
    prompt_lengths = [1 + i % 3 for i in range(len(lengths))]

    def responses(values: torch.Tensor) -> torch.Tensor:
        return nested([values[i, :n] for i, n in enumerate(lengths)])

    fields = {"prompts": nested([torch.ones(p, dtype=torch.long) for p in prompt_lengths]),
              "responses": nested([torch.ones(n, dtype=torch.long) for n in lengths]),
              "response_mask": responses(mask.long()), "old_log_probs": responses(rollout.old_log_prob),
              "advantages": responses(advantages)}
    if with_ref:
        fields["ref_log_prob"] = responses(rollout.batch["ref_log_prob"])
    data = tu.get_tensordict(fields, {"dp_size": info.get("dp_size", 1),
                                      "batch_num_tokens": info.get("batch_num_tokens"),
                                      "global_batch_size": info.get("global_batch_size")})

    def log_probs_of(log_prob: torch.Tensor) -> torch.Tensor:
        # Position p - 1 + t of a sequence predicts response token t (the model's output is shifted by one).
        pieces = []
        for i, (p, n) in enumerate(zip(prompt_lengths, lengths, strict=True)):
            pieces += [log_prob.new_zeros(p - 1), log_prob[i, :n], log_prob.new_zeros(1)]
        values = torch.cat(pieces)
        offsets = torch.tensor([0, *np.cumsum([p + n for p, n in zip(prompt_lengths, lengths, strict=True)])])
        return torch.nested.nested_tensor_from_jagged(values, offsets)

    return data, log_probs_of


def verl_loss(module: types.ModuleType, rollout: Rollout, advantages: torch.Tensor, info: dict,
              with_ref: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss, its gradient w.r.t. the (B, L) log-probs, metrics) through the actor's loss entry point."""
    data, log_probs_of = actor_micro_batch(rollout, advantages, info, with_ref)
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                         loss_agg_mode=module.LOSS_AGG_MODE, loss_scale_factor=info.get("loss_scale_factor"),
                         policy_loss={"loss_mode": plugin.POLICY_LOSS})
    log_prob = rollout.log_prob.clone().requires_grad_(True)
    loss, metrics = engine_workers.ppo_loss(config=config, model_output={"log_probs": log_probs_of(log_prob)},
                                            data=data)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, {key: metric.aggregate() if hasattr(metric, "aggregate") else metric
                                 for key, metric in metrics.items()}


def loss_in_testbed(module: types.ModuleType, rollout: Rollout, advantages: torch.Tensor, info: dict):
    batch, mask = rollout.batch, rollout.batch["response_mask"]
    log_prob = rollout.log_prob.clone().requires_grad_(True)
    loss_mat, metrics = run_policy_loss(module, log_prob, rollout.old_log_prob, advantages, mask, batch)
    loss = aggregate_loss(loss_mat, mask, module.LOSS_AGG_MODE, global_num_tokens=info.get("batch_num_tokens"),
                          global_batch_size=info.get("global_batch_size"), dp_size=info.get("dp_size", 1),
                          loss_scale_factor=info.get("loss_scale_factor"))
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


# ------------------------------------------------------------------------------------------- parity


def test_the_worker_binds_the_wrapped_loss_entry_point():
    # engine_workers binds `ppo_loss` at import; the plugin, imported first, wrapped it so ref log-probs reach us.
    assert getattr(engine_workers.ppo_loss, "poise_wrapped", False)
    from verl.trainer.ppo import core_algos

    assert core_algos.get_adv_estimator_fn(plugin.ADV_ESTIMATOR) is plugin.poise_advantages
    assert core_algos.get_policy_loss_fn(plugin.POLICY_LOSS) is plugin.poise_policy_loss


@pytest.mark.parametrize("rollout", ROLLOUTS)
@pytest.mark.parametrize("name", sorted(REFERENCE_ALGORITHMS))
def test_advantages_through_verl_dispatch_equal_the_testbed(name, rollout, serve):
    serve(candidate_file(name))
    module = candidate_in_testbed(name, rollout)
    expected, _ = run_advantages(module, rollout.batch)
    got = verl_advantages(rollout)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("info", GLOBAL_INFOS)
@pytest.mark.parametrize("rollout", ROLLOUTS)
@pytest.mark.parametrize("name", sorted(REFERENCE_ALGORITHMS))
def test_policy_loss_through_the_actor_loss_entry_equals_the_testbed(name, rollout, info, serve):
    served = serve(candidate_file(name))
    module = candidate_in_testbed(name, rollout)
    advantages, _ = run_advantages(module, rollout.batch)
    expected_loss, expected_grad, expected_metrics = loss_in_testbed(module, rollout, advantages, info)
    loss, grad, metrics = verl_loss(served, rollout, advantages, info)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(expected_metrics["clip_frac"], abs=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(expected_metrics["ppo_kl"], abs=1e-6)


@pytest.mark.parametrize("name", ["gmpo", "gspo"])
def test_per_sequence_means_divide_by_the_exact_token_count_like_verl(name, serve):
    # verl's production masks are bool, so its per-sequence means divide by the integer token count (its + 1e-8
    # is lost); the testbed and the plugin do the same, to rounding, not to a relative 1e-8.
    from verl.trainer.ppo import core_algos

    rollout = make_rollout(4, 8, 11, seed=7)
    served = serve(candidate_file(name))
    module = candidate_in_testbed(name, rollout)
    mask = rollout.batch["response_mask"]
    advantages, _ = run_advantages(module, rollout.batch)
    hp = module_hparams(module)
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio=hp["clip_low"],
                         clip_ratio_low=hp["clip_low"], clip_ratio_high=hp["clip_high"],
                         loss_agg_mode=module.LOSS_AGG_MODE)
    builtin, _ = core_algos.get_policy_loss_fn({"gmpo": "geo_mean", "gspo": "gspo"}[name])(
        old_log_prob=rollout.old_log_prob, log_prob=rollout.log_prob, advantages=advantages,
        response_mask=mask.bool(), loss_agg_mode=module.LOSS_AGG_MODE, config=config)
    ours, _, _ = verl_loss(served, rollout, advantages, {})
    local, _, _ = loss_in_testbed(module, rollout, advantages, {})
    torch.testing.assert_close(ours, builtin, rtol=1e-13, atol=0)
    torch.testing.assert_close(local, builtin, rtol=1e-13, atol=0)


def test_kl_penalty_reads_the_reference_log_probs_of_the_micro_batch(serve):
    overrides = {"kl_coef": 0.05, "kl_estimator": "k3"}
    rollout = make_rollout(4, 8, 11, seed=3)
    served = serve(candidate_file("grpo"), overrides)
    module = candidate_in_testbed("grpo", rollout, overrides)
    advantages, _ = run_advantages(module, rollout.batch)
    info = {"dp_size": 2, "batch_num_tokens": 57.0, "global_batch_size": 13.0}
    expected_loss, expected_grad, expected_metrics = loss_in_testbed(module, rollout, advantages, info)
    loss, grad, metrics = verl_loss(served, rollout, advantages, info)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)
    assert metrics["actor/poise/kl"] == pytest.approx(expected_metrics["kl"], abs=1e-9) and metrics["actor/poise/kl"]
    # Without the reference policy in the micro-batch the candidate's KL cannot be computed: said, not guessed.
    with pytest.raises(ValueError, match="no ref_log_prob: the protocol must keep a reference model"):
        verl_loss(served, rollout, advantages, info, with_ref=False)


# ----------------------------------------------------------------------------- the POISE batch in verl

PROBE = '''
"""A candidate that reads every batch key the testbed gives compute_advantages."""
from poise.algorithms import common

LOSS_AGG_MODE = "token-mean"
HPARAMS = {"clip_low": 0.2, "clip_high": 0.2, "entropy_weight": 0.5}


def compute_advantages(batch):
    mean = batch["group_mean_score"]
    scale = batch["group_size"] / batch["response_length"].clamp(min=1)
    centered = (batch["scores"] - mean) * batch["format_valid"] * scale
    token = common.token_level(centered, batch["response_mask"])
    token = token + batch["hparams"]["entropy_weight"] * batch["entropy"] * batch["response_mask"]
    token = token - 0.1 * (batch["ref_log_prob"] * batch["response_mask"])
    return token, {"mean_group_index": batch["group_index"].float().mean().item()}


def policy_loss(log_prob, old_log_prob, advantages, response_mask, batch):
    return common.ppo_clip_surrogate(log_prob, old_log_prob, advantages, response_mask, 0.2, 0.2)
'''


def probe_rollout(seed: int = 11) -> tuple[Rollout, list[dict], torch.Tensor]:
    rollout = make_rollout(3, 4, 6, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows, length = rollout.batch["response_mask"].shape
    format_valid = (torch.rand(rows, generator=gen) < 0.7).double()
    extras = [{"score": float(s), "acc": float(s), "format_valid": bool(f), "pred": "7", "grade_error": ""}
              for s, f in zip(rollout.batch["scores"], format_valid, strict=True)]
    entropy = torch.rand(rows, length, generator=gen, dtype=torch.float64) * rollout.batch["response_mask"]
    rollout.batch = build_batch(rollout.batch["scores"], rollout.batch["response_mask"], list(rollout.uids),
                                format_valid=format_valid, entropy=entropy,
                                ref_log_prob=rollout.batch["ref_log_prob"])
    return rollout, extras, entropy


def test_reward_extras_become_float_columns_and_other_values_stay_out():
    columns = reward_columns([{"format_valid": True, "acc": 1.0, "pred": "3"},
                              {"format_valid": False, "acc": 0.0, "pred": ""}], rows=2)
    assert set(columns) == {"format_valid", "acc"}
    assert columns["format_valid"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="reward extras cover 1 responses but the batch has 2"):
        reward_columns([{"acc": 1.0}], rows=2)


def test_advantage_batch_has_the_testbed_keys_and_values():
    rollout, extras, entropy = probe_rollout()
    batch = advantage_batch(rollout.batch["token_level_rewards"], rollout.batch["response_mask"].long(),
                            rollout.uids, reward_extra_info=extras, entropy=entropy,
                            ref_log_prob=rollout.batch["ref_log_prob"], hparams={"a": 1})
    expected = dict(rollout.batch, hparams={"a": 1})
    assert set(batch) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(batch[key], value, rtol=0, atol=0, msg=key)


class BatchMeta(types.SimpleNamespace):
    """What the V1 trainer passes between stages (TransferQueue's KVBatchMeta): row keys and a partition."""

    def __len__(self) -> int:
        return len(self.keys)


def test_v1_trainer_hands_the_estimator_extras_entropy_and_ref_log_probs(serve, tmp_path, monkeypatch):
    """PoiseTrainerSync._compute_advantage against a stand-in TransferQueue (the real one needs its Ray actors)."""
    tq = pytest.importorskip("transfer_queue")  # the V1 trainer's dependency (verl's `verl-core` extra)
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

    from trainer.verl.trainer import PoiseTrainerSync

    assert get_trainer_cls("sync") is PoiseTrainerSync
    source = tmp_path / "probe.py"
    source.write_text(PROBE)
    served = serve(source)
    rollout, extras, entropy = probe_rollout()
    mask = rollout.batch["response_mask"]
    lengths = mask.sum(-1).long().tolist()

    def jagged(values):
        return nested([values[i, :n] for i, n in enumerate(lengths)])

    stored = tu.get_tensordict({
        "uid": list(rollout.uids), "response_mask": jagged(mask.long()),
        "rm_scores": jagged(rollout.batch["token_level_rewards"]), "old_log_probs": jagged(rollout.old_log_prob),
        "ref_log_prob": jagged(rollout.batch["ref_log_prob"]), "entropy": jagged(entropy),
        "extra_fields": [{"reward_extra_info": info, "num_turns": 2} for info in extras]})
    written = {}

    def kv_batch_get(keys, partition_id, select_fields=None):
        assert partition_id == "train" and list(keys) == meta.keys
        return stored.select(*[f for f in select_fields if f in stored.keys()])

    def kv_batch_put(keys, partition_id, fields):
        written.update(fields.items())
        return meta

    monkeypatch.setattr(tq, "kv_batch_get", kv_batch_get)
    monkeypatch.setattr(tq, "kv_batch_put", kv_batch_put)
    meta = BatchMeta(keys=[f"{u}_0_{i}" for i, u in enumerate(rollout.uids)], partition_id="train")
    trainer = object.__new__(PoiseTrainerSync)
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": plugin.ADV_ESTIMATOR, "use_kl_in_reward": False, "gamma": 1.0, "lam": 1.0,
                      "norm_adv_by_std_in_grpo": True},
        "actor_rollout_ref": {"rollout": {"n": 4}}})
    metrics: dict = {}
    trainer._compute_advantage(meta, metrics)

    rollout.batch["hparams"] = module_hparams(served)
    expected, expected_metrics = run_advantages(load_candidate(PROBE, "probe"), rollout.batch)
    got = tu.get_tensordict({"advantages": written["advantages"]}).to_padded_tensor()["advantages"]
    torch.testing.assert_close(got, expected, **TOL)
    assert metrics["poise/adv/mean_group_index"] == pytest.approx(expected_metrics["mean_group_index"])
    assert plugin.ADVANTAGE_METRICS == {} and plugin._STEP_FIELDS == {}  # nothing leaks into the next step
    fields = step_fields(stored)
    assert [info["format_valid"] for info in fields["reward_extra_info"]] == [e["format_valid"] for e in extras]


# ------------------------------------------------------------------------------------------- refusals

MALFORMED = {
    "no_policy_loss.py": ("LOSS_AGG_MODE = 'token-mean'\nHPARAMS = {}\ndef compute_advantages(batch):\n"
                          "    return batch['scores']\n", "must define a function `policy_loss`"),
    "bad_mode.py": ("LOSS_AGG_MODE = 'sum-of-everything'\nHPARAMS = {}\ndef compute_advantages(batch):\n"
                    "    return batch['scores']\ndef policy_loss(log_prob, old_log_prob, advantages, response_mask, "
                    "batch):\n    return -advantages * log_prob\n", "LOSS_AGG_MODE must be one of"),
    "syntax.py": ("def compute_advantages(batch)\n    return 1\n", "does not parse"),
    "raises.py": ("raise RuntimeError('boom')\n", "importing the module raised RuntimeError"),
    "nan.py": ("LOSS_AGG_MODE = 'token-mean'\nHPARAMS = {}\ndef compute_advantages(batch):\n"
               "    return batch['scores'] / 0.0 * 0.0\ndef policy_loss(log_prob, old_log_prob, advantages, "
               "response_mask, batch):\n    return -advantages * log_prob\n", "non-finite values"),
}


@pytest.mark.parametrize("filename", sorted(MALFORMED))
def test_a_malformed_candidate_is_refused_naming_the_file_and_the_problem(filename, tmp_path):
    source, problem = MALFORMED[filename]
    path = tmp_path / filename
    path.write_text(source)
    with pytest.raises(plugin.PluginError) as refused:
        plugin.load_candidate_file(path)
    assert str(path) in str(refused.value) and problem in str(refused.value)


def test_a_missing_candidate_or_bad_overrides_are_refused(tmp_path, monkeypatch):
    with pytest.raises(plugin.PluginError, match=r"POISE_CANDIDATE_MODULE='.*nowhere\.py': no such file"):
        plugin.load_candidate_file(tmp_path / "nowhere.py")
    monkeypatch.delenv(plugin.CANDIDATE_ENV, raising=False)
    with pytest.raises(plugin.PluginError, match="POISE_CANDIDATE_MODULE is not set in this process"):
        plugin.candidate()
    with pytest.raises(plugin.PluginError, match="POISE_CANDIDATE_HPARAMS is not valid JSON"):
        plugin.hparam_overrides("{clip: 1}")
    with pytest.raises(plugin.PluginError, match="must be a JSON object"):
        plugin.hparam_overrides('[1, 2]')


def plugin_env(candidate: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"VERL_USE_EXTERNAL_MODULES": "trainer.verl.plugin", plugin.CANDIDATE_ENV: str(candidate),
            "PYTHONPATH": path}


def test_import_verl_stops_on_a_malformed_candidate(tmp_path):
    # The way verl loads the plugin: `import verl` imports VERL_USE_EXTERNAL_MODULES; a bad candidate stops it there.
    path = tmp_path / "no_policy_loss.py"
    path.write_text(MALFORMED["no_policy_loss.py"][0])
    done = subprocess.run([sys.executable, "-c", "import verl"], env={**os.environ, **plugin_env(path)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "PluginError" in done.stderr and str(path) in done.stderr and "`policy_loss`" in done.stderr


# ---------------------------------------------------------------------------------------- Ray processes


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already running in this process")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": plugin_env(candidate_file("dapo_clip_higher"))})
    # The task below travels by value: the workers need not import this test module (only verl and the plugin).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def _in_a_ray_worker(token_level_rewards, response_mask, uids, log_prob, old_log_prob):
    import verl  # noqa: F401 - verl imports VERL_USE_EXTERNAL_MODULES, the plugin, here
    from verl.trainer.ppo import core_algos

    estimator = core_algos.get_adv_estimator_fn("poise")
    loss_fn = core_algos.get_policy_loss_fn("poise")
    advantages, _ = estimator(token_level_rewards=token_level_rewards, response_mask=response_mask, index=uids)
    loss, _ = loss_fn(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                      response_mask=response_mask.bool(), loss_agg_mode="token-mean")
    return os.getpid(), estimator.__module__, advantages, loss


def test_plugin_is_visible_by_name_in_ray_worker_processes(ray_cluster):
    rollout = make_rollout(2, 4, 5, seed=0)
    remote = ray_cluster.remote(_in_a_ray_worker)
    pid, module_name, advantages, loss = ray_cluster.get(remote.remote(
        rollout.batch["token_level_rewards"], rollout.batch["response_mask"].long(), rollout.uids, rollout.log_prob,
        rollout.old_log_prob), timeout=240)
    assert pid != os.getpid() and module_name == "trainer.verl.plugin"
    module = candidate_in_testbed("dapo_clip_higher", rollout)
    expected, _ = run_advantages(module, rollout.batch)
    torch.testing.assert_close(advantages, expected, **TOL)
    expected_loss, _, _ = loss_in_testbed(module, rollout, expected, {})
    torch.testing.assert_close(loss, expected_loss, **TOL)


# ---------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize(("response", "reference", "score", "format_valid"), [
    (r"So the answer is \boxed{\frac{3}{4}}.", "0.75", 1.0, 1.0),
    (r"Adding up, \boxed{42}", r"The total is \boxed{42}", 1.0, 1.0),
    (r"I think it is \boxed{5}", "6", 0.0, 1.0),
    ("The answer is 6", "6", 0.0, 0.0),                 # right number, no boxed answer: malformed
    (r"\boxed{}", "6", 0.0, 0.0),                       # an empty box is no answer
])
def test_reward_grades_correct_incorrect_and_malformed_answers(response, reference, score, format_valid):
    result = compute_score(data_source="math", solution_str=response, ground_truth=reference, extra_info={})
    assert result["score"] == result["acc"] == score
    assert result["format_valid"] == format_valid
    assert set(result) == {"score", "acc", "format_valid", "pred", "grade_error"}  # one key set for every response
    assert result["grade_error"] == ""


def test_verl_loads_the_reward_function_from_its_config():
    # The reward workers load it with verl's own loader, from the config keys docs/verl.md gives.
    from verl.trainer.ppo.reward import get_custom_reward_fn

    reward_fn = get_custom_reward_fn(OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://trainer.verl.reward", "name": "compute_score", "reward_kwargs": {"timeout_s": 3.0}}}}))
    graded = [reward_fn(data_source="math", solution_str=response, ground_truth="12", extra_info={"index": 0})
              for response in (r"\boxed{12}", r"\boxed{13}", "twelve")]
    assert [(g["score"], g["format_valid"]) for g in graded] == [(1.0, 1.0), (0.0, 1.0), (0.0, 0.0)]


def test_a_loss_agg_mode_other_than_the_candidates_is_warned_about_and_the_candidates_is_used(serve, caplog):
    rollout = make_rollout(2, 4, 5, seed=4)
    served = serve(candidate_file("gspo"))  # seq-mean-token-mean
    module = candidate_in_testbed("gspo", rollout)
    advantages, _ = run_advantages(module, rollout.batch)
    mask = rollout.batch["response_mask"]
    plugin._warn_mode_mismatch.cache_clear()  # warned once per process: make this test's call the first
    with caplog.at_level("WARNING", logger=plugin.__name__):
        loss, _ = plugin.poise_policy_loss(old_log_prob=rollout.old_log_prob, log_prob=rollout.log_prob,
                                           advantages=advantages, response_mask=mask.bool(),
                                           loss_agg_mode="token-mean", config=None)
    assert "set actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean" in caplog.text
    expected, _, _ = loss_in_testbed(served, rollout, advantages, {})
    torch.testing.assert_close(loss, expected, **TOL)
