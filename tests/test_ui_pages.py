"""The UI's node, compare and figures pages (archive/ui/node_pages.py), read back as HTML.

Two kinds of archive: a real tiny run (root and three children, one confirmed with a fresh seed; made once per
module), and archives built by hand for what a tiny run does not produce: the report tests' archive (a failed
node with a hostile name, nan curves, a two-parent child, a pending node), agent-LLM requests and screening, a
length-objective run, nodes that all score the same, and a run that is only its root.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_report import (
    HOSTILE,
    RUN,
    SOURCE,
    Element,
    Tree,
    archive_nodes,
    evaluation,
    implementation,
    proposal,
    trajectory,
    walk,
)

from app.runner import run
from archive.report import cumulative_best, format_number
from archive.sqlite_store import SQLiteStore
from archive.ui.layout import NotFound, url
from archive.ui.node_pages import CURVES, render_compare_page, render_figures_page, render_node_page
from poise.contracts import (
    CallRecord,
    Failure,
    Genealogy,
    Implementation,
    Node,
    NodeStatus,
    Objective,
    Phase,
    Rejection,
    RunConfig,
    ScreeningMerits,
    ScreeningSummary,
    TrainingStep,
    TrainingTrajectory,
)
from poise.llm.cost import llm_cost
from poise.objective import stamped_node, yardstick
from poise.scoring import seed_mean

TINY = "ui-tiny"
LENGTH_RUN = "ui-length"
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


# ------------------------------------------------------------------------------------------- archives


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStore]:
    run_dir = tmp_path_factory.mktemp("ui-run")
    run(RunConfig(run_id=TINY, budget=3, parallel=1, protocol="tiny", root_seeds=1, replicate_seeds=1), run_dir)
    with SQLiteStore.in_run_dir(run_dir) as store:
        yield store


def with_llm_and_screening(node: Node) -> Node:
    calls = [
        CallRecord(provider="anthropic", model="claude-opus-5", operator="propose", prompt="propose@v1", mode="tool",
                   input_tokens=900, output_tokens=400, latency_s=4.2, cost_usd=0.0165, ok=True),
        CallRecord(provider="openai", model="qwen2.5-32b", operator="implement", prompt="implement@v1", attempt=2,
                   mode="json_schema", input_tokens=2000, output_tokens=10, priced=False, ok=False,
                   error=f"The answer is not valid JSON: {HOSTILE}"),
    ]  # fmt: skip
    screening = ScreeningSummary(
        parent_id="n0", acquisition="ei", threshold=0.05, passed=2,
        winner=ScreeningMerits(name="variant-n1", expected_improvement=0.012, predicted_mean=0.44,
                               predicted_std=0.02, nearest_id="n0", distance=0.31),
        rejections=[Rejection(proposal_name="copy", stage="novelty", reason="behaves like n0 (distance 0.001)")],
        screened_by="screened by the offline gates", parent_utility=0.4)  # fmt: skip
    cost = llm_cost(calls).model_copy(update={"phase_seconds": {Phase.TRAIN: 12.5, Phase.EVALUATE: 3.0},
                                              "gpu_seconds": 8 * 5400.0})
    return node.model_copy(update={"llm_calls": calls, "cost": cost,
                                   "proposal": node.proposal.model_copy(update={"screening": screening})})


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[SQLiteStore]:
    """The report tests' archive (root n0 with two replicates; n2 failed in train, named <script>), with
    agent-LLM requests and screening on n1 and hostile code on n2."""
    nodes = archive_nodes()
    nodes["n1"] = with_llm_and_screening(nodes["n1"])
    hostile_code = Implementation.from_source(SOURCE + f"# {HOSTILE}\n")
    nodes["n2"] = nodes["n2"].model_copy(update={"implementation": hostile_code})
    with SQLiteStore(tmp_path / "archive.db") as store:
        store.put_run(RunConfig(run_id=RUN, budget=12, seed=7, protocol="testbed-v1"))
        store.insert_nodes(nodes.values())
        yield store


def lone_node(run_id: str, node_id: str, parents: list[Node], overall: float, length: float, **parts: object) -> Node:
    genealogy = Genealogy.child(node_id, [p.genealogy for p in parents]) if parents else \
        Genealogy(run_id=run_id, node_id=node_id)
    parts = {"trajectory": trajectory([0.2, 0.3, overall]), **parts}
    return Node(genealogy=genealogy, proposal=proposal(f"variant-{node_id}", [p.node_id for p in parents]),
                status=NodeStatus.EVALUATED, implementation=implementation(), evaluation=evaluation(overall, length),
                **parts)


def length_run(store: SQLiteStore, tolerance: float = 0.02) -> RunConfig:
    """A length-objective run: the root at Overall 0.40, length 60; shorter children above and below the floor."""
    config = RunConfig(run_id=LENGTH_RUN, budget=4, objective=Objective(kind="length", accuracy_tolerance=tolerance))
    root = lone_node(LENGTH_RUN, "n000", [], 0.40, 60.0)
    nodes = [root, lone_node(LENGTH_RUN, "n001", [root], 0.41, 50.0), lone_node(LENGTH_RUN, "n002", [root], 0.30, 30.0),
             lone_node(LENGTH_RUN, "n003", [root], 0.39, 40.0)]
    stick = yardstick(root)
    store.put_run(config)
    store.insert_nodes(stamped_node(n, config.objective, stick) for n in nodes)
    return config


# ------------------------------------------------------------------------------------------- reading


class Page(Tree):
    """The report tests' tree (which checks that every element is closed in order), keeping each element's text
    and children in document order so that `text` reads a table row as a person does."""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        parent = self.current
        super().handle_starttag(tag, attrs)
        pieces(parent).append(parent.children[-1])

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        parent = self.current
        super().handle_startendtag(tag, attrs)
        pieces(parent).append(parent.children[-1])

    def handle_data(self, data: str) -> None:
        super().handle_data(data)
        pieces(self.current).append(data)


def pieces(element: Element) -> list[Element | str]:
    return element.__dict__.setdefault("pieces", [])


def dom(page: str) -> Element:
    return Page(page).root


def text(element: Element) -> str:
    """The element's text, its parts in document order joined by single spaces."""
    parts = (p if isinstance(p, str) else text(p) for p in pieces(element))
    return " ".join(" ".join(parts).split())


