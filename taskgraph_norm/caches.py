"""Every cache of the package, in one registry, so :func:`clear_caches` empties them all.

A module that keeps a cache registers the function that clears it at import time
(``register(fn)``); ``taskgraph_norm.clear_caches()`` calls every registered
function.  Caches are an optimisation only: clearing them never changes a result,
only the time of the next call.  This module imports nothing of ours.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["clear_caches", "generation", "register"]

_clearers: list[Callable[[], None]] = []
_lock = threading.Lock()
_generation = 0


def register(clear: Callable[[], None]) -> Callable[[], None]:
    """Add ``clear`` (no arguments) to what :func:`clear_caches` calls; returns it."""
    with _lock:
        _clearers.append(clear)
    return clear


def generation() -> int:
    """Bumped by every :func:`clear_caches`: per-thread caches, which another thread
    cannot empty, compare it with the generation they were filled in."""
    return _generation


def clear_caches() -> None:
    """Empty every cache of taskgraph_norm: graphs, proofs, lowered plans, pipelines,
    workspaces (each thread drops its own on its next call) and the kernels' small
    constant tensors.  The next call of each configuration rebuilds what it needs."""
    global _generation
    with _lock:
        clearers = list(_clearers)
        _generation += 1
    for clear in clearers:
        clear()
