"""Base checkpoints shipped with the package (poise/testbed/base/<name>/), rebuilt by `poise testbed build`."""

from __future__ import annotations

import json
from pathlib import Path

from poise.testbed.model import weights_sha256
from poise.testbed.sft import RECIPE_FILE
from poise.testbed.tasks import DEFAULT_SUITES, SuiteSpec, eval_set_fingerprint

BASE_DIR = Path(__file__).resolve().parent / "base"


def base_checkpoint(name: str = "default", suites: tuple[SuiteSpec, ...] = DEFAULT_SUITES) -> Path:
    """The folder of a base checkpoint, after checking its weights against the recipe's sha256 and that its
    SFT data excluded exactly the evaluation prompts of `suites` (else they may have been seen in SFT)."""
    path = BASE_DIR / name
    if not (path / RECIPE_FILE).exists():
        raise FileNotFoundError(f"no base checkpoint {name!r} at {path}: build it with `poise testbed build"
                                f"{'' if name == 'default' else ' --name ' + name}`")
    recipe = json.loads((path / RECIPE_FILE).read_text())
    actual = weights_sha256(path)
    if actual != recipe["weights_sha256"]:
        raise ValueError(f"{path}: weights sha256 {actual} differs from its recipe ({recipe['weights_sha256']});"
                         " the checkpoint is corrupt: rebuild it with `poise testbed build`")
    if recipe.get("excluded_eval_prompts_sha256") != eval_set_fingerprint(suites):
        raise ValueError(f"{path} was built before the evaluation suites changed: its SFT data may hold "
                         "evaluation prompts; rebuild it with `poise testbed build`")
    return path
