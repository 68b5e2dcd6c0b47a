"""Reference algorithms written as candidate modules: the search root (GRPO) and the literature priors.

Each module follows the shared interface (poise.algorithm) and carries NAME, DESCRIPTION, MECHANISMS and
REFERENCE, which the proposer reads as literature priors. KL regularisation is an option of every one of
them: set HPARAMS kl_coef > 0 and kl_estimator to one of common.KL_ESTIMATORS (the protocol must then
keep a reference model).
"""

from __future__ import annotations

import importlib
import importlib.resources
from dataclasses import dataclass
from types import ModuleType

from poise.algorithms.common import KL_ESTIMATORS

_MODULES = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "gspo", "gmpo", "cispo")


@dataclass(frozen=True)
class ReferenceAlgorithm:
    name: str
    module_name: str
    description: str
    mechanisms: tuple[str, ...]
    reference: str

    def module(self) -> ModuleType:
        return importlib.import_module(f"poise.algorithms.{self.module_name}")

    def source(self) -> str:
        """The module's source text: exactly what a candidate derived from it starts from."""
        return importlib.resources.files("poise.algorithms").joinpath(f"{self.module_name}.py").read_text()


def _describe(module_name: str) -> ReferenceAlgorithm:
    module = importlib.import_module(f"poise.algorithms.{module_name}")
    return ReferenceAlgorithm(
        name=module.NAME,
        module_name=module_name,
        description=module.DESCRIPTION,
        mechanisms=tuple(module.MECHANISMS),
        reference=module.REFERENCE,
    )


REFERENCE_ALGORITHMS: dict[str, ReferenceAlgorithm] = {a.name: a for a in map(_describe, _MODULES)}


def reference_algorithm(name: str) -> ReferenceAlgorithm:
    try:
        return REFERENCE_ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown reference algorithm {name!r}; known: {', '.join(REFERENCE_ALGORITHMS)}") from None


__all__ = ["KL_ESTIMATORS", "REFERENCE_ALGORITHMS", "ReferenceAlgorithm", "reference_algorithm"]
