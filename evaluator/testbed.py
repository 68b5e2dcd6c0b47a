"""Testbed evaluator backend: samples a trained checkpoint on the held-out suites.

Runs in its own process and never loads candidate code: the checkpoint is safetensors weights loaded into
a model built from the trusted spec, so scores are computed outside the process that ran the candidate.
Hard suites (the AIME roles) report unbiased pass@k from n samples at temperature 1.0; the others greedy
acc@1, as the paper's protocol does.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from evaluator.metrics import EvalStats, SuiteOutcome, assemble_evaluation, half_of, suite_score
from poise.contracts import Evaluation, Half
from poise.sandbox import thread_cap
from poise.testbed.model import load_model
from poise.testbed.protocol import Protocol, get_protocol
from poise.testbed.sampler import sample
from poise.testbed.tasks import SuiteSpec, eval_problems, grade
from poise.testbed.tokenizer import encode_prompts


def evaluate_checkpoint(checkpoint: Path, protocol: Protocol, seed: int, half: Half = "all"
                        ) -> tuple[Evaluation, EvalStats]:
    started = time.perf_counter()
    torch.set_num_threads(thread_cap(protocol.threads))
    model, _ = load_model(checkpoint)
    model.eval()
    stats = EvalStats()
    outcomes = []
    for suite in protocol.suites:
        outcome, pass1 = _run_suite(model, suite, protocol, seed, stats, half)
        outcomes.append(outcome)
        stats.per_suite_pass_at_1[suite.name] = pass1
    evaluation = assemble_evaluation(outcomes, protocol.bootstrap_resamples, seed, backend="testbed")
    evaluation = evaluation.model_copy(update={"half": half})
    stats.wall_s = time.perf_counter() - started
    return evaluation, stats


def _run_suite(model, suite: SuiteSpec, protocol: Protocol, seed: int, stats: EvalStats, half: Half = "all"
               ) -> tuple[SuiteOutcome, float]:
    """The suite's outcome (per-prompt scores, per-sample lengths and format validity) and its mean pass@1, on
    `half` of its problems."""
    problems = half_of(eval_problems(suite), half)
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
    scores = [suite_score(suite.kind, n, suite.k, int(c)) for c in correct]
    pass1 = float(correct.sum()) / (len(problems) * n)
    outcome = SuiteOutcome(name=suite.name, kind=suite.kind, k=suite.k if sampled else 1, n=n, weight=suite.weight,
                           scores=scores, lengths=out.response_lengths.tolist(),
                           format_valid=[g.format_valid for g in grades])
    return outcome, pass1


class TestbedEvaluator:
    """The testbed backend behind the evaluator service: the checkpoint sampled in this process (torch)."""

    name = "testbed"

    def evaluate(self, checkpoint: Path, protocol: str, seed: int, half: Half = "all") -> Evaluation:
        return evaluate_checkpoint(checkpoint, get_protocol(protocol), seed, half)[0]

    def check(self) -> str | None:
        return None

    def close(self) -> None:
        pass
