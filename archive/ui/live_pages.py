"""The live pages of the UI: the runs of the archive, a run's overview, and its lineage tree.

Pure functions: a store in, HTML or JSON-ready dicts out (the router in app.py serves them). Each page comes
complete from the server; `static/ui.js` keeps it current by polling its JSON twin:

- the overview's parts are HTML fragments rendered here, once, for the page and for `overview_json` alike, and
  the script only swaps each part's innerHTML (ids in `OVERVIEW_PARTS`);
- the tree's JSON carries every node's place (x = depth, y = row of a tidy layout) and fill colour, so the
  script only draws it.

Both stay cheap at ten thousand nodes: the overview reads `run_status` (counters, scores, a few documents),
the failed nodes and a few timestamps; the tree reads `lineage_entries`, the store's `lineage` where it has one.
Names, reasons and ids come from candidates and LLMs: every string reaches the page through `esc`.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from archive.report import FAILED_FILL, PENDING_FILL, SCALE_STOPS, format_number, scale_colour
from archive.status import run_status
from archive.ui.layout import NotFound, esc, page, url
from archive.update import IN_FLIGHT
from poise.contracts import (
    PIPELINE,
    ROOT_ID,
    Node,
    NodeStatus,
    RunConfig,
    RunStatus,
    utc_now,
)
from poise.objective import describe
from poise.store import ArchiveStore, LineageEntry

JSON_PREFIX = "/ui"  # where the router serves the pages' JSON twins
OVERVIEW_PARTS = ("state", "counts", "budget", "nodes-total", "timing", "best", "llm", "failures")
MAX_FAILURES_SHOWN = 100
MIN_EVALUATED_FOR_ESTIMATE = 2  # one evaluated candidate says little about the next ones
IN_PIPELINE = (*sorted(IN_FLIGHT, key=PIPELINE.index), NodeStatus.EVALUATED)  # evaluated: reflection pending
STATUS_ORDER = (*PIPELINE, NodeStatus.FAILED)


# ------------------------------------------------------------------------------------------- addresses


def overview_json_url(run_id: str) -> str:
    return JSON_PREFIX + url("runs", run_id, "overview.json")


def tree_json_url(run_id: str) -> str:
    return JSON_PREFIX + url("runs", run_id, "tree.json")


def node_link(run_id: str, node_id: str, text: str | None = None) -> str:
    return f'<a href="{url("runs", run_id, "nodes", node_id)}">{esc(text or node_id)}</a>'


def run_config(store: ArchiveStore, run_id: str) -> RunConfig:
    """The run's configuration; NotFound, naming the runs the archive has, for a run it does not."""
    config = store.get_run(run_id)
    if config is None:
        known = ", ".join(store.run_ids()) or "none yet"
        raise NotFound(f"no run {run_id!r} in this archive; known runs: {known}")
    return config


# ------------------------------------------------------------------------------------------- run state


@dataclass(frozen=True)
class RunState:
    """Whether a run is going on, read from the archive alone: `label` is starting, running, confirming, idle or
    finished."""

    label: str
    reason: str

    @property
    def finished(self) -> bool:
        return self.label == "finished"


def run_state(store: ArchiveStore, config: RunConfig, status: RunStatus, root: Node | None) -> RunState:
    """The run's state from its stored nodes. The archive service's own stop reason is not stored, so a run
    with nothing in the pipeline and budget left is `idle`: a proposal is being written, or nothing drives it."""
    if root is None:
        return RunState("starting", "the root (GRPO) is not in the archive yet")
    if root.failure is not None:
        return RunState("finished", f"the root (GRPO) failed in {root.failure.phase}: {root.failure.reason}")
    pipeline = [(s, status.counts[s]) for s in IN_PIPELINE if status.counts[s]]
    if pipeline:
        where = ", ".join(f"{n} {s}" for s, n in pipeline)
        return RunState("running", f"{sum(n for _, n in pipeline)} in the pipeline ({where})")
    # The budget as the archive service counts it: children carrying an evaluation, failed ones included (or
    # with racing, their trainings).
    evaluated = store.counters(status.run_id).evaluated - (root.evaluation is not None)
    if (status.budget.reached if status.budget.trainings is not None else evaluated >= status.budget.total):
        reached = (f"budget reached: {evaluated} of {status.budget.total} candidates evaluated"
                   if status.budget.trainings is None else
                   f"budget reached: {status.budget.trainings} of {status.budget.total} trainings")
        leader = status.leader  # the best single seed: the archive service re-trains it before it finishes
        fresh = leader.seeds - 1 if leader else config.replicate_seeds
        if fresh < config.replicate_seeds:
            return RunState("confirming", f"{reached}; {leader.node_id} is re-trained with fresh seeds ({fresh} of "
                                          f"{config.replicate_seeds} so far, fewer if a re-training failed)")
        return RunState("finished", reached)
    llm = status.llm
    if llm.cap_usd is not None and llm.usd >= llm.cap_usd:
        return RunState("finished", f"the agent-LLM cost cap is reached (${llm.usd:.4f} of ${llm.cap_usd:.2f})")
    failed = status.counts[NodeStatus.FAILED]
    also = f"; {failed} candidates failed" if failed else ""
    return RunState("idle", "nothing in the pipeline: the next proposal is being written, or no process drives "
                            f"the run (`poise run` resumes it){also}")


