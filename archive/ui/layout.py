"""What every UI page shares: the HTML frame with its navigation, escaping, and the error a page raises.

Pages are plain HTML rendered on the server; `static/ui.js` adds the live parts (polling JSON, the tree's zoom
and pan) and `static/ui.css` the look. No page loads anything from another origin (docs/ui.md).
"""

from __future__ import annotations

import html
from urllib.parse import quote

STATIC_PREFIX = "/static"


class NotFound(Exception):
    """A run or node the archive does not have; the message is shown to the person, with where to go instead."""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def url(*parts: str) -> str:
    """A path under the UI from raw parts, each percent-encoded: url("runs", run_id, "nodes", node_id)."""
    return "/" + "/".join(quote(part, safe="") for part in parts)


def page(title: str, body: str, run_id: str | None = None, live: dict[str, str] | None = None,
         active: str = "") -> str:
    """A whole page. `run_id` adds the run's navigation (overview, tree, figures); `live` becomes data- attributes
    on <body> that ui.js reads (e.g. {"overview": "/ui/runs/r/overview.json"})."""
    nav = [f'<a href="/" class="{"on" if active == "runs" else ""}">runs</a>']
    if run_id is not None:
        for name, target in (("overview", url("runs", run_id)), ("tree", url("runs", run_id, "tree")),
                             ("figures", url("runs", run_id, "figures"))):
            nav.append(f'<a href="{target}" class="{"on" if active == name else ""}">{name}</a>')
    data = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in (live or {}).items())
    heading = f'<span class="run">{esc(run_id)}</span>' if run_id is not None else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · POISE</title>"
        f'<link rel="stylesheet" href="{STATIC_PREFIX}/ui.css">'
        f'<script defer src="{STATIC_PREFIX}/ui.js"></script>'
        f"</head><body{data}>"
        f'<header><a class="brand" href="/">POISE</a>{heading}<nav>{"".join(nav)}</nav></header>'
        f"<main>{body}</main></body></html>\n"
    )


def message_page(title: str, message: str, status_hint: str = "", run_id: str | None = None) -> str:
    """An error or empty state a person understands: what is wrong and where to go; never a stack trace."""
    hint = f"<p>{status_hint}</p>" if status_hint else ""
    return page(title, f'<section class="message"><h1>{esc(title)}</h1><p>{esc(message)}</p>{hint}</section>',
                run_id=run_id)
