"""Run report: one self-contained HTML page with the paper's figures, and a plain-text view of one node.

`write_report` draws, as inline SVG written here (no JS, no CSS or font files, no CDN, so the page opens
offline and can be kept with the run):

(a) the lineage tree: depth left to right, edges parent → child, colour = Overall, failed nodes grey;
(b) the cumulative-best frontier: best utility among nodes of depth ≤ d, against the root (GRPO) level;
(c) training dynamics (reward, entropy, response length) of the root and the top-3 variants by utility;
(d) Overall against mean response length for every evaluated node;

then a table of every node. Names, rationales and failure reasons come from untrusted candidates and LLMs,
so every string is escaped before it reaches the page.

`render_node_text` is the `poise show NODE` view: everything the archive knows about one node.
"""

from __future__ import annotations

import functools
import html
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from poise.agents import describe_agents
from poise.contracts import (
    Evaluation,
    LegacyScreening,
    MetricKind,
    Node,
    NodeStatus,
    RunConfig,
    ScreeningSummary,
    TrainingTrajectory,
)
from poise.objective import satisfies, yardstick
from poise.pareto import non_dominated
from poise.scoring import utility as evaluation_utility
from poise.store import ArchiveError, ArchiveStore

Utility = Callable[[Node], float | None]  # None (or nan) = the node has no utility yet

TOP_VARIANTS = 3
DYNAMICS_METRICS = (("reward_mean", "reward (mean)"), ("entropy", "entropy"), ("response_length", "response length"))
CURVE_SUMMARY_METRICS = (
    "reward_mean",
    "format_valid_rate",
    "entropy",
    "response_length",
    "kl",
    "clip_frac",
    "grad_norm",
)

# Perceptually uniform low → high scale (viridis anchor colours) for Overall.
SCALE_STOPS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")
FAILED_FILL = "#b0b0b0"
PENDING_FILL = "#ffffff"
ROOT_COLOUR = "#222222"
SERIES_COLOURS = ("#d62728", "#1f77b4", "#2ca02c")  # top-3 variants; the root is drawn in ROOT_COLOUR

_esc = html.escape


def overall_utility(node: Node) -> float | None:
    """The default utility U: the one the run's objective stamped on the evaluation (poise/objective.py), else
    the weighted Overall; None until the node is evaluated."""
    return evaluation_utility(node.evaluation)


def pareto_front(nodes: Sequence[Node]) -> list[Node]:
    """The evaluated nodes no other node beats on both accuracy (higher Overall) and length (shorter mean
    length), sorted by length: the length objective's trade-off curve."""
    points = [n for n in nodes if n.evaluation is not None and _finite(n.evaluation.overall)
              and _finite(n.evaluation.mean_length)]
    vectors = np.array([(n.evaluation.overall, -n.evaluation.mean_length) for n in points], dtype=float)
    on_front = non_dominated(vectors.reshape(len(points), 2))  # shorter is better: −length, larger is better
    front = [n for n, frontier in zip(points, on_front, strict=True) if frontier]
    return sorted(front, key=lambda n: n.evaluation.mean_length)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: float | None, digits: int = 3) -> str:
    """A number for people: '—' when missing, 'nan'/'inf' as such, at most `digits` decimals."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


format_number = _num  # the public name the live UI (archive/ui) formats numbers with


# ---------------------------------------------------------------------------------------- the analysis


def root_of(nodes: Sequence[Node]) -> Node | None:
    """The run's root (GRPO): its first node of depth 0."""
    return next((n for n in nodes if n.genealogy.depth == 0), None)


def finite_utility(node: Node, utility: Utility) -> float | None:
    value = utility(node)
    return float(value) if _finite(value) else None


def cumulative_best(nodes: Sequence[Node], utility: Utility = overall_utility) -> list[tuple[int, float]]:
    """(d, best utility among nodes of depth ≤ d), from the shallowest depth with a utility to the deepest node."""
    best_at: dict[int, float] = {}
    for node in nodes:
        value = finite_utility(node, utility)
        if value is not None:
            depth = node.genealogy.depth
            best_at[depth] = max(value, best_at.get(depth, -math.inf))
    if not best_at:
        return []
    frontier, best = [], -math.inf
    for depth in range(min(best_at), max(n.genealogy.depth for n in nodes) + 1):
        best = max(best, best_at.get(depth, -math.inf))
        frontier.append((depth, best))
    return frontier


def top_variants(nodes: Sequence[Node], utility: Utility = overall_utility, k: int = TOP_VARIANTS) -> list[Node]:
    """The k non-root nodes of highest utility (ties keep insertion order)."""
    root = root_of(nodes)
    scored = [(u, i, n) for i, n in enumerate(nodes) if n is not root and (u := finite_utility(n, utility)) is not None]
    return [n for _, _, n in sorted(scored, key=lambda t: (-t[0], t[1]))[:k]]


