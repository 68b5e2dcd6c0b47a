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