def _state_html(state: RunState) -> str:
    return f'<span class="state state-{esc(state.label)}">{esc(state.label)}</span> {esc(state.reason)}'


# ------------------------------------------------------------------------------------------- runs page


def render_runs_page(store: ArchiveStore) -> str:
    """Every run of the archive: its state, budget used, and best node with its verdict against GRPO."""
    run_ids = store.run_ids()
    if not run_ids:
        return page("runs", '<section class="message"><h1>No runs yet</h1><p>This archive holds no run. Start '
                            "one with <code>poise run --run-dir runs/NAME --budget 8</code> (embedded), or "
                            "<code>POST /api/runs</code> to a distributed archive; it appears here as soon as its "
                            "first node is stored.</p></section>", active="runs")
    rows = []
    for run_id in run_ids:
        status = run_status(store, run_id)
        state = run_state(store, store.get_run(run_id), status, store.get_node(run_id, ROOT_ID))
        best = status.best
        best_cell = ("—" if best is None else
                     f"{node_link(run_id, best.node_id)} {esc(best.name)} · {esc(format_number(best.utility, 4))}")
        rows.append(
            f'<tr data-run="{esc(run_id)}"><td><a href="{url("runs", run_id)}">{esc(run_id)}</a></td>'
            f"<td>{_state_html(state)}</td>"
            f'<td class="num">{status.budget.used} / {status.budget.total}</td>'
            f'<td class="num">{sum(status.counts.values())}</td>'
            f"<td>{best_cell}</td><td>{_verdict_html(best.verdict) if best else '—'}</td>"
            f"<td>{esc(status.protocol)}</td></tr>")
    table = ('<table class="runs"><thead><tr><th>run</th><th>state</th><th>evaluated / budget</th><th>nodes</th>'
             f"<th>best node</th><th>against GRPO</th><th>protocol</th></tr></thead><tbody>{''.join(rows)}</tbody>"
             "</table>")
    return page("runs", f"<h1>Runs</h1>{table}", active="runs")


def _verdict_html(verdict: str) -> str:
    kind = verdict.split()[0].lower() if verdict else ""
    kind = kind if kind in ("better", "worse", "indistinguishable") else "open"
    return f'<span class="verdict verdict-{kind}">{esc(verdict)}</span>'


# ------------------------------------------------------------------------------------------- overview


def overview_json(store: ArchiveStore, run_id: str, now: datetime | None = None) -> dict:
    """The overview's live data: the parts as HTML fragments (by element id), and the numbers they show.

    {"run_id", "state": label, "finished": bool, "counts": {status: n}, "total_nodes": n,
     "budget": {"total", "evaluated", "parallel"}, "fragments": {id: html for id in OVERVIEW_PARTS}}
    """
    return _overview(store, run_config(store, run_id), now)


def render_overview_page(store: ArchiveStore, run_id: str, now: datetime | None = None) -> str:
    config = run_config(store, run_id)
    parts = _overview(store, config, now)["fragments"]
    setup = (f"protocol {config.protocol} · seed {config.seed} · parent selection {config.parent_selection} · "
             f"parallel {config.parallel} · objective: {describe(config.objective)}")
    body = (
        f'<h1>Run {esc(run_id)}</h1><p id="state" class="run-state">{parts["state"]}</p>'
        f'<p class="setup">{esc(setup)}</p>'
        '<div class="panels">'
        f'<section class="panel"><h2>Candidates</h2><ul id="counts" class="counts">{parts["counts"]}</ul>'
        f'<div id="budget">{parts["budget"]}</div>'
        f'<p>nodes in the archive: <span id="nodes-total">{parts["nodes-total"]}</span></p></section>'
        f'<section class="panel"><h2>Time</h2><div id="timing">{parts["timing"]}</div></section>'
        f'<section class="panel"><h2>Best node</h2><div id="best">{parts["best"]}</div></section>'
        f'<section class="panel"><h2>Agent-LLM spend</h2><div id="llm">{parts["llm"]}</div></section>'
        "</div>"
        f'<section class="panel wide"><h2>Failures</h2><div id="failures">{parts["failures"]}</div></section>'
    )
    return page(f"run {run_id}", body, run_id=run_id, live={"overview": overview_json_url(run_id)},
                active="overview")


