"""The gate of a gated RMSNorm in C (``csrc/native_gate.c``): the bits of
:mod:`taskgraph_norm.kernels.gate`'s torch forms, in one pass over the gate.

Elementwise, so an element's bits never depend on how the work is split: a large call
is cut into contiguous slices that torch's intra-op thread count of workers run at
once (each C call releases the GIL).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ...constants import DTYPE_BF16, DTYPE_F16, DTYPE_F32
from .loader import available, module

__all__ = ["gate_product", "runs", "silu_sigmoid"]

_CODES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_F16}
#: Elements below which one thread does the whole call.
SPLIT_ELEMENTS = 1 << 18

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def runs(*tensors: torch.Tensor) -> bool:
    """Whether the C form takes these tensors: CPU fp32, bf16 or fp16, kernels built."""
    return all(t.device.type == "cpu" and t.dtype in _CODES for t in tensors) and available()


def _split(n: int, run: Callable[[int, int], object]) -> None:
    """``run(start, stop)`` over ``[0, n)``, in slices on the pool's threads for a large ``n``."""
    global _pool
    threads = max(1, torch.get_num_threads())
    if n < SPLIT_ELEMENTS or threads == 1:
        run(0, n)
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers != threads:  # (torch's thread count changed)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="tgn-gate")
        pool = _pool
    step = -(-n // threads)
    for f in [pool.submit(run, a, min(a + step, n)) for a in range(0, n, step)]:
        f.result()


def silu_sigmoid(g: torch.Tensor, sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(silu(g), sigmoid(g) or None)`` as fp32 tensors of ``g``'s shape (``runs(g)``)."""
    gc = g.contiguous()
    s = torch.empty(gc.shape, dtype=torch.float32)
    sig = torch.empty(gc.shape, dtype=torch.float32) if sigmoid else None
    size, code, lib = gc.element_size(), _CODES[g.dtype], module()

    def run(a: int, b: int) -> None:
        lib.gate_silu(gc.data_ptr() + a * size, code, b - a, s.data_ptr() + 4 * a,
                      None if sig is None else sig.data_ptr() + 4 * a)

    _split(gc.numel(), run)
    return s, sig


def gate_product(g: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(v.float() * silu(g))`` rounded to ``dtype``, ``g``'s shape (``runs(g, v)``, ``dtype``
    fp32, bf16 or fp16): :func:`taskgraph_norm.kernels.gate.gate_product`'s bits."""
    gc, vc = g.contiguous(), v.contiguous()
    out = torch.empty(gc.shape, dtype=dtype)
    gs, vs, os_ = gc.element_size(), vc.element_size(), out.element_size()
    codes, lib = (_CODES[g.dtype], _CODES[v.dtype], _CODES[dtype]), module()

    def run(a: int, b: int) -> None:
        lib.gate_product(gc.data_ptr() + a * gs, codes[0], vc.data_ptr() + a * vs, codes[1], b - a,
                         out.data_ptr() + a * os_, codes[2])

    _split(gc.numel(), run)
    return out