def lineage_layout(nodes: Sequence[Node]) -> dict[str, tuple[int, int]]:
    """(column = depth, row) of each node. Columns are drawn centred, and a column is ordered by the mean
    centred position of each node's parents, so families stay together and edges cross less; ties keep
    insertion order."""
    by_depth: dict[int, list[Node]] = defaultdict(list)
    for node in nodes:
        by_depth[node.genealogy.depth].append(node)
    rows: dict[str, int] = {}
    centred: dict[str, float] = {}  # row relative to the middle of its column, as drawn
    for depth in sorted(by_depth):
        column = by_depth[depth]

        def parent_position(item: tuple[int, Node]) -> tuple[float, int]:
            order, node = item
            known = [centred[p] for p in node.genealogy.parent_ids if p in centred]
            if known:
                return sum(known) / len(known), order
            return (math.inf if node.genealogy.parent_ids else 0.0), order  # orphans (parent not stored) last

        for row, (_, node) in enumerate(sorted(enumerate(column), key=parent_position)):
            rows[node.node_id] = row
            centred[node.node_id] = row - (len(column) - 1) / 2
    return {n.node_id: (n.genealogy.depth, rows[n.node_id]) for n in nodes}


def finite_points(trajectory: TrainingTrajectory | None, metric: str) -> list[tuple[float, float]]:
    """(step, value) of one metric, skipping steps where it is missing, nan or inf."""
    if trajectory is None:
        return []
    try:
        values = trajectory.curve(metric)
    except KeyError:
        return []
    return [(float(s.step), float(v)) for s, v in zip(trajectory.steps, values, strict=True) if _finite(v)]


# ----------------------------------------------------------------------------------------- svg helpers


def _attr(value: object) -> str:
    if isinstance(value, float):
        return f"{round(value, 2):g}"
    return str(value)


def _tag(name: str, attrs: dict[str, object], body: str | None = None) -> str:
    """An SVG/HTML element; attribute values and nothing else are escaped here (body is markup)."""
    rendered = "".join(f' {key}="{_esc(_attr(value))}"' for key, value in attrs.items() if value is not None)
    return f"<{name}{rendered}/>" if body is None else f"<{name}{rendered}>{body}</{name}>"


def _svg_attrs(attrs: dict[str, object]) -> dict[str, object]:
    """Keyword arguments as SVG attributes: class_ → class, text_anchor → text-anchor."""
    return {key.rstrip("_").replace("_", "-"): value for key, value in attrs.items()}


def _text(x: float, y: float, text: str, **attrs: object) -> str:
    return _tag("text", {"x": x, "y": y, **_svg_attrs(attrs)}, _esc(text))


def _line(x1: float, y1: float, x2: float, y2: float, **attrs: object) -> str:
    return _tag("line", {"x1": x1, "y1": y1, "x2": x2, "y2": y2, **_svg_attrs(attrs)})


def _svg(fig_id: str, title: str, width: float, height: float, parts: Iterable[str]) -> str:
    body = _tag("title", {}, _esc(title)) + _text(10, 18, title, class_="fig-title") + "".join(parts)
    attrs = {
        "id": fig_id,
        "class": "figure",
        "xmlns": "http://www.w3.org/2000/svg",
        "role": "img",
        "width": width,
        "height": height,
        "viewBox": f"0 0 {_attr(width)} {_attr(height)}",
    }
    return _tag("svg", attrs, body)


def _empty_svg(fig_id: str, title: str, message: str) -> str:
    return _svg(fig_id, title, 420, 90, [_text(20, 55, message, class_="empty")])


def _colour(t: float) -> str:
    """The SCALE_STOPS colour at t in [0, 1], interpolated linearly in RGB (to 1/1024: a tree of 10,000 nodes
    asks for a colour each, and the eye sees no finer step)."""
    return _colour_at(round(min(max(t, 0.0), 1.0) * 1024))


@functools.lru_cache(maxsize=1025)
def _colour_at(step: int) -> str:
    t = step / 1024 * (len(SCALE_STOPS) - 1)
    i = min(int(t), len(SCALE_STOPS) - 2)
    f = t - i
    a, b = (tuple(int(stop[j : j + 2], 16) for j in (1, 3, 5)) for stop in SCALE_STOPS[i : i + 2])
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


scale_colour = _colour  # the public name the live UI (archive/ui) colours utilities with


@dataclass(frozen=True)
class _Scale:
    """Data interval [lo, hi] mapped linearly onto pixels [px_lo, px_hi] (px_lo is the bottom for y)."""

    lo: float
    hi: float
    px_lo: float
    px_hi: float

    def __call__(self, value: float) -> float:
        return self.px_lo + (value - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)

    @classmethod
    def fit(cls, values: Iterable[float], px_lo: float, px_hi: float, pad: float = 0.05) -> _Scale:
        values = list(values) or [0.0, 1.0]
        lo, hi = min(values), max(values)
        if hi == lo:  # one value: give it a visible interval around it
            half = abs(lo) * 0.1 or 0.5
            return cls(lo - half, hi + half, px_lo, px_hi)
        margin = (hi - lo) * pad
        return cls(lo - margin, hi + margin, px_lo, px_hi)