def by_id(root: Element, ident: str) -> Element:
    found = [e for e in walk(root) if e.attrs.get("id") == ident]
    assert len(found) == 1, f"{len(found)} elements with id {ident!r}"
    return found[0]


def has_id(root: Element, ident: str) -> bool:
    return any(e.attrs.get("id") == ident for e in walk(root))


def classed(root: Element, css_class: str) -> list[Element]:
    return [e for e in walk(root) if css_class in e.attrs.get("class", "").split()]


def links(element: Element) -> list[str]:
    return [e.attrs["href"] for e in walk(element) if e.tag == "a" and "href" in e.attrs]


def node_href(run_id: str, node_id: str) -> str:
    return url("runs", run_id, "nodes", node_id)


def numeric_labels(svg: Element) -> list[str]:
    return [t.text for t in svg.find_all("text") if NUMBER.match(t.text)]


def charts(root: Element) -> dict[str, Element]:
    return {svg.attrs["data-metric"]: svg for svg in by_id(root, "curves").find_all("svg", "curve")}


# --------------------------------------------------------------------------------- a node page, real run


def test_a_childs_page_diffs_its_code_against_the_parent_and_links_it(tiny: SQLiteStore) -> None:
    child = next(n for n in tiny.nodes(TINY) if n.genealogy.depth == 2)
    parent_id = child.genealogy.parent_ids[0]
    page = dom(render_node_page(tiny, TINY, child.node_id))
    diff = by_id(page, "code-diff")
    assert diff.tag == "pre"
    assert diff.find_all("span", "add") or diff.find_all("span", "del")
    assert {span.text[:1] for span in diff.find_all("span", "add")} <= {"+"}
    assert node_href(TINY, parent_id) in links(page)
    compare = url("runs", TINY, "compare") + f"?a={parent_id}&b={child.node_id}"
    assert compare in links(page)
    children = [c.node_id for c in tiny.children(TINY, child.node_id)]
    assert all(node_href(TINY, c) in links(page) for c in children)


def test_the_roots_page_shows_its_code_without_a_diff(tiny: SQLiteStore) -> None:
    root = tiny.get_node(TINY, "n000")
    page = dom(render_node_page(tiny, TINY, "n000"))
    assert not has_id(page, "code-diff")
    assert by_id(page, "code-source").all_text() == root.implementation.source
    assert "the root has no parent" in text(by_id(page, "code"))


