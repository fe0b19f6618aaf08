"""Device backends for the concurrent executor: persistent, bounded worker pools.

A :class:`WorkerPool` owns ``max_workers`` threads for one device, started once
and reused by every run until :meth:`WorkerPool.close`; no thread is ever made
per node or per run.  Each worker is a :class:`Lane`:

* on the CPU a lane is just a thread (torch releases the GIL inside its
  kernels, so lanes really run in parallel);
* on an accelerator with streams (CUDA, and MPS where torch offers
  ``torch.Stream`` for it) each lane owns one ``torch.Stream``: the thread only
  *launches* a node's kernels on its stream, and dependencies on nodes launched
  on other streams are expressed with ``torch.Event`` (``stream.wait_event``),
  so no lane waits on the host for a producer on another stream;
* on an accelerator without streams, the pool has one lane that launches on the
  device's default queue, whose order already respects every dependency.

Pools are context managers (``with`` / ``async with``); :func:`default_pool`
returns a shared pool per ``(device, max_workers)`` that lives until the
interpreter exits (or :func:`close_default_pools`).

Pools are fork-safe: a forked child (a DataLoader worker, ``multiprocessing``
with the fork start method) inherits the pool objects but none of their
threads, so at the fork every open pool gets a new queue and lock in the child
and starts its threads again on its first :meth:`WorkerPool.submit` there
(docs/reliability.md).  Accelerator streams cannot be used in a forked child
(torch refuses to re-initialise CUDA there); CPU pools can.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError, PoolClosedError

__all__ = [
    "Lane",
    "PoolStats",
    "WorkerPool",
    "close_default_pools",
    "current_pool",
    "default_pool",
    "default_workers",
    "live_streams",
]

WorkFn = Callable[[Any, Any, "Lane"], None]

_stream_lock = threading.Lock()
_live_streams = 0


def live_streams() -> int:
    """How many accelerator streams open pools hold right now (tests check for leaks)."""
    return _live_streams


def default_workers() -> int:
    """The default worker count: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class Lane:
    """One worker of a pool: its name (shown in traces) and, on an accelerator,
    the stream it launches on (``None``: the device's current stream)."""

    name: str
    device: torch.device
    stream: Any = None


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool: ``busy`` lanes now, the most ever busy at once,
    and how many work items they have run."""

    workers: int
    busy: int
    peak_busy: int
    completed: int


def _make_streams(device: torch.device, n: int) -> list[Any] | None:
    """``n`` new streams on ``device``, or None where torch offers none for it."""
    if device.type == "cpu":
        return None
    try:
        streams = [torch.Stream(device=device) for _ in range(n)]
    except (RuntimeError, TypeError, NotImplementedError, ValueError):
        return None
    return streams


class WorkerPool:
    """A persistent pool of ``max_workers`` worker threads for ``device``.

    Parameters
    ----------
    max_workers:
        Threads (and, on an accelerator, streams); default :func:`default_workers`
        on the CPU and 4 streams on an accelerator.  This is the bound on how
        many nodes run at once across every run sharing the pool.
    device:
        ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ``"mps"``...
    name:
        Prefix of the thread names (``tgn-cpu-0``...).

    Raises
    ------
    ConfigError
        ``max_workers < 1`` or a device torch does not know.
    """

    def __init__(
        self, max_workers: int | None = None, *, device: str | torch.device = "cpu",
        name: str = "tgn",
    ) -> None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError("device", device, "a torch device such as 'cpu' or 'cuda:0'") from exc
        if dev.type != "cpu" and dev.index is None:
            dev = torch.device(dev.type, torch.accelerator.current_device_index())
        if max_workers is None:
            max_workers = default_workers() if dev.type == "cpu" else 4
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError("max_workers", max_workers, "an integer >= 1")
        streams = _make_streams(dev, max_workers)
        if dev.type != "cpu" and streams is None:
            max_workers = 1  # one in-order queue: one launcher keeps launches in dependency order
        self.device = dev
        self.max_workers = max_workers
        self.name = f"{name}-{dev}"
        self.lanes = tuple(
            Lane(f"{self.name}-{i}", dev, streams[i] if streams else None) for i in range(max_workers)
        )
        self._uses_streams = streams is not None
        self._streams_held = len(streams or ())
        self._add_streams(self._streams_held)
        self._queue: queue.SimpleQueue[tuple[WorkFn, Any, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = self._peak = self._completed = 0
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._forked = False  # a forked child's copy, whose threads are to be started again
        self._start_threads()
        _open_pools.add(self)

    def _start_threads(self) -> None:
        self._threads = [
            threading.Thread(target=self._work, args=(lane,), name=lane.name, daemon=True)
            for lane in self.lanes
        ]
        for t in self._threads:
            t.start()

    def _after_fork_in_child(self) -> None:
        # The parent's threads do not exist here, and its lock or queue may have been
        # in use at the fork: fresh ones, and threads again on the next submit.
        self._lock = threading.Lock()
        self._queue = queue.SimpleQueue()
        self._busy = 0
        self._threads = []
        self._forked = True

    def _restart_after_fork(self) -> None:
        with self._lock:
            if self._forked and not self._closed:
                self._start_threads()
                self._forked = False

    @staticmethod
    def _add_streams(n: int) -> None:
        global _live_streams
        with _stream_lock:
            _live_streams += n

    @property
    def uses_streams(self) -> bool:
        """Whether lanes launch on their own streams (events order cross-lane work)."""
        return self._uses_streams

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(self.max_workers, self._busy, self._peak, self._completed)

    def submit(self, fn: WorkFn, a: Any, b: Any) -> None:
        """Queue ``fn(a, b, lane)`` to run on the next free lane (FIFO).

        ``fn`` must not raise: it is the executor's own wrapper, which records
        every exception (BaseException included) for its run.  One that does
        anyway is reported through :func:`threading.excepthook`, and its lane
        goes on taking work.
        """
        if self._closed:
            raise PoolClosedError(self.name)
        if self._forked:
            self._restart_after_fork()
        self._queue.put((fn, a, b))

    def _work(self, lane: Lane) -> None:
        _on_pool.pool = self
        get, lock = self._queue.get, self._lock
        while True:
            item = get()
            if item is None:
                return
            fn, a, b = item
            with lock:
                self._busy += 1
                if self._busy > self._peak:
                    self._peak = self._busy
            try:
                fn(a, b, lane)
            except BaseException as e:  # noqa: BLE001 - a lane must outlive anything a node does
                # fn broke its contract (it records its run's errors itself): a bug,
                # reported as an exception leaving a thread is, never swallowed.
                threading.excepthook(threading.ExceptHookArgs(
                    (type(e), e, e.__traceback__, threading.current_thread())))
            finally:
                with lock:
                    self._busy -= 1
                    self._completed += 1

    def close(self) -> None:
        """Stop the threads after the work already queued, and wait for them.
        Idempotent.  A run still waiting on this pool must be finished first."""
        if self._closed:
            return
        self._closed = True
        _open_pools.discard(self)
        for _ in self._threads:
            self._queue.put(None)
        current = threading.current_thread()
        for t in self._threads:
            if t is not current:
                t.join()
        self._add_streams(-self._streams_held)
        self._streams_held = 0
        self.lanes = ()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.max_workers} workers"
        return f"<WorkerPool {self.name} {state}>"


_default_lock = threading.Lock()
_default_pools: dict[tuple[str, int | None], WorkerPool] = {}
#: Every pool not yet closed, for the fork handler below.
_open_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _default_lock, _stream_lock
    _default_lock = threading.Lock()
    _stream_lock = threading.Lock()
    for pool in list(_open_pools):
        if not pool.closed:
            pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_on_pool = threading.local()


def current_pool() -> WorkerPool | None:
    """The pool whose worker the calling thread is (``None`` off every pool): a run
    started from inside a node must not queue its nodes behind the node that waits
    for them."""
    pool: WorkerPool | None = getattr(_on_pool, "pool", None)
    return pool


def default_pool(device: str | torch.device = "cpu", max_workers: int | None = None) -> WorkerPool:
    """The shared persistent pool for ``(device, max_workers)``, made on first use."""
    key = (str(torch.device(device)), max_workers)
    with _default_lock:
        pool = _default_pools.get(key)
        if pool is None or pool.closed:
            pool = _default_pools[key] = WorkerPool(max_workers, device=device, name="tgn-shared")
        return pool


def close_default_pools() -> None:
    """Close every shared pool (they are re-made on next use).  Runs at exit."""
    with _default_lock:
        pools = list(_default_pools.values())
        _default_pools.clear()
    for pool in pools:
        pool.close()


atexit.register(close_default_pools)
