"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    # Two OpenMP threads on two shared cores slow down several-fold as soon as another process
    # is busy (they spin-wait for each other); one thread keeps these tests fast and steady.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end modules first (in their collected order), so that with `-n 2 --dist loadfile` the two
    workers start on the long files and the short ones fill in the gaps at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
