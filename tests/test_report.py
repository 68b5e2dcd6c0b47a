"""The run report (HTML figures and node table) and the plain-text node view of `poise show`.

The archive built here has a root, a two-parent child, a failed node with a hostile name, a node with
nan curves, a pending node without a trajectory, and a node that did worse than the root:

    depth 0   n0 GRPO (0.40, replicates seeds 8, 9)
    depth 1   n1 (0.45)   n2 <script> FAILED in train   n6 (0.38)
    depth 2   n3 (0.43, nan curves; parent n1)   n4 (0.50; parents n1, n2)
    depth 3   n5 pending (parent n3)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from archive.report import (
    CHAR_PX,
    LABEL_HEIGHT_PX,
    SCALE_STOPS,
    Scale,
    coincident,
    cumulative_best,
    lineage_layout,
    min_span,
    place_labels,
    render_node_text,
    tick_labels,
    ticks,
    top_variants,
    write_report,
)
from archive.sqlite_store import SQLiteStore
from archive.status import run_status
from poise.contracts import (
    CallRecord,
    CheckResult,
    Effect,
    Evaluation,
    Failure,
    Genealogy,
    Implementation,
    MechanismEffect,
    MechanismSpec,
    MetricKind,
    Node,
    NodeStatus,
    Phase,
    Proposal,
    Reflection,
    Rejection,
    RunConfig,
    ScreeningMerits,
    ScreeningSummary,
    SuiteResult,
    TrainingStep,
    TrainingTrajectory,
    VerificationAttempt,
)
from poise.llm.cost import llm_cost
from poise.scoring import confirmation_evaluations, confirmation_scores, utility
from poise.store import ArchiveError

RUN = "run-report"
HOSTILE = "<script>alert(1)</script>"
NAN = float("nan")
SOURCE = """LOSS_AGG_MODE = "token-mean"
HPARAMS = {"clip_eps": 0.2}

def compute_advantages(batch):
    return batch["scores"] - batch["group_mean_score"]
