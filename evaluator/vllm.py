"""The vLLM evaluator backend: samples a checkpoint through vLLM's OpenAI-compatible server (docs/evaluation.md).

What is scored depends on the run's protocol:
- a testbed protocol (`tiny`, `default`, ...): its synthetic suites, prompted exactly as the testbed sampler
  prompts them (`<bos>` + the prompt text) through `/v1/completions`, graded by the testbed grader; so one
  checkpoint can be scored by both backends and the two compared (tests/test_vllm.py);
- a benchmark protocol (`paper`, poise/benchmarks/paper.toml): the six math suites, one chat message per
  problem through `/v1/chat/completions`, graded by the shared math grader (poise/grading.py).

Sampling: one request per prompt with `n` samples and a per-request seed derived from (evaluation seed, suite,
prompt id), so results do not depend on request order or concurrency; at most `concurrency` requests in
flight; timeouts per request; retries with exponential backoff on 5xx, 429 and connection errors, where a
connection error first asks the server to recover (a managed server that died is restarted on the same
checkpoint). Response lengths are the server's token counts. The metrics (unbiased pass@k, acc@1, bootstrap
intervals, the weighted Overall) are `evaluator/metrics.py`'s, shared with the testbed backend.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from evaluator.metrics import EvalStats, SuiteOutcome, assemble_evaluation, half_of, suite_score
from evaluator.vllm_server import SERVED_NAME, ServerError, VLLMServer
from poise.contracts import Evaluation, Half

log = logging.getLogger("poise." + __name__)


class VLLMRequestError(RuntimeError):
    """A request the server refused or could not answer after every retry; the message says which and why."""


@dataclass(frozen=True)
class Sample:
    text: str
    finish_reason: str | None   # "stop" (EOS or a stop string) or "length"
    tokens: int                 # generated tokens, as the server counted them


@dataclass(frozen=True)
class Request:
    """One prompt's sampling request: `prompt` is text for /v1/completions or a message list for chat."""

    prompt: str | list[dict[str, str]]
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    recoveries: int = 0
    generated_tokens: int = 0


