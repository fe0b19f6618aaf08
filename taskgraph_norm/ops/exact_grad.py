"""Exact weight gradients: the accumulator's fast path, and its carry across backward calls.

:class:`ExactSum` holds ``n`` exact column sums (the state of
:mod:`taskgraph_norm.kernels.exact_sum`) and adds blocks of products to it, with
the native C kernel on CPU float32 (its columns shared among torch's threads,
native_team.c; for RMSNorm's fp32 rows it also forms ``x_hat = x / rms``), the
Triton kernel on CUDA (``backends/triton/exact_dw.py``, which forms ``x_hat`` too)
and the torch ops elsewhere: the same state either way.

:class:`ExactGrad` carries one :class:`ExactSum` per parameter across backward
calls, until the gradient is cleared, and writes ``param.grad`` as the correctly
rounded sum after each one.  RMSNorm's exact weight (``ops/exact_weight.py``)
forms each call's :class:`ExactSum` in its backward, returns the rounded value to
autograd, and its hooks hand the process-wide :data:`exact_grads` what autograd
accumulated::

    exact_grads.prepare(weight)                 # before AccumulateGrad touches the grad
    exact_grads.add_sum(weight, total, ...)     # after it: weight.grad = round(carry + total)

Code that drives the carry by hand adds products directly: ``accumulate(weight, dy,
x_hat)`` (or ``accumulate_normalized(weight, dy, x, rms)``), then ``finish(weight)``.

"Cleared" is read from ``param.grad`` itself: the carry remembers the tensor it
last wrote (a weak reference) and that tensor's version counter.  ``param.grad``
set to ``None`` or to another tensor, or changed in place (``zero_()``, clipping,
an optimizer hook), starts a new sum, seeded with ``param.grad``'s current
values, exactly (zeros add nothing): ``grad`` always equals the correctly
rounded value of *what it held when last touched by anyone else* plus *every
product accumulated since*.  See docs/training.md.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ExactSumError, ExactSumOverflowError
from ..backends.registry import accumulate_exact
from ..kernels import exact_sum as es
from .exact_state import IdLookup, recycle_state, zero_state
from ..backends.native import grads as native_grads
from ..backends.native import loader as native
from ..backends.triton import exact_dw as triton_dw

__all__ = ["ExactGrad", "ExactSum", "exact_grads"]


class ExactSum:
    """``numel`` exact, order-free sums of products, one per column.

    Exact: every product of two fp32 values is added without rounding.  Order-free:
    the state (:attr:`state`, an int64 ``(STATE_ROWS, numel)`` tensor in its one
    normal form) is the same bits for any order and grouping of the rows.
    Mergeable: ``merge`` adds another state (as ``all_reduce(SUM)`` would).
    """

    __slots__ = ("state",)

    def __init__(self, numel: int, device: torch.device | str | None = None, *, blank: bool = False) -> None:
        # blank: a CPU state's memory not zeroed, for a kernel that writes it whole
        # (the fused backward's fresh state; zero it with :func:`.exact_state.zero_` if not)
        self.state = zero_state(numel, device, blank=blank)

    @classmethod
    def from_state(cls, state: torch.Tensor) -> ExactSum:
        """An :class:`ExactSum` over a (possibly unnormalised, e.g. summed) ``state``."""
        es.check_state(state)
        out = cls.__new__(cls)
        out.state = es.normalize_(state.contiguous().clone())
        return out

    @property
    def numel(self) -> int:
        return int(self.state.shape[1])

    def add_products(self, dy: torch.Tensor, x_hat: torch.Tensor) -> ExactSum:
        """Add ``sum over rows of dy * x_hat`` (fp32/bf16/fp16, whole rows of
        ``numel``), exactly, on the backend that takes it
        (:func:`taskgraph_norm.backends.registry.accumulate_exact`); returns ``self``."""
        self._check_pair(dy, x_hat, "x_hat")
        accumulate_exact(self.state, dy, x_hat, None)
        return self

    def add_normalized(self, dy: torch.Tensor, x: torch.Tensor, rms: torch.Tensor) -> ExactSum:
        """Add ``sum over rows of dy * (x / rms)``, exactly; returns ``self``.

        RMSNorm's weight gradient of fp32 rows: ``x`` fp32 (whole rows of
        ``numel``), ``rms`` fp32, one value per row; ``x / rms`` is the fp32
        division (the bits of ``torch.div(x, rms)``, ``normalize(x, None)``'s).  On
        CPU the native kernel divides as it goes (no ``x_hat`` tensor); the state is
        the one :meth:`add_products` gives for ``dy`` and ``x / rms``.  On CUDA the
        Triton kernel does the same, and takes bf16/fp16 ``x`` too (``x / rms`` then
        rounded to ``x``'s dtype, as ``normalize(x, None)`` rounds it).
        """
        self._check_pair(dy, x, "x")
        if not triton_dw.runs(self.state):
            if x.dtype != torch.float32 or rms.dtype != torch.float32:
                raise ExactSumError(f"add_normalized needs float32 x and rms; got {x.dtype} and {rms.dtype} "
                                    "(round x / rms to x's dtype and use add_products)")
            rows = x.numel() // max(self.numel, 1)
            if rms.numel() != rows or rms.device != self.state.device:
                raise ExactSumError(f"rms {list(rms.shape)} must hold one value per row of x {list(x.shape)}, "
                                    f"on the sum's device {self.state.device}")
        accumulate_exact(self.state, dy, x, rms)
        return self

    def _check_pair(self, dy: torch.Tensor, other: torch.Tensor, name: str) -> None:
        if dy.shape != other.shape:
            raise ExactSumError(f"dy {list(dy.shape)} and {name} {list(other.shape)} must have the same shape")
        if dy.device != self.state.device or other.device != self.state.device:
            raise ExactSumError(f"dy and {name} must be on the sum's device {self.state.device}")

    def _native(self) -> bool:
        return self.state.device.type == "cpu" and native.available()

    def add_values(self, values: torch.Tensor) -> ExactSum:
        """Add the float values ``values`` (whole rows of ``numel``) exactly."""
        rows = es.as_rows(values, self.numel, "values")
        return self.add_products(rows, torch.ones_like(rows))

    def merge(self, other: ExactSum) -> ExactSum:
        """Add ``other``'s sums into these, exactly; returns ``self``."""
        if other.state.shape != self.state.shape or other.state.device != self.state.device:
            raise ExactSumError(f"cannot merge an exact sum of {other.numel} columns on {other.state.device} "
                                f"into one of {self.numel} on {self.state.device}")
        self.state += other.state
        _normalize_sum_(self.state)
        return self

    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The sums correctly rounded to ``dtype`` (fp32, bf16, fp16): ``(numel,)``."""
        if dtype in _WEIGHT_DTYPES and self._native() and self.state.is_contiguous():
            return native_grads.exact_round(self.state, dtype)
        return es.round_state(self.state, dtype)

    def copy(self) -> ExactSum:
        out = ExactSum.__new__(ExactSum)
        out.state = self.state.clone()
        return out


def _recycle(total: ExactSum | None) -> None:
    """Keep ``total``'s CPU state as a spare (:mod:`.exact_state`) when nothing else
    holds ``total`` (the caller has just dropped its own reference to it)."""
    # the references: the caller's variable, this frame's argument and getrefcount's
    if total is not None and sys.getrefcount(total) <= 3:
        recycle_state(total.state)


class _Carry:
    """One parameter's sum and the ``param.grad`` it stands behind (``zero``: the sum
    is known to be zero, as made).  A zero sum is made when first read: a backward
    after ``grad = None`` takes its own sum over (``add_sum``) and never reads it."""

    __slots__ = ("_sum", "numel", "device", "zero", "grad_ref", "grad_version", "lock", "__weakref__")

    def __init__(self, param: torch.Tensor) -> None:
        self.numel, self.device = param.numel(), param.device
        self._sum: ExactSum | None = None
        self.zero = True
        self.grad_ref: weakref.ref[torch.Tensor] | None = None
        self.grad_version = -1
        self.lock = threading.Lock()

    @property
    def sum(self) -> ExactSum:
        if self._sum is None:
            self._sum = ExactSum(self.numel, self.device)
        return self._sum

    @sum.setter
    def sum(self, total: ExactSum) -> None:
        self._sum = total

    def clear(self) -> None:
        """Zero the sum (made when next read)."""
        old, self._sum = self._sum, None
        _recycle(old)

    def stands_behind(self, grad: torch.Tensor | None) -> bool:
        """Whether ``grad`` is what this carry last saw (same tensor, not modified)."""
        if self.grad_ref is None:
            return grad is None
        return grad is not None and self.grad_ref() is grad and grad._version == self.grad_version

    def remember(self, grad: torch.Tensor | None) -> None:
        self.grad_ref = None if grad is None else weakref.ref(grad)
        self.grad_version = -1 if grad is None else grad._version


_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExactGrad:
    """Exact weight gradients carried per parameter across backward calls.

    ``accumulate(param, dy, x_hat)`` adds ``sum over rows of dy * x_hat`` to the
    parameter's exact sum (starting afresh when ``param.grad`` was cleared or
    changed since this object last wrote it); ``finish(param)`` writes
    ``param.grad`` as the correctly rounded sum in ``param.dtype``.  Thread-safe.
    """

    def __init__(self) -> None:
        self._carries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._registered: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._lock = threading.Lock()
        self._fast: IdLookup[_Carry] = IdLookup()  # the carries, found on every backward

    def register(self, param: torch.Tensor) -> torch.Tensor:
        """Mark ``param`` as exact (all_reduce_exact_grads then reduces it on every
        rank, even one that saw no rows); returns it."""
        _check_param(param)
        with self._lock:
            self._registered[param] = True
        return param

    def __contains__(self, param: object) -> bool:
        with self._lock:
            return param in self._registered or param in self._carries

    def _carry(self, param: torch.Tensor) -> _Carry:
        known = self._fast.get(param)
        if known is not None:
            return known
        with self._lock:
            carry: _Carry | None = self._carries.get(param)  # type: ignore[no-untyped-call]
            if carry is None:
                carry = self._carries[param] = _Carry(param)  # zeros: stands behind grad None
            self._fast.put(param, carry, len(self._carries))
            return carry

    def _restart_unless_current(self, param: torch.Tensor, carry: _Carry) -> None:
        grad = param.grad
        if carry.stands_behind(grad):
            return
        carry.clear()
        carry.zero = grad is None
        if grad is not None:
            carry.sum.add_values(grad.detach())
        carry.remember(grad)

    def accumulate(self, param: torch.Tensor, dy: torch.Tensor, x_hat: torch.Tensor) -> None:
        """``param``'s exact sum += ``sum over rows of dy * x_hat``.

        ``dy`` and ``x_hat``: fp32 (or bf16/fp16) ``(..., *param.shape)``, the same
        shape, on ``param``'s device.
        """
        self._check_rows(param, dy, x_hat, "x_hat")
        self._add(param, lambda total: total.add_products(dy.detach(), x_hat.detach()))

    def accumulate_normalized(self, param: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
                              rms: torch.Tensor) -> None:
        """``param``'s exact sum += ``sum over rows of dy * (x / rms)``
        (:meth:`ExactSum.add_normalized`: fp32 ``x``, one fp32 ``rms`` per row)."""
        self._check_rows(param, dy, x, "x")
        self._add(param, lambda total: total.add_normalized(dy.detach(), x.detach(), rms.detach()))

    @staticmethod
    def _check_rows(param: torch.Tensor, dy: torch.Tensor, other: torch.Tensor, name: str) -> None:
        _check_param(param)
        if dy.shape != other.shape or tuple(dy.shape[dy.dim() - param.dim():]) != tuple(param.shape):
            raise ExactSumError(f"dy {list(dy.shape)} and {name} {list(other.shape)} must both be "
                                f"(..., {', '.join(map(str, param.shape))}) like the parameter")

    def _add(self, param: torch.Tensor, add: Callable[[ExactSum], object]) -> None:
        """``add`` into ``param``'s carried sum, restarted first if the grad changed."""
        carry = self._carry(param)
        with carry.lock:
            self._restart_unless_current(param, carry)
            add(carry.sum)
            carry.zero = False

    def finish(self, param: torch.Tensor) -> torch.Tensor | None:
        """Write ``param.grad`` = the correctly rounded exact sum; returns it.

        Does nothing (returns ``param.grad``) when nothing was accumulated since the
        gradient was last cleared or changed.
        """
        carry = self._carry(param)
        with carry.lock:
            grad = param.grad
            if not carry.stands_behind(grad):
                return grad
            self._write(param, carry, grad)
            return param.grad

    def prepare(self, param: torch.Tensor) -> None:
        """Restart ``param``'s sum from ``param.grad``'s values unless the carry stands
        behind it: called before autograd accumulates into the grad (which changes it)."""
        _check_param(param)
        carry = self._carry(param)
        with carry.lock:
            self._restart_unless_current(param, carry)

    def add_sum(self, param: torch.Tensor, total: ExactSum, *, into_grad: bool,
                rounded: torch.Tensor | None = None, installed: bool = False) -> torch.Tensor:
        """``param``'s sum += ``total`` (one backward's exact states, taken over); write
        ``param.grad`` as the rounded sum: into the grad tensor itself with ``into_grad``
        (autograd accumulated into the grad it had), else as a new tensor (autograd may
        have installed the gradient's own tensor, which hooks may hold a view of).  The
        sum is the one :meth:`prepare` left standing behind the grad before that
        accumulation.  ``rounded``: ``total.result(param.dtype)``, if known, written as
        it is when the carried sum was zero (the first backward after a clear); with
        ``installed``, ``rounded`` is the gradient autograd gave, which ``param.grad`` may
        be (then kept as it is, the bits it holds being the rounded sum's)."""
        carry = self._carry(param)
        with carry.lock:
            if carry.zero:
                old, carry.sum = carry._sum, total
                _recycle(old)
                grad = param.grad
                if (installed and rounded is not None and not into_grad and grad is not None
                        and grad.data_ptr() == rounded.data_ptr() and grad.shape == param.shape
                        and grad.dtype == rounded.dtype and grad.is_contiguous()):
                    carry.zero = False
                    carry.remember(grad)
                    return grad
                if installed and rounded is not None:
                    rounded = rounded.clone()  # a tensor of its own, as written otherwise
            else:
                carry.sum.merge(total)
                rounded = None
            carry.zero = False
            return self._write(param, carry, param.grad if into_grad else None, rounded)

    def state(self, param: torch.Tensor) -> ExactSum:
        """A copy of the exact sum behind ``param.grad`` now (from ``param.grad``'s
        values when this object did not write it; zeros for ``None``)."""
        _check_param(param)
        carry = self._carry(param)
        with carry.lock:
            self._restart_unless_current(param, carry)
            return carry.sum.copy()

    def set_state(self, param: torch.Tensor, total: ExactSum) -> torch.Tensor:
        """Make ``total`` the exact sum behind ``param`` and write ``param.grad``."""
        _check_param(param)
        if total.numel != param.numel() or total.state.device != param.device:
            raise ExactSumError(f"an exact sum of {total.numel} columns on {total.state.device} "
                                f"cannot stand behind a parameter of {param.numel()} on {param.device}")
        carry = self._carry(param)
        with carry.lock:
            grad = param.grad
            ours = grad if carry.stands_behind(grad) else None
            carry.sum = total.copy()
            carry.zero = False
            return self._write(param, carry, ours)

    @staticmethod
    def _write(param: torch.Tensor, carry: _Carry, ours: torch.Tensor | None,
               rounded: torch.Tensor | None = None) -> torch.Tensor:
        """``param.grad`` = the rounded sum (``rounded`` when the caller has it): into
        ``ours`` (the grad the carry stands behind, which the optimizer and hooks may
        hold) when there is one."""
        value = (carry.sum.result(param.dtype) if rounded is None else rounded).view(param.shape)
        if ours is not None and ours.layout == torch.strided and ours.shape == param.shape:
            with torch.no_grad():
                ours.copy_(value)
        else:
            param.grad = ours = value
        carry.remember(ours)
        return ours

    def changed_since_written(self, param: torch.Tensor) -> bool:
        """Whether ``param.grad`` is a tensor this object wrote or took in, changed
        since by someone else (e.g. DDP reducing it too)."""
        with self._lock:
            carry: _Carry | None = self._carries.get(param)  # type: ignore[no-untyped-call]
        grad = param.grad
        return (carry is not None and carry.grad_ref is not None and grad is not None
                and not carry.stands_behind(grad))

    def forget(self, params: Iterable[torch.Tensor]) -> None:
        """Drop the carried sums of ``params`` (their ``grad`` is left as it is)."""
        with self._lock:
            for p in params:
                self._carries.pop(p, None)  # type: ignore[no-untyped-call]
                self._fast.pop(p)


