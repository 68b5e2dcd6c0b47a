r"""A suite's problems, read from the files of its usual public releases (docs/evaluation.md, "Benchmark data").

Where the files are: `data_dir` if given, else the directory in POISE_BENCH_DATA, else the suite's default
release downloaded from the Hugging Face hub into the hub's cache. Under a data directory, for each of the
suite's local names (its own name first, then `source.local_names`), the first that has data is used:

    <dir>/<name>/              every .jsonl, .json and .parquet file below it, in path order (hidden folders,
                               such as a download's .cache, are skipped); e.g. AIME 2025 I and II as two files
    <dir>/<name>.jsonl         one JSON object per line
    <dir>/<name>.json          a list of objects
    <dir>/<name>.parquet

What a record holds, whatever the release (`problem_from_record`): the problem is the first of the columns
problem, question, Problem, Question; the answer the first of answer, Answer, final_answer (a list, as in
OlympiadBench, is joined with ", "; numbers such as 27.0 become "27"; surrounding $ are dropped), or, in a
release without an answer column, the last \boxed{} of its solution; the id the first of id, ID, unique_id,
idx, else "<suite>-<position in the suite>".
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from poise.benchmarks.suites import BenchmarkDataError, BenchSuite
from poise.grading import extract_boxed, strip_dollars

DATA_DIR_ENV = "POISE_BENCH_DATA"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question")
ANSWER_COLUMNS = ("answer", "Answer", "final_answer")
SOLUTION_COLUMNS = ("solution", "Solution")
ID_COLUMNS = ("id", "ID", "unique_id", "idx")


@dataclass(frozen=True)
class BenchProblem:
    id: str
    problem: str
    answer: str   # the reference answer, plain (as grading.grade takes it)


def load_problems(suite: BenchSuite, data_dir: str | Path | None = None) -> list[BenchProblem]:
    """Every problem of `suite`, in release order, from `data_dir`, POISE_BENCH_DATA or the hub (see above)."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    files = local_files(suite, Path(root)) if root is not None else downloaded_files(suite)
    problems: list[BenchProblem] = []
    seen: dict[str, str] = {}
    for path in files:
        for where, record in read_records(path):
            problem = problem_from_record(record, default_id=f"{suite.name}-{len(problems)}", where=f"{path}, {where}")
            if problem.id in seen:
                raise BenchmarkDataError(f"suite {suite.name}: id {problem.id!r} appears twice ({seen[problem.id]} and "
                                         f"{path}, {where}); ids must be unique within a suite")
            seen[problem.id] = f"{path}, {where}"
            problems.append(problem)
    return problems


# ---- where the files are -----------------------------------------------------------------------------------


def local_files(suite: BenchSuite, root: Path) -> list[Path]:
    """The suite's data files under `root`, by the layout above; BenchmarkDataError naming every place looked."""
    looked = []
    for name in suite.local_names_or_own():
        folder = root / name
        looked.append(f"{folder}/")
        if folder.is_dir() and (files := data_files(folder)):
            return files
        for suffix in DATA_SUFFIXES:
            path = root / f"{name}{suffix}"
            looked.append(str(path))
            if path.is_file():
                return [path]
    raise BenchmarkDataError(
        f"suite {suite.name}: no data file found; looked for {', '.join(looked)} (.jsonl, .json or .parquet).\n"
        f"Put a release of {suite.title} there (e.g. {suite.source.dataset}), or point data_dir / {DATA_DIR_ENV} "
        "at the directory that holds it (docs/evaluation.md).")


