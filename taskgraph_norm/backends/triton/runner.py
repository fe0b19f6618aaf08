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

import contextlib
import functools
import importlib.util
import os
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ... import caches, kernels
from ...errors import ExecutionError, MissingDependencyError
from ...graph import Graph
from ...lowering import Plan
from .layout import KernelShape, float_layout, kernel_shape, next_pow2

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


_modules: dict[tuple[str, bool], ModuleType] = {}


def _kernels(interpret: bool, stem: str = "kernels") -> ModuleType:
    """The kernels module ``<stem>.py`` of this package for one mode (loaded on first
    use, under that mode; the backward's kernels after the forward's, whose helpers
    they call)."""
    module = _modules.get((stem, interpret))
    if module is not None:
        return module
    if not available():
        raise MissingDependencyError("triton", "the triton executor", _INSTALL)
    if stem != "kernels":
        _kernels(interpret)
    with _load_lock:
        if (stem, interpret) not in _modules:
            name = f"{__package__}._{stem}_{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{stem}.py"))
            assert spec is not None and spec.loader is not None  # our own file
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # triton reads the source through the module
            spec.loader.exec_module(module)
            _modules[stem, interpret] = module
    return _modules[stem, interpret]


@contextlib.contextmanager
def quiet_numpy(interpret: bool) -> Iterator[None]:
    """The interpreter's numpy with its floating-point warnings off (``interpret``): it warns
    where IEEE arithmetic silently overflows or makes a NaN, which the kernels rely on."""
    if not interpret:
        yield
        return
    import numpy

    with numpy.errstate(all="ignore"):
        yield


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


@functools.lru_cache(maxsize=64)
def _offset_in(offset: float, dtype: torch.dtype) -> float:
    """``offset`` as ``kernels.finalize_weight`` adds it to a ``dtype`` weight: torch
    rounds a Python scalar to the tensor's dtype first (then adds in fp32 for bf16
    and fp16).  ``0 + offset`` in ``dtype`` is that value, by torch's own op."""
    return float(kernels.finalize_weight(torch.zeros(1, dtype=dtype), dtype, offset)[0])


def launch_spec(
    shape: KernelShape, plan: Plan, weight_dtype: torch.dtype | None, out_dtype: torch.dtype, interpret: bool,
) -> tuple[str, dict[str, Any], int]:
    """``(kernel name, compile-time arguments, num_warps)`` of one launch of ``plan``
    (``out_dtype``: :func:`kernels.output_dtype`'s).  The dtypes of x, the weight and
    y are the pointers' own, read by the kernel."""
    d = shape.hidden_size
    block = min(next_pow2(d), MAX_BLOCK)
    llama = plan.casting_mode == "llama"
    offset = 0.0
    if weight_dtype is not None and plan.offset:
        offset = _offset_in(plan.offset, out_dtype if llama else torch.float32)  # the weight's dtype in finalize
    constants: dict[str, Any] = dict(D=d, BLOCK=block, HAS_W=weight_dtype is not None, HAS_R=plan.residual,
                                     LLAMA=llama, OFFSET=offset)
    if shape.kind == "exact":
        constants.update(LOG_BLOCK=block.bit_length() - 1, FOLDS=interpret)
        return "exact_kernel", constants, _num_warps(block)
    name, width = float_layout(shape, block, constants, ("float_tree_kernel", "float_linear_kernel"))
    return name, constants, _num_warps(width)


def _launch(
    shape: KernelShape, plan: Plan, x2: torch.Tensor, y2: torch.Tensor, w: torch.Tensor | None,
    res: tuple[torch.Tensor, torch.Tensor] | None, flags: torch.Tensor, eps: float, interpret: bool,
) -> None:
    name, constants, warps = launch_spec(shape, plan, None if w is None else w.dtype, y2.dtype, interpret)
    r2, h2 = res if res is not None else (x2, x2)  # never read: HAS_R is a compile-time False
    pointers: list[torch.Tensor] = [x2, r2, h2, y2, w if w is not None else y2]  # HAS_W likewise
    if shape.kind != "exact":
        pointers.append(_table(shape, x2.device))
    # torch rounds a Python eps to fp32 (to nearest) before adding it, as packing does.
    eps32: float = struct.unpack("f", struct.pack("f", eps))[0]
    strides = (x2.stride(0), r2.stride(0) if res else 0, h2.stride(0) if res else 0, y2.stride(0), eps32)
    kernel = getattr(_kernels(interpret), name)
    kernel[(x2.shape[0],)](*pointers, flags, *strides, num_warps=warps, enable_fp_fusion=False, **constants)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """``t`` as ``(rows, d)`` with unit column stride (a copy only where it has none)."""
    t2 = t.reshape(-1, d)
    return t2.contiguous() if d > 1 and t2.stride(1) != 1 else t2


