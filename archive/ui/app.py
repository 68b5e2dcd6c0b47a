"""The UI's routes: HTML pages, the JSON its script polls, and its two static files (docs/ui.md).

`ui_router(store)` is mounted by the archive service beside `/api` (distributed mode) and by `poise ui` on a
run directory (embedded mode, read-only beside a running `poise run`). Every page is rendered from the
store on request; a missing run or node is a page that says so (404), a store failure a page that says the
archive is unavailable (503), never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from archive.api import finite
from archive.ui import live_pages, node_pages
from archive.ui.layout import NotFound, esc, message_page, url
from poise.store import ArchiveError, ArchiveStore

log = logging.getLogger("poise.archive.ui")

STATIC_TYPES = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
# no page of the UI needs anything from another origin; the browser is told so
SECURITY_HEADERS = {
    # inline styles: the pages' own <style> and SVG style attributes; scripts only from /static
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _static(name: str) -> bytes:
    return resources.files("archive.ui").joinpath("static", name).read_bytes()


def ui_router(store: ArchiveStore) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def html(render: Callable[[], str], run_id: str | None = None) -> Response:
        try:
            body, status = render(), 200
        except NotFound as err:
            body, status = message_page("Not found", str(err), run_id=run_id,
                                        status_hint=f'<a href="{url("runs", run_id) if run_id else "/"}">back</a>'), 404
        except ArchiveError as err:
            log.warning("UI: the archive store failed: %s", err)
            body, status = message_page("Archive unavailable", f"The archive store did not answer: {err}",
                                        status_hint="The page will work again once the store is back; reload it."), 503
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)

    def data(build: Callable[[], dict]) -> Response:
        try:
            return JSONResponse(finite(build()), headers=SECURITY_HEADERS)
        except NotFound as err:
            return JSONResponse({"detail": str(err)}, status_code=404)
        except ArchiveError as err:
            return JSONResponse({"detail": f"the archive store failed: {err}"}, status_code=503)

    @router.get("/", response_class=HTMLResponse)
    def runs_page() -> Response:
        return html(lambda: live_pages.render_runs_page(store))

    @router.get("/runs/{run_id}", response_class=HTMLResponse)
    def overview_page(run_id: str) -> Response:
        return html(lambda: live_pages.render_overview_page(store, run_id), run_id)

    @router.get("/runs/{run_id}/tree", response_class=HTMLResponse)
    def tree_page(run_id: str) -> Response:
        return html(lambda: live_pages.render_tree_page(store, run_id), run_id)

    @router.get("/runs/{run_id}/figures", response_class=HTMLResponse)
    def figures_page(run_id: str) -> Response:
        return html(lambda: node_pages.render_figures_page(store, run_id), run_id)

    @router.get("/runs/{run_id}/nodes/{node_id}", response_class=HTMLResponse)
    def node_page(run_id: str, node_id: str) -> Response:
        return html(lambda: node_pages.render_node_page(store, run_id, node_id), run_id)

    @router.get("/runs/{run_id}/compare", response_class=HTMLResponse)
    def compare_page(run_id: str, a: str = "", b: str = "") -> Response:
        def render() -> str:
            if not a or not b:
                raise NotFound(f"compare needs two nodes: /runs/{run_id}/compare?a=n001&b=n002")
            return node_pages.render_compare_page(store, run_id, a, b)

        return html(render, run_id)

    @router.get("/ui/runs/{run_id}/overview.json")
    def overview_data(run_id: str) -> Response:
        return data(lambda: live_pages.overview_json(store, run_id))

    @router.get("/ui/runs/{run_id}/tree.json")
    def tree_data(run_id: str, version: str | None = None) -> Response:
        # `version`: the tree the script has drawn; an unchanged tree is answered in a few bytes
        return data(lambda: live_pages.tree_json(store, run_id, known_version=version))

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_TYPES:
            return HTMLResponse(message_page("Not found", f"no file {esc(name)} here"), status_code=404)
        return Response(_static(name), media_type=STATIC_TYPES[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @router.api_route("/{path:path}", methods=["GET"], response_class=HTMLResponse)
    def unknown(path: str) -> Response:
        if path.startswith("api/"):  # the JSON API keeps JSON answers
            return JSONResponse({"detail": f"no API route /{path}; see /api/docs"}, status_code=404)
        return HTMLResponse(message_page("Not found", f"There is no page at /{path}.",
                                         status_hint='<a href="/">all runs</a>'), status_code=404,
                            headers=SECURITY_HEADERS)

    return router
