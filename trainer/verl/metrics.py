"""VERL's per-step metrics (its FileLogger's JSONL) as POISE's TrainingStep records (docs/verl.md, "Metrics").

VERL's `file` logger (verl/utils/tracking.py `FileLogger`) writes one line per step, `{"step": N, "data":
{metric: value}}`, N counting from 1, to VERL_FILE_LOGGER_PATH. `MetricsTail` reads the lines written since
its last read (the file grows while the run goes on; a line still being written waits for the next read), and
`training_step` maps VERL's keys to the testbed's field names where VERL measures the same quantity. Every
other finite number is kept in `extra` under VERL's own key.

VERL serialises with orjson, which writes nan and inf as `null`: a key that is present with `null` is a value
that was not a finite number, so a named field gets nan (and the early-abort rules see a broken curve), where a
key that is absent stays None (not measured at this step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from poise.contracts import TrainingStep

# TrainingStep field <- VERL key, first one present wins (V1 trainer, verl 0.9.1)
FIELD_KEYS: dict[str, tuple[str, ...]] = {
    "reward_mean": ("critic/score/mean",),                 # the reward function's raw score
    "format_valid_rate": ("poise/format_valid_rate", "poise/format_valid"),  # from the plugin's estimator metrics
    "entropy": ("actor/entropy",),                         # token entropy of the rollout policy
    "response_length": ("response_length/mean",),          # tokens per response
    "kl": ("actor/kl_loss",),                              # low_var_kl (k3) to the reference = base model
    "grad_norm": ("actor/grad_norm",),
    "clip_frac": ("actor/pg_clipfrac",),
    "adv_mean": ("critic/advantages/mean",),
    "step_time_s": ("timing_s/step",),
}


class MetricsError(ValueError):
    """A metrics line that is not VERL's FileLogger format."""


def training_step(line: dict) -> TrainingStep:
    """One FileLogger record as a TrainingStep; steps count from 0 as in the testbed (VERL's N - 1)."""
    try:
        step, data = int(line["step"]), line["data"]
    except (KeyError, TypeError, ValueError) as err:
        raise MetricsError(f"not a VERL FileLogger record (want {{'step': N, 'data': {{...}}}}): {line!r:.200}") \
            from err
    numbers = {key: math.nan if value is None else float(value) for key, value in data.items()
               if value is None or isinstance(value, int | float) and not isinstance(value, bool)}
    fields: dict[str, float] = {}
    used: set[str] = set()
    for field, keys in FIELD_KEYS.items():
        key = next((k for k in keys if k in numbers), None)
        if key is not None:
            fields[field] = numbers[key]   # nan stays nan: a broken curve must reach the abort rules
            used.add(key)
    extra = {key: value for key, value in numbers.items() if key not in used and math.isfinite(value)}
    return TrainingStep(step=max(step - 1, 0), **fields, extra=extra)


class MetricsTail:
    """Reads the steps VERL has appended to its metrics file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = b""

    def read_new(self) -> list[TrainingStep]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # the FileLogger truncates at start: a restarted run begins again
            self.offset, self.pending = 0, b""
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        steps = []
        for raw in lines:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise MetricsError(f"{self.path}: a line that is not JSON ({err}): {raw[:200]!r}") from err
                steps.append(training_step(record))
        return steps
