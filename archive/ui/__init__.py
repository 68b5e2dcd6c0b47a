"""The live web UI of runs (docs/ui.md): server-rendered pages plus one small script, every asset served by
POISE itself. `ui_router(store)` is mounted at `/` by the archive service and by `poise ui`."""
