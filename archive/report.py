"""Run report: one self-contained HTML page with the paper's figures, and a plain-text view of one node.

`write_report` draws, as inline SVG written here (no JS, no CSS or font files, no CDN, so the page opens
offline and can be kept with the run):

(a) the lineage tree: depth left to right, edges parent → child, colour = Overall, failed nodes grey;
(b) the cumulative-best frontier: best utility among nodes of depth ≤ d, against the root (GRPO) level;
(c) training dynamics (reward, entropy, response length) of the root and the top-3 variants by utility;
(d) Overall against mean response length for every evaluated node;

then a table of every node. Names, rationales and failure reasons come from untrusted candidates and LLMs,
so every string is escaped before it reaches the page.

The figures say what the run's summary says: a node with several seeds (the root's noise seeds, a confirmed
node's fresh-seed replicates) is drawn at its mean over the seeds the summary judges it on, with its 95%
interval, and a node with one seed is marked as such. An axis never magnifies a spread smaller than the run's
seed noise (or 1% of its values) into a large one, tick labels carry the decimals their step needs and no
more, point labels are moved apart instead of printed over each other, and curves that coincide are drawn
with distinct dashes and named in the legend.

`render_node_text` is the `poise show NODE` view: everything the archive knows about one node.
"""

from __future__ import annotations

import functools
import html
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archive.status import best_score, report_status
from poise.agents import describe_agents
from poise.contracts import (
    Evaluation,
    LegacyScreening,
    MetricKind,
    Node,
    NodeStatus,
    ReportStatus,
    RunConfig,
    ScreeningSummary,
    TrainingTrajectory,
)
from poise.objective import satisfies, yardstick
from poise.pareto import non_dominated
from poise.scoring import SeedSummary, confirmation_evaluations, summarize
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


def seed_summary(node: Node, utility: Utility = overall_utility, is_root: bool = False) -> SeedSummary | None:
    """The node's utility as the run's summary reports it: the mean over the seeds the node is judged on
    (poise/scoring.py `confirmation_evaluations`: every seed of the root, only the fresh-seed replicates of a
    confirmed node), with its 95% interval when there are several; None without a finite utility."""
    evaluations = confirmation_evaluations(node, is_root) or [node.evaluation]
    seeds = [node if e is node.evaluation else node.model_copy(update={"evaluation": e}) for e in evaluations]
    return summarize([u for seed in seeds if (u := finite_utility(seed, utility)) is not None])


def seed_summaries(nodes: Sequence[Node], utility: Utility = overall_utility) -> dict[str, SeedSummary]:
    """`seed_summary` of every node with a utility, by node id."""
    root = root_of(nodes)
    found = {n.node_id: seed_summary(n, utility, n is root) for n in nodes}
    return {node_id: summary for node_id, summary in found.items() if summary is not None}


def seed_point(node: Node, is_root: bool = False) -> tuple[SeedSummary, float] | None:
    """(Overall over the node's seeds, as `seed_summary` picks them, and their mean response length); None
    unless some seed has a finite Overall and length."""
    evaluations = [e for e in confirmation_evaluations(node, is_root) or [node.evaluation]
                   if e is not None and _finite(e.overall) and _finite(e.mean_length)]
    if not evaluations:
        return None
    return summarize([e.overall for e in evaluations]), sum(e.mean_length for e in evaluations) / len(evaluations)


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
    def fit(cls, values: Iterable[float], px_lo: float, px_hi: float, pad: float = 0.05,
            min_span: float = 0.0) -> _Scale:
        """The values' interval padded by `pad` of its span on each side, first widened about its middle to at
        least `min_span` (see `min_span`), so a spread of rounding noise is not drawn as a difference."""
        values = list(values) or [0.0, 1.0]
        lo, hi = min(values), max(values)
        if hi - lo < min_span:
            middle = (lo + hi) / 2
            lo, hi = middle - min_span / 2, middle + min_span / 2
        if hi == lo:  # one value: give it a visible interval around it
            half = abs(lo) * 0.1 or 0.5
            return cls(lo - half, hi + half, px_lo, px_hi)
        margin = (hi - lo) * pad
        return cls(lo - margin, hi + margin, px_lo, px_hi)


# An axis spans at least this share of its values' magnitude (56.100-56.106 tokens is drawn as about 55.8-56.4),
# and at least ±2 seed SDs where the run measured its seed noise: differences smaller than that are not drawn
# as if they were large.
MIN_RELATIVE_SPAN = 0.01
NOISE_SPAN_SDS = 4.0