"""


# ------------------------------------------------------------------------------------------ documents


def evaluation(overall: float, mean_length: float = 40.0, seed: int = 7) -> Evaluation:
    suite = SuiteResult(
        suite="hard", kind=MetricKind.PASS_AT_K, k=8, value=overall, ci_low=overall - 0.05, ci_high=overall + 0.05,
        n_prompts=32, n_samples=256, mean_length=mean_length, format_valid_rate=0.97, weight=1.0,
    )  # fmt: skip
    return Evaluation(
        suites={"hard": suite}, overall=overall, overall_ci=(overall - 0.03, overall + 0.03),
        mean_length=mean_length, seed=seed,
    )  # fmt: skip


def trajectory(reward: list[float], entropy: list[float] | None = None) -> TrainingTrajectory:
    entropy = entropy or [1.0 - 0.1 * i for i in range(len(reward))]
    steps = [
        TrainingStep(step=i, reward_mean=r, entropy=e, response_length=50.0 - i, kl=0.01 * i, grad_norm=1.0)
        for i, (r, e) in enumerate(zip(reward, entropy, strict=True))
    ]
    return TrainingTrajectory(protocol="testbed-v1", seed=7, steps=steps, checkpoint_uri="file:///ckpt")


def implementation() -> Implementation:
    checks = [CheckResult(name="shapes", passed=True), CheckResult(name="finite", passed=False, message="nan loss")]
    attempts = [
        VerificationAttempt(attempt=1, source=SOURCE, passed=False, checks=checks, error="ValueError: nan loss"),
        VerificationAttempt(attempt=2, source=SOURCE, passed=True, checks=[CheckResult(name="finite", passed=True)]),
    ]
    return Implementation.from_source(SOURCE, attempts=attempts, verified=True)


def proposal(name: str, parent_ids: list[str]) -> Proposal:
    return Proposal(
        name=name, rationale="scale advantages by the analytic group variance",
        mechanisms=[MechanismSpec(name="analytic_variance_scaling", params={"var_floor": 1e-4})],
        hparams={"clip_eps": 0.2}, generator="offline", parent_ids=parent_ids,
    )  # fmt: skip


def node(node_id: str, parents: list[Node], name: str | None = None, **parts: object) -> Node:
    genealogy = (
        Genealogy.child(node_id, [p.genealogy for p in parents]) if parents else Genealogy(run_id=RUN, node_id=node_id)
    )
    parent_ids = [p.node_id for p in parents]
    return Node(genealogy=genealogy, proposal=proposal(name or f"variant-{node_id}", parent_ids), **parts)


def evaluated(node_id: str, parents: list[Node], overall: float, length: float, **parts: object) -> Node:
    parts = {"trajectory": trajectory([0.2, 0.3, overall]), **parts}
    return node(node_id, parents, status=NodeStatus.EVALUATED, implementation=implementation(),
                evaluation=evaluation(overall, length), **parts)  # fmt: skip


def reflection() -> Reflection:
    effect = MechanismEffect(
        mechanism="analytic_variance_scaling", effect=Effect.HELPED, confidence=0.7, evidence="lower KL spikes"
    )
    return Reflection(
        text="variance scaling steadied the advantage estimate", effects=[effect],
        diagnoses=["KL spikes trace to the advantage estimate"], generator="offline",
    )  # fmt: skip


def archive_nodes() -> dict[str, Node]:
    n0 = node(
        "n0", [], name="GRPO", status=NodeStatus.REFLECTED, implementation=implementation(),
        trajectory=trajectory([0.1, 0.2, 0.3, 0.35]), evaluation=evaluation(0.40, 60.0), reflection=reflection(),
        replicates=[evaluation(0.38, 61.0, seed=8), evaluation(0.42, 59.0, seed=9)],
    )  # fmt: skip
    n1 = evaluated("n1", [n0], 0.45, 50.0)
    failure = Failure(phase=Phase.TRAIN, reason='<img src="http://evil.example/x.png"> diverged', detail="loss nan")
    n2 = node("n2", [n0], name=HOSTILE, status=NodeStatus.FAILED, implementation=implementation(), failure=failure)
    n3 = evaluated("n3", [n1], 0.43, 45.0, trajectory=trajectory([0.2, NAN, 0.4, math.inf], [NAN, 0.9, NAN, NAN]))
    n4 = evaluated("n4", [n1, n2], 0.50, 42.0)
    n5 = node("n5", [n3])
    n6 = evaluated("n6", [n0], 0.38, 70.0)
    return {n.node_id: n for n in (n0, n1, n2, n3, n4, n5, n6)}


@pytest.fixture
def store(tmp_path: Path):
    with SQLiteStore(tmp_path / "archive.db") as store:
        yield store


@pytest.fixture
def archive(store: SQLiteStore) -> SQLiteStore:
    store.put_run(RunConfig(run_id=RUN, budget=12, seed=7, protocol="testbed-v1"))
    for n in archive_nodes().values():
        assert store.insert_node(n)
    return store


# ---------------------------------------------------------------------------------------- html parsing


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], ""

    def find_all(self, tag: str, css_class: str | None = None) -> list[Element]:
        found = []
        for child in self.children:
            if child.tag == tag and (css_class is None or css_class in child.attrs.get("class", "").split()):
                found.append(child)
            found += child.find_all(tag, css_class)
        return found

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


VOID = {"meta", "br", "img", "input", "link", "hr"}


class Tree(HTMLParser):
    """A small DOM from html.parser: enough to count elements and read their attributes and text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.root = self.current = Element("#document", {}, None)
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in VOID:
            self.current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        element = self.current
        while element is not None and element.tag != tag:
            element = element.parent
        assert element is not None, f"</{tag}> closes nothing"
        assert element is self.current, f"</{tag}> closes <{element.tag}> over an unclosed <{self.current.tag}>"
        self.current = element.parent

    def handle_data(self, data: str) -> None:
        self.current.text += data


def walk(element: Element) -> Iterator[Element]:
    for child in element.children:
        yield child
        yield from walk(child)


def figures(root: Element) -> dict[str, Element]:
    return {svg.attrs["id"]: svg for svg in root.find_all("svg")}


def polyline_points(polyline: Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.attrs["points"].split()]


def titles(element: Element) -> str:
    return "".join(t.text for t in element.find_all("title"))


@pytest.fixture
def page(archive: SQLiteStore, tmp_path: Path) -> str:
    summary = {"best node": "n4", "best Overall (mean ± CI over 3 seeds)": "0.50 ± 0.02",
               "vs GRPO": "indistinguishable from GRPO", "wall time (s)": 1234.5}  # fmt: skip
    path = write_report(archive, RUN, tmp_path / "out" / "report.html", summary=summary)
    assert path == tmp_path / "out" / "report.html"
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- analysis


