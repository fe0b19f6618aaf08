"""The helper thread the direct native path splits large inputs with.

One worker, started on first use, serial (torch ops on it run single-threaded: the
split is the parallelism).  A call made on that worker (a nested call) gets no
helper, so it can never wait on itself; a process whose torch thread count is 1
gets none either.  In a forked child the pool is dropped and made afresh on first
use: threads do not survive ``fork``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["helper", "on_worker"]

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def _init_worker() -> None:
    _local.worker = True
    torch.get_num_threads()  # finish torch's lazy per-thread set-up first
    torch.set_num_threads(1)


def on_worker() -> bool:
    """Whether the calling thread is the helper itself."""
    return getattr(_local, "worker", False)


def helper() -> ThreadPoolExecutor | None:
    """The helper pool, or ``None`` when a split must not or need not happen."""
    global _pool
    if getattr(_local, "worker", False) or torch.get_num_threads() < 2:
        return None
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                threads = torch.get_num_threads()
                _pool = ThreadPoolExecutor(1, thread_name_prefix="tgn-direct", initializer=_init_worker)
                _pool.submit(lambda: None).result()  # start it now
                torch.set_num_threads(threads)  # the worker's set-up moved the process default
            pool = _pool
    return pool


def _after_fork_in_child() -> None:
    global _pool, _lock
    _pool = None  # its thread did not survive the fork; never wait on it
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
