"""Reflector service: mechanism-level diagnosis of a node's trajectory and metrics against its parent."""
