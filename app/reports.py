"""What every benchmark report shares: the command that made it, and writing it as JSON (bench/results/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def invoked_command() -> str:
    """The `poise ...` command line of this process, recorded in each report so it can be run again."""
    return " ".join(["poise", *sys.argv[1:]])


def write_json_report(path: str | Path | None, report: dict) -> None:
    """Write `report` as indented JSON to `path` (its folder made if needed); nothing when `path` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
