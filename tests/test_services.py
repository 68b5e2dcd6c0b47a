"""The service shells of distributed mode, without NATS: archive API and client, settings, health, metrics.

The API runs on a real uvicorn server on a free port (the same `HttpServer` `poise serve` uses) over an
SQLite store with hand-built nodes; the client talks to it over real HTTP. `poise serve` itself runs with
a stand-in bus (an `InProcBus` with the `NatsBus` methods serve calls). What needs a real NATS server —
JetStream delivery, ack/nak/redelivery counters, dead-lettering after max_deliver, SIGTERM with a handler
in flight — belongs to the `nats` integration tests.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.serve import HttpServer, ServeError, build_app, bus_check, serve, store_check
from archive.api import NOT_FOUND_HEADER, archive_router, store_unavailable
from archive.auth import ApiAuth
from archive.client import ArchiveClient, ReadOnlyArchive
from archive.runs import RunRefused, resolve_run
from archive.service import ArchiveService
from archive.sqlite_store import SQLiteStore
from poise.bus import InProcBus
from poise.contracts import (
    Backends,
    Evaluation,
    EvtEvaluated,
    EvtImplemented,
    EvtTrained,
    Failure,
    Genealogy,
    Implementation,
    MetricKind,
    Node,
    NodeStatus,
    Phase,
    Proposal,
    RunConfig,
    RunRequest,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
)
from poise.metrics import FAILED, METRICS, OK, PHASE_BUCKETS, REGISTRY, observed, tokens_per_second
from poise.settings import SERVICE_PORTS, SERVICES, ServiceSettings, SettingsError, load_settings
from poise.store import ArchiveError, ArchiveStore
from proposer.service import ProposerService
from reflector.service import ReflectorService

RUN = "run-api"
SOURCE = "LOSS_AGG_MODE = 'token-mean'\n"
METRIC_NAMES = ("poise_phase_duration_seconds", "poise_phase_outcomes_total", "poise_candidates_in_flight",
                "poise_bus_redeliveries_total", "poise_dead_letters_total", "poise_llm_tokens_total",
                "poise_llm_cost_usd_total", "poise_trainer_tokens_per_second", "poise_evaluated_candidates_total",
                "poise_best_utility")


# ------------------------------------------------------------------------------------------- builders


def suite(name: str, value: float) -> SuiteResult:
    return SuiteResult(suite=name, kind=MetricKind.ACC_AT_1, value=value, ci_low=max(0.0, value - 0.02),
                       ci_high=min(1.0, value + 0.02), n_prompts=100, n_samples=100, mean_length=40.0,
                       format_valid_rate=0.9, weight=1.0)


def evaluation(overall: float, seed: int = 0) -> Evaluation:
    return Evaluation(suites={"easy": suite("easy", overall)}, overall=overall, mean_length=40.0, seed=seed)


def diverging_trajectory() -> TrainingTrajectory:
    """A curve that went non-finite: nan reward, infinite KL, a -inf extra."""
    steps = [TrainingStep(step=0, reward_mean=0.3, kl=0.0, step_time_s=2.0, extra={"sample_tokens": 100.0}),
             TrainingStep(step=1, reward_mean=math.nan, kl=math.inf, step_time_s=2.0,
                          extra={"sample_tokens": 300.0, "adv/min": -math.inf})]
    return TrainingTrajectory(protocol="tiny", seed=0, steps=steps, checkpoint_uri="/ckpt/n000", wall_s=4.0)


def proposal(name: str, parents: list[str]) -> Proposal:
    return Proposal(name=name, rationale="hand-built", generator="offline", parent_ids=parents)


def archive_nodes() -> list[Node]:
    """n000 (root, evaluated, diverging curves), its children n001 (failed) and n002 (proposed)."""
    root_genealogy = Genealogy(run_id=RUN, node_id="n000")
    root = Node(genealogy=root_genealogy, status=NodeStatus.EVALUATED, proposal=proposal("grpo", []),
                implementation=Implementation.from_source(SOURCE, verified=True), trajectory=diverging_trajectory(),
                evaluation=evaluation(0.5))
    failed = Node(genealogy=Genealogy.child("n001", [root_genealogy]), status=NodeStatus.FAILED,
                  proposal=proposal("child-a", ["n000"]),
                  failure=Failure(phase=Phase.IMPLEMENT, reason="verification failed"))
    proposed = Node(genealogy=Genealogy.child("n002", [root_genealogy]), proposal=proposal("child-b", ["n000"]))
    return [root, failed, proposed]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "archive.db")
    store.put_run(RunConfig(run_id=RUN, protocol="tiny", budget=4))
    for node in archive_nodes():
        assert store.insert_node(node)
    yield store
    store.close()


WRITE_TOKEN = "test-write-token-of-the-archive"
AUTHORIZED = {"Authorization": f"Bearer {WRITE_TOKEN}"}  # POST /api/runs needs it (archive/auth.py)


def api_app(store: ArchiveStore, start_run=None) -> FastAPI:
    app = build_app("archive", {}, router=archive_router(store, start_run=start_run, auth=ApiAuth([WRITE_TOKEN])))
    return app


@pytest.fixture
def api(store: SQLiteStore) -> Iterator[str]:
    """The archive API on a real uvicorn server on a free port; yields its base URL."""
    server = HttpServer(api_app(store), "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


# --------------------------------------------------------------------------------------------- the API


def test_runs_lists_configs_and_a_run_shows_config_with_status(api: str):
    runs = httpx.get(f"{api}/api/runs").json()
    assert [r["run_id"] for r in runs] == [RUN] and runs[0]["protocol"] == "tiny"
    view = httpx.get(f"{api}/api/runs/{RUN}").json()
    assert view["config"]["budget"] == 4
    assert view["status"]["counts"] == {"proposed": 1, "implemented": 0, "trained": 0, "evaluated": 1,
                                        "reflected": 0, "failed": 1}
    assert view["status"]["best"]["node_id"] == "n000"
    assert httpx.get(f"{api}/api/runs/{RUN}/config").json()["run_id"] == RUN
    assert httpx.get(f"{api}/api/runs/{RUN}/counts").json()["failed"] == 1


def test_nodes_come_in_insertion_order_and_filter_by_status(api: str):
    nodes = httpx.get(f"{api}/api/runs/{RUN}/nodes").json()
    assert [n["genealogy"]["node_id"] for n in nodes] == ["n000", "n001", "n002"]
    failed = httpx.get(f"{api}/api/runs/{RUN}/nodes", params={"status": "failed"}).json()
    assert [n["genealogy"]["node_id"] for n in failed] == ["n001"]
    assert failed[0]["failure"]["reason"] == "verification failed"
    bad = httpx.get(f"{api}/api/runs/{RUN}/nodes", params={"status": "finished"})
    assert bad.status_code == 422


def test_a_node_and_its_children(api: str):
    node = httpx.get(f"{api}/api/runs/{RUN}/nodes/n000").json()
    assert node["proposal"]["name"] == "grpo" and node["status"] == "evaluated"
    children = httpx.get(f"{api}/api/runs/{RUN}/nodes/n000/children").json()
    assert [c["genealogy"]["node_id"] for c in children] == ["n001", "n002"]
    assert httpx.get(f"{api}/api/runs/{RUN}/nodes/n002/children").json() == []


@pytest.mark.parametrize("path, what, says", [
    ("/api/runs/nope", "run", "no run 'nope'"),
    ("/api/runs/nope/config", "run", "no run 'nope'"),
    ("/api/runs/nope/counts", "run", "no run 'nope'"),
    ("/api/runs/nope/nodes", "run", "no run 'nope'"),
    ("/api/runs/nope/nodes/n000", "run", "no run 'nope'"),
    (f"/api/runs/{RUN}/nodes/n999", "node", "no node 'n999' in run 'run-api'"),
    (f"/api/runs/{RUN}/nodes/n999/children", "node", "no node 'n999'"),
])
def test_unknown_ids_are_404_saying_what_is_missing(api: str, path: str, what: str, says: str):
    response = httpx.get(f"{api}{path}")
    assert response.status_code == 404
    assert response.headers[NOT_FOUND_HEADER] == what
    assert says in response.json()["detail"]
    if what == "run":
        assert f"known runs: {RUN}" in response.json()["detail"]


def _strict_json(text: str):
    """Parse like a browser's JSON.parse: NaN and Infinity are errors."""
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_null_for_browsers_and_constants_on_request(api: str):
    for path in (f"/api/runs/{RUN}/nodes/n000", f"/api/runs/{RUN}/nodes", f"/api/runs/{RUN}"):
        _strict_json(httpx.get(f"{api}{path}").text)  # raises if NaN/Infinity slipped through
    steps = _strict_json(httpx.get(f"{api}/api/runs/{RUN}/nodes/n000").text)["trajectory"]["steps"]
    assert steps[1]["reward_mean"] is None and steps[1]["kl"] is None
    assert steps[1]["extra"]["adv/min"] is None
    assert steps[0]["reward_mean"] == 0.3  # finite values untouched

    exact = httpx.get(f"{api}/api/runs/{RUN}/nodes/n000", params={"nonfinite": "constants"}).text
    assert "NaN" in exact and "Infinity" in exact
    node = Node.model_validate_json(exact)
    assert math.isnan(node.trajectory.steps[1].reward_mean) and node.trajectory.steps[1].kl == math.inf


