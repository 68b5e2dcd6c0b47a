"""The live pages of the UI (archive/ui/live_pages.py): the runs list, a run's overview and its JSON twin, the
lineage tree's JSON, and the static script and style sheet they load.

Two kinds of archives: a real embedded run (budget 3, the tiny protocol), made once for the module, and
hand-built nodes for what a short run does not produce (failures with hostile text, a verdict against GRPO,
screening scores, runs in every state):

    n000 GRPO (3 seeds)
    ├── n001 (3 fresh seeds, like GRPO's)   ── n003 FAILED in train, <script> name
    ├── n002 FAILED in implement
    └── n004 proposed
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.runner import run
from archive.sqlite_store import SQLiteStore
from archive.status import run_status
from archive.ui.layout import NotFound
from archive.ui.live_pages import (
    OVERVIEW_PARTS,
    LineageEntry,
    lineage_entries,
    overview_json,
    render_overview_page,
    render_runs_page,
    render_tree_page,
    tree_json,
    tree_layout,
)
from poise.contracts import (
    PIPELINE,
    ROOT_ID,
    CallRecord,
    Evaluation,
    Failure,
    Genealogy,
    Implementation,
    MetricKind,
    Node,
    NodeStatus,
    Phase,
    Proposal,
    Reflection,
    RunConfig,
    ScreeningMerits,
    ScreeningSummary,
    SuiteResult,
    TrainingTrajectory,
)

RUN = "hand"
HOSTILE = "<script>alert(1)</script>"
HOSTILE_REASON = '<img src=x onerror="alert(2)"> loss diverged'
STATIC = Path(__file__).resolve().parents[1] / "archive" / "ui" / "static"
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------------------ archives


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[SQLiteStore]:
    """A real run: the root and three evaluated children, each through every phase."""
    run_dir = tmp_path_factory.mktemp("run")
    run(RunConfig(run_id="t", budget=3, parallel=1, protocol="tiny", root_seeds=1, replicate_seeds=1), run_dir)
    with SQLiteStore.in_run_dir(run_dir) as store:
        yield store


def evaluation(overall: float, seed: int = 0) -> Evaluation:
    suite = SuiteResult(suite="easy", kind=MetricKind.ACC_AT_1, value=overall, ci_low=overall, ci_high=overall,
                        n_prompts=8, n_samples=8, mean_length=30.0, format_valid_rate=1.0, weight=1.0)
    return Evaluation(suites={"easy": suite}, overall=overall, mean_length=30.0, seed=seed)


def make_node(node_id: str, parents: list[Node], status: NodeStatus = NodeStatus.REFLECTED, name: str | None = None,
              overall: float | None = 0.4, replicates: tuple[float, ...] = (), failure: Failure | None = None,
              minutes: float = 0.0, screening: ScreeningSummary | None = None, run_id: str = RUN) -> Node:
    """A node at `status` with what that status needs, created `minutes` after T0 (and changed a minute later)."""
    genealogy = (Genealogy.child(node_id, [p.genealogy for p in parents]) if parents
                 else Genealogy(run_id=run_id, node_id=node_id))
    proposal = Proposal(name=name or f"variant-{node_id}", rationale="why not", generator="offline",
                        parent_ids=[p.node_id for p in parents], screening=screening)
    reached = () if status == NodeStatus.FAILED else PIPELINE[1 : PIPELINE.index(status) + 1]
    parts: dict[str, object] = {}
    if NodeStatus.IMPLEMENTED in reached:
        parts["implementation"] = Implementation.from_source("x = 1\n", attempts=[], verified=True)
    if NodeStatus.TRAINED in reached:
        parts["trajectory"] = TrainingTrajectory(protocol="tiny", seed=0)
    if NodeStatus.EVALUATED in reached and overall is not None:
        parts["evaluation"] = evaluation(overall)
        parts["replicates"] = [evaluation(u, seed=1000 * (i + 1)) for i, u in enumerate(replicates)]
    if NodeStatus.REFLECTED in reached:
        parts["reflection"] = Reflection(text="fine", generator="offline")
    created = T0 + timedelta(minutes=minutes)
    return Node(genealogy=genealogy, proposal=proposal, status=status, failure=failure, created_at=created,
                updated_at=created + timedelta(minutes=1), **parts)


def hand_nodes(run_id: str = RUN) -> dict[str, Node]:
    screening = ScreeningSummary(parent_id=ROOT_ID, acquisition="ei", threshold=0.01, passed=2,
                                 winner=ScreeningMerits(name="variant-n001", expected_improvement=0.0123,
                                                        predicted_mean=0.41, predicted_std=0.02))
    n0 = make_node(ROOT_ID, [], name="GRPO", overall=0.40, replicates=(0.41, 0.39), run_id=run_id)
    n1 = make_node("n001", [n0], overall=0.42, replicates=(0.40, 0.41, 0.405), minutes=10, screening=screening)
    n2 = make_node("n002", [n0], NodeStatus.FAILED, minutes=20,
                   failure=Failure(phase=Phase.IMPLEMENT, reason="verification failed after 3 attempts"))
    n3 = make_node("n003", [n1], NodeStatus.FAILED, name=HOSTILE, minutes=30,
                   failure=Failure(phase=Phase.TRAIN, reason=HOSTILE_REASON))
    n4 = make_node("n004", [n0], NodeStatus.PROPOSED, minutes=40)
    return {n.node_id: n for n in (n0, n1, n2, n3, n4)}


def hand_store(tmp_path: Path, nodes: list[Node], budget: int = 6, run_id: str = RUN, **settings: object
               ) -> SQLiteStore:
    store = SQLiteStore(tmp_path / f"{run_id}.db")
    store.put_run(RunConfig(run_id=run_id, budget=budget, protocol="tiny", **settings))
    for node in nodes:
        assert store.insert_node(node)
    return store


@pytest.fixture
def hand(tmp_path: Path) -> Iterator[SQLiteStore]:
    with hand_store(tmp_path, list(hand_nodes().values())) as store:
        yield store


def elements(html: str, attribute: str) -> dict[str, str]:
    """{value of `attribute`: the element's inner text} of every element carrying it (flat elements only)."""
    pattern = rf'<(\w+)[^>]*\b{attribute}="([^"]*)"[^>]*>(.*?)</\1>'
    return {m.group(2): re.sub(r"<[^>]+>", "", m.group(3)) for m in re.finditer(pattern, html, re.S)}


# ------------------------------------------------------------------------------------------ runs page


def test_runs_page_lists_the_run_with_its_state_budget_and_best(tiny_run: SQLiteStore) -> None:
    status = run_status(tiny_run, "t")
    html = render_runs_page(tiny_run)
    row = re.search(r'<tr data-run="t">(.*?)</tr>', html, re.S).group(1)
    assert '<a href="/runs/t">t</a>' in row
    assert "finished" in row and "budget reached" in row
    assert f"{status.budget.evaluated} / 3" in row
    assert f'<a href="/runs/t/nodes/{status.best.node_id}">' in row
    assert status.best.verdict in row


def test_an_empty_archive_says_how_to_start_a_run(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "empty.db") as store:
        html = render_runs_page(store)
    assert 'class="message"' in html and "poise run" in html


def test_runs_in_every_state_say_why(tmp_path: Path) -> None:
    def first(run_id: str, *node_ids: str) -> list[Node]:
        nodes = hand_nodes(run_id)
        return [nodes[node_id] for node_id in node_ids]

    root_failed = make_node(ROOT_ID, [], NodeStatus.FAILED, run_id="broken",
                            failure=Failure(phase=Phase.TRAIN, reason="out of memory"))
    root = hand_nodes("confirming")[ROOT_ID]
    unconfirmed = make_node("n001", [root], overall=0.45, replicates=(0.44,))
    stores = {
        "running": hand_store(tmp_path, list(hand_nodes("running").values()), run_id="running"),
        "idle": hand_store(tmp_path, first("idle", ROOT_ID, "n001"), run_id="idle"),
        "done": hand_store(tmp_path, first("done", ROOT_ID, "n001"), budget=1, run_id="done"),
        "confirming": hand_store(tmp_path, [root, unconfirmed], budget=1, run_id="confirming"),
        "broken": hand_store(tmp_path, [root_failed], run_id="broken"),
        "new": hand_store(tmp_path, [], run_id="new"),
    }
    expected = {"running": ("running", "1 in the pipeline (1 proposed)"), "idle": ("idle", "poise run"),
                "done": ("finished", "budget reached: 1 of 1"), "confirming": ("confirming", "(1 of 3 so far"),
                "broken": ("finished", "train: out of memory"),
                "new": ("starting", "not in the archive yet")}
    for run_id, store in stores.items():
        with store:
            label, reason = expected[run_id]
            state = overview_json(store, run_id)["fragments"]["state"]
            assert f'class="state state-{label}"' in state and reason in state, run_id


# ------------------------------------------------------------------------------------------ overview


def test_overview_json_counts_match_the_store(tiny_run: SQLiteStore) -> None:
    data = overview_json(tiny_run, "t")
    counts = tiny_run.counts("t")
    assert data["counts"] == {status.value: n for status, n in counts.items()}
    assert data["total_nodes"] == sum(counts.values())
    assert set(data["fragments"]) == set(OVERVIEW_PARTS)
    shown = elements(data["fragments"]["counts"], "data-status")
    assert {status: int(text.split()[0]) for status, text in shown.items()} == data["counts"]
    assert data["fragments"]["nodes-total"] == str(sum(counts.values()))
    assert data["finished"] and data["state"] == "finished"
    json.dumps(data, allow_nan=False)  # what a browser's JSON.parse reads


def test_overview_page_holds_every_live_part_and_polls_its_json(tiny_run: SQLiteStore) -> None:
    html = render_overview_page(tiny_run, "t")
    fragments = overview_json(tiny_run, "t")["fragments"]
    assert 'data-overview="/ui/runs/t/overview.json"' in html
    for part in OVERVIEW_PARTS:
        assert re.search(rf'<(\w+)[^>]* id="{part}"[^>]*>{re.escape(fragments[part])}</\1>', html), part


def test_failures_show_phase_and_reason_most_recent_first_with_links(hand: SQLiteStore) -> None:
    failures = overview_json(hand, RUN)["fragments"]["failures"]
    rows = re.findall(r'<tr data-node="(n\d+)">(.*?)</tr>', failures, re.S)
    assert [node_id for node_id, _ in rows] == ["n003", "n002"]
    newest, older = rows[0][1], rows[1][1]
    assert f'<a href="/runs/{RUN}/nodes/n003">' in newest and ">train<" in newest
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt; loss diverged" in newest
    assert ">implement<" in older and "verification failed after 3 attempts" in older


def test_best_node_shows_its_interval_and_that_grpo_is_indistinguishable(hand: SQLiteStore) -> None:
    best = overview_json(hand, RUN)["fragments"]["best"]
    assert f'<a href="/runs/{RUN}/nodes/n001">' in best
    assert re.search(r"\[0\.\d+, 0\.\d+\] 95% CI over 3 seeds", best)
    assert "indistinguishable from GRPO" in best and "verdict-indistinguishable" in best


def test_timing_gives_elapsed_and_an_estimate_only_with_enough_data(tmp_path: Path) -> None:
    nodes = hand_nodes("early")
    early = [nodes[ROOT_ID], nodes["n001"], nodes["n004"]]
    with hand_store(tmp_path, early, run_id="early") as store:
        timing = overview_json(store, "early", now=T0 + timedelta(minutes=50))["fragments"]["timing"]
    assert "elapsed <b" in timing and "50 min 00 s" in timing
    assert "estimate: after 2 candidates are evaluated" in timing
    n5 = make_node("n005", [nodes["n001"]], overall=0.43, minutes=30)
    with hand_store(tmp_path / "later", [*early, n5], run_id="early") as store:  # 2 of 6 evaluated
        timing = overview_json(store, "early", now=T0 + timedelta(minutes=50))["fragments"]["timing"]
    assert "estimate: about <b>1 h 20 min</b> left for 4 more candidates (20 min 00 s per" in timing


def test_a_finished_run_says_how_long_it_ran(tiny_run: SQLiteStore) -> None:
    timing = overview_json(tiny_run, "t")["fragments"]["timing"]
    assert "ran for" in timing and "estimate" not in timing


def test_llm_spend_is_listed_per_operator(tiny_run: SQLiteStore) -> None:
    llm = overview_json(tiny_run, "t")["fragments"]["llm"]
    assert set(elements(llm, "data-operator")) == {"propose", "screen", "implement", "reflect"}
    assert "no cost cap" in llm


def test_llm_spend_per_operator_is_shown_against_the_cap(tmp_path: Path) -> None:
    nodes = hand_nodes("paid")
    calls = [CallRecord(provider="anthropic", model="claude-x", operator="propose", mode="tool", cost_usd=0.25,
                        ok=True),
             CallRecord(provider="anthropic", model="claude-x", operator="implement", mode="tool", cost_usd=0.5,
                        ok=False, error="the answer is not valid JSON")]
    paid = nodes["n001"].model_copy(update={"llm_calls": calls})
    with hand_store(tmp_path, [nodes[ROOT_ID], paid], run_id="paid", llm_budget_usd=2.0) as store:
        llm = overview_json(store, "paid")["fragments"]["llm"]
    rows = dict(re.findall(r'<tr data-operator="(\w+)">(.*?)</tr>', llm))
    assert re.findall(r">([^<>]+)</td>", rows["propose"])[2:] == ["1", "0", "$0.2500", "12.5%"]
    assert re.findall(r">([^<>]+)</td>", rows["implement"])[2:] == ["1", "1", "$0.5000", "25.0%"]
    assert "$0.7500</b>" in llm and "of the $2.00 cap" in llm


def test_hostile_names_and_reasons_are_escaped_on_every_page(hand: SQLiteStore) -> None:
    pages = [render_runs_page(hand), render_overview_page(hand, RUN), render_tree_page(hand, RUN),
             *overview_json(hand, RUN)["fragments"].values()]
    for html in pages:
        assert "<script>alert" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in overview_json(hand, RUN)["fragments"]["failures"]


def test_an_unknown_run_is_not_found_naming_the_known_runs(hand: SQLiteStore) -> None:
    for render in (overview_json, render_overview_page, tree_json, render_tree_page):
        with pytest.raises(NotFound, match=rf"no run 'nope'.*known runs: {RUN}"):
            render(hand, "nope")


# ------------------------------------------------------------------------------------------ tree


def test_tree_json_has_every_node_with_its_parents_and_place(tiny_run: SQLiteStore) -> None:
    data = tree_json(tiny_run, "t")
    stored = tiny_run.nodes("t")
    assert [n["id"] for n in data["nodes"]] == [n.node_id for n in stored]
    by_id = {n["id"]: n for n in data["nodes"]}
    for node in stored:
        entry = by_id[node.node_id]
        assert entry["parents"] == node.genealogy.parent_ids
        assert entry["x"] == entry["depth"] == node.genealogy.depth
        assert entry["status"] == node.status.value
    utilities = [n["utility"] for n in data["nodes"]]
    assert data["utility"] == {"min": min(utilities), "max": max(utilities)}
    assert data["root"] == ROOT_ID and data["node_href"] == "/runs/t/nodes/"
    json.dumps(data, allow_nan=False)


def test_tree_json_marks_failed_nodes_with_their_phase_and_screened_ones_with_their_score(
        hand: SQLiteStore) -> None:
    by_id = {n["id"]: n for n in tree_json(hand, RUN)["nodes"]}
    assert (by_id["n002"]["failed_phase"], by_id["n003"]["failed_phase"]) == ("implement", "train")
    assert by_id["n003"]["utility"] is None and by_id["n003"]["colour"] != by_id["n001"]["colour"]
    assert by_id["n003"]["name"] == HOSTILE  # JSON, drawn with textContent by ui.js
    assert by_id["n001"]["selection_score"] == pytest.approx(0.0123)
    assert by_id[ROOT_ID]["selection_score"] is None and by_id[ROOT_ID]["failed_phase"] is None


def test_tree_json_answers_unchanged_to_the_version_the_script_has_drawn(tmp_path: Path) -> None:
    nodes = hand_nodes()
    with hand_store(tmp_path, [nodes[ROOT_ID], nodes["n001"]]) as store:
        drawn = tree_json(store, RUN)
        same = tree_json(store, RUN, known_version=drawn["version"])
        store.insert_node(nodes["n004"])
        grown = tree_json(store, RUN, known_version=drawn["version"])
    assert same == {"run_id": RUN, "version": drawn["version"], "unchanged": True}
    assert grown["version"] != drawn["version"] and [n["id"] for n in grown["nodes"]][-1] == "n004"


def test_tree_layout_centres_parents_on_their_children_and_never_overlaps() -> None:
    def entry(node_id: str, *parents: str, depth: int) -> LineageEntry:
        return LineageEntry(id=node_id, parents=parents, status="reflected", depth=depth, utility=None,
                            failed_phase=None, selection_score=None, name=node_id)

    entries = [entry("a", depth=0), entry("b", "a", depth=1), entry("c", "a", depth=1), entry("d", "b", depth=2),
               entry("e", "b", "c", depth=2), entry("orphan", "gone", depth=3)]
    places = tree_layout(entries)
    assert {k: x for k, (x, _) in places.items()} == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 2, "orphan": 3}
    rows = {k: y for k, (_, y) in places.items()}
    assert rows["b"] == (rows["d"] + rows["e"]) / 2 and rows["a"] == (rows["b"] + rows["c"]) / 2
    assert len(set(places.values())) == len(places)
    assert rows["orphan"] > max(rows[k] for k in "abcde")  # its own tree, below


