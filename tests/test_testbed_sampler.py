"""Testbed model and KV-cache sampler: exact agreement with the HF forward pass and `generate`."""

import pytest
import torch
import torch.nn.functional as F

from poise.testbed.model import (
    ModelSpec,
    build_model,
    load_model,
    position_ids_from_mask,
    response_log_probs,
    response_log_probs_by_length,
    save_model,
)
from poise.testbed.sampler import hf_generate_baseline, sample
from poise.testbed.tasks import make_problem
from poise.testbed.tokenizer import EOS_ID, PAD_ID, encode_prompts

# Ragged prompts: 1 to 10 operations, so left padding ranges from 0 to 18 columns.
PROMPTS = [make_problem(s, [("+", 1)] * n).prompt for s, n in [(5, 1), (17, 10), (2, 4), (60, 7), (8, 2), (33, 9)]]


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def model():
    # A larger init than the default makes the random model's distributions peaked, so rows end
    # at different lengths (exercising EOS handling and batch compaction) and greedy has margins.
    return build_model(ModelSpec(init_std=0.3), seed=0).eval()


@pytest.fixture(scope="module")
def prompts():
    return encode_prompts(PROMPTS * 4)  # (24, P)


def full_forward_log_probs(model, prompt_ids, prompt_mask, out, temperature):
    """Log-probs and entropies of the sampled responses recomputed by one plain HF forward."""
    input_ids = torch.cat([prompt_ids, out.response_ids], 1)
    attention_mask = torch.cat([prompt_mask, out.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).logits
    P = prompt_ids.shape[1]
    logits = logits[:, P - 1:-1] / (temperature if temperature > 0 else 1.0)   # (B, L, V)
    log_dist = F.log_softmax(logits, -1)
    mask = out.response_mask.float()
    log_probs = log_dist.gather(-1, out.response_ids[..., None]).squeeze(-1) * mask
    entropy = -(log_dist.exp() * log_dist).sum(-1) * mask
    return log_probs, entropy


def test_default_model_matches_the_probe_size():
    model = build_model()
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.1e6
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sampler_log_probs_equal_a_full_forward_over_ragged_prompts(model, prompts, temperature):
    prompt_ids, prompt_mask = prompts
    out = sample(model, prompt_ids, prompt_mask, max_new_tokens=48, temperature=temperature, seed=3)
    if temperature > 0:  # the test only means something if rows stop at different lengths
        assert out.ended_with_eos.any() and len(set(out.response_lengths.tolist())) > 3
    log_probs, entropy = full_forward_log_probs(model, prompt_ids, prompt_mask, out, temperature)
    # float32, and the cached path sums attention in another order than the full forward: a fresh-clone CI run
    # saw 1.03e-4 on a log-prob of -1.3. A wrong position, mask or cache entry moves log-probs by >1e-2.
    torch.testing.assert_close(out.log_probs, log_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.entropy, entropy, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 8, 24])
