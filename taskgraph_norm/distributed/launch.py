"""Run a function on a local process group over loopback: for tests, benchmarks, examples.

:func:`run_local` spawns ``world_size`` processes, joins them to one process group
(gloo by default) through ``tcp://127.0.0.1`` on a free port, calls
``fn(rank, world_size, *args)`` on each, and returns the ranks' results.  It never
hangs: the process group and the whole run have timeouts, and when a rank dies the
others are killed and the error comes out in the caller.  Production jobs start
their ranks with ``torchrun`` instead (see docs/distributed.md).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_local"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n.startswith("lo")), None)


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str,
            timeout_s: float, threads: int, out_dir: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(threads)
    # gloo picks its transport interface from the host name unless told: keep it on loopback.
    interface = _loopback_interface()
    if backend == "gloo" and interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank past its last collective before any tears its group down.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank whose result is written leaves without the interpreter's finalization: a
    # gloo worker thread still holding a tensor from asynchronous work (FSDP2's) can
    # abort the process there, "terminate called without an active exception" (torch's
    # c10d teardown; seen in about one FSDP2 run in ten on 2 cores).  A rank that raised
    # went through ``finally`` and raises to torch's spawn wrapper, which reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
    collective_timeout: float = 60.0,
    threads: int = 1,
    port: int | None = None,
) -> list[Any]:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]``, each run in its own spawned rank.

    Parameters
    ----------
    fn:
        A module-level (picklable) function ``fn(rank, world_size, *args)``; its
        result must be something ``torch.save`` can write.
    world_size:
        Number of ranks.
    backend:
        ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank).
    timeout:
        Seconds for the whole run, start-up included; past it every rank is killed
        and ``TimeoutError`` is raised.
    collective_timeout:
        The process group's timeout: a collective waiting on a dead peer fails after it.
    threads:
        ``torch.set_num_threads`` in each rank (ranks share the machine's cores).
    port:
        The rendezvous port on 127.0.0.1 (default: :func:`free_port`).

    Raises
    ------
    torch.multiprocessing.ProcessRaisedException, ProcessExitedException
        when a rank raises or dies; the other ranks are terminated first.
    TimeoutError
        when the run takes longer than ``timeout``.
    """
    with tempfile.TemporaryDirectory(prefix="tgn-dist-") as out_dir:
        context = mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
            _worker,
            args=(fn, world_size, port or free_port(), backend, collective_timeout, threads, out_dir,
                  args),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size} ranks did not finish within {timeout:.0f} s; killed them")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(10)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]
