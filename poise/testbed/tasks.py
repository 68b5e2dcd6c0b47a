"""Synthetic verifiable math of the CPU testbed: left-to-right +/- chains.

A problem starts from a value in [0, value_max], applies `n_ops` additions or subtractions of
operands in [1, operand_max], and keeps every intermediate value in [0, value_max]:

    prompt   "Q:39+2-6+9\\n"
    solution "39+2=41,41-6=35,35+9=44 #### 44"     (the model must then emit <eos>)

Six held-out suites of graded difficulty stand in for the paper's six benchmarks (two hard ones
scored pass@k at temperature 1.0, four scored greedy acc@1) with the paper's Overall weights.
Their prompts come from a fixed eval seed and are excluded, by exact prompt string, from every
training and SFT batch. All randomness goes through `random.Random` instances seeded with
strings (str seeds are hashed with SHA-512, so they are stable across processes and versions).
"""

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

VALUE_MAX = 99
OPERAND_MAX = 9
EVAL_SEED = 20240917
TRAIN_CHAIN_LENGTHS: tuple[int, ...] = tuple(range(1, 11))

# Anchored on both ends with fullmatch: `re.match(r"...$")` would also accept a trailing "\n".
ANSWER_FORMAT = re.compile(r"[0-9+\-=,]* #### (\d+)")


@dataclass(frozen=True)
class Problem:
    prompt: str    # "Q:39+2-6+9\n"
    answer: int    # 44
    n_ops: int     # 3
    solution: str  # "39+2=41,41-6=35,35+9=44 #### 44" (no EOS: that is a token, not text)


@dataclass(frozen=True)
class Grade:
    correct: bool       # format_valid and answer == problem.answer
    format_valid: bool  # text fully matches ANSWER_FORMAT and the response ended with EOS
    answer: int | None  # the parsed "#### N" whenever the text matches ANSWER_FORMAT, else None


def grade(problem: Problem, response_text: str, ended_with_eos: bool) -> Grade:
    """Outcome reward of one response. `response_text` excludes the EOS token itself."""
    match = ANSWER_FORMAT.fullmatch(response_text)
    answer = int(match.group(1)) if match else None
    format_valid = match is not None and ended_with_eos
    return Grade(correct=format_valid and answer == problem.answer, format_valid=format_valid,
                 answer=answer)


def chain_values(start: int, steps: Sequence[tuple[str, int]],
                 error: tuple[int, int] | None = None) -> list[int]:
    """Value after each step. `error=(j, delta)` makes step j's result off by `delta` and carries
    the wrong value on, as a careless solver would (used only for the noisy SFT data)."""
    values, value = [], start
    for j, (sign, operand) in enumerate(steps):
        value = value + operand if sign == "+" else value - operand
        if error is not None and error[0] == j:
            value += error[1]
        values.append(value)
    return values


def worked_solution(start: int, steps: Sequence[tuple[str, int]],
                    error: tuple[int, int] | None = None) -> tuple[str, int]:
    """("39+2=41,41-6=35 #### 35", 35) for start 39 and steps [("+", 2), ("-", 6)]."""
    values = chain_values(start, steps, error)
    parts = [f"{before}{sign}{operand}={after}"
             for before, (sign, operand), after in zip([start, *values], steps, values, strict=False)]
    return f"{','.join(parts)} #### {values[-1]}", values[-1]


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of `make_problem`'s prompt: "Q:39+2-6\n" -> (39, [("+", 2), ("-", 6)])."""
    match = re.fullmatch(r"Q:(\d+)((?:[+-]\d+)+)\n", prompt)
    if match is None:
        raise ValueError(f"not a testbed prompt: {prompt!r}")
    steps = [(sign, int(operand)) for sign, operand in re.findall(r"([+-])(\d+)", match.group(2))]
    return int(match.group(1)), steps


def sample_chain(rng: random.Random, n_ops: int, operand_max: int = OPERAND_MAX,
                 value_max: int = VALUE_MAX) -> tuple[int, list[tuple[str, int]]]:
    """(start, [(sign, operand), ...]) with every intermediate in [0, value_max].

    Each step is uniform over the (sign, operand) pairs that stay in range, so chains neither
    drift to a bound nor get stuck (with operand_max < value_max some step is always legal).
    """
    if n_ops < 1:
        raise ValueError(f"a chain needs at least one operation, got n_ops={n_ops}")
    start = value = rng.randint(0, value_max)
    steps = []
    for _ in range(n_ops):
        legal = [("+", d) for d in range(1, operand_max + 1) if value + d <= value_max]
        legal += [("-", d) for d in range(1, operand_max + 1) if value - d >= 0]
        sign, operand = rng.choice(legal)
        value = value + operand if sign == "+" else value - operand
        steps.append((sign, operand))
    return start, steps