def _ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) inside [lo, hi]."""
    raw = (hi - lo) / target
    if raw <= 0:
        return [lo]
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) + 0.0 for i in range(int((hi - first) / step + 1e-9) + 1)]


def _axes(x: _Scale, y: _Scale, x_label: str, y_label: str, integer_x: bool = False) -> list[str]:
    parts = [
        _line(x.px_lo, y.px_lo, x.px_hi, y.px_lo, class_="axis"),
        _line(x.px_lo, y.px_lo, x.px_lo, y.px_hi, class_="axis"),
    ]
    for tick in _ticks(x.lo, x.hi, integer=integer_x):
        parts.append(_line(x(tick), y.px_lo, x(tick), y.px_lo + 4, class_="axis"))
        parts.append(_text(x(tick), y.px_lo + 16, _num(tick), class_="tick", text_anchor="middle"))
    for tick in _ticks(y.lo, y.hi):
        parts.append(_line(x.px_lo, y(tick), x.px_hi, y(tick), class_="grid"))
        parts.append(_text(x.px_lo - 6, y(tick) + 4, _num(tick), class_="tick", text_anchor="end"))
    parts.append(_text((x.px_lo + x.px_hi) / 2, y.px_lo + 34, x_label, class_="axis-label", text_anchor="middle"))
    if y_label:
        lx, ly = x.px_lo - 46, (y.px_lo + y.px_hi) / 2
        rotate = f"rotate(-90 {lx:.1f} {ly:.1f})"
        parts.append(_text(lx, ly, y_label, class_="axis-label", text_anchor="middle", transform=rotate))
    return parts


def _points(xy: Iterable[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)


def _ci(evaluation: Evaluation) -> str:
    if evaluation.overall_ci is None:
        return _num(evaluation.overall)
    low, high = evaluation.overall_ci
    return f"{_num(evaluation.overall)} [{_num(low)}, {_num(high)}]"


def _node_tooltip(node: Node, is_root: bool) -> str:
    lines = [f"{node.node_id} · {node.proposal.name}" + (" · root (GRPO)" if is_root else ""), f"status {node.status}"]
    if node.failure is not None:
        lines.append(f"failed in {node.failure.phase}: {node.failure.reason}")
    if node.evaluation is not None:
        lines.append(f"Overall {_ci(node.evaluation)} · mean length {_num(node.evaluation.mean_length, 1)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- figures


def lineage_svg(nodes: Sequence[Node]) -> str:
    """(a) The lineage tree, coloured by Overall."""
    title = "(a) Lineage tree: depth left to right, colour = Overall"
    if not nodes:
        return _empty_svg("fig-lineage", title, "no nodes yet")
    layout = lineage_layout(nodes)
    root = root_of(nodes)
    depths = max(d for d, _ in layout.values()) + 1
    column_sizes: dict[int, int] = defaultdict(int)
    for depth, _ in layout.values():
        column_sizes[depth] += 1
    tallest = max(column_sizes.values())
    col_w, row_h, left, top = 130.0, 30.0, 40.0, 60.0
    width = max(left + depths * col_w + 60, 460.0)
    height = top + tallest * row_h + 70
    pos = {
        node_id: (left + depth * col_w, top + (row + (tallest - column_sizes[depth]) / 2) * row_h + row_h / 2)
        for node_id, (depth, row) in layout.items()
    }
    overall = [n.evaluation.overall for n in nodes if n.evaluation is not None and _finite(n.evaluation.overall)]
    colour_scale = _Scale(min(overall), max(overall), 0.0, 1.0) if overall and min(overall) < max(overall) else None

    def fill(node: Node) -> str:
        if node.status == NodeStatus.FAILED:
            return FAILED_FILL
        if node.evaluation is None or not _finite(node.evaluation.overall):
            return PENDING_FILL
        return _colour(colour_scale(node.evaluation.overall)) if colour_scale else _colour(1.0)

    parts = [
        _text(left + d * col_w, top - 14, f"depth {d}", class_="tick", text_anchor="middle") for d in range(depths)
    ]
    for node in nodes:
        x2, y2 = pos[node.node_id]
        for parent_id in node.genealogy.parent_ids:
            if parent_id in pos:
                x1, y1 = pos[parent_id]
                parts.append(_line(x1, y1, x2, y2, class_="edge", data_parent=parent_id, data_child=node.node_id))
    for node in nodes:
        x, y = pos[node.node_id]
        if node is root:
            parts.append(_tag("circle", {"class": "root-mark", "cx": x, "cy": y, "r": 11.0}))
        tooltip = _tag("title", {}, _esc(_node_tooltip(node, node is root)))
        attrs = {
            "class": "node",
            "cx": x,
            "cy": y,
            "r": 7.0,
            "fill": fill(node),
            "data-node-id": node.node_id,
            "data-status": node.status.value,
        }
        parts.append(_tag("circle", attrs, tooltip))
        parts.append(_text(x + (15 if node is root else 11), y + 4, node.node_id, class_="node-label"))
    parts += _colour_legend(overall, 20.0, height - 40)
    return _svg("fig-lineage", title, width, height, parts)


def _colour_legend(overall: Sequence[float], x: float, y: float) -> list[str]:
    stops = "".join(
        _tag("stop", {"offset": f"{100 * i / (len(SCALE_STOPS) - 1):.0f}%", "stop-color": c})
        for i, c in enumerate(SCALE_STOPS)
    )
    parts = [_tag("defs", {}, _tag("linearGradient", {"id": "overall-scale"}, stops))]
    if overall:
        parts += [
            _tag(
                "rect",
                {"class": "scale-bar", "x": x + 60, "y": y, "width": 120, "height": 10, "fill": "url(#overall-scale)"},
            ),
            _text(x, y + 9, "Overall", class_="tick"),
            _text(x + 60, y + 24, _num(min(overall)), class_="tick", text_anchor="middle"),
            _text(x + 180, y + 24, _num(max(overall)), class_="tick", text_anchor="middle"),
        ]
    for i, (label, colour) in enumerate((("failed", FAILED_FILL), ("not evaluated", PENDING_FILL))):
        sx = x + 210 + i * 90
        parts.append(_tag("rect", {"class": "swatch", "x": sx, "y": y, "width": 10, "height": 10, "fill": colour}))
        parts.append(_text(sx + 14, y + 9, label, class_="tick"))
    return parts


def frontier_svg(nodes: Sequence[Node], utility: Utility) -> str:
    """(b) Cumulative-best utility against depth, with the root's utility dashed."""
    title = "(b) Cumulative best utility vs depth"
    frontier = cumulative_best(nodes, utility)
    if not frontier:
        return _empty_svg("fig-frontier", title, "no node has a utility yet")
    root = root_of(nodes)
    root_level = finite_utility(root, utility) if root is not None else None
    scored = [(n.genealogy.depth, u) for n in nodes if (u := finite_utility(n, utility)) is not None]
    width, height = 560.0, 320.0
    x = _Scale(frontier[0][0] - 0.3, frontier[-1][0] + 0.3, 60, width - 20)
    y = _Scale.fit([u for _, u in scored], height - 50, 40)
    parts = _axes(x, y, "depth", "utility", integer_x=True)
    parts += [_tag("circle", {"class": "utility-point", "cx": x(d), "cy": y(u), "r": 3.0}) for d, u in scored]
    steps = [frontier[0]]
    for (_, before), (depth, best) in zip(frontier, frontier[1:], strict=False):
        steps += [(depth, before), (depth, best)]
    data = " ".join(f"{d}:{b:.6g}" for d, b in frontier)
    parts.append(
        _tag(
            "polyline",
            {"class": "frontier", "data-best": data, "fill": "none", "points": _points((x(d), y(b)) for d, b in steps)},
        )
    )
    parts += [_tag("circle", {"class": "frontier-point", "cx": x(d), "cy": y(b), "r": 3.5}) for d, b in frontier]
    if root_level is not None:
        parts.append(_line(x.px_lo, y(root_level), x.px_hi, y(root_level), class_="root-level", stroke_dasharray="6 4"))
        parts.append(
            _text(x.px_hi - 4, y(root_level) - 5, f"root (GRPO) {_num(root_level)}", class_="tick", text_anchor="end")
        )
    return _svg("fig-frontier", title, width, height, parts)


