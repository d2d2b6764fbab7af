"""Test-wide settings: CPU threads per test worker, fewer full garbage collections, test outputs
in memory, and `gpu` tests skipped without CUDA.

The suite runs in two pytest-xdist workers (``-n 2`` in pyproject.toml), one test file per
worker at a time; the files that fork from `tests.group`'s forkserver are one unit of work, run
by one worker (`pytest_xdist_make_scheduler`). Each worker, and every process a test starts,
gets an equal share of the CPU's cores as its torch threads: two workers of two OpenMP threads
each on a 2-core machine stall each other.

The tests write checkpoints (2 GB for the full-size single-file test, 6 GB in all): on a
machine with a RAM disk (``/dev/shm`` with room to spare) their temporary folders live there,
about seven times faster to write than this machine's disk. A passing test's folder is removed
when it ends (``tmp_path_retention_policy = "failed"`` in pyproject.toml), so the RAM disk holds
only the running tests' and the shared fixtures' files, and a passing run leaves nothing there.
``--basetemp`` overrides the choice.

Python's cyclic garbage collector scans every live object in a full collection, and by default
starts one each time a quarter more objects have survived into its oldest generation. A test
process holds about a million objects (the libraries, the test items, the models of a run) and
each run's models survive there and die: the default made about 90 full collections in a run
of the suite, 28 s of CPU time in all. At most one full collection per hundred middle ones
(`FULL_COLLECTION_EVERY`) makes about 26, 11 s in all (measured with ``gc.callbacks``); cyclic
garbage waits longer, and the suite's peak memory stays far from this machine's.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

RAM_DISK = Path("/dev/shm")
RAM_DISK_MIN_FREE = 12 * 2**30  # the largest test's files, with room for the others
_CHOSEN_BASETEMP = pytest.StashKey[Path]()  # the RAM-disk folder this run chose
FULL_COLLECTION_EVERY = 100  # middle-generation collections (Python's default: 10)

_young, _middle, _ = gc.get_threshold()
gc.set_threshold(_young, _middle, FULL_COLLECTION_EVERY)


def _threads_per_worker() -> int:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:
    _THREADS = str(_threads_per_worker())
    os.environ.setdefault("OMP_NUM_THREADS", _THREADS)  # the processes that tests start
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config: pytest.Config) -> None:
    """The test outputs on the RAM disk when there is one with room (controller only: xdist
    gives each worker a folder inside the controller's)."""
    if config.option.basetemp is not None or hasattr(config, "workerinput"):
        return
    if not (RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK)):
        return
    if shutil.disk_usage(RAM_DISK).free < RAM_DISK_MIN_FREE:
        return
    checkout = hashlib.sha256(str(config.rootpath).encode()).hexdigest()[:12]
    basetemp = RAM_DISK / f"dreamtrainer-tests-{os.getuid()}-{checkout}"
    config.option.basetemp = str(basetemp)
    config.stash[_CHOSEN_BASETEMP] = basetemp


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A passing run leaves nothing on the RAM disk (a failing one keeps its tests' folders)."""
    chosen = session.config.stash.get(_CHOSEN_BASETEMP, None)
    if chosen is not None and exitstatus == 0:
        shutil.rmtree(chosen, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The scope of every test file that forks processes from `tests.group`'s forkserver.
FORKING_SCOPE = "files that fork from tests.group"


@functools.cache
def _forks(test_file: Path) -> bool:
    return test_file.is_file() and "tests.group" in test_file.read_text(encoding="utf-8")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadfile``, except that the test files that fork from `tests.group`'s
    forkserver are one unit of work: they run in one worker, so one forkserver imports the
    libraries instead of one per worker, and two multi-process tests never run at once."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneForkserver(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return FORKING_SCOPE if _forks(config.rootpath / scope) else scope

    return OneForkserver(config, log)
