"""Running an async executor from sync code, also inside a running event loop.

``run_coroutine_sync(fn)`` is ``anyio.run(fn)``, except where the calling thread
already runs an asyncio or trio loop (a notebook cell, an async web handler): there
the coroutine gets a loop of its own on a fresh thread, which the caller joins
(docs/reliability.md, "event loops").
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio

from ... import torch_state

__all__ = ["run_coroutine_sync"]


def _loop_running() -> bool:
    """Whether an asyncio or trio event loop runs in the calling thread (no sniffio:
    it is not a dependency; trio is looked at only if it is already imported)."""
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return True
        except RuntimeError:
            pass
    return False


def run_coroutine_sync(fn: Callable[[], Any]) -> Any:
    """``anyio.run(fn)``, also from a thread whose event loop is running (a notebook
    cell, an async web handler): there the loop runs on a fresh thread, joined."""
    if not _loop_running():
        return anyio.run(fn)
    result: list[Any] = []
    error: list[BaseException] = []

    state = torch_state.capture()

    def target() -> None:
        try:
            result.append(state.run(anyio.run, fn))
        except BaseException as exc:  # handed to the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=target, name="tgn-sync-in-loop")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