def dynamics_svg(series: Sequence[tuple[str, str, Node]]) -> str:
    """(c) One panel per training metric; one curve per (label, colour, node) of `series`."""
    title = "(c) Training dynamics: root (GRPO) and top variants"
    if not series:
        return _empty_svg("fig-dynamics", title, "no nodes yet")
    panel_w, panel_h, gap, top = 300.0, 220.0, 30.0, 40.0
    width = len(DYNAMICS_METRICS) * (panel_w + gap) + 40
    height = top + panel_h + 30 + 18 * len(series) + 10
    parts: list[str] = []
    for i, (metric, label) in enumerate(DYNAMICS_METRICS):
        curves = [(name, colour, finite_points(node.trajectory, metric)) for name, colour, node in series]
        drawn = [c for c in curves if len(c[2]) >= 2]
        ox = 40 + i * (panel_w + gap)
        panel = [_text(ox + panel_w / 2, top + 4, label, class_="panel-title", text_anchor="middle")]
        if drawn:
            x = _Scale.fit([p[0] for c in drawn for p in c[2]], ox + 45, ox + panel_w, pad=0.0)
            y = _Scale.fit([p[1] for c in drawn for p in c[2]], top + panel_h - 30, top + 20)
            panel += _axes(x, y, "step", "")
            for name, colour, points in drawn:
                attrs = {
                    "class": "curve",
                    "data-metric": metric,
                    "data-series": name,
                    "stroke": colour,
                    "fill": "none",
                    "points": _points((x(s), y(v)) for s, v in points),
                }
                panel.append(_tag("polyline", attrs, _tag("title", {}, _esc(f"{name}: {label}"))))
        else:
            empty = "no finite values logged"
            panel.append(_text(ox + panel_w / 2, top + panel_h / 2, empty, class_="empty", text_anchor="middle"))
        parts.append(_tag("g", {"class": "panel", "data-metric": metric}, "".join(panel)))
    for j, (name, colour, node) in enumerate(series):
        ly = top + panel_h + 30 + 18 * j
        note = "" if node.trajectory is not None else " (no trajectory)"
        swatch = _line(40, ly, 64, ly, stroke=colour, class_="legend-line")
        parts.append(_tag("g", {"class": "legend-entry"}, swatch + _text(70, ly + 4, name + note, class_="tick")))
    return _svg("fig-dynamics", title, width, height, parts)