def test_a_store_failure_is_a_503_not_a_crash(store: SQLiteStore):
    client = TestClient(api_app(store))
    store.close()
    response = client.get(f"/api/runs/{RUN}/nodes")
    assert response.status_code == 503 and "archive store failed" in response.json()["detail"]


def test_post_runs_starts_a_run_and_refuses_conflicts_with_409(store: SQLiteStore):
    started: list[RunConfig] = []

    def start_run(request: RunRequest) -> RunConfig:
        resolved = resolve_run(store, request.run_id, request.given(), Backends(bus="nats"))
        started.append(resolved)
        return resolved

    client = TestClient(api_app(store, start_run), headers=AUTHORIZED)
    response = client.post("/api/runs", json={"run_id": "run-new", "budget": 2, "protocol": "tiny"})
    assert response.status_code == 202 and response.json()["backends"]["bus"] == "nats"
    assert store.get_run("run-new").budget == 2
    assert client.post("/api/runs", json={"run_id": "run-new", "budget": 5}).status_code == 202  # extend
    assert store.get_run("run-new").budget == 5
    conflict = client.post("/api/runs", json={"run_id": "run-new", "seed": 7})
    assert conflict.status_code == 409 and "seed=0 (asked 7)" in conflict.json()["detail"]
    assert client.post("/api/runs", json={"run_id": "bad id!"}).status_code == 422
    assert [c.budget for c in started] == [2, 5]