def data_files(folder: Path, patterns: tuple[str, ...] = ("*",)) -> list[Path]:
    """Data files below `folder` whose path relative to it matches one of `patterns`, in path order; hidden
    folders skipped."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if (path.suffix in DATA_SUFFIXES and path.is_file() and not any(p.startswith(".") for p in relative.parts)
                and any(fnmatch.fnmatch(relative.as_posix(), pattern) for pattern in patterns)):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def downloaded_files(suite: BenchSuite) -> list[Path]:
    """The suite's default release from the Hugging Face hub (or the hub's local cache of it)."""
    source = suite.source
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id=source.dataset, repo_type="dataset", revision=source.revision,
                                 allow_patterns=list(source.files))
    except Exception as error:  # offline, no such dataset, no network, no huggingface_hub
        raise BenchmarkDataError(
            f"suite {suite.name}: cannot download {source.dataset} from the Hugging Face hub "
            f"({type(error).__name__}).\nOn a machine without the hub, copy a release of {suite.title} to "
            f"${DATA_DIR_ENV}/{suite.name}/ and set {DATA_DIR_ENV} (docs/evaluation.md).") from error
    # Only the protocol's patterns: the snapshot folder also holds files other downloads took from that revision.
    files = data_files(Path(root), source.files)
    if not files:
        raise BenchmarkDataError(
            f"suite {suite.name}: {source.dataset} has no data file matching {list(source.files)}; the release's "
            "layout may have changed: fix source.files in the protocol, or copy its files to "
            f"${DATA_DIR_ENV}/{suite.name}/")
    return files


# ---- records ---------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for every record of a .jsonl, .json (a list of objects) or .parquet file; `where` is
    "line 3", "record 3" or "row 3" (counted from 1)."""
    if path.suffix == ".parquet":
        records = list(_parquet_records(path))
    elif path.suffix == ".jsonl":
        records = list(_jsonl_records(path))
    elif path.suffix == ".json":
        records = list(_json_records(path))
    else:
        raise BenchmarkDataError(f"{path}: not a data file; use .jsonl, .json or .parquet")
    if not records:
        raise BenchmarkDataError(f"{path} holds no records")
    return records


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkDataError(
                    f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(record, dict):
                raise BenchmarkDataError(f"{path}, line {number}: a JSON {type(record).__name__} where an object "
                                         "(one record per line) was expected")
            yield f"line {number}", record


def _json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkDataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(records, list):
        raise BenchmarkDataError(f"{path}: a JSON {type(records).__name__} where a list of records was expected")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise BenchmarkDataError(f"{path}, record {number}: a JSON {type(record).__name__}, not an object")
        yield f"record {number}", record


def _parquet_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise BenchmarkDataError(f"{path}: not a readable parquet file ({error})") from None
    for number, record in enumerate(table.to_pylist(), 1):
        yield f"row {number}", record


def problem_from_record(record: dict[str, Any], default_id: str, where: str) -> BenchProblem:
    """The problem, answer and id of one record, by the column rules above; `where` names it in errors."""
    found = f"columns found: {', '.join(record) or 'none'}"
    problem_column = _first_present(record, PROBLEM_COLUMNS)
    if problem_column is None:
        raise BenchmarkDataError(f"{where}: no problem column (one of {', '.join(PROBLEM_COLUMNS)}); {found}")
    problem = str(record[problem_column] or "").strip()
    if not problem:
        raise BenchmarkDataError(f"{where}: the problem ({problem_column}) is empty")
    answer_column = _first_present(record, ANSWER_COLUMNS)
    if answer_column is not None:
        answer = answer_text(record[answer_column])
        if not answer:
            raise BenchmarkDataError(f"{where}: the answer ({answer_column}) is empty")
    else:
        solution_column = _first_present(record, SOLUTION_COLUMNS)
        solution = _joined(record[solution_column]) if solution_column is not None else ""
        boxed = extract_boxed(solution)
        answer = strip_dollars(boxed) if boxed is not None else ""
        if not answer:
            what = (f"its {solution_column} has no \\boxed{{}} answer" if solution_column is not None
                    else f"no solution column ({', '.join(SOLUTION_COLUMNS)}) to take a \\boxed{{}} answer from")
            raise BenchmarkDataError(
                f"{where}: no answer column (one of {', '.join(ANSWER_COLUMNS)}) and {what}; {found}")
    id_column = next((column for column in ID_COLUMNS if record.get(column) is not None), None)
    return BenchProblem(id=str(record[id_column]) if id_column is not None else default_id, problem=problem,
                        answer=answer)


def answer_text(value: Any) -> str:
    """A release's answer value as a plain answer string: lists joined, integral floats as integers, floats
    without exponents (math-verify reads "1e-05" as 1·e − 5), surrounding $ dropped."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(text for text in (answer_text(item) for item in value) if text)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN: a missing value in a table
            return ""
        return str(int(value)) if value.is_integer() else format(Decimal(repr(value)), "f")
    return strip_dollars(str(value))


def _first_present(record: dict[str, Any], columns: tuple[str, ...]) -> str | None:
    return next((column for column in columns if column in record), None)


def _joined(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list | tuple) else str(value or "")
