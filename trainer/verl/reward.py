"""The reward function verl calls for each response: the shared math grader (poise/grading.py), so training rewards
and evaluation accuracy mean the same thing (docs/verl.md, "Reward").

Configure it with
    reward.custom_reward_function.path=<abs path of this file>   (or pkg://trainer.verl.reward)
    reward.custom_reward_function.name=compute_score

verl's reward workers call it from a thread pool; the grader compares answers in its own worker processes, bounded
by a deadline, so a pathological answer cannot hang a reward worker. No verl import here.
"""

from __future__ import annotations

from typing import Any

from poise.grading import DEFAULT_TIMEOUT_S, grade


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> dict[str, float | str]:
    """Grade one decoded response against its reference answer.

    Returns the same keys for every response, as verl requires: `score` (the reward: 1.0 when correct, else 0.0, as
    in the testbed), `acc` (verl's validation metric, = score), `format_valid` (1.0 when the response has a final
    boxed answer), `pred` (that answer, "" when none: verl's majority vote reads it) and `grade_error` (why the
    answer could not be compared, "" normally). The trainer extension passes `format_valid` to the candidate.
    """
    result = grade(solution_str, str(ground_truth), timeout_s=timeout_s)
    correct = float(result.correct)
    return {"score": correct, "acc": correct, "format_valid": float(result.format_valid),
            "pred": result.extracted or "", "grade_error": result.reason or ""}
