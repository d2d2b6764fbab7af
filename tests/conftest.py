"""Test-wide settings: CPU threads per test worker, and `gpu` tests skipped without CUDA.

The suite runs in two pytest-xdist workers (``-n 2`` in pyproject.toml), one test file per worker at
a time. Each worker, and every process a test starts, gets an equal share of the CPU's cores as
its torch threads: two workers of two OpenMP threads each on a 2-core machine stall each other.
"""

from __future__ import annotations

import os

import pytest
import torch


def _threads_per_worker() -> int:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:
    _THREADS = str(_threads_per_worker())
    os.environ.setdefault("OMP_NUM_THREADS", _THREADS)  # the processes that tests start
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
