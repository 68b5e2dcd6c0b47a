"""The README's commands, run in order as a newcomer would on a fresh clone (issue 25, docs/operations.md).

Every `bin/...` line of the README's bash blocks is in CHECKED: either run here, in a copy of the repository's
tracked files (the long runs with a tiny budget, said beside each), or exempt with the test that covers it and
why it cannot run here. A command added to the README without an entry fails `test_every_readme_command_is_checked`,
so the list cannot drift from the README.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY = "--protocol tiny --root-seeds 2 --replicate-seeds 2"


@dataclass(frozen=True)
class Run:
    """Run the command as written, or as `instead` (the same command with a budget that fits CI); `expect` must
    appear in its output (what it points at next, or what it shows)."""
    instead: str | None = None
    expect: tuple[str, ...] = ()


@dataclass(frozen=True)
class Covered:
    """Not run here: `where` is the test that runs it, `why` says why not here."""
    where: str
    why: str


CHECKED: dict[str, Run | Covered] = {
    "bin/test": Covered(".ci/run", "this test runs inside it"),
    "bin/poise run --protocol tiny --budget 6 --run-dir runs/first": Run(
        f"bin/poise run --budget 3 {TINY} --run-dir runs/first",
        expect=("bin/poise status --run-dir runs/first", "bin/poise show best --run-dir runs/first",
                "bin/poise report --run-dir runs/first", "bin/poise ui --run-dir runs/first")),
    "bin/poise status --run-dir runs/first": Run(expect=("evaluated", "best")),
    "bin/poise show best --run-dir runs/first": Run(expect=("proposal", "reflection")),
    "bin/poise report --run-dir runs/first": Run(expect=("runs/first/report.html",)),
    "bin/poise ui --run-dir runs/first": Run("bin/poise ui --run-dir runs/first --port 0"),  # served, then Ctrl-C
    "bin/poise run --budget 16": Run(f"bin/poise run --budget 1 {TINY}", expect=("bin/poise status",)),
    "bin/poise status": Run(expect=("evaluated",)),
    "bin/poise run --parent-selection poise --run-dir runs/p1": Run(
        f"bin/poise run --parent-selection poise --budget 1 {TINY} --run-dir runs/p1"),
    "bin/poise run --seeding racing --split --report-seeds 5 --run-dir runs/r1": Run(
        f"bin/poise run --seeding racing --split --report-seeds 2 --budget 4 {TINY} --run-dir runs/r1",
        expect=("trainings",)),
    'bin/poise run --objective length --directive "shorter answers, same accuracy" --run-dir runs/short': Run(
        f'bin/poise run --objective length --directive "shorter answers, same accuracy" --budget 1 {TINY} '
        "--run-dir runs/short"),
    "bin/poise run --protocol tiny --evaluator vllm --run-dir runs/v": Covered(
        "tests/test_vllm.py", "starts a real vLLM server from .vllm-venv (the `vllm` marker)"),
    "bin/poise evaluate CHECKPOINT --protocol paper --evaluator vllm": Covered(
        "tests/test_vllm.py, tests/test_benchmarks.py", "needs a vLLM server and the six benchmarks' data"),
    "bin/poise doctor --run-dir runs/first": Run(expect=("ok",)),
    "bin/poise run --llm anthropic:claude-opus-5 --llm screen=anthropic:claude-haiku-5-5 --llm-budget-usd 20": Covered(
        "tests/test_llm_live.py", "needs ANTHROPIC_API_KEY and spends money; the loop with a stand-in server is "
        "tests/test_llm_loop.py"),
    "bin/poise run --llm openai:http://localhost:8000/v1#Qwen2.5-32B-Instruct --llm reflect=offline": Covered(
        "tests/test_llm_loop.py", "needs an OpenAI-compatible server with that model; the test serves a stand-in"),
}


def readme_commands(text: str) -> list[str]:
    """The `bin/...` command lines of the README's bash blocks, in order, without their trailing comments."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line.startswith("bin/"):
                commands.append(line)
    return commands


def test_every_readme_command_is_checked():
    commands = readme_commands(README.read_text())
    assert commands[:2] == ["bin/test", "bin/poise run --protocol tiny --budget 6 --run-dir runs/first"], \
        "the README's first screen: set-up + tests, then a first run"
    assert not [c for c in commands if c not in CHECKED], "README commands with no entry in CHECKED"
    assert not [c for c in CHECKED if c not in commands], "CHECKED entries no longer in the README"
    assert len(set(commands)) == len(commands)


def test_readme_comment_stripping_keeps_urls_with_fragments():
    text = "```bash\nbin/poise run --llm openai:http://h/v1#M   # a comment\n```\n"
    assert readme_commands(text) == ["bin/poise run --llm openai:http://h/v1#M"]


def _fresh_copy(dest: Path) -> Path:
    """The repository's tracked files (what a clone has), with this checkout's .venv linked in: the README's
    commands run there, so the runs they make land in the copy."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POISE_", "ANTHROPIC_", "OPENAI_"))}
    env["POISE_MAX_THREADS"] = os.environ.get("POISE_MAX_THREADS", "1")
    return env


def _serve_ui_once(command: str, cwd: Path) -> str:
    """Start `poise ui`, fetch its front page, stop it with Ctrl-C as a person would; its output."""
    # Ctrl-C as at a terminal: SIGINT at its default, which a process started under an xdist worker would not
    # have (the worker ignores SIGINT, and Python keeps an ignored SIGINT ignored).
    proc = subprocess.Popen(f"exec {command}", shell=True, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "http://" in line or not line:
                break
        found = re.search(r"http://[^\s]+/", line)
        assert found, f"`{command}` did not say where it serves: {line!r}"
        with urllib.request.urlopen(found.group(0), timeout=30) as response:
            page = response.read().decode()
        assert response.status == 200 and "first" in page
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"`{command}` did not stop on Ctrl-C within 30 s:\n{out[-3000:]}") from None
    assert proc.returncode in (0, 130), out
    return line + out


@pytest.mark.slow
def test_readme_commands_work_in_order_on_a_fresh_copy(tmp_path):
    repo = _fresh_copy(tmp_path / "repo")
    ran = []
    for command in readme_commands(README.read_text()):
        check = CHECKED[command]
        if isinstance(check, Covered):
            continue
        actual = check.instead or command
        if " ui " in f" {actual} ":
            out = _serve_ui_once(actual, repo)
        else:
            done = subprocess.run(actual, shell=True, cwd=repo, env=_env(), capture_output=True, text=True,
                                  timeout=900)
            out = done.stdout + done.stderr
            assert done.returncode == 0, f"`{actual}` exited {done.returncode}:\n{out[-3000:]}"
            assert "Traceback" not in out, f"`{actual}` printed a traceback:\n{out[-3000:]}"
        for text in check.expect:
            assert text in out, f"`{actual}` did not mention {text!r}:\n{out[-3000:]}"
        ran.append(command)
    assert (repo / "runs/first/report.html").is_file()
    assert len(ran) >= 9, ran
