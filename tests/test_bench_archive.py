"""`poise bench archive` at a tiny size: it builds both archives, times every kind of event, and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

from app.bench_archive import EVENT_KINDS, SyntheticRun
from app.cli import main
from archive.sqlite_store import SQLiteStore
from poise.contracts import NodeStatus
from poise.store import ArchiveStore


def test_bench_archive_writes_a_report_for_each_size_and_backend(tmp_path: Path) -> None:
    path = tmp_path / "archive.json"
    args = ["bench", "archive", "--nodes", "50", "--events", "3", "--selections", "greedy", "--json", str(path)]
    assert main(args) == 0
    report = json.loads(path.read_text())
    entry = report["sizes"]["50"]
    for backend in ("sqlite", "mongomock"):
        measured = entry[backend]
        assert measured["nodes"] == 50 and measured["document_bytes"] > 20_000 and measured["depth"] >= 4
        assert set(measured["per_event"]) == {"start_s", "all", *EVENT_KINDS}
        assert measured["per_event"]["all"]["n"] == 9 and measured["per_event"]["all"]["median_ms"] > 0
        assert measured["run_status"]["n"] == 3
    greedy = entry["selection"]["greedy"]
    assert greedy["nodes"] == 53 and greedy["select_s"] >= 0 and greedy["peak_rss_mb"] > 0


def test_the_synthetic_run_is_a_valid_archive_with_live_nodes_at_the_end(tmp_path: Path) -> None:
    synthetic = SyntheticRun(60, live=4)
    with SQLiteStore.in_run_dir(tmp_path) as store:
        store.put_run(synthetic.config)
        assert store.insert_nodes(synthetic.nodes()) == 60
        counts = store.counters(synthetic.config.run_id).counts
        assert counts[NodeStatus.TRAINED] == counts[NodeStatus.EVALUATED] == 4 and counts[NodeStatus.FAILED] >= 1
        assert store.counters(synthetic.config.run_id) == ArchiveStore.counters(store, synthetic.config.run_id)
        assert len(store.scores(synthetic.config.run_id, min_seeds=2)) >= 1  # the root's seeds at least
