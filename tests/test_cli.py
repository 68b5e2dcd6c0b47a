"""The command line, through the installed `poise` entry point."""

import shutil
import subprocess
import sys

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
