"""POISE core: contracts, algorithm interface, testbed, CLI."""