def _normalize_sum_(state: torch.Tensor) -> torch.Tensor:
    """:func:`~taskgraph_norm.kernels.exact_sum.normalize_` of the sum of two normal
    forms, over the digits in use only (ordinary data uses 4-6 of the 19): a carry out
    of the highest nonzero digit stops in the (zero) digit above it, so the other
    steps are no-ops and the normal form, unique, is the same."""
    digits = state[:es.DIGITS]
    used = (digits[:es.DIGITS - 1] != 0).any(1).nonzero().flatten().tolist()
    half = 1 << (es.DIGIT_BITS - 1)
    for k in range(used[0], used[-1] + 1) if used else ():
        carry = (digits[k] + half) >> es.DIGIT_BITS  # floor division: balanced remainder
        digits[k] -= carry << es.DIGIT_BITS
        digits[k + 1] += carry
    over = int((digits[es.DIGITS - 1].abs() > es.TOP_LIMIT).sum())
    if over:
        raise ExactSumOverflowError(over, f"|sum| must stay below 2**{40 + 256}")
    return state


def _check_param(param: torch.Tensor) -> None:
    if param.dtype not in _WEIGHT_DTYPES:
        raise ExactSumError(f"an exact weight gradient needs a float32, bfloat16 or float16 parameter "
                            f"(the correctly rounded sum is defined in those); got {param.dtype}")


#: The process-wide carrier RMSNorm's backward and ``all_reduce_exact_grads`` use.
exact_grads = ExactGrad()
