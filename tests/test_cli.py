"""The command line, through the installed `poise` entry point."""

import shutil
import subprocess
import sys
import warnings

import pytest

from app import cli
from app.cli import main


def test_selfcheck_checks_every_reference_algorithm(capsys):
    assert main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "8/8 reference algorithms pass the check" in out and "gmpo" in out


def test_installed_entry_point_runs():
    executable = shutil.which("poise") or f"{sys.prefix}/bin/poise"
    done = subprocess.run([executable, "algorithms"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dr_grpo" in done.stdout and "cispo" in done.stdout
    assert "arXiv:2402.03300" in done.stdout


# --------------------------------------------------------------------------------------------- start-up


HEAVY_LIBRARIES = ("torch", "transformers", "sklearn", "scipy")


def loaded_heavy_libraries(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_cli_module_and_its_parser_import_no_heavy_library():
    assert loaded_heavy_libraries("import app.cli\napp.cli.build_parser()") == []
    assert loaded_heavy_libraries("import poise.algorithms") == ["torch"]  # the probe sees an import


def test_status_and_show_import_no_heavy_library(tmp_path):
    from app.bench_cli import shown_node, write_synthetic_run

    write_synthetic_run(tmp_path)
    commands = [["status", "--run-dir", str(tmp_path)], ["show", shown_node(tmp_path), "--run-dir", str(tmp_path)]]
    code = "import contextlib, io\nfrom app.cli import main\n" + "".join(
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0\n" for argv in commands)
    assert loaded_heavy_libraries(code) == []  # the synthetic root has 3 seeds: status draws their interval


# ----------------------------------------------------------------------------------------------- misuse


@pytest.mark.parametrize(("flags", "says"), [
    (["--budget", "-1"], "argument --budget: must be at least 1 (got -1)"),
    (["--parallel", "0"], "argument --parallel: must be at least 1 (got 0)"),
    (["--root-seeds", "two"], "argument --root-seeds: 'two' is not a whole number"),
])
def test_a_bad_count_is_a_usage_error_of_two_lines(flags, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["run", *flags, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.splitlines() == [f"poise run: {says}", "(`poise run --help` lists the options)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "says"), [
    (["--llm-budget-usd", "-1"], "invalid run settings: --llm-budget-usd: Input should be greater than or equal to "
                                 "0 (got -1.0)"),
    (["--accuracy-tolerance", "-0.5"], "invalid run settings: --accuracy-tolerance: Input should be greater than or "
                                       "equal to 0 (got -0.5)"),
    (["--llm", "gpt-4"], "invalid run settings: --llm: llm 'gpt-4' is not one of: offline, anthropic:<model>, "
                         "openai:<url>#<model>"),
])
def test_invalid_run_settings_are_one_line_without_pydantics_dump(flags, says, capsys, tmp_path):
    assert main(["run", *flags, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(says)
    assert "pydantic.dev" not in err and "validation error" not in err


@pytest.mark.parametrize("where", ["under /proc", "under a file"])
def test_a_run_dir_that_cannot_be_written_is_one_line_and_exit_2(where, capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    run_dir = "/proc/poise-test-run" if where == "under /proc" else str(tmp_path / "a-file" / "run")
    assert main(["run", "--protocol", "tiny", "--run-dir", run_dir]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"cannot write in --run-dir {run_dir} (")
    assert "Traceback" not in err


def test_a_run_dir_that_is_a_file_is_refused_in_one_line(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    assert main(["run", "--protocol", "tiny", "--run-dir", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and len(err.splitlines()) == 1


def damaged_archive(run_dir) -> None:
    """A real archive whose pages after the first two are overwritten: SQLite calls it malformed."""
    from app.bench_cli import write_synthetic_run

    write_synthetic_run(run_dir)
    path = run_dir / "archive.db"
    data = bytearray(path.read_bytes())
    assert len(data) > 6 * 4096
    data[2 * 4096:6 * 4096] = b"\x5a" * (4 * 4096)
    path.write_bytes(data)


@pytest.mark.parametrize("command", [["status"], ["show", "n001"], ["report"]])
def test_a_damaged_archive_points_at_poise_doctor(command, capsys, tmp_path):
    damaged_archive(tmp_path)
    assert main([*command, "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("poise: ") and f"poise doctor --run-dir {tmp_path}" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_unexpected_error_is_one_line_and_debug_lets_the_traceback_through(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("the flux capacitor is cold")

    monkeypatch.setattr(cli, "cmd_algorithms", broken)
    assert main(["algorithms"]) == 1
    assert capsys.readouterr().err.splitlines() == ["poise: RuntimeError: the flux capacitor is cold",
                                                    "(run `poise --debug ...` for the traceback)"]
    with pytest.raises(RuntimeError, match="flux capacitor"):
        main(["--debug", "algorithms"])


def test_ctrl_c_exits_130_with_or_without_debug(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_algorithms", interrupted)
    assert main(["algorithms"]) == 130
    assert main(["--debug", "algorithms"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_library_warnings_are_kept_out_unless_debug(monkeypatch, recwarn):
    def tied_seeds_t_test(args):  # the warning `poise status` printed before poise.scoring.welch_p was written out
        from scipy import stats

        stats.ttest_ind([0.5, 0.5, 0.5], [0.4, 0.6, 0.5], equal_var=False)
        warnings.warn_explicit("poise's own warning", UserWarning, "poise/scoring.py", 1, module="poise.scoring")
        return 0

    monkeypatch.setattr(cli, "cmd_algorithms", tied_seeds_t_test)
    assert main(["algorithms"]) == 0
    assert [str(w.message) for w in recwarn] == ["poise's own warning"]
    recwarn.clear()
    assert main(["--debug", "algorithms"]) == 0
    assert any("catastrophic cancellation" in str(w.message) for w in recwarn)


@pytest.mark.slow  # trains and evaluates the root on the tiny protocol: ~30 s on two busy cores
def test_a_run_whose_every_proposal_fails_exits_1_saying_why(monkeypatch, capsys, tmp_path):
    from poise.agents import Agents

    monkeypatch.setattr("poise.agents._DEFAULT", Agents(max_retries=0))  # no SDK backoff: seconds, not a minute
    code = main(["run", "--protocol", "tiny", "--budget", "1", "--root-seeds", "1", "--replicate-seeds", "1",
                 "--llm", "openai:http://127.0.0.1:9/v1#m", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("every proposal failed: openai:m (propose): cannot reach http://127.0.0.1:9/v1")
    assert "Traceback" not in err
