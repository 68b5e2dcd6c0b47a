"""poise.benchmarks: the paper's protocol file and its checks, and the six suites loaded from small files in the
column layouts of their usual public releases, JSONL, JSON and parquet (docs/evaluation.md, "Benchmarks")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from poise.benchmarks import BenchmarkDataError, BenchProblem, load_problems, load_protocol
from poise.contracts import MetricKind

PAPER = load_protocol("paper")
PAPER_TEXT = (Path(__file__).resolve().parents[1] / "poise" / "benchmarks" / "paper.toml").read_text()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


def triples(problems: list[BenchProblem]) -> list[tuple[str, str, str]]:
    return [(p.id, p.problem, p.answer) for p in problems]


# ---- the protocol --------------------------------------------------------------------------------------------


def test_the_paper_protocol_has_the_papers_suites_metrics_and_weights():
    assert [s.name for s in PAPER.suites] == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    assert PAPER.weights() == {"aime24": 0.2, "aime25": 0.2, "amc23": 0.15, "math500": 0.15, "minerva": 0.15,
                               "olympiadbench": 0.15}
    assert math.isclose(math.fsum(PAPER.weights().values()), 1.0, abs_tol=1e-12)
    for name in ("aime24", "aime25", "amc23"):
        suite = PAPER.suite(name)
        sampling = (suite.metric, suite.k, suite.n, suite.temperature, suite.top_p)
        assert sampling == (MetricKind.PASS_AT_K, 32, 32, 1.0, 1.0)
    for name in ("math500", "minerva", "olympiadbench"):
        suite = PAPER.suite(name)
        assert (suite.metric, suite.k, suite.n, suite.temperature) == (MetricKind.ACC_AT_1, 1, 1, 0.0)
    assert PAPER.max_new_tokens == 4096
    assert PAPER.bootstrap_resamples >= 1000
    assert PAPER.apply_chat_template


def test_the_prompt_puts_the_problem_in_and_asks_for_a_boxed_answer():
    prompt = PAPER.render_prompt("What is $1+1$?")
    assert prompt.startswith("What is $1+1$?")
    assert r"\boxed{}" in prompt and "step by step" in prompt and "{problem}" not in prompt


def test_each_suite_names_a_default_release_and_its_files():
    for suite in PAPER.suites:
        assert "/" in suite.source.dataset and suite.source.files
        assert suite.local_names_or_own()[0] == suite.name


def protocol_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "protocol.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("change", "message"), [
    (("weight = 0.2\n", "weight = 0.25\n"), "weights must sum to 1, they sum to 1.05"),
    (("top_p = 1.0\n", "top_p = 1.0\ntempreature = 0.7\n"), "suites.aime24.tempreature: unknown key"),
    (('name = "paper"\n', 'name = "paper"\nseed = 3\n'), "seed: unknown key"),
    (("k = 32\nn = 32", "k = 32\nn = 16"), "suites.aime24: k = 32 needs at least as many samples, but n = 16"),
    (("k = 1\nn = 1\ntemperature = 0.0", "k = 1\nn = 4\ntemperature = 0.0"), "suites.math500: greedy decoding"),
    (("{problem}\n", "Solve it.\n"), "prompt_template must contain {problem}"),
    (('metric = "pass@k"', 'metric = "pass@all"'), "suites.aime24.metric"),
])
def test_a_protocol_that_breaks_a_rule_is_refused_naming_the_key(tmp_path, change, message):
    old, new = change
    assert old in PAPER_TEXT
    path = protocol_file(tmp_path, PAPER_TEXT.replace(old, new, 1))
    with pytest.raises(BenchmarkDataError, match="protocol.toml") as refused:
        load_protocol(path)
    assert message in str(refused.value)


def test_a_protocol_with_other_weights_that_sum_to_one_loads(tmp_path):
    text = PAPER_TEXT.replace("weight = 0.2\n", "weight = 0.25\n", 1).replace("weight = 0.2\n", "weight = 0.15\n", 1)
    assert load_protocol(protocol_file(tmp_path, text)).weights()["aime24"] == 0.25


def test_an_unknown_protocol_name_lists_the_shipped_ones():
    with pytest.raises(BenchmarkDataError, match="no protocol named 'papr'.*paper"):
        load_protocol("papr")


# ---- the six suites in their releases' layouts ---------------------------------------------------------------


def test_aime24_from_the_h4_parquet_release(tmp_path):
    write_parquet(tmp_path / "aime24" / "data" / "train-00000-of-00001.parquet", [
        {"id": 60, "problem": "Every morning Aya walks...", "solution": "... $\\boxed{204}$", "answer": "204",
         "url": "https://artofproblemsolving.com/...", "year": "2024"},
        {"id": 61, "problem": "Let $ABC$ be a triangle...", "solution": "...", "answer": "113", "url": "u",
         "year": "2024"},
    ])
    problems = load_problems(PAPER.suite("aime24"), tmp_path)
    assert triples(problems) == [("60", "Every morning Aya walks...", "204"),
                                 ("61", "Let $ABC$ be a triangle...", "113")]


def test_aime24_from_the_maxwell_jia_release_under_its_own_name(tmp_path):
    write_parquet(tmp_path / "AIME_2024" / "aime_2024_problems.parquet", [
        {"ID": "2024-I-1", "Problem": "Every morning Aya...", "Solution": "...", "Answer": 204},
    ])
    assert triples(load_problems(PAPER.suite("aime24"), tmp_path)) == [("2024-I-1", "Every morning Aya...", "204")]


def test_aime25_from_opencompass_reads_part_i_then_part_ii(tmp_path):
    write_jsonl(tmp_path / "aime25" / "aime2025-II.jsonl", [{"question": "II-1", "answer": "240"}])
    write_jsonl(tmp_path / "aime25" / "aime2025-I.jsonl", [{"question": "I-1", "answer": "70"},
                                                         {"question": "I-2", "answer": "588"}])
    problems = load_problems(PAPER.suite("aime25"), tmp_path)
    assert triples(problems) == [("aime25-0", "I-1", "70"), ("aime25-1", "I-2", "588"), ("aime25-2", "II-1", "240")]


def test_amc23_float_answers_become_integers(tmp_path):
    write_parquet(tmp_path / "amc23.parquet", [
        {"id": 0, "problem": "Cities A and B are 45 miles apart...", "answer": 27.0, "url": "u"},
        {"id": 1, "problem": "What is the ratio...", "answer": 0.5, "url": "u"},
    ])
    problems = load_problems(PAPER.suite("amc23"), tmp_path)
    assert [(p.id, p.answer) for p in problems] == [("0", "27"), ("1", "0.5")]


def test_amc23_from_a_question_answer_jsonl(tmp_path):
    write_jsonl(tmp_path / "amc23" / "test.jsonl", [{"question": "How many...?", "answer": "3"}])
    assert triples(load_problems(PAPER.suite("amc23"), tmp_path)) == [("amc23-0", "How many...?", "3")]


def test_math500_from_the_h4_jsonl_uses_unique_id(tmp_path):
    write_jsonl(tmp_path / "math500" / "test.jsonl", [
        {"problem": "Convert the point $(0,3)$ to polar coordinates.", "solution": "... \\boxed{(3,\\frac{\\pi}{2})}",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
    ])
    [problem] = load_problems(PAPER.suite("math500"), tmp_path)
    assert problem == BenchProblem("test/precalculus/807.json", "Convert the point $(0,3)$ to polar coordinates.",
                                   "\\left( 3, \\frac{\\pi}{2} \\right)")


def test_math500_from_a_json_list(tmp_path):
    (tmp_path / "math500.json").write_text(json.dumps([{"problem": "p", "answer": "$\\frac{1}{2}$"}]))
    assert triples(load_problems(PAPER.suite("math500"), tmp_path)) == [("math500-0", "p", "\\frac{1}{2}")]


def test_minerva_from_math_ai(tmp_path):
    write_jsonl(tmp_path / "minerva" / "test.jsonl", [{"question": "Find the luminosity...", "answer": "7.5e-5"}])
    problems = load_problems(PAPER.suite("minerva"), tmp_path)
    assert triples(problems) == [("minerva-0", "Find the luminosity...", "7.5e-5")]


def test_minerva_from_the_qwen_eval_file_takes_the_boxed_answer_of_the_solution(tmp_path):
    write_jsonl(tmp_path / "minerva_math" / "test.jsonl", [
        {"problem": "Each of the two Magellan telescopes...", "solution": "... so the answer is $\\boxed{1.6}$ m.",
         "type": "Introduction to Astronomy (8.282J Spring 2006)", "idx": 0},
        {"problem": "Compute...", "solution": "We get \\boxed{\\frac{1}{4}}.", "type": "t", "idx": 1},
    ])
    problems = load_problems(PAPER.suite("minerva"), tmp_path)
    assert [(p.id, p.answer) for p in problems] == [("0", "1.6"), ("1", "\\frac{1}{4}")]


def test_olympiadbench_from_hothan_joins_multiple_final_answers(tmp_path):
    write_parquet(tmp_path / "olympiadbench" / "OE_TO_maths_en_COMP.parquet", [
        {"id": 1606, "question": "Xenia and Sergey play...", "solution": ["First...", "Then..."],
         "final_answer": ["$\\frac{1}{2}$"], "is_multiple_answer": False, "unit": None,
         "answer_type": "Numerical", "error": None},
        {"id": 1607, "question": "Find all pairs...", "solution": ["..."], "final_answer": ["$1$", "$2$"],
         "is_multiple_answer": True, "unit": None, "answer_type": "Numerical", "error": None},
    ])
    problems = load_problems(PAPER.suite("olympiadbench"), tmp_path)
    assert triples(problems) == [("1606", "Xenia and Sergey play...", "\\frac{1}{2}"),
                                 ("1607", "Find all pairs...", "1, 2")]


def test_olympiadbench_from_the_qwen_eval_jsonl(tmp_path):
    write_jsonl(tmp_path / "olympiadbench" / "test.jsonl", [{"question": "Compute $T$.", "final_answer": ["$6$"]}])
    assert triples(load_problems(PAPER.suite("olympiadbench"), tmp_path)) == [("olympiadbench-0", "Compute $T$.", "6")]


def test_the_data_directory_comes_from_poise_bench_data(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "aime25.jsonl", [{"problem": "p", "answer": "1"}])
    monkeypatch.setenv("POISE_BENCH_DATA", str(tmp_path))
    assert triples(load_problems(PAPER.suite("aime25"))) == [("aime25-0", "p", "1")]


def test_a_download_takes_only_the_protocols_files_in_order(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    write_jsonl(snapshot / "aime2025-II.jsonl", [{"question": "II-1", "answer": "240"}])
    write_jsonl(snapshot / "aime2025-I.jsonl", [{"question": "I-1", "answer": "70"}])
    write_jsonl(snapshot / "other.jsonl", [{"question": "stray", "answer": "0"}])  # from some other download
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.delenv("POISE_BENCH_DATA", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    problems = load_problems(PAPER.suite("aime25"))
    assert [p.problem for p in problems] == ["I-1", "II-1"]
    assert calls == [{"repo_id": "opencompass/AIME2025", "repo_type": "dataset", "revision": None,
                      "allow_patterns": ["aime2025-I.jsonl", "aime2025-II.jsonl"]}]


# ---- errors a person can act on ------------------------------------------------------------------------------


def test_missing_data_names_the_suite_the_paths_looked_at_and_the_setting(tmp_path):
    with pytest.raises(BenchmarkDataError) as missing:
        load_problems(PAPER.suite("aime24"), tmp_path)
    message = str(missing.value)
    assert "suite aime24" in message
    assert f"{tmp_path / 'aime24'}/" in message and str(tmp_path / "aime_2024.parquet") in message
    assert "POISE_BENCH_DATA" in message


def test_offline_without_local_data_says_to_set_poise_bench_data(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("POISE_BENCH_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BenchmarkDataError) as offline:
        load_problems(PAPER.suite("math500"))
    message = str(offline.value)
    assert "HuggingFaceH4/MATH-500" in message and "POISE_BENCH_DATA" in message and "suite math500" in message


def test_a_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": "q", "answer": \n')
    with pytest.raises(BenchmarkDataError, match=rf"{path}, line 2: not valid JSON"):
        load_problems(PAPER.suite("math500"), tmp_path)


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    write_jsonl(tmp_path / "math500.jsonl", [{"problem": "p", "answer": "1"}]).open("a").write('["q", "2"]\n')
    with pytest.raises(BenchmarkDataError, match="line 2: a JSON list where an object"):
        load_problems(PAPER.suite("math500"), tmp_path)


def test_a_missing_problem_column_lists_the_columns_found(tmp_path):
    path = write_parquet(tmp_path / "minerva.parquet", [{"prompt": "p", "target": "1"}])
    with pytest.raises(BenchmarkDataError) as malformed:
        load_problems(PAPER.suite("minerva"), tmp_path)
    message = str(malformed.value)
    assert f"{path}, row 1" in message
    assert "no problem column (one of problem, question, Problem, Question)" in message
    assert "columns found: prompt, target" in message


def test_a_missing_answer_column_without_a_boxed_solution_is_named(tmp_path):
    write_jsonl(tmp_path / "minerva.jsonl", [{"problem": "p", "solution": "it is 3"}])
    with pytest.raises(BenchmarkDataError, match=r"line 1: no answer column .* its solution has no \\boxed"):
        load_problems(PAPER.suite("minerva"), tmp_path)


def test_an_empty_file_is_named(tmp_path):
    path = tmp_path / "amc23.jsonl"
    path.write_text("\n")
    with pytest.raises(BenchmarkDataError, match=rf"{path} holds no records"):
        load_problems(PAPER.suite("amc23"), tmp_path)


def test_an_empty_answer_is_named_with_its_row(tmp_path):
    write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "p", "answer": "5"}, {"problem": "q", "answer": " "}])
    with pytest.raises(BenchmarkDataError, match=r"aime24.jsonl, line 2: the answer \(answer\) is empty"):
        load_problems(PAPER.suite("aime24"), tmp_path)
    write_parquet(tmp_path / "aime25.parquet", [{"question": "p", "answer": None}])
    with pytest.raises(BenchmarkDataError, match=r"aime25.parquet, row 1: the answer \(answer\) is empty"):
        load_problems(PAPER.suite("aime25"), tmp_path)


def test_duplicate_ids_are_refused(tmp_path):
    write_jsonl(tmp_path / "math500.jsonl", [{"problem": "p", "answer": "1", "unique_id": "a"},
                                             {"problem": "q", "answer": "2", "unique_id": "a"}])
    with pytest.raises(BenchmarkDataError, match="id 'a' appears twice"):
        load_problems(PAPER.suite("math500"), tmp_path)


def test_an_unreadable_parquet_file_is_named(tmp_path):
    path = tmp_path / "olympiadbench.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(BenchmarkDataError, match=rf"{path}: not a readable parquet file"):
        load_problems(PAPER.suite("olympiadbench"), tmp_path)