class VLLMClient:
    """Bounded-concurrency sampling with retries against the server `server` serves (module docstring)."""

    def __init__(self, server: VLLMServer, concurrency: int = 8, timeout_s: float = 600.0, retries: int = 4,
                 backoff_s: float = 1.0) -> None:
        if concurrency < 1 or retries < 0:
            raise ValueError(f"concurrency must be >= 1 and retries >= 0 (got {concurrency}, {retries})")
        self.server = server
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.stats = ClientStats()
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0),
                                  limits=httpx.Limits(max_connections=concurrency))

    def close(self) -> None:
        self._http.close()

    def sample(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """The samples of every request, in request order (each list in the server's choice-index order),
        from the checkpoint the server serves now (`VLLMServer.ensure` first)."""
        if not requests:
            return []
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="vllm-request") as pool:
            return list(pool.map(self._one, requests))

    def _one(self, request: Request) -> list[Sample]:
        chat = not isinstance(request.prompt, str)
        body: dict[str, Any] = {
            "model": SERVED_NAME, "n": request.n, "temperature": request.temperature, "top_p": request.top_p,
            "max_tokens": request.max_tokens, "seed": request.seed, "return_token_ids": True,
            "skip_special_tokens": request.skip_special_tokens,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        body["messages" if chat else "prompt"] = request.prompt
        path = "/v1/chat/completions" if chat else "/v1/completions"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            url = f"{self.server.base_url}{path}"  # a restarted server listens on a new port
            try:
                response = self._http.post(url, json=body)
            except httpx.TransportError as err:  # refused, reset, timed out: the server may have died
                problem = f"{type(err).__name__}: {err}"
                self._recover(problem)
                continue
            if response.status_code == 200:
                self.stats.requests += 1
                return self._parse(response.json(), request, chat)
            problem = f"HTTP {response.status_code}: {response.text[:500]}"
            if response.status_code < 500 and response.status_code != 429:
                raise VLLMRequestError(f"the vLLM server refused a request to {url}: {problem}")
        raise VLLMRequestError(f"no answer from the vLLM server at {url} after {self.retries + 1} tries; "
                               f"last: {problem}")

    def _recover(self, problem: str) -> None:
        log.warning("vLLM request failed (%s); asking the server to recover", problem)
        try:
            if self.server.recover():
                self.stats.recoveries += 1
        except ServerError as err:
            raise VLLMRequestError(f"the vLLM server failed ({problem}) and could not be restarted: {err}") from err

    def _parse(self, payload: dict, request: Request, chat: bool) -> list[Sample]:
        choices = sorted(payload.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != request.n:
            raise VLLMRequestError(f"the vLLM server returned {len(choices)} choices for n={request.n}")
        usage = payload.get("usage") or {}
        samples = []
        for choice in choices:
            text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
            token_ids = choice.get("token_ids")
            tokens = len(token_ids) if token_ids is not None else int(usage.get("completion_tokens", 0)) // request.n
            samples.append(Sample(text=text or "", finish_reason=choice.get("finish_reason"), tokens=tokens))
        self.stats.generated_tokens += sum(s.tokens for s in samples)
        return samples


# ----------------------------------------------------------------------------------------- what is scored


# Grades a suite's samples at once: [(item answer, sample)] -> [(correct, format_valid)], in order.
Grader = Callable[[list[tuple[Any, "Sample"]]], list[tuple[bool, bool]]]


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str | list[dict[str, str]]
    answer: Any


@dataclass(frozen=True)
class EvalSuite:
    name: str
    kind: str                 # "pass@k" or "acc@1"
    k: int
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    weight: float
    items: tuple[EvalItem, ...]
    grade: Grader
    skip_special_tokens: bool = True
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalPlan:
    """Every suite of one protocol, and the protocol's bootstrap resamples."""

    protocol: str
    suites: tuple[EvalSuite, ...]
    bootstrap_resamples: int


def request_seed(seed: int, suite: str, item_id: str) -> int:
    """A 31-bit seed per (evaluation seed, suite, prompt): the same prompt samples alike in any order."""
    digest = hashlib.sha256(f"eval:{seed}:{suite}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def plan_testbed(protocol_name: str) -> EvalPlan:
    """The testbed protocol's suites, prompted and graded as the testbed evaluator does (evaluator/testbed.py)."""
    from poise.testbed.protocol import get_protocol
    from poise.testbed.tasks import eval_problems, grade

    protocol = get_protocol(protocol_name)

    def grade_samples(pairs: list[tuple[Any, Sample]]) -> list[tuple[bool, bool]]:
        # EOS ends a testbed response; special tokens are kept in the text (as the testbed decodes them),
        # so a response with a <pad> in it fails the format check in both backends.
        results = [grade(problem, sample.text, sample.finish_reason == "stop") for problem, sample in pairs]
        return [(r.correct, r.format_valid) for r in results]

    suites = []
    for suite in protocol.suites:
        sampled = suite.kind == "pass@k"
        items = tuple(EvalItem(id=str(i), prompt=p.prompt, answer=p) for i, p in enumerate(eval_problems(suite)))
        suites.append(EvalSuite(
            name=suite.name, kind=suite.kind, k=suite.k if sampled else 1, n=protocol.eval_samples if sampled else 1,
            temperature=1.0 if sampled else 0.0, top_p=1.0, max_tokens=protocol.eval_max_new_tokens,
            weight=suite.weight, items=items, grade=grade_samples, skip_special_tokens=False))
    return EvalPlan(protocol_name, tuple(suites), protocol.bootstrap_resamples)


def plan_benchmarks(protocol_name: str, data_dir: str | Path | None = None) -> EvalPlan:
    """A benchmark protocol's suites (poise/benchmarks): each problem rendered by the protocol's template, as
    one chat message (the model's chat template) or a plain completion prompt, graded by the shared math
    grader (poise/grading.py) in its worker processes."""
    from poise.benchmarks import load_problems, load_protocol
    from poise.grading import grade_many

    protocol = load_protocol(protocol_name)

    def grade_samples(pairs: list[tuple[Any, Sample]]) -> list[tuple[bool, bool]]:
        results = grade_many([(sample.text, answer) for answer, sample in pairs])
        return [(r.correct, r.format_valid) for r in results]

    def prompt(problem: str) -> str | list[dict[str, str]]:
        text = protocol.render_prompt(problem)
        return [{"role": "user", "content": text}] if protocol.apply_chat_template else text

    suites = []
    for suite in protocol.suites:
        items = tuple(EvalItem(id=p.id, answer=p.answer, prompt=prompt(p.problem))
                      for p in load_problems(suite, data_dir))
        suites.append(EvalSuite(
            name=suite.name, kind=str(suite.metric), k=suite.k, n=suite.n, temperature=suite.temperature,
            top_p=suite.top_p, max_tokens=protocol.max_new_tokens, weight=suite.weight, items=items,
            grade=grade_samples))
    return EvalPlan(protocol_name, tuple(suites), protocol.bootstrap_resamples)


def plan_for(protocol_name: str, data_dir: str | Path | None = None) -> EvalPlan:
    from poise.testbed.protocol import PROTOCOLS

    return plan_testbed(protocol_name) if protocol_name in PROTOCOLS else plan_benchmarks(protocol_name, data_dir)


# ----------------------------------------------------------------------------------------- the backend


class VLLMEvaluator:
    """Scores checkpoints through one vLLM server (managed or remote); one evaluation at a time."""

    name = "vllm"

    def __init__(self, server: VLLMServer, concurrency: int = 8, timeout_s: float = 600.0, retries: int = 4,
                 backoff_s: float = 1.0, data_dir: str | Path | None = None) -> None:
        self.server = server
        self.client = VLLMClient(server, concurrency, timeout_s, retries, backoff_s)
        self.data_dir = data_dir
        self._plans: dict[str, EvalPlan] = {}

    def evaluate(self, checkpoint: Path, protocol: str, seed: int, half: Half = "all") -> Evaluation:
        return self.evaluate_with_stats(checkpoint, protocol, seed, half)[0]

    def evaluate_with_stats(self, checkpoint: Path, protocol: str, seed: int, half: Half = "all"
                            ) -> tuple[Evaluation, EvalStats]:
        started = time.perf_counter()
        tokens_before = self.client.stats.generated_tokens
        plan = self._plans.get(protocol) or self._plans.setdefault(protocol, plan_for(protocol, self.data_dir))
        stats = EvalStats()
        outcomes = []
        for suite in plan.suites:
            items = half_of(suite.items, half)
            requests = [Request(prompt=item.prompt, n=suite.n, temperature=suite.temperature, top_p=suite.top_p,
                                max_tokens=suite.max_tokens, seed=request_seed(seed, suite.name, item.id),
                                stop=suite.stop, skip_special_tokens=suite.skip_special_tokens)
                        for item in items]
            # each suite asks again: a server restarted mid-evaluation serves the same checkpoint at a new port
            self.server.ensure(Path(checkpoint))
            answers = self.client.sample(requests)
            grades = iter(suite.grade([(item.answer, s) for item, samples in zip(items, answers, strict=True)
                                       for s in samples]))
            correct, lengths, valid = [], [], []
            for samples in answers:
                mine = [next(grades) for _ in samples]
                correct.append(sum(c for c, _ in mine))
                valid.extend(v for _, v in mine)
                lengths.extend(s.tokens for s in samples)
            outcomes.append(SuiteOutcome(
                name=suite.name, kind=suite.kind, k=suite.k, n=suite.n, weight=suite.weight,
                scores=[suite_score(suite.kind, suite.n, suite.k, c) for c in correct],
                lengths=lengths, format_valid=valid))
            stats.per_suite_pass_at_1[suite.name] = sum(correct) / (len(correct) * suite.n)
        evaluation = assemble_evaluation(outcomes, plan.bootstrap_resamples, seed, backend=self.name)
        evaluation = evaluation.model_copy(update={"half": half})
        stats.wall_s = time.perf_counter() - started
        stats.generated_tokens = self.client.stats.generated_tokens - tokens_before
        return evaluation, stats

    def check(self) -> str | None:
        return self.server.check()

    def close(self) -> None:
        self.client.close()
        self.server.close()
