"""Input checks shared by every entry point: reject what
``torch.nn.functional.rms_norm`` rejects, with torch's error types and messages.

Our own parameters (topology, chunk size, ...) are checked by the builders; this
module checks tensors and ``eps``.  Pure functions, no state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import kernels
from .errors import (
    ConfigError,
    DeviceMismatchError,
    DtypeError,
    ExecutionError,
    InputRankError,
    InputShapeError,
    OverlapError,
    WeightShapeError,
)

__all__ = ["PLAIN_TENSORS", "SUPPORTED_DTYPES", "check_input", "check_no_partial_overlap", "check_out", "check_real",
           "check_residual",
           "resolve_eps"]

#: The tensor types whose data the kernels may read: anything else (a FakeTensor, a
#: FunctionalTensor, another subclass) belongs to a tracer or a wrapper.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

#: The input dtypes every executor accepts (fp16/bf16 accumulate in fp32).
SUPPORTED_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})

# torch's own names in its "not implemented for 'Int'" messages.
_TORCH_TYPE_NAMES = {
    torch.bool: "Bool",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}


def check_input(
    x: object, normalized_shape: Sequence[int], weight: object | None
) -> None:
    """Reject what ``torch.nn.functional.rms_norm`` rejects, with torch's error type.

    Raises
    ------
    TypeError
        ``x`` or ``weight`` is not a tensor.
    InputRankError (ValueError)
        ``x`` is 0-d.
    DtypeError (NotImplementedError)
        ``x`` is not fp32, fp64, fp16 or bf16 (integer, bool and complex inputs).
    InputShapeError (RuntimeError)
        ``x``'s trailing dims differ from ``normalized_shape``.
    WeightShapeError, DeviceMismatchError (RuntimeError)
        ``weight`` has the wrong shape or lives on another device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise InputRankError(1, 0)
    if x.dtype not in SUPPORTED_DTYPES:
        raise DtypeError(_TORCH_TYPE_NAMES.get(x.dtype, str(x.dtype).removeprefix("torch.")))
    shape = tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise InputShapeError(shape, tuple(x.shape))
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if tuple(weight.shape) != shape:
        raise WeightShapeError(tuple(weight.shape), shape)
    if weight.device != x.device:
        raise DeviceMismatchError(weight.device, x.device)


def check_residual(x: torch.Tensor, residual: object, name: str = "residual") -> None:
    """A residual (or ``residual_out``) must be a tensor of ``x``'s shape, dtype and device:
    ``h = x + residual`` is rounded to ``x``'s dtype, never broadcast or promoted."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(residual).__name__}")
    if residual.device != x.device:
        raise DeviceMismatchError(residual.device, x.device)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ConfigError(name, f"tensor{list(residual.shape)} {residual.dtype}",
                          f"a tensor of x's shape {list(x.shape)} and dtype {x.dtype}")


def resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    """``eps=None`` means ``torch.finfo(dtype).eps``, as in ``F.rms_norm``."""
    if eps is None:
        return kernels.default_eps(dtype)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError("eps", eps, "a float or None")
    return float(eps)


def check_out(out: object | None, x: torch.Tensor, dtype: torch.dtype | None = None,
              *inputs: torch.Tensor | None) -> None:
    """``out`` must be a tensor of ``x``'s shape and device and of the result's dtype
    (``dtype``; default ``x``'s: only ``casting_mode="llama"`` returns another), and
    must not partly overlap ``x`` or the other ``inputs`` (:func:`check_no_partial_overlap`)."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    want = x.dtype if dtype is None else dtype
    if out.shape != x.shape or out.dtype != want or out.device != x.device:
        raise ConfigError(
            "out", f"tensor{list(out.shape)} {out.dtype} on {out.device}",
            f"a tensor of shape {list(x.shape)}, dtype {want} on {x.device}",
        )
    check_no_partial_overlap(out, x, *inputs)


def check_no_partial_overlap(written: torch.Tensor, *inputs: torch.Tensor | None) -> None:
    """Raise torch's error for an output that shares memory with an input without being
    that very tensor (the same data pointer, dtype, shape and strides: an in-place call,
    which every path reads before it writes), as torch's own ``out=`` ops do."""
    for t in inputs:
        if t is None or t.device != written.device or not torch._C._overlaps(written, t):
            continue
        if (t.data_ptr() == written.data_ptr() and t.dtype == written.dtype and t.shape == written.shape
                and t.stride() == written.stride()):
            continue
        raise OverlapError()


def check_real(x: torch.Tensor) -> None:
    """Refuse a traced (fake, functional, subclass) tensor before a kernel reads its data
    or a cache keeps it: under ``torch.compile``/``torch.export`` the ops
    (:mod:`taskgraph_norm.ops`) are the way in, and their fake rules answer for shapes."""
    if type(x) not in PLAIN_TENSORS:
        raise ExecutionError(
            f"the pipeline computes on real tensors, got a {type(x).__name__}: under torch.compile, "
            "torch.export or another tracer call taskgraph_norm.ops.rms_norm (tgn.RMSNorm and "
            "tgn.normalize_sync do it for you)"
        )
