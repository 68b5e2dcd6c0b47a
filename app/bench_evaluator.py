"""`poise bench evaluator`: generated tokens per second of the vLLM backend against the testbed sampler, on the
same checkpoint, prompts, seeds and metric code (docs/evaluation.md, "Throughput").

Both backends evaluate one checkpoint under one testbed protocol, alternately (testbed, vLLM, testbed, ...),
so that machine load drifts over both alike; each repeat is a full evaluation pass (every suite, sampled and
greedy). The vLLM server is started once, before the first repeat, and its start-up time is reported apart:
it is paid once per evaluator, not per checkpoint (weights are reloaded in place; the reload is timed too).
Tokens are what each backend generated (the server's token counts for vLLM); the two passes sample with
different random streams, so their token totals differ slightly and tokens/s is the fair comparison.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from app.reports import invoked_command, write_json_report
from evaluator.testbed import evaluate_checkpoint
from evaluator.vllm import VLLMEvaluator
from evaluator.vllm_server import DEFAULT_COMMAND, ManagedServer
from poise.testbed.checkpoints import base_checkpoint
from poise.testbed.model import build_model, load_model, save_model
from poise.testbed.protocol import get_protocol


def bench_evaluator(protocol_name: str = "default", repeats: int = 3, threads: int = 2, concurrency: int = 8,
                    command: str | None = None, json_path: Path | None = None, log=print) -> dict:
    protocol = get_protocol(protocol_name).replace(threads=threads)
    # the server gets the same cores as the testbed sampler: OMP threads bound to CPUs 0..threads-1
    server_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(threads),
                  "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0"}
    command = command or DEFAULT_COMMAND + " --enforce-eager"
    report: dict = {
        "command": invoked_command(), "protocol": protocol_name, "repeats": repeats, "threads": threads,
        "concurrency": concurrency, "vllm_command": command, "server_env": server_env,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_start": os.getloadavg()},
        "testbed": [], "vllm": [],
    }
    with tempfile.TemporaryDirectory(prefix="poise-bench-evaluator-") as tmp:
        tmp = Path(tmp)
        checkpoint = Path(shutil.copytree(base_checkpoint(protocol.base_checkpoint), tmp / "base"))
        other = tmp / "other"
        save_model(build_model(seed=1), load_model(checkpoint)[1], other)
        server = ManagedServer(tmp / "vllm", command, env=server_env)
        evaluator = VLLMEvaluator(server, concurrency=concurrency)
        try:
            started = time.perf_counter()
            server.ensure(checkpoint)
            report["vllm_startup_s"] = round(time.perf_counter() - started, 2)
            log(f"vLLM server up in {report['vllm_startup_s']:.1f} s")
            reloads = []
            for target in (other, checkpoint):
                started = time.perf_counter()
                server.ensure(target)
                reloads.append(time.perf_counter() - started)
            report["vllm_reload_s"] = [round(r, 3) for r in reloads]
            for repeat in range(repeats):
                _, stats = evaluate_checkpoint(checkpoint, protocol, seed=repeat)
                report["testbed"].append(_pass(stats.wall_s, stats.generated_tokens))
                _, vstats = evaluator.evaluate_with_stats(checkpoint, protocol_name, seed=repeat)
                report["vllm"].append(_pass(vstats.wall_s, vstats.generated_tokens))
                log(f"repeat {repeat + 1}/{repeats}: testbed {report['testbed'][-1]['tokens_per_s']:.0f} tok/s, "
                    f"vLLM {report['vllm'][-1]['tokens_per_s']:.0f} tok/s")
                write_json_report(json_path, report)
            report["vllm_restarts"] = server.starts - 1
        finally:
            evaluator.close()
    for backend in ("testbed", "vllm"):
        rates = [p["tokens_per_s"] for p in report[backend]]
        report[f"{backend}_median_tokens_per_s"] = round(statistics.median(rates), 1)
        report[f"{backend}_range_tokens_per_s"] = [round(min(rates), 1), round(max(rates), 1)]
    ratios = [v["tokens_per_s"] / t["tokens_per_s"] for v, t in zip(report["vllm"], report["testbed"], strict=True)]
    report["vllm_over_testbed_median"] = round(statistics.median(ratios), 3)
    report["machine"]["load_avg_end"] = os.getloadavg()
    write_json_report(json_path, report)
    return report


def _pass(wall_s: float, tokens: int) -> dict:
    return {"wall_s": round(wall_s, 3), "generated_tokens": tokens, "tokens_per_s": round(tokens / wall_s, 1)}
