"""The vLLM backend's HTTP client and server management against local stand-in servers (real HTTP, no vLLM):
retries, refusals, recovery, start-up failures, and how the evaluator service reports them. The real server
is exercised in tests/test_vllm.py."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.serve import evaluator_runtime
from evaluator.service import EvaluatorService
from evaluator.vllm import Request, VLLMClient, VLLMEvaluator, VLLMRequestError, request_seed
from evaluator.vllm_server import ManagedServer, RemoteServer, ServerError, VLLMServer, checkpoint_dtype
from poise.bus import InProcBus
from poise.contracts import EvtFailed, WorkEvaluate
from poise.settings import ServiceSettings
from poise.testbed.checkpoints import base_checkpoint


class StandIn:
    """A local HTTP server speaking the part of vLLM's API the backend uses; `script` decides each answer."""

    def __init__(self, script=None, reload_status: int = 200) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.script = script or (lambda n, body: (200, None))
        self.reload_status = reload_status
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "policy", "root": "/somewhere"}]})
                else:
                    self._send(404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
                owner.calls.append((self.path, body))
                if self.path == "/collective_rpc":
                    return self._send(owner.reload_status, {"results": [None]})
                if self.path == "/reset_prefix_cache":
                    return self._send(200, {})
                status, override = owner.script(len(owner.calls), body)
                if status != 200:
                    return self._send(status, {"error": "scripted"})
                n = body["n"]
                choices = override or [{"index": i, "text": f"#{i}", "finish_reason": "stop",
                                        "token_ids": [5] * (i + 1)} for i in reversed(range(n))]
                self._send(200, {"choices": choices, "usage": {"completion_tokens": n}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Fixed(VLLMServer):
    def __init__(self, url: str, recoverable: bool = False) -> None:
        self.base_url = url
        self.recoverable = recoverable
        self.recovered = 0

    def ensure(self, checkpoint):
        return self.base_url

    def recover(self) -> bool:
        self.recovered += 1
        return self.recoverable

    def check(self):
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def stand_in():
    servers = []

    def make(**kwargs) -> StandIn:
        servers.append(StandIn(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


REQ = Request(prompt="Q:1+1\n", n=3, temperature=1.0, top_p=1.0, max_tokens=8, seed=11)


def test_samples_come_back_in_choice_order_with_the_servers_token_counts(stand_in):
    server = stand_in()
    samples = VLLMClient(Fixed(server.url)).sample([REQ])[0]
    assert [s.text for s in samples] == ["#0", "#1", "#2"] and [s.tokens for s in samples] == [1, 2, 3]
    path, body = server.calls[0]
    assert path == "/v1/completions"
    assert {k: body[k] for k in ("n", "temperature", "top_p", "max_tokens", "seed", "model")} == {
        "n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "seed": 11, "model": "policy"}
    chat = Request(prompt=[{"role": "user", "content": "hi"}], n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=1)
    server.script = lambda n, body: (200, [{"index": 0, "message": {"content": "\\boxed{2}"}, "finish_reason": "stop"}])
    (sample,) = VLLMClient(Fixed(server.url)).sample([chat])[0]
    assert server.calls[-1][0] == "/v1/chat/completions" and sample.text == "\\boxed{2}"


def test_5xx_and_429_are_retried_with_backoff_then_answered(stand_in):
    server = stand_in(script=lambda n, body: (503 if n == 1 else 429 if n == 2 else 200, None))
    client = VLLMClient(Fixed(server.url), retries=3, backoff_s=0.05)
    started = time.monotonic()
    assert len(client.sample([REQ])[0]) == 3
    assert client.stats.retries == 2 and len(server.calls) == 3
    assert time.monotonic() - started >= 0.05 + 0.1  # 0.05 s, then 0.1 s


def test_a_refused_request_is_not_retried_and_says_why(stand_in):
    server = stand_in(script=lambda n, body: (400, None))
    with pytest.raises(VLLMRequestError, match="refused a request.*HTTP 400"):
        VLLMClient(Fixed(server.url), retries=3, backoff_s=0.01).sample([REQ])
    assert len(server.calls) == 1


def test_retries_run_out_with_the_last_problem_named(stand_in):
    server = stand_in(script=lambda n, body: (502, None))
    with pytest.raises(VLLMRequestError, match="after 3 tries; last: HTTP 502"):
        VLLMClient(Fixed(server.url), retries=2, backoff_s=0.01).sample([REQ])


def test_a_connection_error_asks_the_server_to_recover(stand_in):
    server = stand_in()
    url = server.url
    server.close()   # nothing listens there any more
    fixed = Fixed(url)
    with pytest.raises(VLLMRequestError, match="ConnectError"):
        VLLMClient(fixed, retries=2, backoff_s=0.01).sample([REQ])
    assert fixed.recovered == 3


def test_a_wrong_number_of_choices_is_an_error(stand_in):
    server = stand_in(script=lambda n, body: (200, [{"index": 0, "text": "x", "finish_reason": "stop"}]))
    with pytest.raises(VLLMRequestError, match="1 choices for n=3"):
        VLLMClient(Fixed(server.url)).sample([REQ])


def test_request_seeds_depend_only_on_the_prompt_not_the_order():
    assert request_seed(0, "aime24", "7") == request_seed(0, "aime24", "7")
    assert len({request_seed(s, suite, i) for s in (0, 1) for suite in ("a", "b") for i in "0123"}) == 16
    assert all(0 <= request_seed(9, "x", str(i)) < 2 ** 31 for i in range(50))


def test_a_remote_server_without_dev_endpoints_fails_with_what_to_do(stand_in):
    server = stand_in(reload_status=404)
    with pytest.raises(ServerError, match="VLLM_SERVER_DEV_MODE=1"):
        RemoteServer(server.url + "/v1").ensure(base_checkpoint())
    ok = stand_in()
    remote = RemoteServer(ok.url)
    assert remote.ensure(base_checkpoint()) == ok.url
    remote.ensure(base_checkpoint())   # the same checkpoint again: no second reload
    reloads = [body for path, body in ok.calls if path == "/collective_rpc"]
    assert reloads == [{"method": "reload_weights", "kwargs": {"weights_path": str(base_checkpoint().resolve())}}]


def test_the_managed_command_is_checked_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="unknown placeholder"):
        ManagedServer(tmp_path, "{python} -m vllm --model {model} --port {port} --x {gpu}")
    with pytest.raises(ValueError, match="must contain"):
        ManagedServer(tmp_path, "{python} -m vllm --port {port}")
    assert checkpoint_dtype(base_checkpoint()) == "float32"


def test_a_server_that_exits_at_start_fails_with_its_status_and_log(tmp_path):
    srv = ManagedServer(tmp_path, "{python} -c \"import sys; print('no GPU here'); sys.exit(3)\" {model} {port}",
                        startup_timeout_s=30)
    with pytest.raises(ServerError, match="exited with status 3") as err:
        srv.ensure(base_checkpoint())
    assert "no GPU here" in str(err.value)
    assert srv.check() is None   # the node fails with the reason; the service stays healthy for the next one


def test_a_server_that_never_becomes_healthy_is_killed_and_the_node_fails_with_the_reason(tmp_path):
    marker = tmp_path / "child.pid"
    # the "server" forks a child in its group and never answers: both must be gone after the timeout
    command = ("{python} -c \"import os,sys,time; pid=os.fork(); "
               f"open('{marker}','w').write(str(pid)) if pid else None; time.sleep(600)\" {{model}} {{port}}")
    srv = ManagedServer(tmp_path / "vllm", command, startup_timeout_s=2)
    bus = InProcBus()
    failures = []
    bus.subscribe(EvtFailed.subject, failures.append)
    service = EvaluatorService(bus, backend=VLLMEvaluator(srv))
    checkpoint = shutil.copytree(base_checkpoint(), tmp_path / "ckpt")
    bus.publish(WorkEvaluate(run_id="r", node_id="n001", attempt=1, checkpoint_uri=str(checkpoint), protocol="tiny",
                             seed=0))
    bus.subscribe(WorkEvaluate.subject, service.handle)
    while bus.step():
        pass
    (failed,) = failures
    assert failed.failure.phase == "evaluate"
    assert "did not become healthy within 2 s" in failed.failure.reason
    child = int(marker.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert srv.process is None


def test_serve_builds_the_vllm_evaluator_and_its_health_check(tmp_path):
    settings = ServiceSettings(evaluator_backend="vllm", work_dir=tmp_path)
    runtime = evaluator_runtime(InProcBus(), settings)
    assert set(runtime.checks) == {"vllm"} and runtime.checks["vllm"]() is None   # idle until the first checkpoint
    for close in runtime.closers:
        close()
    remote = evaluator_runtime(InProcBus(), ServiceSettings(evaluator_backend="vllm", work_dir=tmp_path,
                                                            vllm_url="http://127.0.0.1:9/v1"))
    assert "does not answer /health" in remote.checks["vllm"]() and "(POISE_VLLM_URL)" in remote.checks["vllm"]()
    assert remote.probes == remote.checks  # a server someone else runs is tried at start-up too
    with pytest.raises(ValueError, match="unknown placeholder"):
        evaluator_runtime(InProcBus(), ServiceSettings(evaluator_backend="vllm", work_dir=tmp_path,
                                                       vllm_command="{python} {model} {port} {nope}"))


def test_the_paper_protocol_is_sampled_by_chat_and_math_graded(stand_in, tmp_path):
    """The six benchmark suites from local files, through the chat endpoint of a stand-in server that
    answers right on the problems marked easy: the paper's metrics, weights and sampling come out."""
    data = tmp_path / "bench"
    data.mkdir()
    for name in ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"):
        rows = [{"problem": f"{'easy' if i % 2 == 0 else 'hard'} problem {i} ANSWER={i + 1}/2", "answer": f"{i + 1}/2"}
                for i in range(4)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def script(n, body):
        content = body["messages"][0]["content"]
        answer = content.split("ANSWER=")[1].split()[0]
        num, den = answer.split("/")
        text = (f"so the answer is \\boxed{{\\frac{{{num}}}{{{den}}}}}" if content.startswith("easy")
                else "I think it is \\boxed{7}" if body["seed"] % 2 else "no idea")
        return 200, [{"index": i, "message": {"content": text}, "finish_reason": "stop", "token_ids": [1] * 10}
                     for i in range(body["n"])]

    server = stand_in(script=script)
    evaluation = VLLMEvaluator(Fixed(server.url), data_dir=str(data)).evaluate(base_checkpoint(), "paper", 0)
    assert evaluation.backend == "vllm"
    suites = evaluation.suites
    assert list(suites) == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    assert [suites[n].weight for n in suites] == [0.2, 0.2, 0.15, 0.15, 0.15, 0.15]
    for name in ("aime24", "aime25", "amc23"):
        assert (suites[name].kind, suites[name].k, suites[name].n_samples) == ("pass@k", 32, 32)
    for name in ("math500", "minerva", "olympiadbench"):
        assert (suites[name].kind, suites[name].n_samples) == ("acc@1", 1)
    assert all(s.value == 0.5 and s.n_prompts == 4 and s.mean_length == 10 for s in suites.values())
    assert abs(evaluation.overall - 0.5) < 1e-12
    chats = [body for path, body in server.calls if path == "/v1/chat/completions"]
    assert len(chats) == 24
    assert {b["max_tokens"] for b in chats} == {4096}
    assert {(b["n"], b["temperature"]) for b in chats} == {(32, 1.0), (1, 0.0)}
    assert all("\\boxed{}" in b["messages"][0]["content"] for b in chats)


def test_a_missing_vllm_is_said_at_start_with_what_to_do(tmp_path, capsys, monkeypatch):
    from app.cli import main
    from app.serve import ServeError

    srv = ManagedServer(tmp_path, python=sys.executable)   # the project's venv has no vLLM
    with pytest.raises(ServerError, match="has no vLLM: on a CPU machine run scripts/vllm_venv.sh"):
        srv.preflight()
    settings = ServiceSettings(evaluator_backend="vllm", work_dir=tmp_path, vllm_python=sys.executable)
    with pytest.raises(ServeError, match="POISE_EVALUATOR_BACKEND=vllm: .* has no vLLM"):
        evaluator_runtime(InProcBus(), settings)
    monkeypatch.setenv("POISE_VLLM_PYTHON", sys.executable)
    assert main(["evaluate", str(base_checkpoint()), "--evaluator", "vllm"]) == 2
    assert "has no vLLM" in capsys.readouterr().err
    assert main(["run", "--run-dir", str(tmp_path / "run"), "--evaluator", "vllm"]) == 2
    assert "has no vLLM" in capsys.readouterr().err and not (tmp_path / "run" / "archive.db").exists()


def test_poise_evaluate_scores_a_checkpoint_and_refuses_what_it_cannot(capsys, tmp_path):
    from app.cli import main

    assert main(["evaluate", str(base_checkpoint()), "--protocol", "tiny", "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["backend"] == "testbed" and len(evaluation["suites"]) == 6
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    assert main(["evaluate", str(base_checkpoint()), "--protocol", "paper"]) == 2
    assert "need --evaluator vllm" in capsys.readouterr().err