def test_cumulative_best_is_the_running_max_over_depths() -> None:
    nodes = list(archive_nodes().values())
    assert cumulative_best(nodes) == [(0, 0.40), (1, 0.45), (2, 0.50), (3, 0.50)]
    # A length-aware utility (shorter is better) gives another frontier from the same nodes.
    shorter = cumulative_best(nodes, lambda n: -n.evaluation.mean_length if n.evaluation else None)
    assert shorter == [(0, -60.0), (1, -50.0), (2, -42.0), (3, -42.0)]
    assert cumulative_best(nodes, lambda n: NAN) == []


def test_top_variants_rank_non_root_nodes_by_utility() -> None:
    nodes = list(archive_nodes().values())
    assert [n.node_id for n in top_variants(nodes)] == ["n4", "n1", "n3"]
    longest = top_variants(nodes, lambda n: n.evaluation.mean_length if n.evaluation else None)
    assert [n.node_id for n in longest] == ["n6", "n1", "n3"]  # the root (60) is never a variant


def test_lineage_layout_puts_nodes_in_depth_columns_near_their_parents() -> None:
    layout = lineage_layout(list(archive_nodes().values()))
    assert {k: d for k, (d, _) in layout.items()} == {"n0": 0, "n1": 1, "n2": 1, "n6": 1, "n3": 2, "n4": 2, "n5": 3}
    assert sorted(row for d, row in layout.values() if d == 1) == [0, 1, 2]
    assert layout["n3"][1] < layout["n4"][1]  # n3's parent n1 sits above n4's mean parent row (n1, n2)


# ---------------------------------------------------------------------------------------------- report


def test_report_has_the_four_figures_and_a_row_per_node(page: str) -> None:
    root = Tree(page).root
    assert list(figures(root)) == ["fig-lineage", "fig-frontier", "fig-dynamics", "fig-scatter"]
    rows = root.find_all("table")[0].find_all("tr")[1:]
    assert [r.attrs["data-node-id"] for r in rows] == ["n0", "n1", "n2", "n3", "n4", "n5", "n6"]
    cells = {r.attrs["data-node-id"]: [td.all_text() for td in r.find_all("td")] for r in rows}
    assert cells["n4"][1:5] == ["variant-n4", "2", "n1, n2", "evaluated"]
    assert cells["n4"][5:7] == ["0.5 [0.47, 0.53]", "42"]
    assert cells["n4"][8] == "1 seed"
    assert cells["n0"][8] == "0.4000 ± 0.0497, 3 seeds"  # the mean and 95% CI over the root's seeds
    assert cells["n4"][9] == "—"  # the overall objective has no constraints
    assert cells["n4"][10] == "analytic_variance_scaling"
    assert cells["n2"][4] == "failed" and cells["n2"][11].startswith("train: <img")
    assert cells["n5"][5] == "—"


def test_lineage_figure_draws_every_node_and_edge_coloured_by_overall(page: str) -> None:
    lineage = figures(Tree(page).root)["fig-lineage"]
    circles = {c.attrs["data-node-id"]: c for c in lineage.find_all("circle", "node")}
    assert sorted(circles) == ["n0", "n1", "n2", "n3", "n4", "n5", "n6"]
    edges = {(e.attrs["data-parent"], e.attrs["data-child"]) for e in lineage.find_all("line", "edge")}
    assert edges == {("n0", "n1"), ("n0", "n2"), ("n0", "n6"), ("n1", "n3"), ("n1", "n4"), ("n2", "n4"), ("n3", "n5")}
    # Lowest Overall (n6) and highest (n4) take the ends of the scale shown in the legend's gradient.
    stops = [s.attrs["stop-color"] for s in lineage.find_all("stop")]
    assert stops == list(SCALE_STOPS)
    assert circles["n6"].attrs["fill"] == stops[0] and circles["n4"].attrs["fill"] == stops[-1]
    assert len({circles[n].attrs["fill"] for n in ("n0", "n1", "n3", "n4", "n6")}) == 5
    assert "failed in train" in titles(circles["n2"]) and circles["n2"].attrs["fill"] == "#b0b0b0"
    assert circles["n5"].attrs["fill"] == "#ffffff"
    # The root is marked by a ring around its node.
    (ring,) = lineage.find_all("circle", "root-mark")
    assert (ring.attrs["cx"], ring.attrs["cy"]) == (circles["n0"].attrs["cx"], circles["n0"].attrs["cy"])
    assert "root (GRPO)" in titles(circles["n0"])
    assert float(circles["n0"].attrs["cx"]) < float(circles["n1"].attrs["cx"]) < float(circles["n4"].attrs["cx"])


