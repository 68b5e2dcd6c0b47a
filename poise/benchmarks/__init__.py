"""The paper's six math benchmarks as data: the protocol file, its typed suites, and the loaders of their public
releases (docs/evaluation.md, "Benchmarks").

    protocol = load_protocol("paper")
    for suite in protocol.suites:
        problems = load_problems(suite)            # data_dir=..., or POISE_BENCH_DATA, or the hub
        prompts = [protocol.render_prompt(p.problem) for p in problems]

Grading the responses is poise.grading's job.
"""

from poise.benchmarks.loaders import DATA_DIR_ENV, BenchProblem, load_problems, problem_from_record, read_records
from poise.benchmarks.suites import (
    BenchmarkDataError,
    BenchProtocol,
    BenchSuite,
    DataSource,
    load_protocol,
    protocol_names,
)

__all__ = [
    "DATA_DIR_ENV",
    "BenchProblem",
    "BenchProtocol",
    "BenchSuite",
    "BenchmarkDataError",
    "DataSource",
    "load_problems",
    "load_protocol",
    "problem_from_record",
    "protocol_names",
    "read_records",
]