def _overview(store: ArchiveStore, config: RunConfig, now: datetime | None) -> dict:
    run_id = config.run_id
    status = run_status(store, run_id)
    root = store.get_node(run_id, ROOT_ID)
    state = run_state(store, config, status, root)
    failed = sorted(store.nodes(run_id, NodeStatus.FAILED), key=lambda n: n.updated_at, reverse=True)
    total = sum(status.counts.values())
    fragments = {
        "state": _state_html(state),
        "counts": _counts_html(status),
        "budget": _budget_html(status),
        "nodes-total": str(total),
        "timing": _timing_html(store, status, state, root, failed, now or utc_now()),
        "best": _best_html(status),
        "llm": _llm_html(status, config),
        "failures": _failures_html(run_id, failed),
    }
    return {"run_id": run_id, "state": state.label, "finished": state.finished,
            "counts": {s.value: status.counts[s] for s in STATUS_ORDER}, "total_nodes": total,
            "budget": status.budget.model_dump(), "fragments": fragments}


def _counts_html(status: RunStatus) -> str:
    return "".join(f'<li class="count status-{s.value}" data-status="{s.value}"><span class="n">{status.counts[s]}'
                   f'</span> <span class="label">{s.value}</span></li>' for s in STATUS_ORDER)


def _budget_html(status: RunStatus) -> str:
    budget = status.budget
    counted = ("candidates evaluated" if budget.trainings is None
               else f"trainings ({budget.evaluated} children evaluated)")
    return (f'<progress max="{budget.total}" value="{min(budget.used, budget.total)}"></progress> '
            f"{budget.used} / {budget.total} {counted} · depth {status.depth}")


def _timing_html(store: ArchiveStore, status: RunStatus, state: RunState, root: Node | None,
                 failed: Sequence[Node], now: datetime) -> str:
    """Elapsed time from the root's creation; for a finished run, up to the last change among the few documents
    read (root, newest node, best, failures). The estimate: the mean time per evaluated child since the first
    child was created, times the candidates left."""
    if root is None:
        return "<p>not started</p>"
    started = root.created_at
    lines = [f"<p>started {esc(started.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>"]
    if state.finished:
        newest = store.get_node(status.run_id, _numbered(store.counters(status.run_id).max_number))
        best = store.get_node(status.run_id, status.best.node_id) if status.best else None
        ended = max(n.updated_at for n in (root, newest, best, *failed) if n is not None)
        lines.append(f'<p>ran for <b class="elapsed">{esc(duration(ended - started))}</b></p>')
        return "".join(lines)
    lines.append(f'<p>elapsed <b class="elapsed">{esc(duration(now - started))}</b></p>')
    done, left = status.budget.evaluated, status.budget.total - status.budget.used
    first = store.get_node(status.run_id, _numbered(1))
    if done < MIN_EVALUATED_FOR_ESTIMATE or first is None or left <= 0:
        why = ("every candidate is evaluated; the fresh-seed confirmation of the best remains" if left <= 0
               else f"after {MIN_EVALUATED_FOR_ESTIMATE} candidates are evaluated")
        lines.append(f'<p class="estimate">estimate: {why}</p>')
        return "".join(lines)
    per_candidate = (now - first.created_at).total_seconds() / done
    lines.append(f'<p class="estimate">estimate: about <b>{esc(duration(per_candidate * left))}</b> left for '
                 f"{left} more candidate{'s' if left != 1 else ''} ({esc(duration(per_candidate))} per evaluated "
                 "candidate so far), then the fresh-seed confirmation of the best</p>")
    return "".join(lines)


def _numbered(number: int) -> str:
    """The id of the node numbered `number`, as the archive service names children (n001, n012)."""
    return f"n{number:03d}"


def duration(span: timedelta | float) -> str:
    """A time span for people: '45 s', '3 min 20 s', '2 h 05 min', '3 d 4 h' (a timedelta or seconds)."""
    seconds = span.total_seconds() if isinstance(span, timedelta) else float(span)
    seconds = max(0, round(seconds)) if math.isfinite(seconds) else 0
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"
    return f"{seconds // 86400} d {seconds // 3600 % 24} h"


