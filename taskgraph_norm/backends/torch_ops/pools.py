"""The executors' worker threads: the compiled executor's tile pools.  (The native
kernels' rows and columns run on torch's own threads instead: native_team.c.)

Each pool is made on first use and kept; its workers run torch ops single-threaded
(the split is the parallelism).  A call made on one of these workers (a nested
call) gets no pool, so it can never wait on itself.

Fork safety: a forked child (a DataLoader worker, ``multiprocessing`` with the
fork start method) inherits these objects but not their threads, so a task
submitted there would never run.  At the fork (``os.register_at_fork``) the child
drops every pool, without waiting on threads that do not exist, and makes its own
on first use; the lock is new too, since another thread of the parent may have
held it at the fork (docs/reliability.md).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["on_worker", "tile_pool"]

_lock = threading.Lock()
_tile_pools: dict[int, ThreadPoolExecutor] = {}
_local = threading.local()


def _serial_worker() -> None:
    _local.worker = True
    # A torch intra-op team inside every worker would oversubscribe the cores
    # (measured ~10% slower here).  Reading the count first finishes torch's lazy
    # per-thread set-up, which would otherwise reset the count on the worker's first op.
    torch.get_num_threads()
    torch.set_num_threads(1)


def on_worker() -> bool:
    """Whether the calling thread is one of these pools' workers."""
    return getattr(_local, "worker", False)


def _start(workers: int, name: str) -> ThreadPoolExecutor:
    caller_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=_serial_worker)
    started = threading.Barrier(workers)
    list(pool.map(lambda _: started.wait(), range(workers)))  # start every worker now
    torch.set_num_threads(caller_threads)  # the workers' set-up moved the process default
    return pool


def tile_pool(workers: int) -> ThreadPoolExecutor:
    """The compiled executor's pool of ``workers`` threads, every thread started."""
    with _lock:
        pool = _tile_pools.get(workers)
        if pool is None:
            pool = _tile_pools[workers] = _start(workers, "tgn-compiled")
        return pool


def _after_fork_in_child() -> None:
    global _lock, _tile_pools
    _lock = threading.Lock()
    _tile_pools = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
