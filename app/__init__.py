"""The composition root: the `poise` CLI, the embedded runner, `poise serve` and the benchmarks (docs/architecture.md).

The only package that imports every service; no service and nothing in `poise/` imports it.
"""