def min_span(values: Iterable[float], noise_sd: float | None = None) -> float:
    """The narrowest interval an axis over `values` should show (MIN_RELATIVE_SPAN, NOISE_SPAN_SDS)."""
    magnitude = max((abs(v) for v in values), default=0.0)
    noise = NOISE_SPAN_SDS * noise_sd if noise_sd is not None and math.isfinite(noise_sd) else 0.0
    return max(MIN_RELATIVE_SPAN * magnitude, noise)


def _ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) inside [lo, hi], about `target` of them."""
    raw = (hi - lo) / target
    if raw <= 0:
        return [lo]
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) + 0.0 for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_labels(values: Sequence[float]) -> list[str]:
    """Tick labels with the decimals the tick step needs, the same for every label, so neighbours never read
    the same and no label carries digits the step does not resolve."""
    if len(values) < 2:
        return [_num(v) for v in values]
    step = (values[-1] - values[0]) / (len(values) - 1)
    decimals = min(10, max(0, -math.floor(math.log10(step) + 1e-9)))
    return [f"{v:.{decimals}f}" for v in values]


# An estimate of a tick label's width at the figures' 11 px font (digits are about 6.2 px wide), and the space
# kept between two labels.
CHAR_PX = 6.4
LABEL_GAP_PX = 8.0


def _x_ticks(x: _Scale, integer: bool) -> tuple[list[float], list[str]]:
    """The most ticks (at most about 5) whose labels fit side by side under the axis."""
    for target in (5, 4, 3, 2):
        values = _ticks(x.lo, x.hi, target=target, integer=integer)
        labels = tick_labels(values)
        widest = max((len(label) for label in labels), default=0) * CHAR_PX
        if len(values) < 2 or abs(x(values[1]) - x(values[0])) >= widest + LABEL_GAP_PX:
            return values, labels
    return values, labels


def _axes(x: _Scale, y: _Scale, x_label: str, y_label: str, integer_x: bool = False) -> list[str]:
    parts = [
        _line(x.px_lo, y.px_lo, x.px_hi, y.px_lo, class_="axis"),
        _line(x.px_lo, y.px_lo, x.px_lo, y.px_hi, class_="axis"),
    ]
    for tick, label in zip(*_x_ticks(x, integer_x), strict=True):
        parts.append(_line(x(tick), y.px_lo, x(tick), y.px_lo + 4, class_="axis"))
        parts.append(_text(x(tick), y.px_lo + 16, label, class_="tick", text_anchor="middle"))
    y_ticks = _ticks(y.lo, y.hi)
    for tick, label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        parts.append(_line(x.px_lo, y(tick), x.px_hi, y(tick), class_="grid"))
        parts.append(_text(x.px_lo - 6, y(tick) + 4, label, class_="tick", text_anchor="end"))
    parts.append(_text((x.px_lo + x.px_hi) / 2, y.px_lo + 34, x_label, class_="axis-label", text_anchor="middle"))
    if y_label:
        lx, ly = x.px_lo - 46, (y.px_lo + y.px_hi) / 2
        rotate = f"rotate(-90 {lx:.1f} {ly:.1f})"
        parts.append(_text(lx, ly, y_label, class_="axis-label", text_anchor="middle", transform=rotate))
    return parts


def _points(xy: Iterable[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)


LABEL_HEIGHT_PX = 11.0
LABEL_STEP_PX = 12.0  # how far a label that would cover another is nudged up or down at a time
LABEL_TRIES = 6


def coincident(points: Sequence[tuple[str, float, float]], tolerance_px: float = 1.5) -> list[list[str]]:
    """The ids of points drawn at the same place (within `tolerance_px`), grouped in the order given; a point
    alone is a group of one."""
    groups: list[tuple[float, float, list[str]]] = []
    for key, px, py in points:
        group = next((g for g in groups if abs(g[0] - px) <= tolerance_px and abs(g[1] - py) <= tolerance_px), None)
        if group is None:
            groups.append((px, py, [key]))
        else:
            group[2].append(key)
    return [ids for _, _, ids in groups]


def place_labels(anchors: Sequence[tuple[float, float, str]], bounds: tuple[float, float, float, float],
                 markers: Iterable[tuple[float, float]] = (), marker_px: float = 5.0) -> list[tuple[float, float, str]]:
    """(x, y, text-anchor) of a label beside each anchor point (x, y, text), so that no label covers another
    label, an anchor or one of the other `markers`: right of the point and a little above, else nudged up or
    down a line at a time, else on the left; where no place is free, the one covering least. `bounds` (left,
    top, right, bottom) hold the labels."""
    left, top, right, bottom = bounds
    points = [(x, y) for x, y, _ in anchors] + list(markers)
    taken = [(x - marker_px, y - marker_px, x + marker_px, y + marker_px) for x, y in points]
    placed = []
    for x, y, text in anchors:
        width = len(text) * CHAR_PX
        candidates = list(_label_places(x, y, width))
        inside = [c for c in candidates if c[3][0] >= left and c[3][2] <= right and c[3][1] >= top
                  and c[3][3] <= bottom] or candidates[:1]
        reach = width + 2 * LABEL_TRIES * LABEL_STEP_PX  # nothing farther can touch a candidate place
        near = [b for b in taken if abs(b[0] - x) < reach and abs(b[1] - y) < reach]
        tx, ty, anchor, box = min(inside, key=lambda c: sum(_overlap(c[3], other) for other in near))
        taken.append(box)
        placed.append((tx, ty, anchor))
    return placed


def _label_places(x: float, y: float, width: float) -> Iterator[tuple[float, float, str, tuple[float, ...]]]:
    """Places for a label beside the point (x, y), most preferred first: (x, baseline, text-anchor, box)."""
    for anchor, tx in (("start", x + 7), ("end", x - 7)):
        box_left = tx if anchor == "start" else tx - width
        for k in range(LABEL_TRIES + 1):
            for ty in dict.fromkeys((y - 6 - k * LABEL_STEP_PX, y - 6 + k * LABEL_STEP_PX)):
                yield tx, ty, anchor, (box_left, ty - LABEL_HEIGHT_PX + 2, box_left + width, ty + 2)


def _leader(x: float, y: float, tx: float, ty: float) -> str | None:
    """A thin line from a point to its label where `place_labels` moved the label away from beside it."""
    if abs(ty - (y - 6)) <= LABEL_STEP_PX / 2:
        return None
    return _line(x, y, tx, ty - LABEL_HEIGHT_PX / 2 + 2, class_="leader")


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The area two boxes (left, top, right, bottom) share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


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
    """(a) The lineage tree, coloured by Overall (the mean over a node's seeds, as `seed_point` picks them)."""
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
    means = {n.node_id: point[0].mean for n in nodes if (point := seed_point(n, n is root)) is not None}
    overall = list(means.values())
    colour_scale = _Scale(min(overall), max(overall), 0.0, 1.0) if overall and min(overall) < max(overall) else None

    def fill(node: Node) -> str:
        if node.status == NodeStatus.FAILED:
            return FAILED_FILL
        if node.node_id not in means:
            return PENDING_FILL
        return _colour(colour_scale(means[node.node_id])) if colour_scale else _colour(1.0)

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


def frontier_svg(nodes: Sequence[Node], utility: Utility, best_id: str | None = None) -> str:
    """(b) Cumulative-best utility against depth. A node is drawn at its `seed_summary`, the value the run's
    summary gives: filled with its 95% interval where it has several seeds, hollow where it has one. The
    root's mean is dashed, its interval shaded; `best_id`, the node the summary reports as the best, is
    labelled with its value."""
    title = "(b) Cumulative best utility vs depth"
    summaries = seed_summaries(nodes, utility)
    frontier = cumulative_best(nodes, lambda n: summaries[n.node_id].mean if n.node_id in summaries else None)
    if not frontier:
        return _empty_svg("fig-frontier", title, "no node has a utility yet")
    root = root_of(nodes)
    root_summary = summaries.get(root.node_id) if root is not None else None
    scored = [(n, summaries[n.node_id]) for n in nodes if n.node_id in summaries]
    width, height, plot_bottom = 600.0, 420.0, 300.0
    x = _Scale(frontier[0][0] - 0.3, frontier[-1][0] + 0.3, 70, width - 30)
    extent = [v for _, m in scored for v in (m.mean, m.ci_low, m.ci_high) if v is not None]
    y = _Scale.fit(extent, plot_bottom, 40, min_span=min_span(extent, root_summary.sd if root_summary else None))
    parts = _axes(x, y, "depth", "utility", integer_x=True)
    if root_summary is not None:
        level = y(root_summary.mean)
        if root_summary.ci_low is not None:
            band = {"class": "root-band", "x": x.px_lo, "y": y(root_summary.ci_high), "width": x.px_hi - x.px_lo,
                    "height": y(root_summary.ci_low) - y(root_summary.ci_high)}
            parts.append(_tag("rect", band))
        parts.append(_line(x.px_lo, level, x.px_hi, level, class_="root-level", stroke_dasharray="6 4"))
    for node, summary in scored:
        parts += _seed_marker(node, summary, x(node.genealogy.depth), y, "utility-point", 3.5, node is root)
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
    for depth, best in frontier:
        holder, summary = next((n, m) for n, m in scored if n.genealogy.depth <= depth and m.mean == best)
        parts += _seed_marker(holder, summary, x(depth), y, "frontier-point", 4.5, holder is root, interval=False)
    labels = []
    if root_summary is not None:
        labels.append((x.px_lo + 4, y(root_summary.mean), f"root (GRPO): {_seed_value(root_summary)}", "root-label"))
    best = next(((n, m) for n, m in scored if n.node_id == best_id), None)
    if best is not None and best[0] is not root:
        node, summary = best
        labels.append((x(node.genealogy.depth), y(summary.mean), f"{node.node_id} (best): {_seed_value(summary)}",
                       "best-label"))
    parts += _frontier_labels(labels, x, [(x(n.genealogy.depth), y(m.mean)) for n, m in scored])
    parts += _frontier_legend(70.0, plot_bottom + 50)
    return _svg("fig-frontier", title, width, height, parts)


def _seed_value(summary: SeedSummary) -> str:
    """'0.6307 ± 0.0143, 3 seeds' (the half-width of the 95% CI) or '0.6259, 1 seed': the run summary's numbers."""
    if summary.ci_low is None:
        return f"{summary.mean:.4f}, 1 seed"
    return f"{summary.mean:.4f} ± {(summary.ci_high - summary.ci_low) / 2:.4f}, {summary.n} seeds"


def _seed_marker(node: Node, summary: SeedSummary, px: float, y: _Scale, css: str, r: float, is_root: bool,
                 interval: bool = True) -> list[str]:
    """A node's point at its seed mean: its 95% interval as an error bar and the point filled where it has
    several seeds, the point hollow where it has one."""
    parts = _interval_bar(px, summary, y) if interval else []
    seeds = f"mean of {summary.n} seeds: {summary.text()}" if summary.n > 1 else f"1 seed: {summary.text()}"
    attrs = {"class": css + (" one-seed" if summary.n == 1 else " seed-mean"), "cx": px, "cy": y(summary.mean), "r": r,
             "data-node-id": node.node_id, "data-seeds": summary.n, "data-value": f"{summary.mean:.6g}"}
    parts.append(_tag("circle", attrs, _tag("title", {}, _esc(_node_tooltip(node, is_root) + "\nutility " + seeds))))
    return parts


def _interval_bar(px: float, summary: SeedSummary, y: _Scale) -> list[str]:
    """A vertical error bar with caps over a node's 95% interval; nothing for one seed."""
    if summary.ci_low is None:
        return []
    low, high = y(summary.ci_low), y(summary.ci_high)
    return [_line(x1, y1, x2, y2, class_="seed-interval")
            for x1, y1, x2, y2 in ((px, low, px, high), (px - 3, low, px + 3, low), (px - 3, high, px + 3, high))]


def _frontier_labels(labels: list[tuple[float, float, str, str]], x: _Scale,
                     markers: list[tuple[float, float]]) -> list[str]:
    """The root's and the best node's values, beside their points, not over each other or other points."""
    anchors = [(px, py, text) for px, py, text, _ in labels]
    places = place_labels(anchors, (x.px_lo, 24.0, x.px_hi + 20, 1e9), markers)
    parts = []
    for (px, py, text, css), (tx, ty, anchor) in zip(labels, places, strict=True):
        if css == "best-label":  # the root's label names a line, not a point
            parts += [line for line in [_leader(px, py, tx, ty)] if line]
        parts.append(_text(tx, ty, text, class_=f"tick {css}", text_anchor=anchor))
    return parts


def _frontier_legend(x: float, y: float) -> list[str]:
    entries = [
        (_line(x, y, x + 22, y, class_="legend-frontier"), "best so far (depth ≤ d)"),
        (_line(x, y, x + 22, y, class_="legend-root", stroke_dasharray="6 4")
         + _tag("rect", {"class": "legend-band", "x": x, "y": y - 5, "width": 22, "height": 10}),
         "root (GRPO): mean over its seeds, band = 95% CI"),
        (_line(x + 11, y - 6, x + 11, y + 6, class_="legend-interval")
         + _tag("circle", {"class": "legend-point seed-mean", "cx": x + 11, "cy": y, "r": 3.5}),
         "mean over a node's seeds, bar = 95% CI (as in the summary)"),
        (_tag("circle", {"class": "legend-point one-seed", "cx": x + 11, "cy": y, "r": 3.5}), "1 seed"),
    ]
    parts = []
    for i, (mark, label) in enumerate(entries):
        dy = 16 * i
        parts.append(_tag("g", {"class": "legend-entry", "transform": f"translate(0 {dy})"},
                          mark + _text(x + 30, y + 4, label, class_="tick")))
    return parts


def dynamics_svg(series: Sequence[tuple[str, str, Node]]) -> str:
    """(c) One panel per training metric; one curve per (label, colour, node) of `series`, each with its own
    dash pattern (SERIES_DASHES), drawn in order over a wider first curve, so curves that coincide stay
    visible; the legend names the curves that coincide exactly."""
    title = "(c) Training dynamics: root (GRPO) and top variants"
    if not series:
        return _empty_svg("fig-dynamics", title, "no nodes yet")
    panel_w, panel_h, gap, top = 300.0, 220.0, 30.0, 40.0
    width = len(DYNAMICS_METRICS) * (panel_w + gap) + 40
    height = top + panel_h + 30 + 18 * len(series) + 10
    parts: list[str] = []
    drawn_by_metric: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for i, (metric, label) in enumerate(DYNAMICS_METRICS):
        curves = [(j, name, colour, finite_points(node.trajectory, metric)) for j, (name, colour, node)
                  in enumerate(series)]
        drawn = [c for c in curves if len(c[3]) >= 2]
        drawn_by_metric[metric] = {name: points for _, name, _, points in drawn}
        ox = 40 + i * (panel_w + gap)
        panel = [_text(ox + panel_w / 2, top + 4, label, class_="panel-title", text_anchor="middle")]
        if drawn:
            values = [p[1] for c in drawn for p in c[3]]
            x = _Scale.fit([p[0] for c in drawn for p in c[3]], ox + 45, ox + panel_w, pad=0.0)
            y = _Scale.fit(values, top + panel_h - 30, top + 20, min_span=min_span(values))
            panel += _axes(x, y, "step", "")
            for j, name, colour, points in drawn:
                attrs = {
                    "class": "curve",
                    "data-metric": metric,
                    "data-series": name,
                    "stroke": colour,
                    "fill": "none",
                    "points": _points((x(s), y(v)) for s, v in points),
                    **_svg_attrs(_series_style(j)),
                }
                panel.append(_tag("polyline", attrs, _tag("title", {}, _esc(f"{name}: {label}"))))
        else:
            empty = "no finite values logged"
            panel.append(_text(ox + panel_w / 2, top + panel_h / 2, empty, class_="empty", text_anchor="middle"))
        parts.append(_tag("g", {"class": "panel", "data-metric": metric}, "".join(panel)))
    same = identical_curves(drawn_by_metric)
    for j, (name, colour, node) in enumerate(series):
        ly = top + panel_h + 30 + 18 * j
        note = "" if node.trajectory is not None else " (no trajectory)"
        swatch = _line(40, ly, 70, ly, stroke=colour, class_="legend-line", **_series_style(j))
        entry = swatch + _text(76, ly + 4, name + note, class_="tick")
        if name in same:
            entry += _text(76 + CHAR_PX * len(name + note) + 8, ly + 4, same[name], class_="tick identical")
        parts.append(_tag("g", {"class": "legend-entry"}, entry))
    return _svg("fig-dynamics", title, width, height, parts)


# Each curve of a dynamics panel has its own dash pattern and the first is drawn wider, so a later curve that
# coincides with an earlier one shows as dashes over it instead of hiding it.
SERIES_DASHES = (None, "7 4", "2 3", "10 3 2 3")


def _series_style(index: int) -> dict[str, object]:
    return {"stroke_dasharray": SERIES_DASHES[index % len(SERIES_DASHES)], "stroke_width": 3.0 if index == 0 else 1.6}


def identical_curves(curves_by_metric: dict[str, dict[str, list[tuple[float, float]]]]) -> dict[str, str]:
    """For each series whose curves equal an earlier series' exactly, in every panel where either is drawn, a
    note such as '= root (GRPO) n000 (identical curves)'; where only some panels coincide, it names them."""
    names = list(dict.fromkeys(name for curves in curves_by_metric.values() for name in curves))
    notes = {}
    for later_index, later in enumerate(names):
        for earlier in names[:later_index]:
            shared = [m for m, curves in curves_by_metric.items() if later in curves and earlier in curves]
            equal = [m for m in shared if curves_by_metric[m][later] == curves_by_metric[m][earlier]]
            if not equal:
                continue
            if len(equal) == len(shared):
                notes[later] = f"= {earlier} (identical curves)"
            else:
                labels = dict(DYNAMICS_METRICS)
                notes[later] = f"= {earlier} in {', '.join(labels.get(m, m) for m in equal)} (identical)"
            break
    return notes


def scatter_svg(nodes: Sequence[Node], config: RunConfig | None = None) -> str:
    """(d) Overall against mean response length for every evaluated node, labelled by node id, with the
    Pareto front (higher Overall, shorter responses) drawn through its nodes. A node with several seeds is
    drawn at its means over them (as `seed_summary` picks them), with the 95% interval of its Overall. Under
    the length objective the accuracy floor (root Overall − tolerance) is drawn and each point says whether it
    meets the directive's constraints (filled: met, hollow: not). Nodes drawn at the same place share one
    label ("n003 = n005"); labels are moved apart where they would cover each other."""
    title = "(d) Accuracy (Overall) vs mean response length"
    root = root_of(nodes)
    seeds = {n.node_id: point for n in nodes if (point := seed_point(n, n is root)) is not None}
    evaluated = [n for n in nodes if n.node_id in seeds]
    if not evaluated:
        return _empty_svg("fig-scatter", title, "no evaluated nodes yet")
    at_mean = {n.node_id: _at_seed_mean(n, *seeds[n.node_id]) for n in evaluated}
    width, height, plot_bottom = 600.0, 380.0, 300.0
    lengths = [length for _, length in seeds.values()]
    root_noise = _seed_noise(root)
    x = _Scale.fit(lengths, 70, width - 30, min_span=min_span(lengths, root_noise[1]))
    length_objective = config is not None and config.objective.kind == "length"
    floor_value = None
    if length_objective:
        stick = yardstick(root)  # the same yardstick the archive stamps utilities with
        floor_value = stick.overall - config.objective.accuracy_tolerance if stick is not None else None
    extent = [v for summary, _ in seeds.values() for v in (summary.mean, summary.ci_low, summary.ci_high)
              if v is not None] + ([floor_value] if floor_value is not None else [])
    y = _Scale.fit(extent, plot_bottom, 40, min_span=min_span(extent, root_noise[0]))
    parts = _axes(x, y, "mean response length (tokens)", "Overall")
    front = pareto_front(list(at_mean.values()))
    if len(front) > 1:
        xy = [(x(n.evaluation.mean_length), y(n.evaluation.overall)) for n in front]
        parts.append(_tag("polyline", {"class": "pareto-front", "points": _points(xy), "fill": "none",
                                       "data-nodes": " ".join(n.node_id for n in front)}))
    if floor_value is not None:
        floor = y(floor_value)
        parts.append(_line(x.px_lo, floor, x.px_hi, floor, class_="accuracy-floor"))
        parts.append(_text(x.px_hi, floor - 4, "accuracy floor (GRPO − tolerance)", class_="tick",
                           text_anchor="end"))
    on_front = {n.node_id for n in front}
    where = {}
    for node in evaluated:
        summary, length = seeds[node.node_id]
        px, py = x(length), y(summary.mean)
        where[node.node_id] = (px, py)
        verdict = satisfies(node) if length_objective else None
        parts += _interval_bar(px, summary, y)
        attrs = {
            "class": "point" + (" root" if node is root else "") + (" front" if node.node_id in on_front else "")
            + {True: " satisfied", False: " violated", None: ""}[verdict],
            "cx": px,
            "cy": py,
            "r": 5.0,
            "data-node-id": node.node_id,
            "data-seeds": summary.n,
        }
        tooltip = _node_tooltip(node, node is root)
        if summary.n > 1:
            tooltip += f"\nplotted at the seed means: Overall {_seed_value(summary)}, length {length:.1f}"
        parts.append(_tag("circle", attrs, _tag("title", {}, _esc(tooltip))))
    parts += _point_labels(evaluated, where, {n.node_id for n in front} | ({root.node_id} if root else set()),
                           (x.px_lo, y.px_hi - 14, x.px_hi + 25, y.px_lo))
    legend = "bar: 95% CI of Overall over a node's seeds (the point is at the means); no bar: 1 seed"
    if length_objective:
        legend += "; hollow: misses the objective's constraints"
    parts.append(_text(x.px_lo, plot_bottom + 60, legend, class_="tick legend"))
    return _svg("fig-scatter", title, width, height, parts)


MAX_POINT_LABELS = 40  # beyond this many points, only the root and the Pareto front are labelled (hover the rest)


def _point_labels(nodes: Sequence[Node], where: dict[str, tuple[float, float]], always: set[str],
                  bounds: tuple[float, float, float, float]) -> list[str]:
    """Node-id labels of the scatter's points: one per place ("n003 = n005" where points coincide), placed so
    that none covers another."""
    labelled = nodes if len(nodes) <= MAX_POINT_LABELS else [n for n in nodes if n.node_id in always]
    groups = coincident([(n.node_id, *where[n.node_id]) for n in labelled])
    anchors = [(*where[group[0]], " = ".join(group)) for group in groups]
    others = [where[n.node_id] for n in nodes]
    parts = []
    for group, (x, y, text), (tx, ty, anchor) in zip(groups, anchors, place_labels(anchors, bounds, others),
                                                    strict=True):
        parts += [line for line in [_leader(x, y, tx, ty)] if line]
        parts.append(_text(tx, ty, text, class_="point-label", text_anchor=anchor, data_nodes=" ".join(group)))
    return parts


def _at_seed_mean(node: Node, summary: SeedSummary, length: float) -> Node:
    """The node with its evaluation's Overall and mean length replaced by their means over its seeds."""
    if summary.n == 1:
        return node
    update = {"overall": summary.mean, "mean_length": length, "overall_ci": None}
    return node.model_copy(update={"evaluation": node.evaluation.model_copy(update=update)})


def _seed_noise(root: Node | None) -> tuple[float | None, float | None]:
    """The SD over the root's seeds of Overall and of mean length: the run's seed noise (None with one seed)."""
    if root is None:
        return None, None
    evaluations = [e for e in confirmation_evaluations(root, True) if _finite(e.overall) and _finite(e.mean_length)]
    overall, length = summarize([e.overall for e in evaluations]), summarize([e.mean_length for e in evaluations])
    return (overall.sd if overall else None), (length.sd if length else None)


# ----------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
table.nodes td:nth-child(n+6):nth-child(-n+9) { white-space: nowrap; }
tr.failed td { color: #777; }
svg.figure { display: block; margin: 1em 0; font-size: 11px; }
.fig-title { font-weight: 600; font-size: 13px; }
.axis { stroke: #333; } .grid { stroke: #eee; } .tick { fill: #444; } .empty { fill: #888; }
.edge { stroke: #999; stroke-width: 1.2; }
.node { stroke: #333; stroke-width: 1; } .root-mark { fill: none; stroke: #000; stroke-width: 2; }
.swatch, .scale-bar { stroke: #333; stroke-width: 0.5; }
.frontier, .legend-frontier { stroke: #1f77b4; stroke-width: 2; } .frontier-point { fill: #1f77b4; stroke: #1f77b4; }
.utility-point, .legend-point { fill: #999; stroke: #999; stroke-width: 1.2; }
.one-seed { fill: #fff; } .frontier-point.one-seed { fill: #fff; stroke-width: 1.8; }
.seed-interval, .legend-interval { stroke: #777; stroke-width: 1.2; }
.root-band, .legend-band { fill: #222; fill-opacity: 0.08; }
.root-level, .legend-root { stroke: #222; stroke-width: 1.2; } .best-label { font-weight: 600; fill: #1f77b4; }
.identical { fill: #777; font-style: italic; } .leader { stroke: #999; stroke-width: 0.8; }
.point-label, .root-label, .best-label { paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
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


def _node_row(node: Node, utility: Utility, is_root: bool, seeds: SeedSummary | None) -> str:
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
        "—" if seeds is None else _seed_value(seeds) if seeds.n > 1 else "1 seed",
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
    "utility over seeds ± 95% CI",
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
    best_id: str | None = None,
) -> str:
    """The report page as an HTML string (pure: `write_report` reads the archive and writes the file).
    `best_id`: the node the run's summary reports as the best, labelled in the frontier figure."""
    root = root_of(nodes)
    summaries = seed_summaries(nodes, utility)
    ranked = top_variants(nodes, lambda n: summaries[n.node_id].mean if n.node_id in summaries else None)
    series = [("root (GRPO) " + root.node_id, ROOT_COLOUR, root)] if root is not None else []
    series += [(n.node_id, c, n) for n, c in zip(ranked, SERIES_COLOURS, strict=False)]
    counts = {status: sum(n.status == status for n in nodes) for status in NodeStatus}
    count_text = ", ".join(f"{status.value} {count}" for status, count in counts.items() if count) or "none"
    rows = "".join(_node_row(n, utility, n is root, summaries.get(n.node_id)) for n in nodes)
    head = "".join(f"<th>{_esc(h)}</th>" for h in _TABLE_HEAD)
    header = [
        f"<h1>POISE run {_esc(run_id)}</h1>",
        _definition_list([*_config_items(run_id, config), ("nodes", f"{len(nodes)} ({count_text})")], "config"),
    ]
    if summary:
        header += ["<h2>Summary</h2>", _definition_list(summary.items(), "summary")]
    best = next((n for n in nodes if n.node_id == best_id), None)
    report = report_status(best, root) if best is not None else None
    sections = [
        f'<header id="run-summary">{"".join(header)}</header>',
        *([_report_html(report)] if report is not None else []),
        "<h2>Figures</h2>",
        lineage_svg(nodes),
        frontier_svg(nodes, utility, best_id),
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


def _report_html(report: ReportStatus) -> str:
    """The run's report (docs/reporting.md): each arm on the fresh seeds, the paired gain, and the ablation."""
    where = "the reporting half" if report.half == "reporting" else "every problem"

    def interval(low: float | None, high: float | None, signed: bool = False) -> str:
        fmt = "{:+.4f}" if signed else "{:.4f}"
        return f"[{fmt.format(low)}, {fmt.format(high)}]" if low is not None and high is not None else "—"

    arms = "".join(f"<tr><td>{_esc(a.arm)}</td><td class=\"num\">{_num(a.mean, 4)}</td>"
                   f"<td>{interval(a.ci_low, a.ci_high)}</td><td class=\"num\">{len(a.seeds)}</td>"
                   f"<td class=\"num\">{_num(a.mean_length, 1)}</td></tr>" for a in report.arms)
    parts = "".join(f"<tr><td>{_esc(c.difference)}</td><td>{_esc(c.arm)}</td>"
                    f"<td class=\"num\">{'—' if c.gain is None else f'{c.gain:+.4f}'}</td>"
                    f"<td>{interval(*(c.interval or (None, None)), signed=True)}</td>"
                    f"<td class=\"num\">{c.seeds}</td><td class=\"num\">{_num(c.p, 3)}</td></tr>"
                    for c in report.contributions)
    gain = ("—" if report.gain is None else
            f"{report.gain:+.4f} {interval(*(report.gain_interval or (None, None)), signed=True)}")
    html = [f'<section id="report"><h2>Report: the best against GRPO on fresh seeds, on {_esc(where)}</h2>',
            '<table class="report"><thead><tr><th>arm</th><th>Overall</th><th>95% interval</th><th>seeds</th>'
            f"<th>mean length</th></tr></thead><tbody>{arms}</tbody></table>",
            f"<p>best − GRPO, paired over {report.paired_seeds} seeds: {_esc(gain)}; {_esc(report.verdict)}</p>"]
    if report.contributions:
        html.append('<h3>Ablation: what each difference from GRPO contributed</h3><table class="ablation"><thead>'
                    "<tr><th>difference undone</th><th>against arm</th><th>best − arm</th><th>95% interval</th>"
                    f"<th>seeds</th><th>paired t p</th></tr></thead><tbody>{parts}</tbody></table>")
    return "".join(html) + "</section>"


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
    best = best_score(store, run_id)
    page = render_report(run_id, config, nodes, utility or overall_utility, summary, best.node_id if best else None)
    path.write_text(page, encoding="utf-8")
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
    if trajectory.stopped_early:
        lines.append(f"  STOPPED EARLY: {trajectory.stopped_early.reason}")
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