def test_post_runs_refuses_a_field_a_client_may_not_set_with_a_clear_422(store: SQLiteStore):
    asked: list[RunRequest] = []
    client = TestClient(api_app(store, lambda request: asked.append(request) or RunConfig(run_id=request.run_id)),
                        headers=AUTHORIZED)
    for body, problem in [
        ({"run_id": "r", "budjet": 2}, "budjet: Extra inputs are not permitted"),
        ({"run_id": "r", "protocol_sha256": "0" * 64}, "protocol_sha256: Extra inputs are not permitted"),
        ({"run_id": "r", "objective": {"kind": "length", "tolerance": 0.1}}, "objective.tolerance: Extra inputs"),
        ({"run_id": "r", "budget": 0}, "budget: Input should be greater than or equal to 1"),
        ({"budget": 2}, "run_id: Field required"),
    ]:
        response = client.post("/api/runs", json=body)
        detail = response.json()["detail"]
        assert response.status_code == 422 and detail.startswith("not a valid run request: ") and problem in detail
        assert "a client may set budget, parallel, " in detail and detail.endswith("run_id; see RunRequest in "
                                                                                   "poise/contracts.py)")
    assert asked == []
    assert client.post("/api/runs", json={"run_id": "r", "seed": 3}).status_code == 202
    assert asked[0].given() == {"seed": 3} and asked[0].run_id == "r"


def test_post_runs_is_absent_from_a_read_only_api(store: SQLiteStore):
    assert TestClient(api_app(store)).post("/api/runs", json={"run_id": "x"}).status_code == 405


# ------------------------------------------------------------------------------------------ the client


def test_the_client_reads_exactly_what_the_store_holds(api: str, store: SQLiteStore):
    client = ArchiveClient(api)
    try:
        assert client.run_ids() == [RUN]
        assert client.get_run(RUN) == store.get_run(RUN)
        assert client.get_run("nope") is None
        root = client.get_node(RUN, "n000")
        stored = store.get_node(RUN, "n000")
        assert root.model_dump_json() == stored.model_dump_json()  # nan/inf survive the trip
        assert math.isnan(root.trajectory.steps[1].reward_mean)
        assert client.get_node(RUN, "n999") is None
        assert [n.node_id for n in client.nodes(RUN)] == ["n000", "n001", "n002"]
        assert [n.node_id for n in client.nodes(RUN, NodeStatus.PROPOSED)] == ["n002"]
        assert [n.node_id for n in client.children(RUN, "n000")] == ["n001", "n002"]
        assert client.counts(RUN) == store.counts(RUN)
        assert client.counters(RUN) == store.counters(RUN) and client.counters(RUN).evaluated == 1
        # the store contract for unknown ids: empty lists and zero counts, not errors
        assert client.nodes("nope") == [] and client.children(RUN, "n999") == []
        assert set(client.counts("nope").values()) == {0} and set(client.counters("nope").counts.values()) == {0}
    finally:
        client.close()


def test_the_client_refuses_writes():
    client = ArchiveClient("http://archive.invalid:8000")
    node = archive_nodes()[0]
    with pytest.raises(ReadOnlyArchive, match="only the archive service writes"):
        client.insert_node(node)
    with pytest.raises(ReadOnlyArchive):
        client.transition(RUN, "n000", NodeStatus.EVALUATED, node)
    with pytest.raises(ReadOnlyArchive):
        client.put_run(RunConfig(run_id=RUN))
    client.close()


def test_the_client_retries_5xx_and_connection_errors_then_succeeds():
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, json={"detail": "the archive store failed"})
        return httpx.Response(200, json=[RunConfig(run_id=RUN).model_dump(mode="json")])

    client = ArchiveClient("http://archive:8000", backoff_s=0.0, transport=httpx.MockTransport(answer))
    assert client.run_ids() == [RUN]
    assert calls == ["/api/runs"] * 3