def _check_residual(plan: Plan, x: torch.Tensor, residual: torch.Tensor | None,
                    residual_out: torch.Tensor | None) -> None:
    if not plan.residual:
        if residual is not None or residual_out is not None:
            raise ExecutionError("this plan adds no residual: build the graph with residual=True")
        return
    if residual is None or residual_out is None:
        raise ExecutionError("this plan adds a residual: pass residual= and residual_out=")
    for name, t in (("residual", residual), ("residual_out", residual_out)):
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ExecutionError(f"{name} must have x's shape {list(x.shape)}, dtype {x.dtype} and device "
                                 f"{x.device}; got {list(t.shape)}, {t.dtype}, {t.device}")


def run_triton(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    plan: Plan,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``plan`` (lowered from the certified ``graph``) on ``x`` with Triton kernels.

    The bits are the reference's (:func:`~taskgraph_norm.executors.run_reference` on
    ``graph``) for float32, bfloat16 and float16 inputs, in every casting mode, with
    the plan's offset.  ``graph`` is only read to finish the rows whose total is not
    finite (NaN or Inf inputs, fp32 overflow), which the reference interpreter
    computes row by row.

    Parameters
    ----------
    out:
        Written in place and returned, when given (``x``'s shape and device, the
        dtype of :func:`kernels.output_dtype`).
    residual, residual_out:
        A residual plan's residual (``x``'s shape and dtype) and the tensor
        ``h = x + residual`` is written into (may be ``x`` or ``residual`` itself);
        ``y`` is the norm of ``h``.

    Raises
    ------
    ExecutionError
        for a plan no kernel runs (native leaves, a ``cat`` merge, a hand-made ADD
        DAG: use executor='compiled'), an fp64 input, a CPU tensor without
        ``TRITON_INTERPRET=1``, a device Triton does not target, a residual missing
        (or given to a plan without one), an ``out`` of another dtype.
    MissingDependencyError
        if triton is not installed.
    """
    shape = kernel_shape(plan)
    interpret = interpreting()
    _check_input(x, plan, interpret)
    _check_residual(plan, x, residual, residual_out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual)):
        from ...kernels.reference import run_reference  # its torch ops record gradients

        y_ref = run_reference(graph, x, weight, eps, residual=residual, residual_out=residual_out)
        return y_ref if out is None else out.copy_(y_ref)
    out_dtype = kernels.output_dtype(x.dtype, None if weight is None else weight.dtype, plan.casting_mode)
    if out is not None and out.dtype != out_dtype:
        raise ExecutionError(f"out must have dtype {out_dtype} (casting_mode={plan.casting_mode!r}), not {out.dtype}")
    d = plan.hidden_size
    x2 = _rows(x, d)
    y = out if out is not None and out.is_contiguous() else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y2 = y.view(-1, d)
    h: torch.Tensor | None = None
    res: tuple[torch.Tensor, torch.Tensor] | None = None
    if residual is not None and residual_out is not None:
        h = residual_out if residual_out.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res = (_rows(residual, d), h.view(-1, d))
    rows = x2.shape[0]
    if rows:
        w = None if weight is None else weight.contiguous()  # widened (or rounded) to fp32 by the kernel
        flags = torch.empty(rows, dtype=torch.int8, device=x.device)
        with quiet_numpy(interpret):  # (IEEE overflow and NaN, as the GPU and the reference make them)
            _launch(shape, plan, x2, y2, w, res, flags, eps, interpret)
        bad = flags.nonzero()[:, 0]
        if len(bad):
            from ...kernels.reference import finish_from_h, run_reference

            if res is not None:  # from h, already written (perhaps over x or the residual)
                y2[bad] = finish_from_h(graph, res[1][bad], weight, eps)
            else:
                y2[bad] = run_reference(graph, x2[bad], weight, eps)
    if h is not None and residual_out is not None and h is not residual_out:
        residual_out.copy_(h)
    if y is not out and (out is not None or not x.is_contiguous()):
        # A strided input or output: the result keeps the input's layout, as torch's does.
        return (out if out is not None else torch.empty_like(x, dtype=out_dtype)).copy_(y)
    return y


caches.register(_offset_in.cache_clear)
