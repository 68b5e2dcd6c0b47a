"""Trainer service: runs a candidate under the standardized protocol (CPU testbed or VERL)."""