def test_the_curves_section_charts_every_recorded_metric_for_node_parent_and_root(tiny: SQLiteStore) -> None:
    child = next(n for n in tiny.nodes(TINY) if n.genealogy.depth == 2)
    drawn = charts(dom(render_node_page(tiny, TINY, child.node_id)))
    for key, field, _ in CURVES:
        if any(getattr(step, field) is not None for step in child.trajectory.steps):
            series = {line.attrs["data-series"] for line in drawn[key].find_all("polyline", "series")}
            assert series == {child.node_id, child.genealogy.parent_ids[0], "n000"}, key
    first = next(n for n in tiny.nodes(TINY) if n.genealogy.depth == 1)  # its parent is the root: drawn once
    reward = charts(dom(render_node_page(tiny, TINY, first.node_id)))["reward"]
    assert [p.attrs["data-series"] for p in reward.find_all("polyline", "series")] == [first.node_id, "n000"]
    assert "n000 (parent, root)" in text(reward)


def test_the_metrics_table_lists_every_suite_with_its_interval_and_the_overall(tiny: SQLiteStore) -> None:
    node = next(n for n in tiny.nodes(TINY) if n.genealogy.depth == 1)
    table = by_id(dom(render_node_page(tiny, TINY, node.node_id)), "metrics")
    rows = {row.attrs["data-suite"]: text(row) for row in table.find_all("tr") if "data-suite" in row.attrs}
    assert set(rows) == set(node.evaluation.suites)
    for name, result in node.evaluation.suites.items():
        interval = f"{format_number(result.value)} [{format_number(result.ci_low)}, {format_number(result.ci_high)}]"
        assert interval in rows[name] and f"{result.n_prompts} × {result.n_samples}" in rows[name]
    low, high = node.evaluation.overall_ci
    overall = text(table.find_all("tr", "overall")[0])
    assert f"{format_number(node.evaluation.overall)} [{format_number(low)}, {format_number(high)}]" in overall


def test_a_confirmed_node_lists_its_replicates_and_their_mean(tiny: SQLiteStore) -> None:
    confirmed = next(n for n in tiny.nodes(TINY) if n.replicates)
    table = by_id(dom(render_node_page(tiny, TINY, confirmed.node_id)), "replicates")
    seeds = [confirmed.evaluation, *confirmed.replicates]
    assert all(str(e.seed) in text(table) for e in seeds)
    mean = sum(e.overall for e in seeds) / len(seeds)
    assert f"mean over {len(seeds)} seeds {format_number(mean)}" in text(table)


def test_the_compare_page_shows_both_nodes_their_diff_curves_and_metrics(tiny: SQLiteStore) -> None:
    a, b = tiny.get_node(TINY, "n000"), next(n for n in tiny.nodes(TINY) if n.genealogy.depth == 2)
    page = dom(render_compare_page(tiny, TINY, a.node_id, b.node_id))
    compare = by_id(page, "compare")
    assert {node_href(TINY, a.node_id), node_href(TINY, b.node_id)} <= set(links(compare))
    assert a.proposal.name in text(compare) and b.proposal.name in text(compare)
    diff = by_id(page, "code-diff")
    assert diff.find_all("span", "file")[0].text.strip() == "--- n000"
    reward = charts(page)["reward"]
    assert {p.attrs["data-series"] for p in reward.find_all("polyline", "series")} == {a.node_id, b.node_id}
    overall = text(by_id(page, "metrics").find_all("tr", "overall")[0])
    assert f"{b.evaluation.overall - a.evaluation.overall:+.3f}" in overall


def test_the_figures_page_links_every_node_and_draws_the_cumulative_best(tiny: SQLiteStore) -> None:
    nodes = tiny.nodes(TINY)
    page = dom(render_figures_page(tiny, TINY))
    best = by_id(page, "fig-cumulative-best")
    expected = " ".join(f"{d}:{b:.6g}" for d, b in cumulative_best(nodes, seed_mean))
    assert best.find_all("polyline", "frontier")[0].attrs["data-best"] == expected
    scatter = by_id(page, "fig-accuracy-length")
    points = [a for a in scatter.find_all("a", "pt")]
    assert sorted(a.attrs["href"] for a in points) == sorted(node_href(TINY, n.node_id) for n in nodes)
    for a in points:
        node_id = a.attrs["href"].rsplit("/", 1)[1]
        assert a.find_all("title")[0].text.startswith(node_id)
    assert not scatter.find_all("line", "accuracy-floor")  # the overall objective has no floor
    averaged = [n.node_id for n in nodes if n.replicates]
    assert averaged and all(f"{n} (2 seeds)" in text(page) for n in averaged)


# ---------------------------------------------------------------------------- node pages, built archives