def test_frontier_is_a_monotone_step_line_above_the_dashed_root_level(page: str) -> None:
    frontier_fig = figures(Tree(page).root)["fig-frontier"]
    (line,) = frontier_fig.find_all("polyline", "frontier")
    assert line.attrs["data-best"] == "0:0.4 1:0.45 2:0.5 3:0.5"
    points = polyline_points(line)
    assert len(points) == 1 + 2 * 3  # a step (horizontal then vertical) per depth after the first
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # SVG y grows downwards: better is higher
    (root_level,) = frontier_fig.find_all("line", "root-level")
    assert root_level.attrs["stroke-dasharray"]
    assert float(root_level.attrs["y1"]) == pytest.approx(ys[0], abs=0.1)  # the root is the depth-0 best
    assert len(frontier_fig.find_all("circle", "utility-point")) == 5


def test_dynamics_draw_root_and_top_three_skipping_non_finite_points(page: str) -> None:
    dynamics = figures(Tree(page).root)["fig-dynamics"]
    panels = {g.attrs["data-metric"]: g for g in dynamics.find_all("g", "panel")}
    assert list(panels) == ["reward_mean", "entropy", "response_length"]
    series = {m: [c.attrs["data-series"] for c in p.find_all("polyline", "curve")] for m, p in panels.items()}
    root = "root (GRPO) n0"
    assert series["reward_mean"] == [root, "n4", "n1", "n3"]
    assert series["entropy"] == [root, "n4", "n1"]  # n3 logged one finite entropy: no line to draw
    assert series["response_length"] == [root, "n4", "n1", "n3"]
    n3_reward = next(c for c in panels["reward_mean"].find_all("polyline", "curve") if c.attrs["data-series"] == "n3")
    assert len(polyline_points(n3_reward)) == 2  # of 0.2, nan, 0.4, inf
    legend = [g.find_all("text")[0].text for g in dynamics.find_all("g", "legend-entry")]
    assert legend == [root, "n4", "n1", "n3"]


def test_scatter_places_every_evaluated_node_by_length_and_overall(page: str) -> None:
    scatter = figures(Tree(page).root)["fig-scatter"]
    points = {p.attrs["data-node-id"]: p for p in scatter.find_all("circle", "point")}
    assert sorted(points) == ["n0", "n1", "n3", "n4", "n6"]
    assert sorted(t.text for t in scatter.find_all("text", "point-label")) == sorted(points)
    assert float(points["n4"].attrs["cy"]) < float(points["n6"].attrs["cy"])  # higher Overall is higher up
    assert float(points["n4"].attrs["cx"]) < float(points["n6"].attrs["cx"])  # shorter is further left


def test_header_shows_config_counts_and_summary(page: str) -> None:
    root = Tree(page).root
    config, summary = root.find_all("dl")
    items = dict(zip((d.text for d in config.find_all("dt")), (d.text for d in config.find_all("dd")), strict=True))
    assert (items["budget"], items["protocol"], items["seed"]) == ("12", "testbed-v1", "7")
    assert items["nodes"] == "7 (proposed 1, evaluated 4, reflected 1, failed 1)"
    values = [d.text for d in summary.find_all("dd")]
    assert values == ["n4", "0.50 ± 0.02", "indistinguishable from GRPO", "1234"]


def test_report_is_self_contained_and_escapes_hostile_text(page: str) -> None:
    root = Tree(page).root
    tags = {e.tag for e in walk(root)}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "foreignobject"}
    for element in walk(root):
        for name, value in element.attrs.items():
            assert not name.startswith("on"), f"event handler {name} on <{element.tag}>"
            if name in ("src", "href", "xlink:href"):
                pytest.fail(f"<{element.tag} {name}={value!r}> refers to a resource")
    assert "@import" not in page and "url(http" not in page
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert HOSTILE in Tree(page).root.all_text()  # shown as text, exactly as the candidate named itself


