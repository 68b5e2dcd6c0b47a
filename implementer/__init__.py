"""Implementer service: proposal -> candidate module, verification in the sandbox, bounded correction."""
