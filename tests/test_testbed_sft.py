"""Base-checkpoint SFT: noisy data, schedule, determinism, checkpoint integrity."""

import json

import pytest
import torch

from poise.testbed.model import weights_sha256
from poise.testbed.sft import (
    RECIPE_FILE,
    SFTConfig,
    build_base_checkpoint,
    load_base,
    lr_at,
    sft_batch,
)
from poise.testbed.tasks import eval_prompt_set, eval_set_fingerprint, grade, make_problem, parse_prompt

TINY = SFTConfig(batch_size=8, warmup_steps=1, threads=1)


pytestmark = pytest.mark.usefixtures("one_thread")



def test_sft_data_has_the_intended_share_of_wrong_and_broken_solutions():
    config = SFTConfig()
    outcomes = {"correct": 0, "wrong": 0, "broken": 0}
    eval_prompts = eval_prompt_set()
    for step in range(40):
        prompts, responses = sft_batch(step, 0, config)
        assert not any(p in eval_prompts for p in prompts)
        for prompt, response in zip(prompts, responses, strict=True):
            g = grade(make_problem(*parse_prompt(prompt)), response, ended_with_eos=True)
            outcomes["correct" if g.correct else "wrong" if g.format_valid else "broken"] += 1
    n = sum(outcomes.values())  # 2560 examples: binomial SD of a share is below 0.01
    assert abs(outcomes["wrong"] / n - config.wrong_step_rate) < 0.04
    assert abs(outcomes["broken"] / n - config.broken_format_rate) < 0.03
    assert sft_batch(5, 0, config) == sft_batch(5, 0, config) != sft_batch(5, 1, config)


def test_lr_warms_up_then_decays_by_cosine_to_the_floor():
    config = SFTConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(step, 100, config) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)


def test_tiny_sft_build_is_byte_identical_for_a_seed(tmp_path):
    a = build_base_checkpoint(tmp_path / "a", seed=0, steps=3, config=TINY)
    b = build_base_checkpoint(tmp_path / "b", seed=0, steps=3, config=TINY)
    c = build_base_checkpoint(tmp_path / "c", seed=1, steps=3, config=TINY)
    assert weights_sha256(a) == weights_sha256(b) != weights_sha256(c)
    recipe = json.loads((a / RECIPE_FILE).read_text())
    assert recipe["weights_sha256"] == weights_sha256(a)
    assert recipe["excluded_eval_prompts_sha256"] == eval_set_fingerprint()
    assert recipe["seed"] == 0 and recipe["steps"] == 3 and recipe["sft"]["batch_size"] == 8
    assert len(recipe["loss_every_10_steps"]) == 1 and recipe["final_loss"] > 0
    assert not (tmp_path / "a.partial").exists()


def test_load_base_returns_the_trained_weights_and_rejects_tampering(tmp_path):
    path = build_base_checkpoint(tmp_path / "base", seed=0, steps=2, config=TINY)
    model = load_base(path)
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rebuilt = load_base(build_base_checkpoint(tmp_path / "again", seed=0, steps=2, config=TINY))
    for a, b in zip(model.parameters(), rebuilt.parameters(), strict=True):
        assert torch.equal(a, b)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="rebuild it"):
        load_base(path)