def test_a_failed_node_shows_its_phase_and_reason_first(archive: SQLiteStore) -> None:
    page = dom(render_node_page(archive, RUN, "n2"))
    failure = by_id(page, "failure")
    assert failure.attrs["data-phase"] == "train"
    assert '<img src="http://evil.example/x.png"> diverged' in text(failure) and "loss nan" in text(failure)


def test_hostile_names_code_and_llm_errors_are_escaped(archive: SQLiteStore) -> None:
    pages = [render_node_page(archive, RUN, "n2"), render_node_page(archive, RUN, "n1"),
             render_compare_page(archive, RUN, "n1", "n2"), render_figures_page(archive, RUN),
             render_node_page(archive, RUN, "n4")]  # fmt: skip
    for html in pages:
        assert HOSTILE not in html and "<img" not in html
        assert all("src" in s.attrs for s in dom(html).find_all("script"))  # only the layout's ui.js
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]
    assert HOSTILE in text(by_id(dom(pages[0]), "code-source"))


def test_unknown_ids_raise_not_found_naming_them(archive: SQLiteStore) -> None:
    with pytest.raises(NotFound, match=r"no node 'n99'.*n0, n1, n2"):
        render_node_page(archive, RUN, "n99")
    with pytest.raises(NotFound, match=r"no node 'zz' \(given as b\)"):
        render_compare_page(archive, RUN, "n1", "zz")
    with pytest.raises(NotFound, match=rf"no run 'nope'.*{RUN}"):
        render_node_page(archive, "nope", "n0")
    with pytest.raises(NotFound, match="no run 'nope'"):
        render_figures_page(archive, "nope")


def test_a_missing_metric_is_a_note_not_a_chart_and_nan_values_are_counted(archive: SQLiteStore) -> None:
    page = dom(render_node_page(archive, RUN, "n3"))  # clip_frac never logged; n3's curves have nan and inf
    drawn = charts(page)
    assert "clip_frac" not in drawn
    assert [p.attrs["data-metric"] for p in classed(page, "not-recorded")] == ["clip_frac"]
    assert "(2 non-finite not drawn)" in text(drawn["reward"])
    assert "(3 non-finite not drawn)" in text(drawn["entropy"])


def test_the_proposal_screening_reflection_and_llm_requests_are_shown(archive: SQLiteStore) -> None:
    page = dom(render_node_page(archive, RUN, "n1"))
    proposal_text = text(by_id(page, "proposal"))
    assert "scale advantages by the analytic group variance" in proposal_text
    assert "analytic_variance_scaling" in proposal_text and "var_floor=0.0001" in proposal_text
    screening = text(by_id(page, "screening"))
    assert "selection score EI 0.012" in screening and "0.44 ± 0.02" in screening
    assert "copy novelty behaves like n0 (distance 0.001)" in screening
    verification = by_id(page, "verification")
    assert [a.attrs["data-passed"] for a in classed(verification, "attempt")] == ["false", "true"]
    assert "FAIL finite nan loss" in text(verification) and "ValueError: nan loss" in text(verification)
    root_page = dom(render_node_page(archive, RUN, "n0"))
    reflection = by_id(root_page, "reflection")
    assert "analytic_variance_scaling helped 0.7 lower KL spikes" in text(reflection)
    assert classed(reflection, "effect-helped")
    assert "KL spikes trace to the advantage estimate" in text(reflection)
    llm = by_id(page, "llm")
    rows = [text(r) for r in llm.find_all("tr", "ok") + llm.find_all("tr", "fail")]
    assert "propose propose@v1 anthropic:claude-opus-5 1 900 / 400 4.2 s $0.0165 ok" in rows[0]
    assert "unpriced failed" in rows[1] and HOSTILE in rows[1]
    assert "train 12.5" in text(llm) and "$0.0165" in text(llm)
    assert "training held GPUs for 12.00 GPU-hours" in text(llm)


def test_a_two_parent_child_diffs_against_its_first_parent_and_offers_both_comparisons(archive: SQLiteStore) -> None:
    page = dom(render_node_page(archive, RUN, "n4"))
    compare = url("runs", RUN, "compare")
    assert {f"{compare}?a=n1&b=n4", f"{compare}?a=n2&b=n4"} <= set(links(page))
    assert "identical" in text(by_id(page, "code"))  # the report archive gives every node the same source


# ------------------------------------------------------------------------------------------------ figures