def test_the_client_gives_up_after_its_retries_with_a_clear_error():
    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="boom")

    client = ArchiveClient("http://archive:8000", retries=2, backoff_s=0.0, transport=httpx.MockTransport(down))
    with pytest.raises(ArchiveError, match=r"did not answer GET /api/runs/r/config after 3 tries: HTTP 500"):
        client.get_run("r")


def test_the_client_tells_a_missing_api_from_a_missing_node():
    def not_poise(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="Not Found")  # no X-Poise-Not-Found: some other server

    client = ArchiveClient("http://wrong:8000", backoff_s=0.0, transport=httpx.MockTransport(not_poise))
    with pytest.raises(ArchiveError, match="POISE_ARCHIVE_URL"):
        client.get_node(RUN, "n000")


def test_the_client_against_a_closed_port_fails_after_retries():
    client = ArchiveClient("http://127.0.0.1:9", retries=1, backoff_s=0.0, timeout_s=1.0)
    with pytest.raises(ArchiveError, match="ConnectError"):
        client.run_ids()


# ---------------------------------------------------------------------------------------------- settings


def test_settings_defaults_and_empty_variables_count_as_unset(monkeypatch):
    monkeypatch.setenv("POISE_MONGO_URL", "")
    monkeypatch.setenv("POISE_HTTP_PORT", "8080")
    settings = load_settings()
    assert settings.mongo_url is None and settings.http_port == 8080
    assert settings.backends().store == "sqlite" and settings.run_config() is None


def test_settings_errors_name_every_bad_variable(monkeypatch):
    monkeypatch.setenv("POISE_HTTP_PORT", "70000")
    monkeypatch.setenv("POISE_NATS_URL", "http://nats:4222")
    monkeypatch.setenv("POISE_TRAINER_BACKEND", "megatron")
    monkeypatch.setenv("POISE_MONGO_URL", "postgres://db")
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value)
    assert "POISE_HTTP_PORT='70000': Input should be less than or equal to 65535" in text
    assert "POISE_NATS_URL='http://nats:4222'" in text and "nats://" in text
    assert "POISE_TRAINER_BACKEND='megatron'" in text and "'testbed' or 'verl'" in text
    assert "POISE_MONGO_URL='postgres://db'" in text


def test_vllm_starts_its_own_server_or_takes_a_url(monkeypatch):
    monkeypatch.setenv("POISE_EVALUATOR_BACKEND", "vllm")
    assert load_settings().vllm_url is None   # the evaluator starts and owns its server (docs/evaluation.md)
    monkeypatch.setenv("POISE_VLLM_URL", "http://vllm:8000/")
    assert load_settings().vllm_url == "http://vllm:8000"
    monkeypatch.setenv("POISE_VLLM_URL", "vllm:8000")
    with pytest.raises(SettingsError, match="must start with http:// or https://"):
        load_settings()


def test_the_run_described_by_the_environment_is_validated_up_front(monkeypatch):
    monkeypatch.setenv("POISE_BUDGET", "8")
    with pytest.raises(SettingsError, match="POISE_BUDGET set without POISE_RUN_ID"):
        load_settings()
    monkeypatch.setenv("POISE_RUN_ID", "r1")
    monkeypatch.setenv("POISE_BUDGET", "0")
    with pytest.raises(SettingsError, match="POISE_BUDGET: Input should be greater than or equal to 1"):
        load_settings()
    monkeypatch.setenv("POISE_BUDGET", "8")
    monkeypatch.setenv("POISE_MONGO_URL", "mongodb://mongo:27017")
    config = load_settings().run_config()
    assert (config.run_id, config.budget, config.backends.store, config.backends.bus) == ("r1", 8, "mongo", "nats")