def _best_html(status: RunStatus) -> str:
    best = status.best
    if best is None:
        return "<p>no node evaluated yet</p>"
    interval = (f" [{esc(format_number(best.interval[0], 4))}, {esc(format_number(best.interval[1], 4))}] 95% CI"
                if best.interval else "")
    seeds = f"{best.seeds} seed{'s' if best.seeds != 1 else ''}"
    lines = [f'<p class="best-node">{node_link(status.run_id, best.node_id)} <b>{esc(best.name)}</b></p>',
             f'<p>utility <b class="utility">{esc(format_number(best.utility, 4))}</b>{interval} over {seeds}</p>',
             f"<p>{_verdict_html(best.verdict)}</p>"]
    if best.mechanisms:
        lines.append(f'<p class="mechanisms">{esc(", ".join(best.mechanisms))}</p>')
    root = status.root
    if root is not None and root.mean is not None and best.node_id != root.node_id:
        lines.append(f"<p>GRPO (the root): {esc(format_number(root.mean, 4))} over {len(root.scores)} "
                     f"seed{'s' if len(root.scores) != 1 else ''}</p>")
    leader = status.leader
    if leader is not None and leader.node_id != best.node_id:
        lines.append(f"<p>highest single seed: {node_link(status.run_id, leader.node_id)} {esc(leader.name)} · "
                     f"{esc(format_number(leader.utility, 4))}</p>")
    return "".join(lines)


