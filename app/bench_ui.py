"""`poise bench ui`: how fast the web UI's live endpoints answer on large archives (docs/ui.md, "Speed").

A synthetic run of N nodes (the archive benchmark's, app/bench_archive.py: nodes built the way the loop builds
them) is written to a SQLite archive; `poise ui`'s app serves it read-only over real HTTP on loopback, and each
endpoint is fetched `repeats` times after one warm-up. The overview JSON and the tree JSON are what the open
pages poll (every 2 s and 3 s); the overview and tree pages are what a person loads first.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from app.bench_archive import RUN_ID, SyntheticRun
from app.reports import invoked_command, write_json_report
from app.serve import HttpServer
from app.ui import ui_app
from archive.sqlite_store import DB_FILENAME, SQLiteStore

ENDPOINTS = {
    "overview.json": f"/ui/runs/{RUN_ID}/overview.json",
    "tree.json": f"/ui/runs/{RUN_ID}/tree.json",
    "overview page": f"/runs/{RUN_ID}",
    "tree page": f"/runs/{RUN_ID}/tree",
    "runs page": "/",
}


def bench_ui(sizes: Sequence[int] = (1_000, 10_000), repeats: int = 7, json_path: Path | None = None,
             log=print) -> dict:
    report: dict = {"command": invoked_command(), "repeats": repeats, "sizes": {}}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="poise-bench-ui-") as tmp:
            synthetic = SyntheticRun(size, live=12)
            with SQLiteStore(Path(tmp) / DB_FILENAME) as writer:
                writer.put_run(synthetic.config)
                started = time.perf_counter()
                writer.insert_nodes(synthetic.nodes())
                build_s = time.perf_counter() - started
            store = SQLiteStore(Path(tmp) / DB_FILENAME, read_only=True)
            http = HttpServer(ui_app(store), "127.0.0.1", 0).start()
            try:
                section = {"build_s": round(build_s, 1), "endpoints": {}}
                with httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=120) as client:
                    for name, path in ENDPOINTS.items():
                        first = client.get(path)
                        first.raise_for_status()
                        times = []
                        for _ in range(repeats):
                            started = time.perf_counter()
                            response = client.get(path)
                            times.append(time.perf_counter() - started)
                            response.raise_for_status()
                        section["endpoints"][name] = {
                            "median_ms": round(1000 * statistics.median(times), 1),
                            "max_ms": round(1000 * max(times), 1), "bytes": len(response.content)}
                        log(f"{size} nodes: {name} median {section['endpoints'][name]['median_ms']:.0f} ms, "
                            f"max {section['endpoints'][name]['max_ms']:.0f} ms, {len(response.content) / 1000:.0f} KB")
                report["sizes"][str(size)] = section
                write_json_report(json_path, report)
            finally:
                http.stop()
                store.close()
    return report