def test_log_probs_by_length_equal_one_padded_forward_in_values_and_gradients(model, prompts, rows_per_chunk):
    prompt_ids, prompt_mask = prompts
    out = sample(model, prompt_ids, prompt_mask, max_new_tokens=48, temperature=1.0, seed=5)
    lengths = out.response_lengths
    assert lengths.min() < lengths.max() // 2  # chunks really are cut shorter than the batch
    gradients = []
    for score in (response_log_probs, response_log_probs_by_length):
        kwargs = {"rows_per_chunk": rows_per_chunk} if score is response_log_probs_by_length else {}
        model.zero_grad()
        log_probs, entropy = score(model, prompt_ids, prompt_mask, out.response_ids, out.response_mask, **kwargs)
        # A loss that weighs rows differently, so a row landing in another row's place would show.
        weights = torch.arange(1, len(log_probs) + 1, dtype=torch.float32)[:, None]
        ((log_probs + 0.1 * entropy) * weights).sum().backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
        if score is response_log_probs:
            expected = (log_probs.detach(), entropy.detach())
        else:
            torch.testing.assert_close(log_probs.detach(), expected[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy.detach(), expected[1], atol=1e-5, rtol=1e-5)
            assert (log_probs[out.response_mask == 0] == 0).all()
    model.zero_grad()
    for plain, chunked in zip(*gradients, strict=True):
        # Summation order differs (gradients here reach ~1e3): float32 rounding is ~1e-6 of the largest entry;
        # a row's gradient lost or counted twice moves entries by a whole row's share.
        torch.testing.assert_close(chunked, plain, atol=1e-5 * float(plain.abs().max()), rtol=1e-4)


def test_response_layout_eos_in_mask_then_padding(model, prompts):
    out = sample(model, *prompts, max_new_tokens=48, temperature=1.0, seed=1)
    L = out.response_ids.shape[1]
    for ids, mask, length, eos in zip(out.response_ids, out.response_mask, out.response_lengths,
                                      out.ended_with_eos, strict=True):
        n = int(length)
        assert mask.tolist() == [1] * n + [0] * (L - n)
        assert ids[n:].eq(PAD_ID).all()
        assert bool(eos) == (ids[n - 1].item() == EOS_ID)
        assert eos or n == 48  # a row without EOS ran out of tokens
        assert not ids[:n - 1].eq(EOS_ID).any()
    assert out.log_probs[out.response_mask == 0].eq(0).all()
    assert len(out.texts()) == len(out.response_ids)


def test_sampler_outputs_can_enter_an_autograd_loss(model, prompts):
    out = sample(model, *prompts, max_new_tokens=8, seed=0)
    weight = torch.ones((), requires_grad=True)
    (weight * out.log_probs * out.response_mask).sum().backward()  # inference tensors would raise here
    assert weight.grad is not None


def test_greedy_equals_hf_generate_token_for_token(model, prompts):
    prompt_ids, prompt_mask = prompts
    ours = sample(model, prompt_ids, prompt_mask, max_new_tokens=40, temperature=0.0).response_ids
    theirs = hf_generate_baseline(model, prompt_ids, prompt_mask, max_new_tokens=40, temperature=0.0)
    assert torch.equal(ours, theirs[:, :ours.shape[1]])
    assert theirs[:, ours.shape[1]:].eq(PAD_ID).all()


def test_hf_generate_baseline_samples_a_batch_like_the_sampler(model, prompts):
    theirs = hf_generate_baseline(model, *prompts, max_new_tokens=24, temperature=1.0, seed=0)
    assert theirs.shape[0] == prompts[0].shape[0] and theirs.shape[1] <= 24
    assert torch.equal(theirs, hf_generate_baseline(model, *prompts, max_new_tokens=24, temperature=1.0, seed=0))


def test_sampling_is_deterministic_for_a_seed(model, prompts):
    a = sample(model, *prompts, max_new_tokens=32, temperature=1.0, seed=7)
    b = sample(model, *prompts, max_new_tokens=32, temperature=1.0, seed=7)
    c = sample(model, *prompts, max_new_tokens=32, temperature=1.0, seed=8)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_a_rows_tokens_depend_only_on_its_own_distribution_and_uniforms(model, prompts):
    # Rows 0-5 keep their prompts; the others change, so other rows finish (and are dropped from the
    # batch) at other steps. With one uniform per (step, row) the kept rows sample exactly the same.
    prompt_ids, prompt_mask = prompts
    others = encode_prompts(PROMPTS[:6] + [make_problem(s, [("-", 2)] * n).prompt
                                           for s, n in [(9, 3), (40, 8), (1, 1)] * 6])
    a = sample(model, prompt_ids, prompt_mask, max_new_tokens=40, temperature=1.0, seed=3)
    b = sample(model, *others, max_new_tokens=40, temperature=1.0, seed=3)
    assert a.response_lengths[6:].tolist() != b.response_lengths[6:].tolist()
    for row in range(6):
        n = int(a.response_lengths[row])
        assert torch.equal(a.response_ids[row, :n], b.response_ids[row, :n])


def test_tokens_with_zero_probability_are_never_sampled(model, prompts):
    # At T = 0.05 most of the softmax underflows to exactly 0; inverse CDF must land on a positive mass.
    out = sample(model, *prompts, max_new_tokens=24, temperature=0.05, seed=1)
    assert torch.isfinite(out.log_probs).all()
    assert (out.log_probs[out.response_mask.bool()] > -50).all()


def test_sampled_first_tokens_follow_the_tempered_distribution():
    # Many rows of one prompt: a tiny model keeps this cheap; the sampling math is the same.
    model = build_model(ModelSpec(d_model=32, n_layers=1, n_heads=2, d_ff=64, init_std=0.5), seed=1).eval()
    n = 8000
    prompt_ids, prompt_mask = encode_prompts(["Q:12+3-4\n"] * n)
    with torch.no_grad():
        logits = model(input_ids=prompt_ids[:1]).logits[0, -1]
    for temperature in (1.0, 2.0):
        expected = F.softmax(logits / temperature, -1)
        out = sample(model, prompt_ids, prompt_mask, max_new_tokens=1, temperature=temperature, seed=0)
        observed = torch.bincount(out.response_ids[:, 0], minlength=len(expected)).float() / n
        assert 0.5 * (observed - expected).abs().sum() < 0.03  # total variation; sampling noise < 0.02
        torch.testing.assert_close(out.log_probs[:, 0].exp(), expected[out.response_ids[:, 0]])
    hot = sample(model, prompt_ids[:8], prompt_mask[:8], max_new_tokens=1, temperature=2.0).entropy
    cold = sample(model, prompt_ids[:8], prompt_mask[:8], max_new_tokens=1, temperature=0.5).entropy
    assert (hot > cold).all()
    greedy = sample(model, prompt_ids[:2], prompt_mask[:2], max_new_tokens=1, temperature=0.0)
    assert greedy.response_ids[:, 0].eq(logits.argmax()).all()


def test_sampler_rejects_sequences_longer_than_the_model(model, prompts):
    with pytest.raises(ValueError, match="exceeds the model's 160 positions"):
        sample(model, *prompts, max_new_tokens=160)


def test_model_save_load_round_trip(model, prompts, tmp_path):
    save_model(model, ModelSpec(init_std=0.3), tmp_path)
    loaded, spec = load_model(tmp_path)
    assert spec == ModelSpec(init_std=0.3)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_benchmark_times_both_decoders_alternately_and_keeps_every_repeat():
    from app.bench import sampler_speedup
    from poise.testbed.checkpoints import base_checkpoint
    from poise.testbed.protocol import get_protocol

    report = sampler_speedup(base_checkpoint(), get_protocol("tiny"), repeats=3)
    for label in ("sampled", "greedy"):
        timing = report[label]
        assert set(timing["times"]) == {"sampler", "hf_generate"}
        assert all(len(values) == 3 and min(values) > 0 for values in timing["times"].values())
        assert timing["sampler"] == min(timing["times"]["sampler"])
        ratios = [g / s for g, s in zip(timing["times"]["hf_generate"], timing["times"]["sampler"], strict=True)]
        assert timing["pair_ratios"] == pytest.approx(ratios)
        assert timing["speedup"] == pytest.approx(sorted(ratios)[1])  # the median of three pairs
        assert timing["speedup_best_of"] == pytest.approx(timing["hf_generate"] / timing["sampler"])
    assert report["speedup"] == report["sampled"]["speedup"] and report["repeats"] == 3