def test_report_of_a_run_with_only_a_proposed_root(store: SQLiteStore, tmp_path: Path) -> None:
    store.put_run(RunConfig(run_id=RUN, budget=4))
    store.insert_node(node("n0", [], name="GRPO"))
    root = Tree(write_report(store, RUN, tmp_path / "r.html").read_text()).root
    figs = figures(root)
    assert len(figs) == 4
    assert len(figs["fig-lineage"].find_all("circle", "node")) == 1 and not figs["fig-lineage"].find_all("line", "edge")
    assert not figs["fig-frontier"].find_all("polyline") and "no node has a utility" in figs["fig-frontier"].all_text()
    assert not figs["fig-dynamics"].find_all("polyline") and "(no trajectory)" in figs["fig-dynamics"].all_text()
    assert not figs["fig-scatter"].find_all("circle")


def test_report_of_a_run_with_only_an_evaluated_root(store: SQLiteStore, tmp_path: Path) -> None:
    store.insert_node(evaluated("n0", [], 0.4, 60.0))
    root = Tree(write_report(store, RUN, tmp_path / "r.html").read_text()).root
    figs = figures(root)
    assert "config" in root.find_all("dl")[0].all_text() and "not stored" in root.find_all("dl")[0].all_text()
    assert figs["fig-frontier"].find_all("polyline", "frontier")[0].attrs["data-best"] == "0:0.4"
    assert len(figs["fig-dynamics"].find_all("polyline", "curve")) == 3
    assert len(figs["fig-scatter"].find_all("circle", "point")) == 1


def test_report_follows_a_custom_utility(archive: SQLiteStore, tmp_path: Path) -> None:
    def shorter(n: Node) -> float | None:
        return -n.evaluation.mean_length if n.evaluation else None

    figs = figures(Tree(write_report(archive, RUN, tmp_path / "r.html", utility=shorter).read_text()).root)
    assert figs["fig-frontier"].find_all("polyline", "frontier")[0].attrs["data-best"] == "0:-60 1:-50 2:-42 3:-42"
    legend = [g.find_all("text")[0].text for g in figs["fig-dynamics"].find_all("g", "legend-entry")]
    assert legend == ["root (GRPO) n0", "n4", "n3", "n1"]


