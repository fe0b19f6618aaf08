"""The caller's thread-local torch state, carried to the threads that do its work.

Grad mode, inference mode and autocast are per thread in torch.  Work handed to
another thread (the torch-ops backend's tile workers, the async faces' offload, the
concurrent executor's lanes, the helper thread of a sync call made inside a running
event loop) would otherwise run with that thread's defaults: an inference tensor
written outside inference mode, a view made under ``no_grad`` modified with grad
on, a result that records a graph the caller switched off.  So every hand-off
captures the caller's state and the worker runs under it::

    state = torch_state.capture()
    pool.submit(state.run, fn, *args)

This module imports nothing of ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["TorchState", "capture"]

_T = TypeVar("_T")

#: The device types whose autocast state is carried.
_AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True, slots=True)
class TorchState:
    """A snapshot of the thread-local torch state that changes what ops record or
    return: grad mode, inference mode, and autocast per device type."""

    grad: bool
    inference: bool
    autocast: tuple[tuple[str, bool, torch.dtype], ...]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run the body under this state (on any thread)."""
        with contextlib.ExitStack() as stack:
            if self.inference:
                stack.enter_context(torch.inference_mode(True))
            else:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.set_grad_enabled(self.grad))
            for device, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            yield

    def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` under this state."""
        if self == _DEFAULT_STATE:
            return fn(*args, **kwargs)  # a fresh thread's state already
        with self.applied():
            return fn(*args, **kwargs)


def _autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    states = []
    for device in _AUTOCAST_DEVICES:
        enabled = torch.is_autocast_enabled(device)
        if enabled:
            states.append((device, True, torch.get_autocast_dtype(device)))
    return tuple(states)


def capture() -> TorchState:
    """The calling thread's state, to be applied on the thread that does its work."""
    return TorchState(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), _autocast_state())


#: What a new thread starts with (so a worker can skip entering it).
_DEFAULT_STATE = TorchState(True, False, ())
