"""The triton executor's entry point: launch a plan's kernel, then let the reference
finish the rows whose total is not finite.

Modes.  On CUDA (and ROCm) tensors the kernels are compiled.  With
``TRITON_INTERPRET=1`` in the environment when a call is made, they run in
Triton's interpreter (numpy), which also accepts CPU tensors: that is how they are
tested without a GPU.  The kernels module is loaded once per mode, as its own
module object, because ``triton.jit`` picks compiled or interpreted when it
decorates: one process can run the interpreted kernels on CPU tensors and the
compiled ones on CUDA tensors (the environment variable only has to be set while
the interpreted kernels are first loaded and called).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import struct
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ...errors import ExecutionError, MissingDependencyError
from ...graph import Graph
from ..lowering import Plan
from .layout import KernelShape, kernel_shape, next_pow2

__all__ = ["available", "interpreting", "run_triton", "supports"]

_INSTALL = 'pip install "taskgraph-norm[triton]"'
#: Columns one FINALIZE (or exact) step handles at a time.
MAX_BLOCK = 4096
_load_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the ``triton`` package can be imported."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (as Triton reads it): kernels loaded now
    run in Triton's interpreter, on CPU or CUDA tensors."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")  # triton's getenv_bool


_modules: dict[bool, ModuleType] = {}


def _kernels(interpret: bool) -> ModuleType:
    """The kernels module for one mode (loaded on first use, under that mode)."""
    module = _modules.get(interpret)
    if module is not None:
        return module
    if not available():
        raise MissingDependencyError("triton", "the triton executor", _INSTALL)
    with _load_lock:
        if interpret not in _modules:
            name = f"{__package__}._kernels_{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("kernels.py"))
            assert spec is not None and spec.loader is not None  # our own file
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # triton reads the source through the module
            spec.loader.exec_module(module)
            _modules[interpret] = module
    return _modules[interpret]


def supports(plan: Plan) -> bool:
    """True when the triton executor can run ``plan`` (see :func:`.layout.kernel_kind`)."""
    try:
        kernel_shape(plan)
    except ExecutionError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _table(shape: KernelShape, device: torch.device) -> torch.Tensor:
    table = shape.table or (0,)  # a natural layout never reads it
    return torch.tensor(table, dtype=torch.int32, device=device)


def _num_warps(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def _check_input(x: torch.Tensor, plan: Plan, interpret: bool) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ExecutionError(
            f"the triton executor runs float32, bfloat16 and float16 inputs, not {x.dtype} "
            "(use executor='compiled': fp64 keeps the torch-ops plan)"
        )
    if x.device.type == "cpu" and not interpret:
        raise ExecutionError(
            "the triton executor runs CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 (slow; for tests), or use a CUDA tensor or executor='compiled'"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise ExecutionError(
            f"Triton does not target {x.device.type!r} tensors; use executor='compiled' (torch ops)"
        )
    if x.dim() < 1 or x.shape[-1] != plan.hidden_size:
        raise ExecutionError(
            f"the plan normalises a last dimension of {plan.hidden_size}, the input has shape {list(x.shape)}"
        )


def _launch(
    shape: KernelShape, x2: torch.Tensor, y2: torch.Tensor, w: torch.Tensor | None,
    flags: torch.Tensor, eps: float, interpret: bool,
) -> None:
    k = _kernels(interpret)
    d = shape.hidden_size
    block = min(next_pow2(d), MAX_BLOCK)
    w_arg = w if w is not None else y2  # never read: HAS_W is a compile-time False
    common: dict[str, Any] = dict(D=d, BLOCK=block, HAS_W=w is not None,
                              BF16=y2.dtype == torch.bfloat16, enable_fp_fusion=False)
    # torch rounds a Python eps to fp32 (to nearest) before adding it, as packing does.
    eps32: float = struct.unpack("f", struct.pack("f", eps))[0]
    grid = (x2.shape[0],)
    args = (x2, y2, w_arg)
    strides = (x2.stride(0), y2.stride(0), eps32)
    if shape.kind == "exact":
        k.exact_kernel[grid](
            *args, flags, *strides, LOG_BLOCK=block.bit_length() - 1, FOLDS=interpret,
            num_warps=_num_warps(block), **common,
        )
        return
    table = _table(shape, x2.device)
    width = shape.chunks_width * shape.chunk_width
    if shape.kind == "tree":
        k.float_tree_kernel[grid](
            *args, table, flags, *strides, NW=shape.chunks_width, CW=shape.chunk_width,
            LOG_C=shape.log_chunk, LOG_N=shape.log_chunks, NATURAL=shape.natural,
            num_warps=_num_warps(max(width, block)), **common,
        )
    else:
        k.float_linear_kernel[grid](
            *args, table, flags, *strides, N=shape.n_chunks, CW=shape.chunk_width,
            LOG_C=shape.log_chunk, NATURAL=shape.natural,
            num_warps=_num_warps(max(shape.chunk_width, block)), **common,
        )


def run_triton(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    plan: Plan,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``plan`` (lowered from the certified ``graph``) on ``x`` with Triton kernels.

    The bits are the reference's (:func:`~taskgraph_norm.executors.run_reference` on
    ``graph``) for float32, bfloat16 and float16 inputs.  ``graph`` is only read to
    finish the rows whose total is not finite (NaN or Inf inputs, fp32 overflow),
    which the reference interpreter computes row by row.

    Raises
    ------
    ExecutionError
        for a plan no kernel runs (native leaves, a ``cat`` merge, a hand-made ADD
        DAG: use executor='compiled'), an fp64 input, a CPU tensor without
        ``TRITON_INTERPRET=1``, a device Triton does not target.
    MissingDependencyError
        if triton is not installed.
    """
    shape = kernel_shape(plan)
    interpret = interpreting()
    _check_input(x, plan, interpret)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        from ..reference import run_reference  # its torch ops record gradients

        y_ref = run_reference(graph, x, weight, eps)
        return y_ref if out is None else out.copy_(y_ref)
    d = plan.hidden_size
    x2 = x.reshape(-1, d)
    if d > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None and out.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, d)
    rows = x2.shape[0]
    if rows:
        # y *= w.to(acc), as kernels.finalize: exact for a narrower weight, the
        # reference's own rounding for a wider one.
        w = None if weight is None else weight.to(torch.float32).contiguous()
        flags = torch.empty(rows, dtype=torch.int8, device=x.device)
        if interpret:
            import numpy

            # The interpreter computes with numpy, which warns where IEEE arithmetic
            # silently overflows or makes a NaN (as the GPU does, and the reference).
            with numpy.errstate(all="ignore"):
                _launch(shape, x2, y2, w, flags, eps, interpret)
        else:
            _launch(shape, x2, y2, w, flags, eps, interpret)
        bad = flags.nonzero()[:, 0]
        if len(bad):
            from ..reference import run_reference

            y2[bad] = run_reference(graph, x2[bad], weight, eps)
    if y is not out and (out is not None or not x.is_contiguous()):
        # A strided input or output: the result keeps the input's layout, as torch's does.
        return (out if out is not None else torch.empty_like(x)).copy_(y)
    return y


#: Marks runners that write ``out`` themselves (see ``api._run``).
run_triton.writes_out = True  # type: ignore[attr-defined]