def scatter_svg(nodes: Sequence[Node], config: RunConfig | None = None) -> str:
    """(d) Overall against mean response length for every evaluated node, labelled by node id, with the
    Pareto front (higher Overall, shorter responses) drawn through its nodes. Under the length objective the
    accuracy floor (root Overall − tolerance) is drawn and each point says whether it meets the directive's
    constraints (filled: met, hollow: not)."""
    title = "(d) Accuracy (Overall) vs mean response length"
    evaluated = [
        n
        for n in nodes
        if n.evaluation is not None and _finite(n.evaluation.overall) and _finite(n.evaluation.mean_length)
    ]
    if not evaluated:
        return _empty_svg("fig-scatter", title, "no evaluated nodes yet")
    root = root_of(nodes)
    width, height = 560.0, 340.0
    x = _Scale.fit([n.evaluation.mean_length for n in evaluated], 60, width - 40)
    length_objective = config is not None and config.objective.kind == "length"
    floor_value = None
    if length_objective:
        stick = yardstick(root)  # the same yardstick the archive stamps utilities with
        floor_value = stick.overall - config.objective.accuracy_tolerance if stick is not None else None
    y = _Scale.fit([n.evaluation.overall for n in evaluated] + ([floor_value] if floor_value is not None else []),
                   height - 50, 40)
    parts = _axes(x, y, "mean response length (tokens)", "Overall")
    front = pareto_front(evaluated)
    if len(front) > 1:
        xy = [(x(n.evaluation.mean_length), y(n.evaluation.overall)) for n in front]
        parts.append(_tag("polyline", {"class": "pareto-front", "points": _points(xy), "fill": "none",
                                       "data-nodes": " ".join(n.node_id for n in front)}))
    if floor_value is not None:
        floor = y(floor_value)
        parts.append(_line(60, floor, width - 40, floor, class_="accuracy-floor"))
        parts.append(_text(width - 40, floor - 4, "accuracy floor (GRPO − tolerance)", class_="tick",
                           text_anchor="end"))
    on_front = {n.node_id for n in front}
    for node in evaluated:
        px, py = x(node.evaluation.mean_length), y(node.evaluation.overall)
        verdict = satisfies(node) if length_objective else None
        attrs = {
            "class": "point" + (" root" if node is root else "") + (" front" if node.node_id in on_front else "")
            + {True: " satisfied", False: " violated", None: ""}[verdict],
            "cx": px,
            "cy": py,
            "r": 5.0,
            "data-node-id": node.node_id,
        }
        parts.append(_tag("circle", attrs, _tag("title", {}, _esc(_node_tooltip(node, node is root)))))
        parts.append(_text(px + 7, py - 6, node.node_id, class_="point-label"))
    return _svg("fig-scatter", title, width, height, parts)