def make_problem(start: int, steps: Sequence[tuple[str, int]]) -> Problem:
    prompt = "Q:" + str(start) + "".join(f"{sign}{operand}" for sign, operand in steps) + "\n"
    solution, answer = worked_solution(start, steps)
    return Problem(prompt=prompt, answer=answer, n_ops=len(steps), solution=solution)


def sample_problem(rng: random.Random, n_ops: int, operand_max: int = OPERAND_MAX,
                   value_max: int = VALUE_MAX) -> Problem:
    return make_problem(*sample_chain(rng, n_ops, operand_max, value_max))


# ---- evaluation suites ------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    role: str                       # the paper benchmark this suite stands in for
    weight: float                   # weight in Overall; DEFAULT_SUITES sum to 1.0
    kind: Literal["pass@k", "acc@1"]
    k: int                          # samples per prompt: k for pass@k (T = 1.0), 1 for greedy acc@1
    n_prompts: int
    chain_lengths: tuple[int, ...]  # n_ops of each prompt is drawn uniformly from these
    operand_max: int = OPERAND_MAX


DEFAULT_SUITES: tuple[SuiteSpec, ...] = (
    SuiteSpec("chain8", "AIME24", 0.2, "pass@k", 2, 150, (8,)),
    SuiteSpec("chain9-10", "AIME25", 0.2, "pass@k", 2, 150, (9, 10)),
    SuiteSpec("chain3-4", "AMC", 0.15, "acc@1", 1, 300, (3, 4)),
    SuiteSpec("chain5", "MATH-500", 0.15, "acc@1", 1, 300, (5,)),
    SuiteSpec("chain6", "Minerva", 0.15, "acc@1", 1, 300, (6,)),
    SuiteSpec("chain7", "OlympiadBench", 0.15, "acc@1", 1, 300, (7,)),
)


def eval_problems(suite: SuiteSpec, eval_seed: int = EVAL_SEED) -> list[Problem]:
    """The suite's held-out prompts: fixed by (eval_seed, suite name), distinct within the suite."""
    rng = random.Random(f"eval:{eval_seed}:{suite.name}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(100 * suite.n_prompts):  # bounded: a too-small chain space fails loudly below
        if len(problems) == suite.n_prompts:
            return problems
        problem = sample_problem(rng, rng.choice(suite.chain_lengths), suite.operand_max)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    raise ValueError(f"suite {suite.name}: could not draw {suite.n_prompts} distinct prompts")


@lru_cache(maxsize=8)
def eval_prompt_set(suites: tuple[SuiteSpec, ...] = DEFAULT_SUITES,
                    eval_seed: int = EVAL_SEED) -> frozenset[str]:
    """Every evaluation prompt string; training and SFT generators reject these."""
    return frozenset(p.prompt for suite in suites for p in eval_problems(suite, eval_seed))


def eval_set_fingerprint(suites: tuple[SuiteSpec, ...] = DEFAULT_SUITES, eval_seed: int = EVAL_SEED) -> str:
    """sha256 of the sorted eval prompts. A base checkpoint records the fingerprint of the set its
    SFT data excluded; a different fingerprint at evaluation time means the suites changed after
    the base was built, and only prompts of the old set are guaranteed unseen."""
    return hashlib.sha256("".join(sorted(eval_prompt_set(suites, eval_seed))).encode()).hexdigest()


# ---- training prompts ---------------------------------------------------------------------------


def draw_problems(rng: random.Random, n: int, chain_lengths: Sequence[int] = TRAIN_CHAIN_LENGTHS,
                  operand_max: int = OPERAND_MAX, excluded: frozenset[str] | None = None
                  ) -> list[Problem]:
    """`n` problems (repeats allowed) with n_ops uniform over `chain_lengths`, none in `excluded`.

    `excluded` defaults to the prompts of DEFAULT_SUITES at EVAL_SEED.
    """
    excluded = eval_prompt_set() if excluded is None else excluded
    problems: list[Problem] = []
    while len(problems) < n:
        problem = sample_problem(rng, rng.choice(chain_lengths), operand_max)
        if problem.prompt not in excluded:
            problems.append(problem)
    return problems


def training_batch(step: int, seed: int, n_prompts: int,
                   chain_lengths: Sequence[int] = TRAIN_CHAIN_LENGTHS,
                   operand_max: int = OPERAND_MAX, excluded: frozenset[str] | None = None
                   ) -> list[Problem]:
    """The RL prompts of one step. Depends only on (seed, step), so a resumed run or another
    candidate with the same seed sees exactly the same prompt stream."""
    rng = random.Random(f"train:{seed}:{step}")
    return draw_problems(rng, n_prompts, chain_lengths, operand_max, excluded)
