"""The trainer service's verl backend (docs/verl.md).

- `plugin`: imported in every verl process through `VERL_USE_EXTERNAL_MODULES`; registers the candidate's advantage
  estimator and policy loss with verl under the name `poise`;
- `batch`: the candidate's `batch` built from what verl hands over (pure functions, no verl import);
- `trainer`: the V1 trainer extension that fetches reward extras, entropy and reference log-probs for the estimator;
- `reward`: the reward function verl calls per response, on the shared math grader (poise/grading.py).

Importing this package imports no verl: only `plugin` and `trainer` do.
"""
