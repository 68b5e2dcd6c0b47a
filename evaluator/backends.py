"""The evaluator backends and the one builder that picks between them (`poise run` and `poise serve` both
call `build_evaluator`, and the deploy tests call it with each profile's settings; docs/evaluation.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from poise.contracts import Evaluation, Half

EVALUATOR_BACKENDS = ("testbed", "vllm")


class EvaluatorBackend(Protocol):
    name: str

    def evaluate(self, checkpoint: Path, protocol: str, seed: int, half: Half = "all") -> Evaluation:
        """One evaluation pass over `half` of each suite's problems (evaluator.metrics.half_of); raises an error
        whose message is the node's failure reason."""

    def check(self) -> str | None:
        """None when the backend can evaluate, else why not (served on /healthz)."""

    def close(self) -> None: ...


def build_evaluator(kind: str, work_dir: Path, vllm_url: str | None = None, vllm_command: str | None = None,
                    vllm_python: str | None = None, startup_timeout_s: float = 600.0, concurrency: int = 8,
                    request_timeout_s: float = 600.0, server_env: Mapping[str, str] | None = None,
                    bench_data: str | None = None) -> EvaluatorBackend:
    """The backend `kind` names. vllm: a server at `vllm_url`, else one this evaluator starts with
    `vllm_command` (evaluator/vllm_server.py) and keeps under `work_dir`/vllm. Nothing starts here."""
    if kind == "testbed":
        from evaluator.testbed import TestbedEvaluator

        return TestbedEvaluator()
    if kind == "vllm":
        from evaluator.vllm import VLLMEvaluator
        from evaluator.vllm_server import DEFAULT_COMMAND, ManagedServer, RemoteServer

        server = (RemoteServer(vllm_url) if vllm_url else
                  ManagedServer(Path(work_dir) / "vllm", vllm_command or DEFAULT_COMMAND, vllm_python,
                                server_env, startup_timeout_s))
        return VLLMEvaluator(server, concurrency=concurrency, timeout_s=request_timeout_s, data_dir=bench_data)
    raise ValueError(f"unknown evaluator backend {kind!r}; known: {', '.join(EVALUATOR_BACKENDS)}")


def preflight(backend: EvaluatorBackend) -> None:
    """Raise (evaluator.vllm_server.ServerError) when the backend cannot work at all, e.g. no vLLM installed for a
    server it would start; called when a run or a service starts, so the mistake shows before any node."""
    server = getattr(backend, "server", None)
    if server is not None and hasattr(server, "preflight"):
        server.preflight()
