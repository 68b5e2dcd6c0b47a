"""Proposer service: parent selection, context construction, proposal generation and screening (Phase I)."""
