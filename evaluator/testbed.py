"""Testbed evaluator backend: samples a trained checkpoint on the held-out suites.

Runs in its own process and never loads candidate code: the checkpoint is safetensors weights loaded into
a model built from the trusted spec, so scores are computed outside the process that ran the candidate.
Hard suites (the AIME roles) report unbiased pass@k from n samples at temperature 1.0; the others greedy
acc@1, as the paper's protocol does.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evaluator.metrics import bootstrap_intervals, pass_at_k, weighted_overall
from poise.contracts import Evaluation, MetricKind, SuiteResult
from poise.sandbox import thread_cap
from poise.testbed.model import load_model
from poise.testbed.protocol import Protocol
from poise.testbed.sampler import sample
from poise.testbed.tasks import SuiteSpec, eval_problems, grade
from poise.testbed.tokenizer import encode_prompts


@dataclass
class EvalStats:
    """Throughput of one evaluation, for benchmarks."""

    wall_s: float = 0.0
    generated_tokens: int = 0
    per_suite_pass_at_1: dict[str, float] = field(default_factory=dict)


def evaluate_checkpoint(checkpoint: Path, protocol: Protocol, seed: int) -> tuple[Evaluation, EvalStats]:
    started = time.perf_counter()
    torch.set_num_threads(thread_cap(protocol.threads))
    model, _ = load_model(checkpoint)
    model.eval()
    stats = EvalStats()
    per_prompt: dict[str, list[float]] = {}
    results: dict[str, SuiteResult] = {}
    weights = {suite.name: suite.weight for suite in protocol.suites}
    for suite in protocol.suites:
        scores, lengths, valid, pass1 = _run_suite(model, suite, protocol, seed, stats)
        per_prompt[suite.name] = scores
        stats.per_suite_pass_at_1[suite.name] = pass1
        results[suite.name] = SuiteResult(
            suite=suite.name,
            kind=MetricKind(suite.kind),
            k=suite.k if suite.kind == "pass@k" else 1,
            value=float(sum(scores) / len(scores)),
            ci_low=0.0, ci_high=1.0,  # replaced below once every suite is in
            n_prompts=len(scores),
            n_samples=protocol.eval_samples if suite.kind == "pass@k" else 1,
            mean_length=float(sum(lengths) / len(lengths)),
            format_valid_rate=float(sum(valid) / len(valid)),
            weight=suite.weight,
        )
    suite_ci, overall_ci = bootstrap_intervals(per_prompt, weights, protocol.bootstrap_resamples, seed)
    for name, (low, high) in suite_ci.items():
        results[name] = results[name].model_copy(update={"ci_low": low, "ci_high": high})
    evaluation = Evaluation(
        suites=results,
        overall=weighted_overall({n: r.value for n, r in results.items()}, weights),
        overall_ci=overall_ci,
        mean_length=weighted_overall({n: r.mean_length for n, r in results.items()}, weights),
        seed=seed,
    )
    stats.wall_s = time.perf_counter() - started
    return evaluation, stats


def _run_suite(model, suite: SuiteSpec, protocol: Protocol, seed: int, stats: EvalStats):
    """Per-prompt scores, per-sample lengths and format validity, and the mean pass@1 of the suite."""
    problems = eval_problems(suite)
    sampled = suite.kind == "pass@k"
    n = protocol.eval_samples if sampled else 1
    expanded = [p for p in problems for _ in range(n)]
    prompt_ids, prompt_mask = encode_prompts([p.prompt for p in expanded])
    out = sample(model, prompt_ids, prompt_mask, protocol.eval_max_new_tokens,
                 temperature=1.0 if sampled else 0.0, seed=random.Random(f"eval:{seed}:{suite.name}").getrandbits(63))
    stats.generated_tokens += int(out.response_lengths.sum())
    grades = [grade(p, text, bool(eos)) for p, text, eos in zip(expanded, out.texts(), out.ended_with_eos,
                                                                strict=True)]
    correct = torch.tensor([g.correct for g in grades], dtype=torch.long).view(len(problems), n).sum(-1)
    if sampled:
        scores = [pass_at_k(n, int(c), suite.k) for c in correct]
    else:
        scores = [float(c) for c in correct]
    pass1 = float(correct.sum()) / (len(problems) * n)
    return scores, out.response_lengths.tolist(), [g.format_valid for g in grades], pass1