def _llm_html(status: RunStatus, config: RunConfig) -> str:
    """Requests and spend per operator, each against the run's one cap (`llm_budget_usd`) when it has one."""
    llm, cap = status.llm, config.llm_budget_usd
    rows = []
    for operator, agent in llm.agents.items():
        spend = llm.per_operator.get(operator)
        calls, failed, usd = (spend.calls, spend.failed, spend.usd) if spend else (0, 0, 0.0)
        share = f'<td class="num">{100 * usd / cap:.1f}%</td>' if cap else ""
        rows.append(f'<tr data-operator="{esc(operator)}"><td>{esc(operator)}</td><td>{esc(agent)}</td>'
                    f'<td class="num">{calls}</td><td class="num">{failed}</td><td class="num">${usd:.4f}</td>'
                    f"{share}</tr>")
    if cap is None:
        total = " (no cost cap)"
    else:
        total = f' <meter min="0" max="{cap:g}" value="{min(llm.usd, cap):g}"></meter> of the ${cap:.2f} cap'
    unpriced = f"; {llm.unpriced_calls} requests to models with no price on file" if llm.unpriced_calls else ""
    return ('<table class="llm"><thead><tr><th>operator</th><th>agent</th><th>requests</th><th>failed</th>'
            f"<th>USD</th>{'<th>of the cap</th>' if cap else ''}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f'<p>total <b class="usd">${llm.usd:.4f}</b>{total}{esc(unpriced)}</p>')


def _failures_html(run_id: str, failed: Sequence[Node]) -> str:
    """The failed nodes, most recent first: when, node, name, phase and reason."""
    if not failed:
        return "<p>no failures</p>"
    rows = [f'<tr data-node="{esc(n.node_id)}"><td>{esc(n.updated_at.strftime("%m-%d %H:%M:%S"))}</td>'
            f"<td>{node_link(run_id, n.node_id)}</td><td>{esc(n.proposal.name)}</td>"
            f'<td class="phase">{esc(n.failure.phase)}</td><td class="reason">{esc(n.failure.reason)}</td></tr>'
            for n in failed[:MAX_FAILURES_SHOWN]]
    more = (f"<p>and {len(failed) - MAX_FAILURES_SHOWN} earlier failures</p>"
            if len(failed) > MAX_FAILURES_SHOWN else "")
    return ('<table class="failures"><thead><tr><th>at (UTC)</th><th>node</th><th>name</th><th>phase</th>'
            f"<th>reason</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{more}")


# ------------------------------------------------------------------------------------------- lineage tree


def lineage_entries(store: ArchiveStore, run_id: str) -> list[LineageEntry]:
    """The run's lineage in insertion order: the store's fast `lineage` when it has one, else built from the
    whole documents (slow on large archives)."""
    return store.lineage(run_id)


def tree_layout(entries: Sequence[LineageEntry]) -> dict[str, tuple[int, float]]:
    """(x, y) of each node: x its depth; y a row of a tidy tree over each node's first stored parent, leaves on
    consecutive rows in insertion order and a parent centred on its children. O(n), no recursion."""
    known = {e.id for e in entries}
    children: dict[str | None, list[str]] = defaultdict(list)
    for entry in entries:
        children[next((p for p in entry.parents if p in known), None)].append(entry.id)
    depth = {e.id: e.depth for e in entries}
    rows: dict[str, float] = {}
    next_row = 0.0
    for top in children[None]:
        stack = [(top, False)]
        while stack:
            node_id, expanded = stack.pop()
            kids = children.get(node_id, [])
            if not kids:
                rows[node_id], next_row = next_row, next_row + 1
            elif expanded:
                rows[node_id] = (rows[kids[0]] + rows[kids[-1]]) / 2
            else:
                stack.append((node_id, True))
                stack.extend((kid, False) for kid in reversed(kids))
        next_row += 1  # a gap between separate trees (nodes whose parents are not stored)
    return {node_id: (depth[node_id], row) for node_id, row in rows.items()}


def tree_json(store: ArchiveStore, run_id: str, known_version: str | None = None) -> dict:
    """The lineage for ui.js to draw; only {"run_id", "version", "unchanged": true} when `known_version` (the
    `?version=` the script sends, the one it has drawn) is still current.

    {"run_id", "node_href": prefix of a node's page (+ node id), "root": the first node of depth 0,
     "version": a checksum of the entries (the script redraws only when it changes), "utility": {"min", "max"},
     "extent": {"x": max depth, "y": max row}, "nodes": [{id, parents, status, depth, utility, failed_phase,
     selection_score, name, x, y, colour}] in insertion order}
    """
    run_config(store, run_id)
    entries = lineage_entries(store, run_id)
    version = f"{len(entries)}-{zlib.crc32(repr(entries).encode()):08x}"
    if version == known_version:
        return {"run_id": run_id, "version": version, "unchanged": True}
    places = tree_layout(entries)
    utilities = [e.utility for e in entries if e.utility is not None]
    low, high = (min(utilities), max(utilities)) if utilities else (None, None)

    def colour(entry: LineageEntry) -> str:
        if entry.status == NodeStatus.FAILED:
            return FAILED_FILL
        if entry.utility is None:
            return PENDING_FILL
        return scale_colour((entry.utility - low) / (high - low) if high > low else 1.0)

    nodes = [{"id": e.id, "parents": list(e.parents), "status": e.status, "depth": e.depth, "utility": e.utility,
              "failed_phase": e.failed_phase, "selection_score": e.selection_score, "name": e.name,
              "x": places[e.id][0], "y": places[e.id][1], "colour": colour(e)} for e in entries]
    root = next((e.id for e in entries if e.depth == 0), None)
    return {"run_id": run_id, "node_href": url("runs", run_id, "nodes") + "/", "root": root,
            "version": version, "utility": {"min": low, "max": high},
            "extent": {"x": max((x for x, _ in places.values()), default=0),
                       "y": max((y for _, y in places.values()), default=0)},
            "nodes": nodes}


def render_tree_page(store: ArchiveStore, run_id: str) -> str:
    """The tree's frame: tools, legend and an empty <svg id="tree"> that ui.js draws from tree_json."""
    run_config(store, run_id)
    total = sum(store.counts(run_id).values())
    gradient = ", ".join(SCALE_STOPS)
    body = (
        '<h1>Lineage tree</h1>'
        '<div class="tree-bar"><div class="tree-tools" role="toolbar" aria-label="zoom">'
        '<button type="button" id="zoom-in" title="zoom in" aria-label="zoom in">+</button>'
        '<button type="button" id="zoom-out" title="zoom out" aria-label="zoom out">−</button>'
        '<button type="button" id="zoom-fit" title="show the whole tree">fit</button></div>'
        f'<span id="tree-count">{total} nodes</span>'
        '<div id="tree-legend" class="legend"><span>utility</span> <span id="utility-min">—</span>'
        f'<span class="scale" style="background: linear-gradient(to right, {gradient})"></span>'
        '<span id="utility-max">—</span>'
        f'<span class="swatch" style="background: {PENDING_FILL}"></span> not evaluated'
        f'<span class="swatch failed" style="background: {FAILED_FILL}"></span> failed (P I T E R: its phase)'
        '</div></div>'
        '<svg id="tree" role="img" aria-label="lineage tree: depth left to right; wheel or +/− to zoom, drag to pan">'
        '</svg>'
        '<p class="hint">Click a node to open it. Wheel or +/− zooms, dragging pans, fit shows everything.</p>'
        '<noscript><p class="message">The tree is drawn by the page\'s script; the figures page has a static '
        'copy.</p></noscript>'
    )
    return page(f"tree of {run_id}", body, run_id=run_id, live={"tree": tree_json_url(run_id)}, active="tree")