# ----------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
tr.failed td { color: #777; }
svg.figure { display: block; margin: 1em 0; font-size: 11px; }
.fig-title { font-weight: 600; font-size: 13px; }
.axis { stroke: #333; } .grid { stroke: #eee; } .tick { fill: #444; } .empty { fill: #888; }
.edge { stroke: #999; stroke-width: 1.2; }
.node { stroke: #333; stroke-width: 1; } .root-mark { fill: none; stroke: #000; stroke-width: 2; }
.swatch, .scale-bar { stroke: #333; stroke-width: 0.5; }
.frontier { stroke: #1f77b4; stroke-width: 2; } .frontier-point { fill: #1f77b4; }
.utility-point { fill: #bbb; } .root-level { stroke: #222; stroke-width: 1.2; }
.curve, .legend-line { stroke-width: 1.6; }
.point { fill: #1f77b4; stroke: #fff; } .point.root { fill: #222; }
.point.violated { fill: #fff; stroke: #1f77b4; stroke-width: 1.5; }
.pareto-front { stroke: #d62728; stroke-width: 1.5; stroke-dasharray: 5 3; }
.accuracy-floor { stroke: #888; stroke-dasharray: 2 3; }
"""


def _config_items(run_id: str, config: RunConfig | None) -> list[tuple[str, str]]:
    if config is None:
        return [("run", run_id), ("config", "not stored")]
    return [
        ("run", run_id),
        ("budget", str(config.budget)),
        ("protocol", config.protocol),
        ("seed", str(config.seed)),
        (
            "objective",
            config.objective.kind + (f" — {config.objective.directive}" if config.objective.directive else ""),
        ),
        ("trainer / evaluator", f"{config.backends.trainer} / {config.backends.evaluator}"),
        ("agent LLM", describe_agents(config)),
    ]


def _definition_list(items: Iterable[tuple[str, object]], css_class: str) -> str:
    body = "".join(
        f"<dt>{_esc(str(k))}</dt><dd>{_esc(_num(v) if isinstance(v, float) else str(v))}</dd>" for k, v in items
    )
    return f'<dl class="{css_class}">{body}</dl>'


def _node_row(node: Node, utility: Utility, is_root: bool) -> str:
    evaluation = node.evaluation
    mechanisms = ", ".join(m.name for m in node.proposal.mechanisms)
    failure = f"{node.failure.phase}: {node.failure.reason}" if node.failure is not None else ""
    cells = [
        node.node_id + (" (root)" if is_root else ""),
        node.proposal.name,
        str(node.genealogy.depth),
        ", ".join(node.genealogy.parent_ids),
        node.status.value,
        _ci(evaluation) if evaluation is not None else "—",
        _num(evaluation.mean_length, 1) if evaluation is not None else "—",
        _num(finite_utility(node, utility)),
        {True: "yes", False: "no", None: "—"}[satisfies(node)],
        mechanisms,
        failure,
    ]
    css = ' class="failed"' if node.status == NodeStatus.FAILED else ""
    return f'<tr{css} data-node-id="{_esc(node.node_id)}">' + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>"


_TABLE_HEAD = (
    "id",
    "name",
    "depth",
    "parents",
    "status",
    "Overall [CI]",
    "mean length",
    "utility",
    "meets objective",
    "mechanisms",
    "failure",
)


def render_report(
    run_id: str,
    config: RunConfig | None,
    nodes: Sequence[Node],
    utility: Utility = overall_utility,
    summary: dict | None = None,
) -> str:
    """The report page as an HTML string (pure: `write_report` reads the archive and writes the file)."""
    root = root_of(nodes)
    series = [("root (GRPO) " + root.node_id, ROOT_COLOUR, root)] if root is not None else []
    series += [(n.node_id, c, n) for n, c in zip(top_variants(nodes, utility), SERIES_COLOURS, strict=False)]
    counts = {status: sum(n.status == status for n in nodes) for status in NodeStatus}
    count_text = ", ".join(f"{status.value} {count}" for status, count in counts.items() if count) or "none"
    rows = "".join(_node_row(n, utility, n is root) for n in nodes)
    head = "".join(f"<th>{_esc(h)}</th>" for h in _TABLE_HEAD)
    sections = [
        f"<h1>POISE run {_esc(run_id)}</h1>",
        _definition_list([*_config_items(run_id, config), ("nodes", f"{len(nodes)} ({count_text})")], "config"),
    ]
    if summary:
        sections += ["<h2>Summary</h2>", _definition_list(summary.items(), "summary")]
    sections += [
        "<h2>Figures</h2>",
        lineage_svg(nodes),
        frontier_svg(nodes, utility),
        dynamics_svg(series),
        scatter_svg(nodes, config),
        "<h2>Nodes</h2>",
        f'<table class="nodes"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>',
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>POISE run {_esc(run_id)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_report(
    store: ArchiveStore,
    run_id: str,
    path: Path,
    utility: Utility | None = None,
    summary: dict | None = None,
) -> Path:
    """Write the run's self-contained HTML report to `path` and return it.

    `utility` ranks nodes for the frontier and the top variants (default: Overall); `summary` (best node,
    its mean ± CI over seeds, the comparison with GRPO, wall time …) is shown as given under the header.
    """
    config = store.get_run(run_id)
    nodes = store.nodes(run_id)
    if config is None and not nodes:
        raise ArchiveError(f"no run {run_id!r} in the archive: nothing to report; check the run id")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(run_id, config, nodes, utility or overall_utility, summary), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- poise show NODE

# Terminal control characters and bidi overrides in LLM-written text could rewrite the screen or hide
# code (Trojan Source); they are shown as U+FFFD instead.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _plain(text: str) -> str:
    return _UNPRINTABLE.sub("\ufffd", text.replace("\r\n", "\n"))


def _indent(text: str, prefix: str = "    ") -> list[str]:
    return [prefix + line if line.strip() else "" for line in text.splitlines()]


def _scalars(values: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items()) or "—"


def _first_last(trajectory: TrainingTrajectory | None, metric: str) -> tuple[float, float] | None:
    if trajectory is None:
        return None
    values = [v for v in trajectory.curve(metric) if v is not None]
    return (values[0], values[-1]) if values else None


def _curve_lines(node: Node, parent: Node | None) -> list[str]:
    trajectory = node.trajectory
    if trajectory is None:
        return ["  not trained yet"]
    lines = [
        f"  protocol {trajectory.protocol} · seed {trajectory.seed} · {len(trajectory.steps)} steps · "
        f"wall {_num(trajectory.wall_s, 1)} s"
    ]
    if trajectory.aborted:
        lines.append(f"  ABORTED: {trajectory.abort_reason or 'no reason given'}")
    if trajectory.checkpoint_uri:
        lines.append(f"  checkpoint {trajectory.checkpoint_uri}")
    for metric in CURVE_SUMMARY_METRICS:
        ends = _first_last(trajectory, metric)
        text = f"{_num(ends[0])} → {_num(ends[1])}" if ends else "not logged"
        parent_ends = _first_last(parent.trajectory, metric) if parent is not None else None
        if parent_ends:
            text = f"{text:<24} (parent {_num(parent_ends[0])} → {_num(parent_ends[1])})"
        lines.append(f"  {metric:<18} {text}")
    return lines


def _metric_lines(node: Node, parent: Node | None) -> list[str]:
    evaluation = node.evaluation
    if evaluation is None:
        return ["  not evaluated yet"]
    lines = [f"  seed {evaluation.seed}"]
    for result in evaluation.suites.values():
        kind = f"pass@{result.k}" if result.kind == MetricKind.PASS_AT_K else result.kind.value
        lines.append(
            f"  {result.suite:<16} {kind:<8} {_num(result.value)} [{_num(result.ci_low)}, {_num(result.ci_high)}]"
            f"  length {_num(result.mean_length, 1)}  format-valid {_num(result.format_valid_rate)}"
            f"  weight {_num(result.weight)}"
        )
    parent_eval = parent.evaluation if parent is not None else None
    overall = f"  {'Overall':<25} {_ci(evaluation)}"
    length = f"  {'mean length':<25} {_num(evaluation.mean_length, 1)}"
    if parent_eval is not None:
        overall += f"   (parent {_num(parent_eval.overall)}, Δ {evaluation.overall - parent_eval.overall:+.3f})"
        if parent_eval.mean_length > 0:
            change = 100 * (evaluation.mean_length / parent_eval.mean_length - 1)
            length += f"   (parent {_num(parent_eval.mean_length, 1)}, {change:+.1f}%)"
    lines += [overall, length]
    if evaluation.utility is not None:
        lines.append(f"  {'utility':<25} {_num(evaluation.utility)}")
    if evaluation.constraints_satisfied is not None:
        lines.append(f"  {'constraints satisfied':<25} {'yes' if evaluation.constraints_satisfied else 'no'}")
    if node.replicates:
        lines.append("  replicates (fresh seeds):")
        lines += [f"    seed {r.seed:<6} Overall {_ci(r)}" for r in node.replicates]
        seeds = [evaluation, *node.replicates]
        mean = sum(e.overall for e in seeds) / len(seeds)
        lines.append(f"  mean Overall over {len(seeds)} seeds (own + replicates): {_num(mean)}")
    return lines


def render_node_text(node: Node, parent: Node | None = None) -> str:
    """Everything the archive holds about one node as plain text, compared with `parent` where given."""
    g, proposal = node.genealogy, node.proposal
    parents = ", ".join(
        f"{p} ({parent.proposal.name})" if parent is not None and parent.node_id == p else p for p in g.parent_ids
    )
    lines = [
        f"node {g.node_id} — {proposal.name}",
        "",
        "--- genealogy ---",
        f"  run {g.run_id} · depth {g.depth}",
        f"  parents: {parents or 'none (root)'}",
        f"  ancestors: {', '.join(g.ancestors) or 'none'}",
        "",
        "--- status ---",
        f"  {node.status.value}",
    ]
    if node.failure is not None:
        lines.append(f"  failed in {node.failure.phase.value}: {node.failure.reason}")
        if node.failure.detail:
            lines += _indent(node.failure.detail)
    lines += [
        "",
        "--- proposal ---",
        f"  name: {proposal.name}",
        f"  generator: {proposal.generator} · loss_agg_mode: {proposal.loss_agg_mode.value}",
    ]
    if proposal.directive:
        lines.append(f"  directive: {proposal.directive}")
    lines += ["  rationale:", *_indent(proposal.rationale), "  mechanisms:"]
    lines += [f"    - {m.name}" + (f"({_scalars(m.params)})" if m.params else "") for m in proposal.mechanisms] or [
        "    none"
    ]
    lines += [f"  hparams: {_scalars(proposal.hparams)}", *_screening_lines(proposal.screening), "", "--- code ---"]
    implementation = node.implementation
    if implementation is None:
        lines.append("  not implemented yet")
    else:
        lines += [f"  sha256 {implementation.source_sha256} · verified: {'yes' if implementation.verified else 'no'}"]
        lines += _indent(implementation.source)
    lines += ["", "--- verification ---"]
    attempts = implementation.attempts if implementation is not None else []
    for attempt in attempts:
        verdict = "passed" if attempt.passed else "FAILED"
        lines.append(f"  attempt {attempt.attempt}: {verdict} ({_num(attempt.duration_s, 2)} s)")
        for check in attempt.checks:
            mark = "ok  " if check.passed else "FAIL"
            lines.append(f"    [{mark}] {check.name}" + (f": {check.message}" if check.message else ""))
        if attempt.error:
            lines += ["    error:", *_indent(attempt.error, "      ")]
    if not attempts:
        lines.append("  no verification attempts recorded")
    lines += ["", "--- training curves (first → last logged) ---", *_curve_lines(node, parent)]
    lines += ["", "--- metrics ---", *_metric_lines(node, parent)]
    lines += ["", "--- reflection ---"]
    reflection = node.reflection
    if reflection is None:
        lines.append("  not reflected yet")
    else:
        lines += [f"  by {reflection.generator}", *_indent(reflection.text, "  ")]
        if reflection.diagnoses:
            lines += ["  diagnoses:", *[f"    - {d}" for d in reflection.diagnoses]]
        if reflection.effects:
            lines.append("  effects:")
            lines += [
                f"    - {e.mechanism}: {e.effect.value} (confidence {_num(e.confidence, 2)}) — {e.evidence}"
                for e in reflection.effects
            ]
    lines += ["", "--- agent LLM ---", *_llm_lines(node)]
    return _plain("\n".join(lines) + "\n")


def _screening_lines(screening: ScreeningSummary | LegacyScreening | None) -> list[str]:
    """The Phase I screening the proposal won: how its population was ranked, the winner's merits, every
    rejection with its gate, the proposals the offline gates skipped."""
    if screening is None:
        return []
    if isinstance(screening, LegacyScreening):
        return ["  screening:", *_indent(screening.note)]
    lines = ["  screening:", f"    parent {screening.parent_id} · {screening.passed} passed · ranked by "
                             f"{screening.acquisition} · near-duplicate below distance {_num(screening.threshold)}"]
    winner = screening.winner
    if winner is not None:
        nearest = f" · nearest {winner.nearest_id} at {_num(winner.distance)}" if winner.nearest_id else ""
        lines.append(f"    winner {winner.name}: {winner.summary()}{nearest}")
    lines += [f"    rejected {r.proposal_name} at {r.stage}: {r.reason}" for r in screening.rejections]
    lines += [f"    offline gates skipped for {name}: {why}" for name, why in screening.skipped.items()]
    if screening.screened_by:
        lines.append(f"    {screening.screened_by}")
    if screening.parent_utility is not None:
        lines.append(f"    parent utility {_num(screening.parent_utility, 4)}")
    return lines


def _llm_lines(node: Node) -> list[str]:
    """One line per agent-LLM request of the node, then its total."""
    if not node.llm_calls:
        return ["  no agent-LLM requests (offline operators)"]
    lines = []
    for call in node.llm_calls:
        cache = f", cache read {call.cache_read_tokens}" if call.cache_read_tokens else ""
        price = f"${call.cost_usd:.4f}" if call.priced else "unpriced"
        outcome = "ok" if call.ok else f"FAILED: {(call.error or '').splitlines()[0][:100]}"
        lines.append(f"  {call.operator} ({call.prompt or 'no prompt id'}, answer {call.attempt}) "
                     f"{call.provider}:{call.model}: {call.input_tokens} in / {call.output_tokens} out{cache}, "
                     f"{_num(call.latency_s, 2)} s, {price} — {outcome}")
    cost = node.cost
    lines.append(f"  total: {len(node.llm_calls)} requests, {cost.llm_input_tokens} input and "
                 f"{cost.llm_output_tokens} output tokens, ${cost.llm_usd:.4f}")
    return lines


# Public names of the helpers above that the live UI (archive/ui/node_pages.py) draws and writes with; the
# report's own code keeps calling the private names.
Scale = _Scale
ticks = _ticks
svg_tag = _tag
svg_text = _text
svg_line = _line
svg_points = _points
is_finite = _finite
overall_text = _ci
node_tooltip = _node_tooltip
printable = _plain