def test_a_length_objective_draws_the_accuracy_floor_and_the_pareto_front(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "archive.db") as store:
        config = length_run(store, tolerance=0.02)
        page = dom(render_figures_page(store, LENGTH_RUN))
    scatter = by_id(page, "fig-accuracy-length")
    floor = scatter.find_all("line", "accuracy-floor")
    assert len(floor) == 1 and math.isclose(float(floor[0].attrs["data-floor"]), 0.40 - 0.02)
    assert config.objective.kind == "length" and "accuracy floor" in text(page)
    front = scatter.find_all("polyline", "pareto-front")[0].attrs["data-nodes"].split()
    assert front == ["n002", "n003", "n001"]  # shortest first; the root is dominated by n001
    assert {c.attrs["data-node-id"] for c in classed(scatter, "front")} == set(front)


def test_nodes_that_all_score_the_same_get_padded_axes_with_distinct_labels(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "archive.db") as store:
        store.put_run(RunConfig(run_id="same", budget=2))
        root = lone_node("same", "n000", [], 0.5, 40.0)
        store.insert_nodes([root, lone_node("same", "n001", [root], 0.5, 40.0),
                            lone_node("same", "n002", [root], 0.5 + 1e-12, 40.0)])
        page = dom(render_figures_page(store, "same"))
    for figure in ("fig-cumulative-best", "fig-accuracy-length"):
        labels = numeric_labels(by_id(page, figure))
        assert len(labels) == len(set(labels)) and len(labels) >= 3, (figure, labels)


def test_a_narrow_range_gets_tick_labels_that_tell_the_ticks_apart(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "archive.db") as store:
        store.put_run(RunConfig(run_id="narrow", budget=2))
        root = lone_node("narrow", "n000", [], 0.4001, 40.0)
        store.insert_nodes([root, lone_node("narrow", "n001", [root], 0.4004, 40.0001)])
        labels = numeric_labels(by_id(dom(render_figures_page(store, "narrow")), "fig-accuracy-length"))
    assert len(labels) == len(set(labels)) and any(label.startswith("0.400") for label in labels)


# ------------------------------------------------------------------------------------------ a lone root


def test_a_run_that_is_only_its_root_renders_every_page(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "archive.db") as store:
        store.put_run(RunConfig(run_id="lone", budget=1))
        one_step = TrainingTrajectory(protocol="tiny", seed=0, steps=[TrainingStep(step=0, reward_mean=0.25)])
        store.insert_node(lone_node("lone", "n000", [], 0.4, 40.0, trajectory=one_step))
        node_page = dom(render_node_page(store, "lone", "n000"))
        compare_page = dom(render_compare_page(store, "lone", "n000", "n000"))
        figures = dom(render_figures_page(store, "lone"))
    reward = charts(node_page)["reward"]
    assert reward.find_all("circle") and not reward.find_all("polyline")  # one step: a point, not a line
    assert len(set(numeric_labels(reward))) == len(numeric_labels(reward))
    assert not has_id(node_page, "code-diff") and "identical" in text(by_id(compare_page, "compare"))
    assert by_id(figures, "fig-cumulative-best").find_all("a", "pt")
    assert by_id(figures, "fig-accuracy-length").find_all("a", "pt")


def test_a_root_that_is_only_proposed_renders_every_page(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "archive.db") as store:
        store.put_run(RunConfig(run_id="fresh", budget=1))
        store.insert_node(Node(genealogy=Genealogy(run_id="fresh", node_id="n000"), proposal=proposal("grpo", [])))
        node_page = dom(render_node_page(store, "fresh", "n000"))
        dom(render_compare_page(store, "fresh", "n000", "n000"))
        figures = dom(render_figures_page(store, "fresh"))
    for section in ("code", "verification", "curves", "reflection", "llm"):
        assert by_id(node_page, section)
    assert "not trained yet" in text(by_id(node_page, "curves"))
    assert "no node has a utility yet" in text(by_id(figures, "fig-cumulative-best"))


def test_a_failed_root_without_parts_renders_its_failure(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "archive.db") as store:
        store.put_run(RunConfig(run_id="broken", budget=1))
        failure = Failure(phase=Phase.IMPLEMENT, reason="the module does not import")
        store.insert_node(Node(genealogy=Genealogy(run_id="broken", node_id="n000"), proposal=proposal("grpo", []),
                               status=NodeStatus.FAILED, failure=failure))
        page = dom(render_node_page(store, "broken", "n000"))
    assert by_id(page, "failure").attrs["data-phase"] == "implement"
    assert "the module does not import" in text(by_id(page, "failure"))
