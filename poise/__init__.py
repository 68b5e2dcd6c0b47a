"""POISE core: what every service shares and nothing that wires them (docs/architecture.md, "Layout").

Contracts, the algorithm interface and reference algorithms, the algorithm-description library, the bus
interface and buses, the sandbox, settings, agent-LLM clients, metrics, the archive store interface, scoring and
objectives, and the CPU testbed. It imports no service and not the composition root (`app/`).
"""
