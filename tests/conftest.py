"""Shared fixtures, and the order and threads of the test run."""

import os

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


# The longest modules, longest first. `bin/test` runs two xdist workers with `--dist loadfile
# --no-loadscope-reorder`, which hands out whole files in collection order: these go first, one per worker, and
# the short files fill in behind them.
LONGEST_FIRST = ("test_vllm.py", "test_chaos.py", "test_loop.py", "test_distributed.py", "test_embedded_kills.py",
                 "test_readme.py", "test_shutdown.py", "test_llm_loop.py", "test_hostile.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    # Under xdist every worker shares the two cores with the other: one thread each for torch here and in the
    # sandboxed children (poise.sandbox.thread_cap), instead of two spinning against two.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("POISE_MAX_THREADS", "1")
        torch.set_num_threads(1)
