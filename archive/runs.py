"""Opening a run: the one rule for starting a new run or resuming a stored one, used by both modes.

`poise run` (embedded, app/runner.py) and the archive service of the distributed mode (`POST /api/runs` and
`POISE_RUN_ID` at start-up, archive/host.py) both call `resolve_run`:

- a new run is validated, its protocol's settings are recorded (sha256), and it is stored;
- a stored run keeps its settings: only RESUMABLE_SETTINGS (budget, parallelism, the agent-LLM and GPU-hours caps,
  early stopping) may change; any other difference is refused, and so is a resume after the protocol's settings
  changed in the code.

See docs/architecture.md, "Runs: start and resume".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from poise.contracts import RECORDED_SETTINGS, RESUMABLE_SETTINGS, Backends, RunConfig
from poise.store import ArchiveStore
from poise.testbed.protocol import protocol_drift, protocol_sha256


class RunRefused(Exception):
    """The run cannot start or resume as asked (it exists with other settings, or is invalid); the message says
    what to do. The API answers it with 409, `poise run` with its message."""


def resolve_run(store: ArchiveStore, run_id: str, given: Mapping[str, Any], backends: Backends,
                where: str = "the archive", elsewhere: str = "another run_id") -> RunConfig:
    """Store and return the run `run_id` with the settings `given` (JSON values): a new run, or the stored one
    resumed. A new run takes `backends` unless `given` names them. `where` and `elsewhere` word the refusals
    for the caller ("runs/x" and "another --run-dir" for `poise run`)."""
    stored = store.get_run(run_id)
    if stored is None:
        try:
            config = RunConfig.model_validate({"backends": backends.model_dump(), **given, "run_id": run_id})
            config = config.model_copy(update={"protocol_sha256": protocol_sha256(config.protocol)})
        except (ValueError, KeyError) as err:
            raise RunRefused(f"invalid run {run_id}: {err.args[0] if isinstance(err, KeyError) else err}") from err
        store.put_run(config)
        return config
    current = stored.model_dump(mode="json")
    differ = [k for k, v in given.items()
              if k not in (*RESUMABLE_SETTINGS, *RECORDED_SETTINGS, "run_id") and current.get(k) != v]
    if differ:
        what = ", ".join(f"{k}={current.get(k)!r} (asked {given[k]!r})" for k in differ)
        raise RunRefused(f"{where} holds run {run_id} with {what}; resume it with the same settings (only "
                         f"{', '.join(RESUMABLE_SETTINGS)} may change) or start a run with {elsewhere}")
    drift = protocol_drift(stored.protocol, stored.protocol_sha256)
    if drift:
        raise RunRefused(f"{where} holds run {run_id}, but {drift} (start a run with {elsewhere})")
    updated = RunConfig.model_validate({**current, **{k: given[k] for k in RESUMABLE_SETTINGS if k in given}})
    if updated != stored:
        store.put_run(updated)
    return updated
