"""Testbed task, grader, suites and tokenizer."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.testbed import tokenizer
from poise.testbed.tasks import (
    DEFAULT_SUITES,
    VALUE_MAX,
    Problem,
    SuiteSpec,
    chain_values,
    draw_problems,
    eval_problems,
    eval_prompt_set,
    grade,
    make_problem,
    parse_prompt,
    sample_problem,
    training_batch,
)

PROBLEM = make_problem(39, [("+", 2), ("-", 6), ("+", 9)])


def test_problem_has_the_documented_prompt_and_worked_solution():
    assert PROBLEM == Problem(prompt="Q:39+2-6+9\n", answer=44, n_ops=3,
                              solution="39+2=41,41-6=35,35+9=44 #### 44")


@pytest.mark.parametrize("text, eos, correct, format_valid, answer", [
    ("39+2=41,41-6=35,35+9=44 #### 44", True, True, True, 44),
    ("39+2=41,41-6=35,35+9=45 #### 45", True, False, True, 45),     # wrong answer
    (" #### 44", True, True, True, 44),                              # no work shown still parses
    ("39+2=41,41-6=35,35+9=44 #### 44", False, False, False, 44),   # cut before EOS
    ("39+2=41,41-6=35,35+9=44 #### 44\n", True, False, False, None),  # trailing newline ($ pitfall)
    ("39+2=41,41-6=35,35+9=44 #### 44 ", True, False, False, None),   # trailing space
    ("39+2=41 #### 44,44", True, False, False, None),                 # garbage after the answer
    ("Q:39+2=41 #### 44", True, False, False, None),                  # garbage before
    ("39+2=41,41-6=35,35+9=44 ans 44", True, False, False, None),     # broken formats
    ("39+2=41,41-6=35,35+9=44 => 44", True, False, False, None),
    ("39+2=41,41-6=35,35+9=44 ## 44", True, False, False, None),
    ("39+2=41,41-6=35,35+9=44", True, False, False, None),            # no answer at all
    ("39+2=41,41-6=35,35+9=44 #### ", True, False, False, None),
    ("39+2=41,41-6=35,35+9=44 #### -44", True, False, False, None),
    ("39+2=41<pad> #### 44", True, False, False, None),               # a special token inside
    ("", True, False, False, None),
])
def test_grade(text, eos, correct, format_valid, answer):
    g = grade(PROBLEM, text, eos)
    assert (g.correct, g.format_valid, g.answer) == (correct, format_valid, answer)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), n_ops=st.integers(1, 12))
def test_chains_stay_in_range_and_solutions_grade_correct(seed, n_ops):
    problem = sample_problem(random.Random(seed), n_ops)
    start, steps = parse_prompt(problem.prompt)
    assert 0 <= start <= VALUE_MAX and len(steps) == n_ops == problem.n_ops
    assert all(sign in "+-" and 1 <= operand <= 9 for sign, operand in steps)
    values = chain_values(start, steps)
    assert all(0 <= v <= VALUE_MAX for v in values) and values[-1] == problem.answer
    assert grade(problem, problem.solution, True).correct


def test_suites_mirror_the_paper_benchmarks_and_weights():
    assert sum(s.weight for s in DEFAULT_SUITES) == pytest.approx(1.0)
    hard = [s for s in DEFAULT_SUITES if s.kind == "pass@k"]
    rest = [s for s in DEFAULT_SUITES if s.kind == "acc@1"]
    assert [s.weight for s in hard] == [0.2, 0.2] and [s.weight for s in rest] == [0.15] * 4
    assert all(s.k > 1 for s in hard) and all(s.k == 1 for s in rest)
    assert min(min(s.chain_lengths) for s in hard) > max(max(s.chain_lengths) for s in rest)
    assert len({s.name for s in DEFAULT_SUITES}) == 6


def test_eval_problems_are_fixed_distinct_and_match_their_suite():
    for suite in DEFAULT_SUITES:
        problems = eval_problems(suite)
        assert problems == eval_problems(suite)
        assert len(problems) == suite.n_prompts == len({p.prompt for p in problems})
        assert {p.n_ops for p in problems} <= set(suite.chain_lengths)
    assert len(eval_prompt_set()) == sum(s.n_prompts for s in DEFAULT_SUITES)
    assert eval_problems(DEFAULT_SUITES[0], eval_seed=1) != eval_problems(DEFAULT_SUITES[0])


def test_training_batches_are_deterministic_per_step_and_seed():
    assert training_batch(3, 7, 16) == training_batch(3, 7, 16)
    assert training_batch(3, 7, 16) != training_batch(4, 7, 16)
    assert training_batch(3, 7, 16) != training_batch(3, 8, 16)
    assert len(training_batch(0, 0, 16)) == 16


def test_training_prompts_never_include_an_eval_prompt():
    # A suite of one-operation chains covers ~11% of their ~1,800 prompts, so unfiltered draws
    # would hit it hundreds of times.
    suite = SuiteSpec("one-op", "test", 1.0, "acc@1", 1, 200, (1,))
    eval_prompts = eval_prompt_set((suite,))
    unfiltered = draw_problems(random.Random(0), 2000, chain_lengths=(1,), excluded=frozenset())
    assert sum(p.prompt in eval_prompts for p in unfiltered) > 100
    filtered = draw_problems(random.Random(0), 2000, chain_lengths=(1,), excluded=eval_prompts)
    assert not any(p.prompt in eval_prompts for p in filtered)
    # By default every training batch excludes the prompts of DEFAULT_SUITES.
    default_eval_prompts = eval_prompt_set()
    for step in range(50):
        assert not any(p.prompt in default_eval_prompts for p in training_batch(step, 0, 64))


# ---- tokenizer ----------------------------------------------------------------------------------


def test_token_ids_are_stable():
    assert (tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID) == (0, 1, 2)
    assert tokenizer.VOCAB_SIZE == 26
    assert tokenizer.encode("09+-=,# Q:\n") == [3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=tokenizer.CHARS, max_size=60))
def test_encode_decode_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_rejects_unknown_characters():
    with pytest.raises(ValueError, match="not in the testbed vocabulary"):
        tokenizer.encode("Q:1*2\n")


def test_prompts_are_left_padded_after_bos():
    ids, mask = tokenizer.encode_prompts(["Q:1+2\n", "Q:10+2-3\n"])
    assert ids.shape == mask.shape == (2, 10)
    assert mask[0].tolist() == [0, 0, 0] + [1] * 7 and mask[1].tolist() == [1] * 10
    assert ids[0, 3].item() == tokenizer.BOS_ID and ids[0, :3].tolist() == [tokenizer.PAD_ID] * 3
    assert tokenizer.decode(ids[0, 4:]) == "Q:1+2\n"


def test_responses_are_right_padded_with_eos_in_the_mask():
    ids, mask = tokenizer.encode_responses(["1+2=3 #### 3", ""], add_eos=[True, False])
    assert ids.shape == (2, 13) and mask[0].sum() == 13 and mask[1].sum() == 0
    assert ids[0, 12].item() == tokenizer.EOS_ID
    assert tokenizer.decode_response(ids[0]) == ("1+2=3 #### 3", True)
    assert tokenizer.decode_response(torch.tensor([4, 5])) == ("12", False)