class LineageStore:
    """A store with the fast `lineage` method: tree_json must use it instead of parsing documents."""

    def __init__(self, store: SQLiteStore, entries: list[LineageEntry]) -> None:
        self.store, self.entries = store, entries

    def __getattr__(self, name: str) -> object:
        if name == "nodes":
            raise AssertionError("tree_json parsed the documents although the store has `lineage`")
        return getattr(self.store, name)

    def lineage(self, run_id: str) -> list[LineageEntry]:
        return self.entries


def synthetic_lineage(size: int) -> list[LineageEntry]:
    """A bushy lineage: every node a child of one of the 200 before it, some failed, most evaluated."""
    entries: list[LineageEntry] = []
    for i in range(size):
        parent = entries[max(0, i - 1 - (i * 7919) % 200)] if i else None
        failed = i % 37 == 0 and i > 0
        entries.append(LineageEntry(
            id=f"n{i:03d}", parents=(parent.id,) if parent else (), status="failed" if failed else "reflected",
            depth=parent.depth + 1 if parent else 0, utility=None if failed else 0.3 + (i % 101) / 500,
            failed_phase="train" if failed else None, selection_score=0.01 if i % 3 else None, name=f"variant {i}"))
    return entries


def test_tree_json_reads_the_stores_lineage_when_it_has_one(hand: SQLiteStore) -> None:
    entries = synthetic_lineage(20)
    fast = LineageStore(hand, entries)
    assert lineage_entries(fast, RUN) == entries
    assert [n["id"] for n in tree_json(fast, RUN)["nodes"]] == [e.id for e in entries]


