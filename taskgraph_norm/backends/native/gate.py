"""The gate's ``silu`` and ``sigmoid`` in C (``csrc/native_gate.c``): the bits of
:func:`taskgraph_norm.kernels.gate.silu_sigmoid`, in one pass over the gate."""

from __future__ import annotations

import torch

from ...constants import DTYPE_BF16, DTYPE_F16, DTYPE_F32
from .loader import available, module

__all__ = ["runs", "silu_sigmoid"]

_CODES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_F16}


def runs(g: torch.Tensor) -> bool:
    """Whether the C form takes ``g``: a CPU fp32, bf16 or fp16 tensor, kernels built."""
    return g.device.type == "cpu" and g.dtype in _CODES and available()


def silu_sigmoid(g: torch.Tensor, sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(silu(g), sigmoid(g) or None)`` as fp32 tensors of ``g``'s shape (``runs(g)`` true)."""
    gc = g.contiguous()
    s = torch.empty(gc.shape, dtype=torch.float32)
    sig = torch.empty(gc.shape, dtype=torch.float32) if sigmoid else None
    if gc.numel():
        module().gate_silu(gc.data_ptr(), _CODES[g.dtype], gc.numel(), s.data_ptr(),
                           None if sig is None else sig.data_ptr())
    return s, sig