def test_poise_serve_with_bad_settings_exits_2_with_the_message(monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("POISE_HTTP_PORT", "not-a-port")
    assert main(["serve", "trainer"]) == 2
    assert "POISE_HTTP_PORT='not-a-port'" in capsys.readouterr().err


def test_a_resumed_run_may_raise_its_budget_and_llm_cap_like_poise_run(store: SQLiteStore):
    resolve_run(store, "run-cap", {"budget": 3, "llm_budget_usd": 1.0, "gpu_hours_budget": 8.0}, Backends())
    resumed = resolve_run(store, "run-cap", {"budget": 5, "parallel": 2, "llm_budget_usd": 4.0,
                                             "gpu_hours_budget": 16.0}, Backends())
    assert (resumed.budget, resumed.parallel, resumed.llm_budget_usd, resumed.gpu_hours_budget) == (5, 2, 4.0, 16.0)
    with pytest.raises(RunRefused, match="budget, parallel, llm_budget_usd, early_stop, gpu_hours_budget may change"):
        resolve_run(store, "run-cap", {"seed": 9}, Backends())
    assert resolve_run(store, "run-cap", {"early_stop": False}, Backends()).early_stop is False


def test_resolve_run_starts_resumes_and_refuses(store: SQLiteStore):
    new = resolve_run(store, "run-env", {"budget": 3, "seed": 5}, Backends(bus="nats", store="mongo"))
    assert (new.budget, new.seed, new.backends.store) == (3, 5, "mongo")
    assert resolve_run(store, "run-env", {"budget": 6}, Backends()).budget == 6  # backends kept, budget grows
    assert store.get_run("run-env").backends.store == "mongo"
    with pytest.raises(RunRefused, match="protocol='default' \\(asked 'tiny'\\)"):
        resolve_run(store, "run-env", {"protocol": "tiny"}, Backends())


def test_resolve_run_records_the_protocol_and_refuses_a_resume_after_its_settings_changed(store, monkeypatch):
    from poise.testbed.protocol import PROTOCOLS, protocol_sha256

    new = resolve_run(store, "run-drift", {"budget": 3, "protocol": "tiny"}, Backends())
    assert new.protocol_sha256 == protocol_sha256("tiny") == store.get_run("run-drift").protocol_sha256
    assert resolve_run(store, "run-drift", {"budget": 4}, Backends()).budget == 4  # unchanged protocol resumes
    monkeypatch.setitem(PROTOCOLS, "tiny", PROTOCOLS["tiny"].replace(policy_ema=0.5))
    with pytest.raises(RunRefused, match="settings of protocol 'tiny' changed since the run started"):
        resolve_run(store, "run-drift", {"budget": 5}, Backends())
    with pytest.raises(RunRefused, match="unknown protocol 'nope'"):
        resolve_run(store, "run-unknown", {"protocol": "nope"}, Backends())


# --------------------------------------------------------------------------------------------- health


class FakeBus(InProcBus):
    """An in-process bus with the NatsBus methods `poise serve` calls; `connected` drives healthy()."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.connected = False
        self.closed = False
        self.redelivered: int = 0

    def connect(self) -> None:
        self.connected = True

    def healthy(self) -> bool:
        return self.connected and not self.closed

    def drain_once(self, timeout_s: float) -> int:
        if self.step():
            return 1
        time.sleep(min(timeout_s, 0.01))
        return 0

    def run_forever(self, stop: threading.Event | None = None) -> None:
        while stop is None or not stop.is_set():
            self.drain_once(0.05)

    def stop_fetching(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class PingStore:
    def __init__(self, answers: bool) -> None:
        self.answers = answers

    def ping(self) -> bool:
        return self.answers


def test_healthz_is_200_only_when_the_bus_is_connected():
    bus = FakeBus()
    client = TestClient(build_app("proposer", {"bus": bus_check(bus, "nats://nats:4222")}))
    down = client.get("/healthz")
    assert down.status_code == 503
    assert down.json() == {"status": "unhealthy", "service": "proposer",
                           "checks": {"bus": "not connected to NATS JetStream at nats://nats:4222 (POISE_NATS_URL)"}}
    bus.connect()
    up = client.get("/healthz")
    assert up.status_code == 200 and up.json()["status"] == "ok"


def test_archive_healthz_also_needs_the_store(tmp_path: Path):
    bus = FakeBus()
    bus.connect()
    ping = PingStore(True)
    checks = {"bus": bus_check(bus, "nats://n:4222"), "store": store_check(ping)}
    client = TestClient(build_app("archive", checks))
    assert client.get("/healthz").status_code == 200
    ping.answers = False
    answer = client.get("/healthz")
    assert answer.status_code == 503 and answer.json()["checks"] == {
        "bus": "ok", "store": "the archive store does not answer ping"}
    sqlite = SQLiteStore(tmp_path / "a.db")
    client = TestClient(build_app("archive", {"store": store_check(sqlite)}))
    assert client.get("/healthz").status_code == 200
    sqlite.close()
    broken = client.get("/healthz")
    assert broken.status_code == 503 and "ArchiveError" in broken.json()["checks"]["store"]


def test_healthz_says_when_the_service_is_shutting_down():
    stopping = threading.Event()
    client = TestClient(build_app("trainer", {}, stopping))
    assert client.get("/healthz").status_code == 200
    stopping.set()
    assert client.get("/healthz").json()["checks"] == {"service": "shutting down"}


# -------------------------------------------------------------------------------------------- metrics


def test_metrics_exposes_every_poise_metric_after_a_phase_is_observed():
    METRICS.observe_phase("train", "testbed", 42.0, OK)
    text = TestClient(build_app("trainer", {})).get("/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text or f"# TYPE {name}" in text, name
    assert 'poise_phase_outcomes_total{backend="testbed",outcome="ok",phase="train"}' in text
    assert 'poise_phase_duration_seconds_bucket{backend="testbed",le="14400.0",phase="train"}' in text
    # each phase has its own buckets: a proposal is measured in sub-seconds, training in hours
    assert PHASE_BUCKETS["propose"][0] < 0.1 and PHASE_BUCKETS["train"][-1] >= 86400
    assert TestClient(build_app("trainer", {})).get("/metrics/").status_code == 200


def test_a_handler_reports_its_outcome_and_an_exception_counts_as_error():
    class Flaky:
        backend = "fake"

        @observed("reflect")
        def handle(self, fail: bool) -> str | None:
            if fail:
                raise RuntimeError("boom")
            return FAILED

    def count(outcome: str) -> float:
        return REGISTRY.get_sample_value("poise_phase_outcomes_total",
                                         {"phase": "reflect", "outcome": outcome, "backend": "fake"}) or 0.0

    before_failed, before_error = count("failed"), count("error")
    assert Flaky().handle(False) == FAILED
    with pytest.raises(RuntimeError):
        Flaky().handle(True)
    assert (count("failed") - before_failed, count("error") - before_error) == (1.0, 1.0)
    with pytest.raises(ValueError, match="unknown phase"):
        observed("lunch")


def test_trainer_throughput_is_sampled_tokens_per_step_second():
    assert tokens_per_second(diverging_trajectory()) == pytest.approx(400 / 4.0)
    assert tokens_per_second(TrainingTrajectory(protocol="tiny", seed=0)) is None


def test_metric_labels_stay_bounded_while_the_archive_proposer_and_reflector_handle_many_nodes(tmp_path: Path):
    """No node or run id reaches a label, however many nodes go through the services."""
    run_id = "run-label-check"
    store = SQLiteStore(tmp_path / "archive.db")
    config = RunConfig(run_id=run_id, protocol="tiny", budget=4, parallel=3, root_seeds=1)
    store.put_run(config)
    bus = InProcBus()
    archive = ArchiveService(bus, store, config)
    bus.dead_letter = archive.dead_letter
    proposer, reflector = ProposerService(bus, store), ReflectorService(bus, store)
    bus.subscribe("work.propose", proposer.handle)
    bus.subscribe("work.reflect", reflector.handle)
    for subject in ("evt.proposed", "evt.implemented", "evt.trained", "evt.evaluated", "evt.reflected",
                    "evt.failed"):
        bus.subscribe(subject, archive.handle)
    evaluated_before = REGISTRY.get_sample_value("poise_evaluated_candidates_total") or 0.0

    def settle() -> None:
        while bus.step():
            pass

    archive.start()
    settle()
    ids = {"run_id": run_id, "node_id": "n000"}
    bus.publish(EvtImplemented(**ids, implementation=Implementation.from_source(SOURCE, verified=True)))
    settle()
    bus.publish(EvtTrained(**ids, trajectory=diverging_trajectory()))
    settle()
    bus.publish(EvtEvaluated(**ids, evaluation=evaluation(0.5)))
    settle()  # the root is reflected, and children n001.. are proposed by the proposer

    nodes = store.nodes(run_id)
    assert len(nodes) >= 3 and store.get_node(run_id, "n000").status == NodeStatus.REFLECTED
    text = TestClient(build_app("archive", {})).get("/metrics").text
    assert run_id not in text
    for node in nodes:
        assert f'"{node.node_id}"' not in text and node.node_id not in text
    assert 'poise_phase_outcomes_total{backend="sqlite",outcome="ok",phase="update"}' in text
    assert 'poise_phase_outcomes_total{backend="baseline",outcome="ok",phase="propose"}' in text
    assert 'phase="reflect"' in text
    assert REGISTRY.get_sample_value("poise_evaluated_candidates_total") == evaluated_before + 1
    assert REGISTRY.get_sample_value("poise_best_utility") == pytest.approx(0.5)
    assert REGISTRY.get_sample_value("poise_candidates_in_flight") >= 1
    store.close()


# ------------------------------------------------------------------------------------------ poise serve


def _serve_in_thread(service: str, settings: ServiceSettings, bus: FakeBus):
    stop = threading.Event()
    ready: list[HttpServer] = []
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(serve(service, settings, stop,
                                                                 bus_factory=lambda *a: bus,
                                                                 on_ready=ready.append)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not ready:
        assert thread.is_alive() and time.monotonic() < deadline, "serve did not start"
        time.sleep(0.01)
    return stop, thread, result, f"http://127.0.0.1:{ready[0].port}"


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_serve_archive_starts_a_posted_run_serves_health_metrics_and_api_and_stops_cleanly(tmp_path: Path):
    bus = FakeBus()
    settings = ServiceSettings(work_dir=tmp_path, http_port=0, http_host="127.0.0.1", archive_token=WRITE_TOKEN)
    stop, thread, result, url = _serve_in_thread("archive", settings, bus)
    _wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
    posted = httpx.post(f"{url}/api/runs", json={"run_id": "run-served", "budget": 2, "protocol": "tiny"},
                        headers=AUTHORIZED)
    assert posted.status_code == 202 and posted.json()["backends"]["bus"] == "nats"
    # the loop thread starts the run: the root is proposed, applied, and its implementation asked for
    _wait_for(lambda: [n["genealogy"]["node_id"] for n in httpx.get(f"{url}/api/runs/run-served/nodes").json()]
              == ["n000"])
    assert bus.pending("work.implement") == 1
    bus.redelivered = 3
    metrics = httpx.get(f"{url}/metrics").text
    assert 'poise_bus_redeliveries_total{subject="evt.*"} 3.0' in metrics
    bus.connected = False
    sick = httpx.get(f"{url}/healthz")
    assert sick.status_code == 503 and "not connected" in sick.json()["checks"]["bus"]
    stop.set()
    thread.join(10)
    assert result == [0] and bus.closed
    assert (tmp_path / "archive.db").exists()


def test_serve_archive_resumes_the_run_named_by_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("POISE_RUN_ID", "run-env")
    monkeypatch.setenv("POISE_PROTOCOL", "tiny")
    settings = ServiceSettings(work_dir=tmp_path, http_port=0, http_host="127.0.0.1")
    bus = FakeBus()
    stop, thread, result, url = _serve_in_thread("archive", settings, bus)
    _wait_for(lambda: httpx.get(f"{url}/api/runs/run-env/nodes").status_code == 200
              and len(httpx.get(f"{url}/api/runs/run-env/nodes").json()) == 1)
    assert httpx.get(f"{url}/api/runs/run-env/config").json()["protocol"] == "tiny"
    stop.set()
    thread.join(10)
    assert result == [0]


def test_serve_gives_a_stuck_handler_only_the_grace_period(tmp_path: Path):
    class StuckBus(FakeBus):
        def run_forever(self, stop=None) -> None:
            time.sleep(30)  # a handler that ignores the stop request

    settings = ServiceSettings(work_dir=tmp_path, http_port=0, http_host="127.0.0.1", shutdown_grace_s=0.2)
    bus = StuckBus()
    stop, thread, result, url = _serve_in_thread("evaluator", settings, bus)
    _wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
    started = time.monotonic()
    stop.set()
    thread.join(10)
    assert result == [0] and time.monotonic() - started < 5 and bus.closed


def test_serve_trainer_with_verl_starts_without_gpus_and_passes_healthz(tmp_path: Path, caplog):
    settings = ServiceSettings(work_dir=tmp_path, http_port=0, http_host="127.0.0.1", trainer_backend="verl")
    bus = FakeBus()
    with caplog.at_level("INFO", logger="app.serve"):
        stop, thread, result, url = _serve_in_thread("trainer", settings, bus)
    _wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
    assert httpx.get(f"{url}/healthz").json()["checks"] == {"bus": "ok", "verl": "ok"}
    assert "trainer backend verl: GPU protocol paper (8 GPU(s)" in caplog.text
    # a machine without GPUs still serves; it says why it cannot train, and each node fails with that reason
    assert "the VERL trainer cannot train here yet" in caplog.text
    stop.set()
    thread.join(10)
    assert result == [0] and bus.closed


def test_serve_refuses_a_gpu_protocol_it_cannot_load(tmp_path: Path):
    from app.serve import ServeError

    broken = tmp_path / "broken.toml"
    broken.write_text('name = "broken"\n[training]\nlr = 0\n')
    settings = ServiceSettings(work_dir=tmp_path, http_port=0, trainer_backend="verl", verl_protocol=str(broken))
    bus = FakeBus()
    with pytest.raises(ServeError, match=r"POISE_VERL_PROTOCOL=.*broken.toml refused: training.lr"):
        serve("trainer", settings, threading.Event(), bus_factory=lambda *a: bus)
    assert bus.closed


def test_store_unavailable_handler_is_wired_into_the_app(store: SQLiteStore):
    app = api_app(store)
    assert app.exception_handlers[ArchiveError] is store_unavailable


def test_every_service_has_one_runtime_builder():
    from app.serve import RUNTIMES
    from poise.settings import SERVICES

    assert tuple(RUNTIMES) == SERVICES


# --------------------------------------------------------------------------------------- started by hand

REPO = Path(__file__).resolve().parents[1]


def test_every_service_has_a_default_port_of_its_own_clear_of_poise_ui(monkeypatch):
    from app.ui import serve_ui

    monkeypatch.delenv("POISE_HTTP_PORT", raising=False)
    ports = [load_settings().port_of(service) for service in SERVICES]
    assert len(set(ports)) == len(SERVICES), f"two services share a default port: {ports}"
    assert inspect.signature(serve_ui).parameters["port"].default not in ports
    assert load_settings().archive_url.endswith(f":{SERVICE_PORTS['archive']}")
    monkeypatch.setenv("POISE_HTTP_PORT", "9100")
    assert {load_settings().port_of(service) for service in SERVICES} == {9100}


def _taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_the_archive_and_a_proposer_started_by_hand_with_default_ports_both_serve(tmp_path: Path, monkeypatch,
                                                                                   caplog):
    monkeypatch.delenv("POISE_HTTP_PORT", raising=False)
    ports = {service: SERVICE_PORTS[service] for service in ("archive", "proposer")}
    if taken := [port for port in ports.values() if _taken(port)]:
        pytest.skip(f"default ports {taken} are in use on this machine")
    settings = ServiceSettings(work_dir=tmp_path, http_host="127.0.0.1",
                               archive_url=f"http://127.0.0.1:{ports['archive']}")
    started = {service: _serve_in_thread(service, settings, FakeBus()) for service in ports}  # archive first
    try:
        for service, (_, _, _, url) in started.items():
            assert url == f"http://127.0.0.1:{ports[service]}"
            _wait_for(lambda url=url: httpx.get(f"{url}/healthz").status_code == 200)
            assert httpx.get(f"{url}/healthz").json()["service"] == service
    finally:
        for stop, thread, _, _ in started.values():
            stop.set()
            thread.join(10)
    assert [result for _, _, result, _ in started.values()] == [[0], [0]]
    assert "POISE_ARCHIVE_URL" not in caplog.text, "the proposer's start-up probe did not reach the archive"


def _serve_by_hand(service: str, tmp_path: Path, **settings: str) -> subprocess.Popen:
    """`poise serve SERVICE` as a newcomer starts it: a process of its own, its settings from the environment."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("POISE_")}
    env.update(POISE_WORK_DIR=str(tmp_path), POISE_HTTP_HOST="127.0.0.1", POISE_HTTP_PORT="0", **settings)
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", service], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_service_started_by_hand_without_nats_says_to_set_poise_nats_url_and_keeps_trying(tmp_path: Path):
    process = _serve_by_hand("proposer", tmp_path, POISE_NATS_URL="nats://127.0.0.1:1",
                             POISE_ARCHIVE_URL="http://127.0.0.1:1")
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    threading.Thread(target=lambda: [lines.put((time.monotonic(), line)) for line in process.stdout],
                     daemon=True).start()
    seen: list[str] = []
    serving_at = None
    deadline = time.monotonic() + 60  # start-up imports on a loaded machine; the retry itself comes within seconds
    try:
        while not any("POISE_NATS_URL" in line for line in seen):
            assert time.monotonic() < deadline and process.poll() is None, "".join(seen)
            try:
                at, line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            if "serving /healthz" in line:
                serving_at = at
        assert serving_at is not None and at - serving_at < 10, "".join(seen)
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(30)
    text = "".join(seen)
    assert "cannot connect to NATS" in text and "nats://127.0.0.1:1" in text and "retrying in 1 s" in text
    assert "POISE_ARCHIVE_URL" in text, "the archive probe at start-up named no setting"
    assert status == 0


def test_an_archive_started_by_hand_without_its_mongodb_exits_2_naming_poise_mongo_url(tmp_path: Path):
    process = _serve_by_hand("archive", tmp_path, POISE_NATS_URL="nats://127.0.0.1:1",
                             POISE_MONGO_URL="mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("poise serve archive: the archive's store (POISE_MONGO_URL)") and "127.0.0.1:1" in last


@pytest.mark.parametrize("service", ["archive", "implementer", "trainer", "evaluator"])
def test_a_work_dir_that_cannot_be_made_stops_the_service_naming_poise_work_dir(service: str, tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    settings = ServiceSettings(work_dir=tmp_path / "a-file" / "work", http_port=0, http_host="127.0.0.1")
    bus = FakeBus()
    with pytest.raises(ServeError, match="set POISE_WORK_DIR to a directory this user can write"):
        serve(service, settings, threading.Event(), bus_factory=lambda *a: bus)
    assert bus.closed


@pytest.mark.nats
def test_poise_serve_trainer_with_verl_started_by_hand_passes_healthz_on_a_machine_without_gpus(tmp_path: Path):
    # POISE_TRAINER_BACKEND=verl poise serve trainer, with a real NATS: healthy, the backend named as configured,
    # and the log says why this machine cannot train (each node it gets fails with that reason; docs/verl.md)
    from app.cluster import NatsServer

    server = NatsServer(tmp_path / "jetstream", tmp_path / "nats-server.log").start()
    process = _serve_by_hand("trainer", tmp_path, POISE_NATS_URL=server.url, POISE_TRAINER_BACKEND="verl",
                             POISE_LOG_LEVEL="INFO", CUDA_VISIBLE_DEVICES="")
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        port = None
        while port is None:
            assert time.monotonic() < deadline and process.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            if "serving /healthz and /metrics on port" in seen[-1]:
                port = int(seen[-1].rsplit(" ", 1)[1])
        url = f"http://127.0.0.1:{port}/healthz"
        _wait_for(lambda: httpx.get(url).status_code == 200, timeout_s=60)
        health = httpx.get(url).json()
        assert health["service"] == "trainer" and health["checks"] == {"bus": "ok", "verl": "ok"}
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(30)
        server.stop()
    text = "".join(seen)
    assert "trainer backend verl: GPU protocol paper (8 GPU(s)" in text
    assert "the VERL trainer cannot train here yet: GPU protocol paper needs 8 GPU(s)" in text
    assert status == 0 and "Traceback" not in text
