"""The pages about nodes: one node, two nodes side by side, and the run's figures.

Each page is a pure function of the archive (store in, HTML out) drawn on the server: code diffs by difflib,
charts as inline SVG with archive/report.py's scales and figure analysis, no script. Names, code, logs and
LLM text come from candidates and agent LLMs, so every archive string is escaped (`esc`, after `printable`
masks terminal controls and bidi overrides) and every id in a link is percent-encoded (`url`).

Element ids the browser tests hold the pages to: `code` (the source), `code-diff` (the diff, lines of class
`add` / `del`), `curves` (one `<svg class="curve" data-metric=...>` per recorded metric), `metrics`, `failure`
(`data-phase`), `verification`, `reflection`, `llm`, `compare`, `fig-cumulative-best`, `fig-accuracy-length`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from archive.report import (
    ROOT_COLOUR,
    SERIES_COLOURS,
    Scale,
    cumulative_best,
    finite_points,
    finite_utility,
    format_number,
    is_finite,
    node_tooltip,
    overall_text,
    pareto_front,
    printable,
    render_node_text,
    root_of,
    svg_line,
    svg_points,
    svg_tag,
    svg_text,
    ticks,
)
from archive.ui.layout import NotFound, esc, page, url
from poise.contracts import (
    ROOT_ID,
    Evaluation,
    LegacyScreening,
    MetricKind,
    Node,
    Proposal,
    RunConfig,
    ScreeningSummary,
    SuiteResult,
    TrainingTrajectory,
)
from poise.objective import describe, yardstick
from poise.scoring import seed_mean, seed_scores
from poise.store import ArchiveStore

# The training metrics every node page charts, "not recorded" where no series has them: (data-metric, the
# TrainingStep field, label). The optional ones, and any `extra` metric, get a chart only when recorded.
CURVES = (
    ("reward", "reward_mean", "reward (mean)"),
    ("entropy", "entropy", "entropy"),
    ("response_length", "response_length", "response length (tokens)"),
    ("kl", "kl", "KL to the reference"),
    ("grad_norm", "grad_norm", "gradient norm"),
    ("clip_frac", "clip_frac", "clip fraction"),
)
OPTIONAL_CURVES = (
    ("format_valid", "format_valid_rate", "format-valid rate"),
    ("adv_mean", "adv_mean", "advantage mean"),
    ("adv_std", "adv_std", "advantage std"),
    ("step_time", "step_time_s", "step time (s)"),
)
FRONT_COLOUR = "#d62728"
LONG_TEXT_LINES = 8  # longer logs and messages fold into <details>
MAX_LISTED_IDS = 30  # a "no such node" message lists the run's node ids up to this many

# The pages' own look, inline so that a page needs nothing else to read right; the charts carry their colours
# and dashes as SVG attributes. Hover and focus grow a figure's point (no script).
CSS = """
pre.code, pre.diff, pre.log { overflow-x: auto; padding: 0.5em; background: #f7f7f7; font-size: 12px; }
pre.diff span { display: block; } pre.diff .add { background: #e6ffec; } pre.diff .del { background: #ffebe9; }
pre.diff .hunk { color: #6639ba; } pre.diff .file { color: #666; font-weight: 600; }
.prose { white-space: pre-wrap; } .note, .not-recorded { color: #666; font-style: italic; }
#failure { border: 2px solid #c62828; background: #fff3f3; padding: 0.5em 1em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } svg.curve, svg.figure { background: #fff; }
svg a.pt circle { transition: r 0.1s; } svg a.pt:hover circle, svg a.pt:focus circle { r: 8px; stroke: #000;
  stroke-width: 2; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; } tr.fail td, .effect-hurt { color: #c62828; }
.effect-helped { color: #2e7d32; } dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.facts dd { margin: 0; } .side-by-side td { vertical-align: top; width: 42%; }
"""


@dataclass(frozen=True)
class Series:
    """One node's curves on a chart: its legend label, colour and dash (None: solid)."""

    label: str
    colour: str
    dash: str | None
    node: Node


# -------------------------------------------------------------------------------------------- the pages


def render_node_page(store: ArchiveStore, run_id: str, node_id: str) -> str:
    """Everything the archive holds about one node, against its parent and the root."""
    node = _node(store, run_id, node_id)
    parents = {p: store.get_node(run_id, p) for p in node.genealogy.parent_ids}
    parent = next((p for p in parents.values() if p is not None), None)
    root = _root(store, node)
    children = store.children(run_id, node_id)
    shown = {node.node_id}
    series = [Series(f"{node.node_id} (this node)", SERIES_COLOURS[0], None, node)]
    if parent is not None:
        is_root = root is not None and parent.node_id == root.node_id
        series.append(Series(f"{parent.node_id} (parent{', root' if is_root else ''})", SERIES_COLOURS[1], "6 3",
                             parent))
        shown.add(parent.node_id)
    if root is not None and root.node_id not in shown:
        series.append(Series(f"{root.node_id} (root, GRPO)", ROOT_COLOUR, "2 3", root))
    sections = [
        _header(node, parents, children),
        _proposal_section(node.proposal, run_id),
        _code_section(node, parent),
        _verification_section(node),
        _curves_section(series),
        _metrics_section(node, parent),
        _reflection_section(node),
        _llm_section(node),
        '<section id="plain"><details><summary>as text (<code>poise show</code>)</summary>'
        f'<pre class="log">{_text(render_node_text(node, parent))}</pre></details></section>',
    ]
    title = f"{node.node_id} · {node.proposal.name}"
    return page(title, _style() + "".join(sections), run_id=run_id, active="tree")


def render_compare_page(store: ArchiveStore, run_id: str, a: str, b: str) -> str:
    """Two nodes side by side: what each is, the code diff a → b, both curves on shared charts, both metrics."""
    node_a = _node(store, run_id, a, role="a")
    node_b = _node(store, run_id, b, role="b")
    series = [Series(f"{a} (a)", SERIES_COLOURS[0], None, node_a), Series(f"{b} (b)", SERIES_COLOURS[1], "6 3", node_b)]
    rows = [
        ("node", _node_link(node_a), _node_link(node_b)),
        ("status", _status(node_a), _status(node_b)),
        ("depth", str(node_a.genealogy.depth), str(node_b.genealogy.depth)),
        ("parents", _links(run_id, node_a.genealogy.parent_ids), _links(run_id, node_b.genealogy.parent_ids)),
        ("mechanisms", _mechanism_list(node_a.proposal), _mechanism_list(node_b.proposal)),
        ("hyperparameters", _scalars(node_a.proposal.hparams), _scalars(node_b.proposal.hparams)),
        ("loss aggregation", esc(node_a.proposal.loss_agg_mode.value), esc(node_b.proposal.loss_agg_mode.value)),
        ("rationale", _prose(node_a.proposal.rationale), _prose(node_b.proposal.rationale)),
    ]
    table = "".join(f'<tr><th scope="row">{esc(label)}</th><td>{x}</td><td>{y}</td></tr>' for label, x, y in rows)
    source_a = node_a.implementation.source if node_a.implementation else None
    source_b = node_b.implementation.source if node_b.implementation else None
    if source_a is None or source_b is None:
        missing = " and ".join(n.node_id for n, s in ((node_a, source_a), (node_b, source_b)) if s is None)
        diff = f'<p class="note">no diff: {esc(missing)} has no implementation</p>'
    else:
        diff = _diff(source_a, source_b, a, b, element_id="code-diff")
    body = (
        f"{_style()}<h1>Compare {esc(a)} and {esc(b)}</h1>{_compare_form(store, run_id, a, b)}"
        f'<section id="compare"><table class="side-by-side"><thead><tr><th></th><th>a</th><th>b</th></tr></thead>'
        f"<tbody>{table}</tbody></table>"
        f"<h2>Code: {esc(a)} → {esc(b)}</h2>{diff}</section>"
        f"{_curves_section(series)}"
        f'<section id="metrics-section"><h2>Metrics</h2>{_compare_metrics(node_a, node_b)}</section>'
    )
    return page(f"compare {a} and {b}", body, run_id=run_id, active="tree")


def render_figures_page(store: ArchiveStore, run_id: str) -> str:
    """The paper's figures for the run: cumulative best utility against depth, and accuracy against length."""
    config = store.get_run(run_id)
    nodes = store.nodes(run_id)
    if config is None and not nodes:
        raise NotFound(_no_run_message(store, run_id))
    root = root_of(nodes)
    averaged = [f"{n.node_id} ({len(seed_scores(n))} seeds)" for n in nodes if len(seed_scores(n)) > 1]
    seeds_note = (f" Nodes trained with several seeds are plotted at the mean over their seeds (their own and "
                  f"fresh-seed replicates): {', '.join(averaged)}." if averaged else "")
    objective = describe(config.objective) if config is not None else "maximize the weighted Overall"
    body = (
        f"{_style()}<h1>Figures</h1>"
        f'<p class="note">Every point links to its node; hover it for the node and its values. Utility: '
        f"{esc(objective)}.</p>"
        f'<figure>{_cumulative_best_svg(run_id, nodes, root)}<figcaption>Cumulative best utility vs depth: the best '
        "utility among nodes of depth ≤ d (step line, each step at the node that holds it); grey: every node with "
        f"a utility; dashed: the root (GRPO).{esc(seeds_note)}</figcaption></figure>"
        f"<figure>{_accuracy_length_svg(run_id, nodes, root, config)}<figcaption>Accuracy (Overall) vs mean response "
        "length of every evaluated node; red: the Pareto front (higher Overall, shorter responses)"
        + (", dotted: the accuracy floor (GRPO's Overall − tolerance)" if _length_objective(config) else "")
        + f".{esc(seeds_note)}</figcaption></figure>"
    )
    return page("figures", body, run_id=run_id, active="figures")


# ------------------------------------------------------------------------------------------ archive reads


def _node(store: ArchiveStore, run_id: str, node_id: str, role: str = "") -> Node:
    node = store.get_node(run_id, node_id)
    if node is not None:
        return node
    counters = store.counters(run_id)
    total = sum(counters.counts.values())
    if store.get_run(run_id) is None and total == 0:
        raise NotFound(_no_run_message(store, run_id))
    given = f" (given as {role})" if role else ""
    listed = f" ({', '.join(n.node_id for n in store.nodes(run_id))})" if 0 < total <= MAX_LISTED_IDS else ""
    raise NotFound(f"run {run_id} has no node {node_id!r}{given}: it has {total} nodes{listed}; "
                   f"pick one in the run's tree at {url('runs', run_id, 'tree')}")


def _no_run_message(store: ArchiveStore, run_id: str) -> str:
    runs = store.run_ids()
    known = f"it holds {', '.join(runs[-10:])}" if runs else "it holds no runs yet"
    return f"no run {run_id!r} in the archive; {known}; the list of runs is at /"


def _root(store: ArchiveStore, node: Node) -> Node | None:
    """The root of the node's lineage (its first ancestor), else the run's root id."""
    if node.genealogy.depth == 0:
        return node
    for node_id in (*node.genealogy.ancestors[:1], ROOT_ID):
        found = store.get_node(node.run_id, node_id)
        if found is not None and found.genealogy.depth == 0:
            return found
    return None


# --------------------------------------------------------------------------------------------- markup


def _style() -> str:
    return f"<style>{CSS}</style>"


def _text(text: str) -> str:
    return esc(printable(text))


def _prose(text: str) -> str:
    return f'<div class="prose">{_text(text)}</div>' if text.strip() else '<span class="note">none</span>'


def _long_text(text: str, summary: str) -> str:
    """A log or message: one short line inline, else in a <pre>, folded into <details> when long."""
    lines = printable(text).splitlines() or [""]
    if len(lines) == 1 and len(text) <= 160:
        return f'<span class="log">{esc(lines[0])}</span>'
    joined = "\n".join(lines)
    pre = f'<pre class="log">{esc(joined)}</pre>'
    if len(lines) <= LONG_TEXT_LINES and len(text) <= 600:
        return pre
    return f"<details><summary>{esc(summary)} ({len(lines)} lines)</summary>{pre}</details>"


def _num(value: float | None, digits: int = 3) -> str:
    return esc(format_number(value, digits))


def _dl(items: Iterable[tuple[str, str]], css_class: str = "facts") -> str:
    """A definition list; values are markup."""
    return f'<dl class="{css_class}">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _table(head: Sequence[str], rows: Iterable[str], attrs: str = "", foot: str = "") -> str:
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    tfoot = f"<tfoot>{foot}</tfoot>" if foot else ""
    return f"<table{attrs}><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody>{tfoot}</table>"


def _node_url(run_id: str, node_id: str) -> str:
    return url("runs", run_id, "nodes", node_id)


def _compare_url(run_id: str, a: str, b: str) -> str:
    return url("runs", run_id, "compare") + "?" + urlencode({"a": a, "b": b})


def _node_link(node: Node) -> str:
    return f'<a href="{esc(_node_url(node.run_id, node.node_id))}">{esc(node.node_id)}</a> {_text(node.proposal.name)}'


def _links(run_id: str, node_ids: Sequence[str]) -> str:
    return ", ".join(f'<a href="{esc(_node_url(run_id, n))}">{esc(n)}</a>' for n in node_ids) or "none (root)"


def _status(node: Node) -> str:
    text = node.status.value
    if node.failure is not None:
        text += f" in {node.failure.phase.value}: {node.failure.reason}"
    return f'<span class="status" data-status="{esc(node.status.value)}">{_text(text)}</span>'


def _scalars(values: dict[str, object]) -> str:
    return esc(", ".join(f"{k}={v!r}" for k, v in values.items())) or '<span class="note">none</span>'


def _mechanism_list(proposal: Proposal) -> str:
    items = "".join(f"<li><code>{_text(m.name)}</code> {_scalars(m.params) if m.params else ''}</li>"
                    for m in proposal.mechanisms)
    return f"<ul>{items}</ul>" if items else '<span class="note">none</span>'


# ------------------------------------------------------------------------------------------ node sections


def _header(node: Node, parents: dict[str, Node | None], children: Sequence[Node]) -> str:
    g = node.genealogy
    failure = ""
    if node.failure is not None:
        detail = _long_text(node.failure.detail, "detail") if node.failure.detail else ""
        failure = (f'<section id="failure" class="failure" data-phase="{esc(node.failure.phase.value)}">'
                   f"<h2>Failed in phase {esc(node.failure.phase.value)}</h2>"
                   f'<p class="reason">{_text(node.failure.reason)}</p>{detail}</section>')
    parent_items = [
        f'<a href="{esc(_node_url(g.run_id, p))}">{esc(p)}</a>'
        + (f" {_text(found.proposal.name)}" if found is not None else ' <span class="note">(not stored)</span>')
        for p, found in parents.items()
    ]
    child_items = [f"{_node_link(c)} <span class=\"note\">{esc(c.status.value)}</span>" for c in children]
    facts = [
        ("status", _status(node)),
        ("depth", str(g.depth)),
        ("parents", ", ".join(parent_items) or "none: the root (GRPO), every other node descends from it"),
        ("children", ", ".join(child_items) or '<span class="note">none yet</span>'),
        ("created", esc(node.created_at.isoformat(timespec="seconds"))),
        ("updated", esc(node.updated_at.isoformat(timespec="seconds"))),
    ]
    compare = "".join(
        f'<a class="compare" href="{esc(_compare_url(g.run_id, p, node.node_id))}">compare with parent {esc(p)}</a> '
        for p in g.parent_ids
    )
    sections = (("proposal", "proposal"), ("code", "code"), ("verification", "verification"), ("curves", "curves"),
                ("metrics", "metrics-section"), ("reflection", "reflection"), ("LLM and cost", "llm"))
    jump = " · ".join(f'<a href="#{anchor}">{label}</a>' for label, anchor in sections)
    return (f'<h1><span class="node-id">{esc(node.node_id)}</span> · {_text(node.proposal.name)}</h1>{failure}'
            f'{_dl(facts)}<p class="links">{compare}</p><p class="jump">{jump}</p>')


def _proposal_section(proposal: Proposal, run_id: str) -> str:
    mechanisms = [
        f"<tr><td><code>{_text(m.name)}</code></td><td>{_scalars(m.params)}</td></tr>" for m in proposal.mechanisms
    ]
    facts = [("generator", _text(proposal.generator)), ("loss aggregation", esc(proposal.loss_agg_mode.value)),
             ("hyperparameters", _scalars(proposal.hparams))]
    directive = f'<p class="directive"><strong>directive:</strong> {_text(proposal.directive)}</p>' \
        if proposal.directive else ""
    mechanism_table = (_table(("mechanism", "constants"), mechanisms, ' class="mechanisms"') if mechanisms
                       else '<p class="note">no named mechanisms</p>')
    return (f'<section id="proposal"><h2>Proposal</h2>{directive}<h3>Rationale</h3>{_prose(proposal.rationale)}'
            f"<h3>Mechanisms</h3>{mechanism_table}{_dl(facts)}{_screening(proposal.screening, run_id)}</section>")


def _screening(screening: ScreeningSummary | LegacyScreening | None, run_id: str) -> str:
    """Phase I: how the proposal won its population, the score it was selected on, and who was rejected why."""
    if screening is None:
        return ""
    if isinstance(screening, LegacyScreening):
        return f'<section id="screening"><h3>Screening</h3>{_prose(screening.note)}</section>'
    winner = screening.winner
    facts = [("parent", _links(run_id, [screening.parent_id])),
             ("passed the gates", str(screening.passed)),
             ("survivors ranked by", esc(screening.acquisition)),
             ("near duplicate below distance", _num(screening.threshold))]
    if winner is not None:
        facts.append(("selection score", _text(winner.summary())))
        if winner.predicted_mean is not None:
            facts.append(("predicted utility", f"{_num(winner.predicted_mean, 4)} ± {_num(winner.predicted_std, 4)}"))
        if winner.nearest_id:
            facts.append(("nearest archived node", f"{_links(run_id, [winner.nearest_id])} at distance "
                                                   f"{_num(winner.distance)}"))
    if screening.parent_utility is not None:
        facts.append(("parent utility", _num(screening.parent_utility, 4)))
    if screening.screened_by:
        facts.append(("screened by", _text(screening.screened_by)))
    rejected = [
        f"<tr><td>{_text(r.proposal_name)}</td><td>{esc(r.stage)}</td><td>{_text(r.reason)}</td>"
        f"<td>{_links(run_id, [r.nearest_id]) if r.nearest_id else ''} {_num(r.distance) if r.nearest_id else ''}</td>"
        "</tr>"
        for r in screening.rejections
    ]
    rejections = _table(("proposal", "gate", "reason", "nearest node"), rejected, ' class="rejections"') \
        if rejected else ""
    skipped = "".join(f"<li>{_text(name)}: {_text(why)}</li>" for name, why in screening.skipped.items())
    skipped = f"<p>offline gates skipped for:</p><ul>{skipped}</ul>" if skipped else ""
    return f'<section id="screening"><h3>Screening (Phase I)</h3>{_dl(facts)}{rejections}{skipped}</section>'


def _code_section(node: Node, parent: Node | None) -> str:
    implementation = node.implementation
    if implementation is None:
        return '<section id="code"><h2>Code</h2><p class="note">not implemented yet</p></section>'
    source = f'<pre id="code-source" class="code">{_text(implementation.source)}</pre>'
    lines = len(implementation.source.splitlines())
    if parent is None or parent.implementation is None:
        why = "the root has no parent" if node.genealogy.depth == 0 else "the parent has no implementation"
        return f'<section id="code"><h2>Code</h2><p class="note">{esc(why)}: the code alone.</p>{source}</section>'
    diff = _diff(parent.implementation.source, implementation.source, parent.node_id, node.node_id,
                 element_id="code-diff")
    return (f'<section id="code"><h2>Code: changes against parent {esc(parent.node_id)}</h2>{diff}'
            f"<details><summary>the whole module ({lines} lines)</summary>{source}</details></section>")


def _diff(before: str, after: str, before_name: str, after_name: str, element_id: str | None = None) -> str:
    """A unified diff as a <pre> of lines classed add, del, hunk, file or ctx."""
    lines = list(difflib.unified_diff(printable(before).splitlines(), printable(after).splitlines(),
                                      before_name, after_name, lineterm=""))
    if not lines:
        return f'<p class="note">the code of {esc(after_name)} is identical to that of {esc(before_name)}</p>'

    def kind(i: int, line: str) -> str:
        if i < 2 and line.startswith(("---", "+++")):
            return "file"
        return {"@": "hunk", "+": "add", "-": "del"}.get(line[:1], "ctx")

    body = "".join(f'<span class="{kind(i, line)}">{esc(line)}\n</span>' for i, line in enumerate(lines))
    ident = f' id="{esc(element_id)}"' if element_id else ""
    return f'<pre{ident} class="diff">{body}</pre>'


def _verification_section(node: Node) -> str:
    implementation = node.implementation
    if implementation is None:
        return '<section id="verification"><h2>Verification</h2><p class="note">not implemented yet</p></section>'
    verdict = "verified" if implementation.verified else "not verified"
    head = (f"<p>{verdict} after {len(implementation.attempts)} attempt(s) · sha256 "
            f"<code>{esc(implementation.source_sha256[:16])}…</code></p>")
    attempts, previous = [], None
    for attempt in implementation.attempts:
        checks = [
            f'<tr class="{"ok" if c.passed else "fail"}"><td>{"ok" if c.passed else "FAIL"}</td>'
            f"<td>{_text(c.name)}</td><td>{_long_text(c.message, 'report') if c.message else ''}</td></tr>"
            for c in attempt.checks
        ]
        report = _table(("", "check", "report"), checks, ' class="checks"') if checks \
            else '<p class="note">no checks recorded</p>'
        error = _long_text(attempt.error, "error") if attempt.error else ""
        if previous is None:
            code = f'<pre class="code">{_text(attempt.source)}</pre>'
            label = "the code tried"
        else:
            code = _diff(previous, attempt.source, f"attempt {attempt.attempt - 1}", f"attempt {attempt.attempt}")
            label = f"the correction against attempt {attempt.attempt - 1}"
        previous = attempt.source
        outcome = "passed" if attempt.passed else "failed"
        attempts.append(
            f'<div class="attempt" data-attempt="{attempt.attempt}" data-passed="{str(attempt.passed).lower()}">'
            f"<h3>attempt {attempt.attempt}: {outcome} ({_num(attempt.duration_s, 2)} s)</h3>{report}{error}"
            f"<details><summary>{label}</summary>{code}</details></div>"
        )
    if not attempts:
        attempts.append('<p class="note">no verification attempts recorded</p>')
    return f'<section id="verification"><h2>Verification</h2>{head}{"".join(attempts)}</section>'


def _metrics_section(node: Node, parent: Node | None) -> str:
    evaluation = node.evaluation
    if evaluation is None:
        return '<section id="metrics-section"><h2>Metrics</h2><p class="note">not evaluated yet</p></section>'
    rows = [_suite_row(result) for result in evaluation.suites.values()]
    foot = (f'<tr class="overall"><th scope="row">Overall</th><td>weighted</td>'
            f'<td class="num">{esc(overall_text(evaluation))}</td><td></td>'
            f'<td class="num">{_num(evaluation.mean_length, 1)}</td><td></td><td></td></tr>')
    head = ("suite", "metric", "value [95% CI]", "n prompts × samples", "mean length", "format-valid", "weight")
    table = _table(head, rows, ' id="metrics" class="metrics"', foot)
    facts = [("seed", str(evaluation.seed)), ("backend", esc(evaluation.backend or "not recorded")),
             ("utility", _num(_utility(evaluation), 4))]
    if evaluation.constraints_satisfied is not None:
        facts.append(("meets the objective's constraints", "yes" if evaluation.constraints_satisfied else "no"))
    if parent is not None and parent.evaluation is not None:
        facts.append((f"against parent {parent.node_id}", esc(_change(parent.evaluation, evaluation))))
    return (f'<section id="metrics-section"><h2>Metrics</h2>{table}{_dl(facts)}'
            f"<h3>Seeds</h3>{_replicates(node)}</section>")


def _suite_row(result: SuiteResult) -> str:
    return (
        f'<tr data-suite="{esc(result.suite)}"><th scope="row">{_text(result.suite)}</th><td>{esc(_kind(result))}</td>'
        f'<td class="num">{_num(result.value)} [{_num(result.ci_low)}, {_num(result.ci_high)}]</td>'
        f'<td class="num">{result.n_prompts} × {result.n_samples}</td>'
        f'<td class="num">{_num(result.mean_length, 1)}</td>'
        f'<td class="num">{_num(result.format_valid_rate)}</td><td class="num">{_num(result.weight)}</td></tr>'
    )


def _kind(result: SuiteResult) -> str:
    return f"pass@{result.k}" if result.kind == MetricKind.PASS_AT_K else result.kind.value


def _change(before: Evaluation, after: Evaluation) -> str:
    """"Overall Δ +0.012, mean length −3.1%": how `after` differs from `before`."""
    text = f"Overall Δ {after.overall - before.overall:+.3f}"
    if before.mean_length > 0:
        text += f", mean length {100 * (after.mean_length / before.mean_length - 1):+.1f}%"
    return text


def _replicates(node: Node) -> str:
    """The node's own evaluation and each fresh-seed replicate, with their mean."""
    if not node.replicates:
        return ('<p class="note">one seed: no fresh-seed replicates (the root is trained with the run\'s root seeds, '
                "the node reported as the best is re-trained with fresh seeds)</p>")
    evaluations = [("own (the seed it was picked on)", node.evaluation),
                   *((f"replicate {i}", e) for i, e in enumerate(node.replicates, 1))]
    rows = [f'<tr><td>{esc(label)}</td><td class="num">{e.seed}</td><td class="num">{esc(overall_text(e))}</td>'
            f'<td class="num">{_num(e.mean_length, 1)}</td><td class="num">{_num(_utility(e), 4)}</td></tr>'
            for label, e in evaluations]
    finite = [e for _, e in evaluations if is_finite(e.overall)]
    mean = (sum(e.overall for e in finite) / len(finite)) if finite else None
    length = (sum(e.mean_length for e in finite) / len(finite)) if finite else None
    foot = (f'<tr class="mean"><th scope="row" colspan="2">mean over {len(finite)} seeds</th>'
            f'<td class="num">{_num(mean)}</td><td class="num">{_num(length, 1)}</td>'
            f'<td class="num">{_num(seed_mean(node), 4)}</td></tr>')
    return _table(("evaluation", "seed", "Overall [95% CI]", "mean length", "utility"), rows,
                  ' id="replicates" class="replicates"', foot)


def _utility(evaluation: Evaluation) -> float:
    return evaluation.utility if evaluation.utility is not None else evaluation.overall


def _reflection_section(node: Node) -> str:
    reflection = node.reflection
    if reflection is None:
        return '<section id="reflection"><h2>Reflection</h2><p class="note">not reflected yet</p></section>'
    diagnoses = "".join(f"<li>{_text(d)}</li>" for d in reflection.diagnoses)
    effects = [
        f'<tr class="effect effect-{esc(e.effect.value)}"><td><code>{_text(e.mechanism)}</code></td>'
        f'<td>{esc(e.effect.value)}</td><td class="num">{_num(e.confidence, 2)}</td><td>{_text(e.evidence)}</td></tr>'
        for e in reflection.effects
    ]
    verdicts = _table(("mechanism", "effect", "confidence", "evidence"), effects, ' class="effects"') if effects \
        else '<p class="note">no mechanism verdicts</p>'
    return (f'<section id="reflection"><h2>Reflection</h2><p class="note">by {_text(reflection.generator)}</p>'
            f"{_prose(reflection.text)}" + (f"<h3>Diagnoses</h3><ul>{diagnoses}</ul>" if diagnoses else "")
            + f"<h3>Mechanism verdicts</h3>{verdicts}</section>")


def _llm_section(node: Node) -> str:
    rows = []
    for call in node.llm_calls:
        outcome = "ok" if call.ok else f"failed: {_long_text(call.error, 'error')}" if call.error else "failed"
        cache = f" (+{call.cache_read_tokens} cached)" if call.cache_read_tokens else ""
        rows.append(
            f'<tr class="{"ok" if call.ok else "fail"}"><td>{esc(call.operator)}</td><td>{_text(call.prompt or "—")}'
            f"</td><td>{esc(call.provider)}:{_text(call.model)}</td><td class=\"num\">{call.attempt}</td>"
            f'<td class="num">{call.input_tokens}{cache} / {call.output_tokens}</td>'
            f'<td class="num">{_num(call.latency_s, 2)} s</td>'
            f'<td class="num">{"$" + format(call.cost_usd, ".4f") if call.priced else "unpriced"}</td>'
            f"<td>{outcome}</td></tr>"
        )
    cost = node.cost
    if rows:
        calls = _table(("operator", "prompt", "model", "answer", "tokens in / out", "latency", "cost", "outcome"),
                       rows, ' class="llm-calls"')
        calls += (f"<p>{len(rows)} requests · {cost.llm_input_tokens} input and {cost.llm_output_tokens} output "
                  f"tokens · ${cost.llm_usd:.4f}</p>")
    else:
        calls = '<p class="note">no agent-LLM requests (offline operators)</p>'
    phases = [f'<tr><td>{esc(phase.value)}</td><td class="num">{_num(seconds, 1)}</td></tr>'
              for phase, seconds in cost.phase_seconds.items()]
    seconds = _table(("phase", "seconds"), phases, ' class="phase-seconds"') if phases \
        else '<p class="note">no phase times recorded</p>'
    if cost.gpu_seconds:
        seconds += f'<p class="gpu-seconds">training held GPUs for {cost.gpu_seconds / 3600:.2f} GPU-hours</p>'
    return f'<section id="llm"><h2>Agent-LLM requests and cost</h2>{calls}<h3>Time per phase</h3>{seconds}</section>'


# ------------------------------------------------------------------------------------------------ compare


def _compare_form(store: ArchiveStore, run_id: str, a: str, b: str) -> str:
    """Two pickers of the run's nodes: a plain GET form, no script."""
    ids = [n.node_id for n in store.nodes(run_id)]

    def picker(name: str, chosen: str) -> str:
        options = "".join(f'<option value="{esc(i)}"{" selected" if i == chosen else ""}>{esc(i)}</option>'
                          for i in ids)
        return f'<label>{name} <select name="{name}">{options}</select></label>'

    return (f'<form class="compare-picker" method="get" action="{esc(url("runs", run_id, "compare"))}">'
            f'{picker("a", a)} {picker("b", b)} <button type="submit">compare</button>'
            f' <a href="{esc(_compare_url(run_id, b, a))}">swap</a></form>')


def _compare_metrics(a: Node, b: Node) -> str:
    ea, eb = a.evaluation, b.evaluation
    if ea is None and eb is None:
        return '<p class="note">neither node is evaluated yet</p>'
    suites = list(dict.fromkeys([*(ea.suites if ea else {}), *(eb.suites if eb else {})]))

    def cell(evaluation: Evaluation | None, suite: str) -> str:
        result = evaluation.suites.get(suite) if evaluation else None
        if result is None:
            return '<td class="num">—</td>'
        return f'<td class="num">{_num(result.value)} [{_num(result.ci_low)}, {_num(result.ci_high)}]</td>'

    def delta(x: float | None, y: float | None, digits: int = 3) -> str:
        ok = is_finite(x) and is_finite(y)
        return f'<td class="num delta">{format(y - x, f"+.{digits}f") if ok else "—"}</td>'

    rows = []
    for suite in suites:
        ra, rb = (e.suites.get(suite) if e else None for e in (ea, eb))
        kind = _kind(ra or rb)
        rows.append(f'<tr data-suite="{esc(suite)}"><th scope="row">{_text(suite)}</th><td>{esc(kind)}</td>'
                    f"{cell(ea, suite)}{cell(eb, suite)}"
                    f"{delta(ra.value if ra else None, rb.value if rb else None)}</tr>")

    def summary(label: str, css: str, x: str, y: str, d: str) -> str:
        return f'<tr class="{css}"><th scope="row" colspan="2">{label}</th><td class="num">{x}</td>' \
               f'<td class="num">{y}</td>{d}</tr>'

    overall = [esc(overall_text(e)) if e else "—" for e in (ea, eb)]
    lengths = [_num(e.mean_length, 1) if e else "—" for e in (ea, eb)]
    utilities = [finite_utility(n, seed_mean) for n in (a, b)]
    change = "—"
    if ea and eb and ea.mean_length > 0:
        change = f"{100 * (eb.mean_length / ea.mean_length - 1):+.1f}%"
    foot = (summary("Overall", "overall", *overall, delta(ea.overall if ea else None, eb.overall if eb else None))
            + summary("mean length", "length", *lengths, f'<td class="num delta">{change}</td>')
            + summary("utility (mean over seeds)", "utility", *(_num(u, 4) for u in utilities),
                      delta(*utilities, digits=4)))
    return _table(("suite", "metric", f"a: {a.node_id}", f"b: {b.node_id}", "b − a"), rows,
                  ' id="metrics" class="metrics compare"', foot)


# ------------------------------------------------------------------------------------------------- charts


def _fit(values: Sequence[float], px_lo: float, px_hi: float, pad: float = 0.05) -> Scale:
    """`Scale.fit`, with values equal up to rounding noise taken as one value (so it gets a padded interval,
    never a span so narrow that every tick label reads the same)."""
    if values and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values)), abs(min(values))):
        values = [values[0]]
    return Scale.fit(values, px_lo, px_hi, pad)


def _tick_labels(values: Sequence[float]) -> list[str]:
    """Tick labels with as many decimals as the tick step needs, so neighbours never read the same."""
    if len(values) < 2:
        return [format_number(v) for v in values]
    step = (values[-1] - values[0]) / (len(values) - 1)
    decimals = min(10, max(0, -math.floor(math.log10(step) + 1e-9)))
    return [f"{v:.{decimals}f}" for v in values]


def _axes(x: Scale, y: Scale, x_label: str, y_label: str = "", integer_x: bool = False) -> list[str]:
    parts = [svg_line(x.px_lo, y.px_lo, x.px_hi, y.px_lo, stroke="#333"),
             svg_line(x.px_lo, y.px_lo, x.px_lo, y.px_hi, stroke="#333")]
    x_ticks = ticks(x.lo, x.hi, integer=integer_x)
    for tick, label in zip(x_ticks, _tick_labels(x_ticks), strict=True):
        parts.append(svg_line(x(tick), y.px_lo, x(tick), y.px_lo + 4, stroke="#333"))
        parts.append(svg_text(x(tick), y.px_lo + 15, label, text_anchor="middle", fill="#444"))
    y_ticks = ticks(y.lo, y.hi, target=4)
    for tick, label in zip(y_ticks, _tick_labels(y_ticks), strict=True):
        parts.append(svg_line(x.px_lo, y(tick), x.px_hi, y(tick), stroke="#eee"))
        parts.append(svg_text(x.px_lo - 5, y(tick) + 4, label, text_anchor="end", fill="#444"))
    parts.append(svg_text((x.px_lo + x.px_hi) / 2, y.px_lo + 30, x_label, text_anchor="middle"))
    if y_label:
        lx, ly = x.px_lo - 48, (y.px_lo + y.px_hi) / 2
        parts.append(svg_text(lx, ly, y_label, text_anchor="middle", transform=f"rotate(-90 {lx:.1f} {ly:.1f})"))
    return parts


def _svg(attrs: dict[str, object], title: str, width: float, height: float, parts: Iterable[str]) -> str:
    body = svg_tag("title", {}, esc(title)) + svg_text(8, 16, title, font_weight="600") + "".join(parts)
    frame = {**attrs, "xmlns": "http://www.w3.org/2000/svg", "role": "img", "width": width, "height": height,
             "viewBox": f"0 0 {width:g} {height:g}", "font-family": "system-ui, sans-serif", "font-size": 11}
    return svg_tag("svg", frame, body)


def _curves_section(series: Sequence[Series]) -> str:
    trained = [s for s in series if s.node.trajectory is not None]
    if not trained:
        return '<section id="curves"><h2>Training curves</h2><p class="note">not trained yet</p></section>'
    notes = []
    for s in trained:
        t = s.node.trajectory
        notes.append(f"{s.label}: protocol {t.protocol}, seed {t.seed}, {len(t.steps)} steps, "
                     f"{format_number(t.wall_s, 1)} s" + (f"; aborted: {t.abort_reason or 'no reason given'}"
                                                          if t.aborted else ""))
    extras = sorted({k for s in trained for step in s.node.trajectory.steps for k in step.extra})
    charts = [_curve_chart(key, field, label, series) for key, field, label in CURVES]
    charts += [_curve_chart(key, field, label, series) for key, field, label in OPTIONAL_CURVES
               if any(finite_points(s.node.trajectory, field) for s in trained)]
    more = [_curve_chart(name, name, name, series) for name in extras]
    more_charts = (f'<details class="extra-curves"><summary>{len(more)} more metrics the trainer logged</summary>'
                   f'<div class="charts">{"".join(more)}</div></details>') if more else ""
    listed = "".join(f"<li>{_text(n)}</li>" for n in notes)
    return (f'<section id="curves"><h2>Training curves</h2><ul class="runs">{listed}</ul>'
            f'<div class="charts">{"".join(charts)}</div>{more_charts}</section>')


def _curve_chart(key: str, field: str, label: str, series: Sequence[Series]) -> str:
    """One metric over steps, one line per series (colour + dash + legend); a note where nothing is recorded."""
    drawn = [(s, finite_points(s.node.trajectory, field)) for s in series]
    if not any(points for _, points in drawn):
        return f'<p class="not-recorded" data-metric="{esc(key)}">{esc(label)}: not recorded</p>'
    width, left, right, top, bottom = 340.0, 56.0, 330.0, 30.0, 160.0
    x = _fit([p[0] for _, points in drawn for p in points], left, right, pad=0.0)
    y = _fit([p[1] for _, points in drawn for p in points], bottom, top)
    parts = _axes(x, y, "step", integer_x=True)
    legend_top = bottom + 46
    for i, (s, points) in enumerate(drawn):
        stroke = {"stroke": s.colour, "stroke-dasharray": s.dash, "stroke-width": 1.8}
        xy = [(x(step), y(value)) for step, value in points]
        if len(xy) > 1:
            parts.append(svg_tag("polyline", {"class": "series", "data-series": s.node.node_id, "fill": "none",
                                              "points": svg_points(xy), **stroke},
                                 svg_tag("title", {}, esc(f"{s.label}: {label}"))))
        parts += [svg_tag("circle", {"cx": px, "cy": py, "r": 2.5, "fill": s.colour}) for px, py in xy[:1] + xy[-1:]]
        ly = legend_top + 15 * i
        skipped = _non_finite(s.node.trajectory, field)
        note = (" (not recorded)" if not points else "") + (f" ({skipped} non-finite not drawn)" if skipped else "")
        parts.append(svg_line(left, ly, left + 26, ly, **stroke))
        parts.append(svg_text(left + 32, ly + 4, s.label + note, fill="#222"))
    height = legend_top + 15 * len(drawn)
    return _svg({"class": "curve", "data-metric": key}, label, width, height, parts)


def _non_finite(trajectory: TrainingTrajectory | None, field: str) -> int:
    if trajectory is None:
        return 0
    try:
        values = trajectory.curve(field)
    except KeyError:
        return 0
    return sum(v is not None and not math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------------ figures


def _length_objective(config: RunConfig | None) -> bool:
    return config is not None and config.objective.kind == "length"


def _point(run_id: str, node: Node, x: float, y: float, tooltip: str, css: str, r: float = 5.0,
           fill: str = "#1f77b4", stroke: str = "#fff", stroke_width: float = 1.0) -> str:
    """A figure's point: a link to the node's page, its tooltip the node and its values."""
    circle = svg_tag("circle", {"class": css, "cx": x, "cy": y, "r": r, "data-node-id": node.node_id, "fill": fill,
                                "stroke": stroke, "stroke-width": stroke_width}, svg_tag("title", {}, esc(tooltip)))
    return svg_tag("a", {"class": "pt", "href": _node_url(run_id, node.node_id)}, circle)


def _seed_note(node: Node) -> str:
    scores = seed_scores(node)
    return f"\nmean utility over {len(scores)} seeds {format_number(seed_mean(node), 4)}" if len(scores) > 1 else ""


def _cumulative_best_svg(run_id: str, nodes: Sequence[Node], root: Node | None) -> str:
    title = "Cumulative best utility vs depth"
    attrs = {"id": "fig-cumulative-best", "class": "figure"}
    frontier = cumulative_best(nodes, seed_mean)
    if not frontier:
        return _svg(attrs, title, 460, 80, [svg_text(20, 55, "no node has a utility yet", fill="#888")])
    scored = [(n, u) for n in nodes if (u := finite_utility(n, seed_mean)) is not None]
    root_level = finite_utility(root, seed_mean) if root is not None else None
    width, height = 600.0, 340.0
    x = Scale(frontier[0][0] - 0.5, frontier[-1][0] + 0.5, 70, width - 20)
    y = _fit([u for _, u in scored] + ([root_level] if root_level is not None else []), height - 50, 34)
    parts = _axes(x, y, "depth", "utility", integer_x=True)
    if root_level is not None:
        parts.append(svg_line(x.px_lo, y(root_level), x.px_hi, y(root_level), stroke="#222", stroke_dasharray="6 4",
                              class_="root-level"))
        parts.append(svg_text(x.px_hi - 4, y(root_level) - 5, f"root (GRPO) {format_number(root_level)}",
                              text_anchor="end", fill="#444"))
    parts += [_point(run_id, n, x(n.genealogy.depth), y(u), node_tooltip(n, n is root) + _seed_note(n),
                     "utility-point", r=3.5, fill="#bbb") for n, u in scored]
    steps = [frontier[0]]
    for (_, before), (depth, best) in zip(frontier, frontier[1:], strict=False):
        steps += [(depth, before), (depth, best)]
    data = " ".join(f"{d}:{b:.6g}" for d, b in frontier)
    parts.append(svg_tag("polyline", {"class": "frontier", "data-best": data, "fill": "none", "stroke": "#1f77b4",
                                      "stroke-width": 2, "points": svg_points((x(d), y(b)) for d, b in steps)}))
    for depth, best in frontier:
        holder = next(n for n, u in scored if n.genealogy.depth <= depth and u == best)
        tooltip = (f"depth ≤ {depth}: best {format_number(best, 4)} at {holder.node_id} · {holder.proposal.name}"
                   + _seed_note(holder))
        parts.append(_point(run_id, holder, x(depth), y(best), tooltip, "frontier-point", r=4.5))
    return _svg(attrs, title, width, height, parts)


def _seed_evaluations(node: Node) -> list[Evaluation]:
    """The node's evaluations (its own, then its replicates') with a finite Overall and mean length."""
    return [e for e in (node.evaluation, *node.replicates)
            if e is not None and is_finite(e.overall) and is_finite(e.mean_length)]


def _at_seed_mean(node: Node) -> Node:
    """The node with its evaluation's Overall and mean length replaced by their means over its seeds."""
    evaluations = _seed_evaluations(node)
    if len(evaluations) < 2:
        return node
    overall = sum(e.overall for e in evaluations) / len(evaluations)
    length = sum(e.mean_length for e in evaluations) / len(evaluations)
    return node.model_copy(update={"evaluation": node.evaluation.model_copy(
        update={"overall": overall, "mean_length": length, "overall_ci": None})})


def _accuracy_length_svg(run_id: str, nodes: Sequence[Node], root: Node | None, config: RunConfig | None) -> str:
    title = "Accuracy (Overall) vs mean response length"
    attrs = {"id": "fig-accuracy-length", "class": "figure"}
    plotted = [_at_seed_mean(n) for n in nodes
               if n.evaluation is not None and is_finite(n.evaluation.overall) and is_finite(n.evaluation.mean_length)]
    if not plotted:
        return _svg(attrs, title, 460, 80, [svg_text(20, 55, "no evaluated nodes yet", fill="#888")])
    floor = None
    if _length_objective(config) and (stick := yardstick(root)) is not None:
        floor = stick.overall - config.objective.accuracy_tolerance
    width, height = 600.0, 360.0
    x = _fit([n.evaluation.mean_length for n in plotted], 70, width - 30)
    y = _fit([n.evaluation.overall for n in plotted] + ([floor] if floor is not None else []), height - 50, 34)
    parts = _axes(x, y, "mean response length (tokens)", "Overall")
    front = pareto_front(plotted)
    if len(front) > 1:
        xy = [(x(n.evaluation.mean_length), y(n.evaluation.overall)) for n in front]
        parts.append(svg_tag("polyline", {"class": "pareto-front", "points": svg_points(xy), "fill": "none",
                                          "stroke": FRONT_COLOUR, "stroke-width": 1.5, "stroke-dasharray": "5 3",
                                          "data-nodes": " ".join(n.node_id for n in front)}))
    if floor is not None:
        parts.append(svg_line(x.px_lo, y(floor), x.px_hi, y(floor), class_="accuracy-floor", stroke="#888",
                              stroke_dasharray="2 3", data_floor=f"{floor:.6g}"))
        parts.append(svg_text(x.px_hi, y(floor) - 4, f"accuracy floor {format_number(floor)} (GRPO − tolerance)",
                              text_anchor="end", fill="#444"))
    on_front = {n.node_id for n in front}
    originals = {n.node_id: n for n in nodes}
    for node in plotted:
        px, py = x(node.evaluation.mean_length), y(node.evaluation.overall)
        is_root = root is not None and node.node_id == root.node_id
        original = originals[node.node_id]
        tooltip = node_tooltip(original, is_root)
        if node is not original:
            tooltip += (f"\nplotted at the mean over {len(_seed_evaluations(original))} seeds: Overall "
                        f"{format_number(node.evaluation.overall)}, length "
                        f"{format_number(node.evaluation.mean_length, 1)}")
        css = "point" + (" root" if is_root else "") + (" front" if node.node_id in on_front else "")
        outline = {"stroke": FRONT_COLOUR, "stroke_width": 2.0} if node.node_id in on_front else {}
        parts.append(_point(run_id, node, px, py, tooltip, css, fill=ROOT_COLOUR if is_root else "#1f77b4",
                            **outline))
        if is_root or node.node_id in on_front:
            parts.append(svg_text(px + 7, py - 6, node.node_id, fill="#444"))
    return _svg(attrs, title, width, height, parts)