def test_report_of_an_unknown_run_is_an_error(store: SQLiteStore, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no run 'nope'"):
        write_report(store, "nope", tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_frontier_draws_seed_means_with_intervals_and_single_seeds_hollow(page: str) -> None:
    frontier_fig = figures(Tree(page).root)["fig-frontier"]
    points = {c.attrs["data-node-id"]: c for c in frontier_fig.find_all("circle", "utility-point")}
    root = points["n0"]  # 0.40 with replicates 0.38 and 0.42: the mean of three seeds, with its interval
    assert (root.attrs["data-seeds"], root.attrs["data-value"]) == ("3", "0.4")
    assert "seed-mean" in root.attrs["class"] and "one-seed" in points["n1"].attrs["class"]
    assert "0.4000 ± 0.0497 (95% CI, 3 seeds)" in titles(root)
    bars = {line.attrs["x1"] for line in frontier_fig.find_all("line", "seed-interval")
            if line.attrs["x1"] == line.attrs["x2"]}  # the bar, not its caps
    assert bars == {root.attrs["cx"]}  # only the root has several seeds
    (band,) = frontier_fig.find_all("rect", "root-band")
    assert float(band.attrs["height"]) > 0
    legend = frontier_fig.all_text()
    assert "bar = 95% CI" in legend and "1 seed" in legend


def test_the_frontier_labels_the_best_node_with_the_summarys_value(store: SQLiteStore, tmp_path: Path) -> None:
    nodes = archive_nodes()
    # n4's first seed (0.50) is the lucky one it was picked on; the runner re-trained it with three fresh seeds
    fresh = [evaluation(u, 42.0, seed=1000 * (i + 1)) for i, u in enumerate((0.46, 0.48, 0.47))]
    nodes["n4"] = nodes["n4"].model_copy(update={"replicates": fresh})
    store.put_run(RunConfig(run_id=RUN, budget=12, seed=7, protocol="testbed-v1"))
    for node in nodes.values():
        store.insert_node(node)
    best = run_status(store, RUN).best
    figs = figures(Tree(write_report(store, RUN, tmp_path / "r.html").read_text()).root)
    (label,) = figs["fig-frontier"].find_all("text", "best-label")
    half = (best.interval[1] - best.interval[0]) / 2
    assert label.text == f"n4 (best): {best.utility:.4f} ± {half:.4f}, {best.seeds} seeds"
    assert label.text.startswith("n4 (best): 0.4700 ± ")  # the fresh seeds' mean, not the lucky first seed
    n4 = next(c for c in figs["fig-frontier"].find_all("circle", "utility-point") if c.attrs["data-node-id"] == "n4")
    assert n4.attrs["data-value"] == "0.47"


def test_confirmation_evaluations_are_the_evaluations_confirmation_scores_score() -> None:
    nodes = archive_nodes()
    confirmed = nodes["n4"].model_copy(update={"replicates": [evaluation(0.46), evaluation(0.48)]})
    for node, is_root in ((nodes["n0"], True), (nodes["n1"], False), (confirmed, False), (nodes["n5"], False)):
        scores = [utility(e) for e in confirmation_evaluations(node, is_root)]
        assert scores == confirmation_scores(node, is_root)


def test_identical_curves_get_distinct_dashes_and_are_named_in_the_legend(page: str) -> None:
    dynamics = figures(Tree(page).root)["fig-dynamics"]
    entropy = next(g for g in dynamics.find_all("g", "panel") if g.attrs["data-metric"] == "entropy")
    styles = [(c.attrs.get("stroke-dasharray"), c.attrs["stroke-width"]) for c in entropy.find_all("polyline")]
    assert len(set(styles)) == len(styles)  # n4 and n1 log the same entropy; their curves still differ in dash
    notes = {g.find_all("text")[0].text: g.all_text() for g in dynamics.find_all("g", "legend-entry")}
    # n4 and n1 share the fixture's entropy and length curves but not their rewards
    assert notes["n1"].endswith("= n4 in entropy, response length (identical)")
    assert "identical" not in notes["n4"]


def test_a_variant_identical_to_the_root_is_named_as_such(store: SQLiteStore, tmp_path: Path) -> None:
    root = evaluated("n0", [], 0.40, 60.0)
    store.insert_node(root)
    store.insert_node(evaluated("n1", [root], 0.45, 60.0, trajectory=root.trajectory))
    dynamics = figures(Tree(write_report(store, RUN, tmp_path / "r.html").read_text()).root)["fig-dynamics"]
    assert "n1= root (GRPO) n0 (identical curves)" in [g.all_text() for g in dynamics.find_all("g", "legend-entry")]


def test_an_axis_over_a_tiny_spread_is_widened_and_its_labels_are_distinct_and_fit() -> None:
    lengths = [56.100, 56.103, 56.106]
    x = Scale.fit(lengths, 70, 570, min_span=min_span(lengths))
    assert x.hi - x.lo >= 0.01 * 56.1  # not 56.100-56.106 drawn across the whole axis
    values = ticks(x.lo, x.hi)
    labels = tick_labels(values)
    assert len(set(labels)) == len(labels) >= 3
    assert all(len(label.split(".")[-1]) <= 2 for label in labels)  # no digits the step does not resolve
    spacing = min(abs(x(b) - x(a)) for a, b in zip(values, values[1:], strict=False))
    assert spacing > max(len(label) for label in labels) * CHAR_PX
    # the run's measured seed noise widens it further: ±2 SD at least
    assert min_span([0.6300, 0.6305], noise_sd=0.004) == pytest.approx(0.016)
    assert tick_labels([0.61, 0.62, 0.63]) == ["0.61", "0.62", "0.63"]
    assert tick_labels([0.0, 10.0, 20.0]) == ["0", "10", "20"]


def test_the_scatter_of_a_tiny_protocol_run_has_readable_axes_and_labels(store: SQLiteStore, tmp_path: Path) -> None:
    """The tiny protocol: every length within 56.100-56.106, two nodes at the same place."""
    root = evaluated("n0", [], 0.500, 56.103, replicates=[evaluation(0.497, 56.101, 8), evaluation(0.504, 56.105, 9)])
    nodes = [root, evaluated("n1", [root], 0.503, 56.100), evaluated("n2", [root], 0.503, 56.100),
             evaluated("n3", [root], 0.502, 56.1005), evaluated("n4", [root], 0.5015, 56.106)]
    for node in nodes:
        store.insert_node(node)
    scatter = figures(Tree(write_report(store, RUN, tmp_path / "r.html").read_text()).root)["fig-scatter"]
    ticks_text = [t.text for t in scatter.find_all("text", "tick") if t.attrs.get("text-anchor") == "middle"]
    assert len(set(ticks_text)) == len(ticks_text) >= 3
    labels = {t.text: t for t in scatter.find_all("text", "point-label")}
    assert set(labels) == {"n0", "n1 = n2", "n3", "n4"}  # the coincident pair shares one label
    boxes = [label_box(t) for t in labels.values()]
    assert not any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    root_point = next(c for c in scatter.find_all("circle", "point") if c.attrs["data-node-id"] == "n0")
    assert root_point.attrs["data-seeds"] == "3" and scatter.find_all("line", "seed-interval")


def label_box(text: Element) -> tuple[float, float, float, float]:
    x, y, width = float(text.attrs["x"]), float(text.attrs["y"]), len(text.text) * CHAR_PX
    left = x - width if text.attrs.get("text-anchor") == "end" else x
    return left, y - LABEL_HEIGHT_PX + 2, left + width, y + 2


def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_labels_of_crowded_points_are_placed_apart() -> None:
    anchors = [(100.0, 100.0 + 2 * i, f"n00{i}") for i in range(5)]  # five points within 8 px
    placed = place_labels(anchors, (0, 0, 400, 400))
    boxes = []
    for (_, _, text), (x, y, anchor) in zip(anchors, placed, strict=True):
        width = len(text) * CHAR_PX
        left = x - width if anchor == "end" else x
        boxes.append((left, y - LABEL_HEIGHT_PX + 2, left + width, y + 2))
    assert not any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert coincident([("a", 1.0, 1.0), ("b", 1.5, 1.2), ("c", 9.0, 1.0)]) == [["a", "b"], ["c"]]


# ------------------------------------------------------------------------------------------- node text


def section(text: str, name: str) -> str:
    """The body of one '--- name ---' section of the node view."""
    match = re.search(rf"^--- {re.escape(name)}[^\n]*---\n(.*?)(?=^--- |\Z)", text, re.S | re.M)
    assert match, f"no section {name!r} in:\n{text}"
    return match.group(1)


def test_node_text_shows_every_part_of_a_reflected_root() -> None:
    text = render_node_text(archive_nodes()["n0"])
    assert text.startswith("node n0 — GRPO\n")
    assert "parents: none (root)" in section(text, "genealogy")
    assert section(text, "status").strip() == "reflected"
    proposal = section(text, "proposal")
    assert "analytic_variance_scaling(var_floor=0.0001)" in proposal and "hparams: clip_eps=0.2" in proposal
    assert "scale advantages by the analytic group variance" in proposal
    assert 'return batch["scores"] - batch["group_mean_score"]' in section(text, "code")
    verification = section(text, "verification")
    assert "attempt 1: FAILED" in verification and "attempt 2: passed" in verification
    assert "[FAIL] finite: nan loss" in verification and "[ok  ] shapes" in verification
    assert "ValueError: nan loss" in verification
    curves = section(text, "training curves")
    assert re.search(r"reward_mean\s+0\.1 → 0\.35", curves)
    assert re.search(r"response_length\s+50 → 47", curves)
    assert re.search(r"clip_frac\s+not logged", curves)
    metrics = section(text, "metrics")
    assert re.search(r"hard\s+pass@8\s+0\.4 \[0\.35, 0\.45\]", metrics)
    assert re.search(r"Overall\s+0\.4 \[0\.37, 0\.43\]", metrics)
    assert re.search(r"seed 8\s+Overall 0\.38", metrics) and re.search(r"seed 9\s+Overall 0\.42", metrics)
    assert "mean Overall over 3 seeds (own + replicates): 0.4" in metrics
    reflection_text = section(text, "reflection")
    assert "variance scaling steadied the advantage estimate" in reflection_text
    assert "- KL spikes trace to the advantage estimate" in reflection_text
    assert "- analytic_variance_scaling: helped (confidence 0.7) — lower KL spikes" in reflection_text


def test_node_text_compares_with_the_parent_and_keeps_nan_visible() -> None:
    nodes = archive_nodes()
    text = render_node_text(nodes["n3"], parent=nodes["n1"])
    assert "parents: n1 (variant-n1)" in section(text, "genealogy")
    assert "ancestors: n0, n1" in section(text, "genealogy")
    curves = section(text, "training curves")
    assert re.search(r"reward_mean\s+0\.2 → inf\s+\(parent 0\.2 → 0\.45\)", curves)
    assert re.search(r"entropy\s+nan → nan", curves)
    metrics = section(text, "metrics")
    assert "(parent 0.45, Δ -0.020)" in metrics and "(parent 50, -10.0%)" in metrics


def test_node_text_of_a_failed_and_a_pending_node() -> None:
    nodes = archive_nodes()
    failed = render_node_text(nodes["n2"])
    assert 'failed in train: <img src="http://evil.example/x.png"> diverged' in section(failed, "status")
    assert "loss nan" in section(failed, "status")
    assert "not trained yet" in section(failed, "training curves")
    pending = render_node_text(nodes["n5"])
    assert section(pending, "status").strip() == "proposed"
    assert "not implemented yet" in section(pending, "code")
    assert "no verification attempts recorded" in section(pending, "verification")
    assert "not evaluated yet" in section(pending, "metrics") and "not reflected yet" in section(pending, "reflection")


def test_node_text_shows_the_screening_the_proposal_won_typed_or_as_an_old_line() -> None:
    node = archive_nodes()["n1"]
    screening = ScreeningSummary(
        parent_id="n0", acquisition="ei", threshold=0.05, passed=2,
        winner=ScreeningMerits(name="variant-n1", expected_improvement=0.012, nearest_id="n0", distance=0.31),
        rejections=[Rejection(proposal_name="copy", stage="novelty", reason="behaves like n0 (distance 0.001)")],
        skipped={"p~new": "new mechanisms scale:x (the LLM coder implements them)"},
        screened_by="screened by the offline gates", parent_utility=0.4)
    typed = node.model_copy(update={"proposal": node.proposal.model_copy(update={"screening": screening})})
    proposal = section(render_node_text(typed), "proposal")
    assert "screening:\n    parent n0 · 2 passed · ranked by ei · near-duplicate below distance 0.05" in proposal
    assert "winner variant-n1: EI 0.012 · nearest n0 at 0.31" in proposal
    assert "rejected copy at novelty: behaves like n0 (distance 0.001)" in proposal
    assert "offline gates skipped for p~new: new mechanisms scale:x" in proposal
    assert "screened by the offline gates" in proposal and "parent utility 0.4" in proposal
    old = Proposal.model_validate({**node.proposal.model_dump(mode="json"), "screening": "parent n0: best x"})
    text = render_node_text(node.model_copy(update={"proposal": old}))
    assert "screening:\n    parent n0: best x" in section(text, "proposal")
    assert "screening" not in section(render_node_text(node), "proposal")


def test_node_text_lists_each_agent_llm_request_and_the_nodes_total() -> None:
    node = archive_nodes()["n5"]
    assert "no agent-LLM requests (offline operators)" in section(render_node_text(node), "agent LLM")
    calls = [
        CallRecord(provider="anthropic", model="claude-opus-5", operator="propose", prompt="propose@v1",
                   mode="tool", input_tokens=900, output_tokens=400, cache_read_tokens=3000, latency_s=4.2,
                   cost_usd=0.0165, ok=True),
        CallRecord(provider="openai", model="qwen2.5-32b", operator="implement", prompt="implement@v1", attempt=2,
                   mode="json_schema", input_tokens=2000, output_tokens=10, priced=False, ok=False,
                   error="The answer is not valid JSON: Expecting value\nmore detail"),
    ]
    spent = node.model_copy(update={"llm_calls": calls, "cost": llm_cost(calls)})
    text = section(render_node_text(spent), "agent LLM")
    assert ("propose (propose@v1, answer 1) anthropic:claude-opus-5: 900 in / 400 out, cache read 3000, 4.2 s, "
            "$0.0165 — ok") in text
    assert ("implement (implement@v1, answer 2) openai:qwen2.5-32b: 2000 in / 10 out, 0 s, unpriced — FAILED: "
            "The answer is not valid JSON: Expecting value\n") in text
    assert "total: 2 requests, 5900 input and 410 output tokens, $0.0165" in text


def test_node_text_neutralizes_terminal_control_characters() -> None:
    n = archive_nodes()["n5"]
    sneaky = n.model_copy(update={"proposal": proposal("clear\x1b[2J\x1b]0;pwned\x07 me\u202e", ["n3"])})
    text = render_node_text(sneaky)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert text.startswith("node n5 — clear\ufffd[2J\ufffd]0;pwned\ufffd me\ufffd\n")
