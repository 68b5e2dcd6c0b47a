"""The evaluation protocol as typed values, read from a TOML file (docs/evaluation.md, "Benchmarks").

`load_protocol("paper")` reads `paper.toml` next to this module: the paper's six suites with their metric,
sampling, weight and data source, the prompt template and the generation budget. Any other file in the same
layout loads by path. Everything is checked on load, and a problem is reported as one BenchmarkDataError
naming the file and the key.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from poise.contracts import MetricKind

PROTOCOL_DIR = Path(__file__).resolve().parent
PROBLEM_PLACEHOLDER = "{problem}"
WEIGHT_TOLERANCE = 1e-9


class BenchmarkDataError(ValueError):
    """A protocol file or a benchmark's data cannot be used as it is; the message says which file and what to
    change."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(_Frozen):
    """Where a suite's problems come from: a public release on the hub, or a local copy."""

    dataset: str = Field(min_length=1)                       # hub dataset id of the default release
    files: tuple[str, ...] = Field(min_length=1)             # its files to take (snapshot_download allow_patterns)
    revision: str | None = None                              # a commit or tag to pin; None: the default branch
    local_names: tuple[str, ...] = ()                        # names looked for under the data directory


class BenchSuite(_Frozen):
    """One benchmark: how it is sampled and scored, its weight in Overall, and its data source."""

    name: str = Field(min_length=1)
    title: str = Field(min_length=1)
    weight: float = Field(ge=0.0, le=1.0)
    metric: MetricKind
    k: int = Field(ge=1)                  # pass@k's k; 1 for acc@1
    n: int = Field(ge=1)                  # samples per problem
    temperature: float = Field(ge=0.0)
    top_p: float = Field(gt=0.0, le=1.0)
    source: DataSource

    @model_validator(mode="after")
    def _check_sampling(self) -> BenchSuite:
        if self.k > self.n:
            raise ValueError(f"k = {self.k} needs at least as many samples, but n = {self.n}")
        if self.temperature == 0.0 and self.n != 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one answer, so n must be 1, not {self.n}")
        if self.metric == MetricKind.ACC_AT_1 and self.k != 1:
            raise ValueError(f"acc@1 needs k = 1, not {self.k}")
        return self

    def local_names_or_own(self) -> tuple[str, ...]:
        """The names looked for under the data directory: the suite's own name first."""
        return tuple(dict.fromkeys((self.name, *self.source.local_names)))


class BenchProtocol(_Frozen):
    """The evaluation protocol: every suite, the prompt and the generation budget."""

    name: str = Field(min_length=1)
    max_new_tokens: int = Field(ge=1)
    bootstrap_resamples: int = Field(ge=1)
    apply_chat_template: bool = True
    prompt_template: str
    suites: tuple[BenchSuite, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> BenchProtocol:
        if self.prompt_template.count(PROBLEM_PLACEHOLDER) != 1:
            raise ValueError(f"prompt_template must contain {PROBLEM_PLACEHOLDER} exactly once")
        total = math.fsum(suite.weight for suite in self.suites)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            listed = ", ".join(f"{s.name} {s.weight:g}" for s in self.suites)
            raise ValueError(f"suite weights must sum to 1, they sum to {total:.12g} ({listed})")
        return self

    def suite(self, name: str) -> BenchSuite:
        for suite in self.suites:
            if suite.name == name:
                return suite
        raise KeyError(f"protocol {self.name} has no suite {name!r}; it has {', '.join(self.weights())}")

    def weights(self) -> dict[str, float]:
        return {suite.name: suite.weight for suite in self.suites}

    def render_prompt(self, problem: str) -> str:
        """The user message for `problem` (the chat template, when applied, is the evaluator's job)."""
        return self.prompt_template.replace(PROBLEM_PLACEHOLDER, problem)


def protocol_names() -> list[str]:
    """The protocols shipped with POISE, loadable by name."""
    return sorted(path.stem for path in PROTOCOL_DIR.glob("*.toml"))


def load_protocol(name_or_path: str | Path = "paper") -> BenchProtocol:
    """The protocol named `name_or_path` (a file shipped next to this module) or read from that TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():
        path = PROTOCOL_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise BenchmarkDataError(f"no protocol named {str(name_or_path)!r}; shipped protocols: "
                                     f"{', '.join(protocol_names())}, or give the path of a .toml file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchmarkDataError(f"protocol file {path} does not exist") from None
    except OSError as error:
        raise BenchmarkDataError(f"protocol file {path} cannot be read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise BenchmarkDataError(f"protocol file {path} is not valid TOML: {error}") from None
    suites = raw.get("suites")
    if isinstance(suites, dict):
        raw = {**raw, "suites": [_with_name(name, suite) for name, suite in suites.items()]}
    try:
        return BenchProtocol.model_validate(raw)
    except ValidationError as error:
        raise BenchmarkDataError(f"protocol file {path}: {_problems(error, raw)}") from None


def _with_name(name: str, suite: object) -> object:
    return {"name": name, **suite} if isinstance(suite, dict) else suite


def _problems(error: ValidationError, raw: dict) -> str:
    """Validation problems with suites named as in the file ("suites.aime24.k", not "suites.0.k") and unknown
    keys called that."""
    names = [suite.get("name") if isinstance(suite, dict) else i for i, suite in enumerate(raw.get("suites", []))]
    listed = []
    for problem in error.errors():
        loc = list(problem["loc"])
        if len(loc) >= 2 and loc[0] == "suites" and isinstance(loc[1], int) and loc[1] < len(names):
            loc[1] = names[loc[1]]
        unknown = problem["type"] == "extra_forbidden"
        message = "unknown key" if unknown else problem["msg"].removeprefix("Value error, ")
        listed.append(f"{'.'.join(map(str, loc))}: {message}" if loc else message)
    return "; ".join(listed)
