"""`poise ui`: the web UI of the runs in one run directory, served on this machine (docs/ui.md).

It opens the directory's archive read-only, so it can run beside the `poise run` that writes it (SQLite in WAL
mode lets readers see each commit), and serves the same pages the archive service serves at `/` in the
distributed mode, plus the read-only JSON API under `/api`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from archive.api import archive_router, store_unavailable
from archive.sqlite_store import DB_FILENAME, SQLiteStore
from archive.ui.app import ui_router
from poise.store import ArchiveError


def ui_app(store: SQLiteStore) -> FastAPI:
    app = FastAPI(title="POISE", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.add_exception_handler(ArchiveError, store_unavailable)
    app.include_router(archive_router(store))   # read-only: no POST /api/runs here
    app.include_router(ui_router(store))
    return app


def serve_ui(run_dir: Path, host: str = "127.0.0.1", port: int = 8420,
             on_ready: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set (or Ctrl-C). ArchiveError when the directory holds no archive; ServeError
    (app.serve) when the port is taken."""
    from app.serve import HttpServer

    path = Path(run_dir) / DB_FILENAME
    if not path.is_file():
        raise ArchiveError(f"no run in {run_dir} (no {DB_FILENAME}): start one with `poise run --run-dir {run_dir}`")
    store = SQLiteStore(path, read_only=True)
    try:
        http = HttpServer(ui_app(store), host, port).start()
        shown = f"[{host}]" if ":" in host else host
        if on_ready is not None:
            on_ready(f"http://{shown}:{http.port}/")
        try:
            (stop or threading.Event()).wait()
        finally:
            http.stop()
    finally:
        store.close()