def test_tree_json_of_ten_thousand_nodes_takes_under_a_second(hand: SQLiteStore) -> None:
    fast = LineageStore(hand, synthetic_lineage(10_000))
    started = time.perf_counter()
    data = tree_json(fast, RUN)
    text = json.dumps(data, allow_nan=False)
    elapsed = time.perf_counter() - started
    assert len(data["nodes"]) == 10_000 and elapsed < 1.0, f"{elapsed:.2f} s for {len(text) >> 10} KiB"
    assert all(math.isfinite(n["y"]) for n in data["nodes"])


def test_tree_page_is_a_frame_the_script_draws_from_tree_json(hand: SQLiteStore) -> None:
    html = render_tree_page(hand, RUN)
    assert f'data-tree="/ui/runs/{RUN}/tree.json"' in html
    assert re.search(r'<svg id="tree"[^>]*>', html)
    for control in ("zoom-in", "zoom-out", "zoom-fit", "tree-count", "utility-min", "utility-max"):
        assert f'id="{control}"' in html


# ------------------------------------------------------------------------------------------ static files


def test_script_and_style_request_nothing_from_another_origin() -> None:
    for name in ("ui.js", "ui.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://", text), name
        assert not re.search(r"""["'(]//\w""", text), name  # protocol-relative: //host/path
    style = (STATIC / "ui.css").read_text()
    assert "@import" not in style and not re.search(r"url\((?!#)", style)  # no fonts or images from anywhere


def test_every_element_the_script_looks_up_is_on_its_page(hand: SQLiteStore) -> None:
    script = (STATIC / "ui.js").read_text()
    wanted = set(re.findall(r'(?:getElementById|button|text)\("([\w-]+)"', script))
    pages = render_tree_page(hand, RUN) + render_overview_page(hand, RUN)
    assert wanted and {w for w in wanted if f'id="{w}"' not in pages} == set()
