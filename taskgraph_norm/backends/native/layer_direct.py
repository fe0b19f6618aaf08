"""LayerNorm's warm call: the faces' one C call for an input they sent straight to the kernel.

:func:`layer_direct` makes, once per plan, ``routed(x, weight, bias, eps, out) -> y |
None``: the entry :func:`taskgraph_norm.layer_norm_sync` and :class:`taskgraph_norm.LayerNorm`
take when :func:`taskgraph_norm.ops.route` said ``DIRECT`` for ``x``, the weight and the
bias (plain tensors, no gradient recorded, no tracer) and the cached pipeline of
``x.shape[-1]`` was found.  It makes the checks the C call needs inline (the weight's
and bias's shape, device, layout and dtype; ``out``'s; ``eps`` a float or ``None``) and
makes :func:`.layer.layer_rows`'s one C call, with its bits.  Anything unusual, an
input the checks would reject included, returns ``None`` and the face runs its general
path, which raises the general path's errors or runs the call its way: fp64, another
device, strided tensors, an ``out`` that overlaps an input (in place), an ``eps`` of
another type, no rows, a context that does not allow native C (or names Triton), and
a row the kernel leaves to torch ops (a NaN in ``y``, an exact row with an Inf).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...constants import DTYPE_F32, SPLIT_NUMEL, TEAM_GRAIN
from ...kernels.layer import LAYER_EPS
from ...lowering import Plan
from ..base import allowed, triton_asked
from . import face as _face
from . import loader as _native
from . import team as _team
from .direct import HUGE_BYTES, advise_fresh
from .layer_plan import CODES, plan_fixed

__all__ = ["LayerRouted", "layer_direct"]

#: ``routed(x, weight, bias, eps, out) -> y | None`` (``None``: run the general path).
LayerRouted = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", object, object],
                       "torch.Tensor | None"]

#: (bound once: each attribute lookup shows on a 3 us call)
_overlaps = torch._C._overlaps
_F32 = torch.float32
#: Tensors whose data pointer is real (a FakeTensor or FunctionalTensor has none).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def layer_direct(plan: Plan) -> LayerRouted | None:
    """The warm entry of a LayerNorm plan the C kernels run, or ``None`` (no native form
    for the plan, or the kernels not built or switched off)."""
    fixed = plan_fixed(plan)
    if fixed is None:
        return None
    chunk, adds, n_adds, root, exact, recipe = fixed
    hidden = plan.hidden_size
    grain = max(1, TEAM_GRAIN // hidden)
    w_shape = (hidden,)
    module = _native.module()
    rows_call = module.layer_rows
    huge_numel = HUGE_BYTES // 4  # (no dtype here is wider: advise_fresh decides)

    def routed(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: object,
               out: object) -> torch.Tensor | None:
        if not x.is_cpu or not x.is_contiguous() or triton_asked() or "native" not in allowed():
            return None
        x_dtype = x.dtype
        code = CODES.get(x_dtype)
        if code is None:
            return None
        w_code = code
        w_ptr = b_ptr = None
        # A weight and bias (checked inline: each call shows here): (hidden,), CPU,
        # contiguous, x's dtype or fp32 with a half x, and of one dtype.
        p_dtype = None
        if weight is not None:
            p_dtype = weight.dtype
            if weight.shape != w_shape or not weight.is_cpu or not weight.is_contiguous():
                return None
            w_ptr = weight.data_ptr()
        if bias is not None:
            if p_dtype is None:
                p_dtype = bias.dtype
            elif bias.dtype is not p_dtype:
                return None
            if bias.shape != w_shape or not bias.is_cpu or not bias.is_contiguous():
                return None
            b_ptr = bias.data_ptr()
        if p_dtype is not None and p_dtype is not x_dtype:
            if p_dtype is not _F32 or code == DTYPE_F32:
                return None
            w_code = DTYPE_F32
        if eps is None:
            e = LAYER_EPS
        elif type(eps) is float:
            e = eps
        else:
            return None
        numel = x.numel()
        if not numel:
            return None
        if out is None:
            y = torch.empty_like(x)
            if numel >= huge_numel:
                advise_fresh(y)  # (32 MiB or more: a huge-page candidate, as RMSNorm's direct call's)
        elif (type(out) not in _PLAIN or out.shape != x.shape or out.dtype is not x_dtype  # type: ignore[attr-defined]
              or not out.is_cpu or not out.is_contiguous() or _overlaps(out, x)  # type: ignore[attr-defined]
              or (weight is not None and _overlaps(out, weight)) or (bias is not None and _overlaps(out, bias))):
            return None  # (the general checks raise, or run an in-place call)
        else:
            y = out  # type: ignore[assignment]
        rows = numel // hidden
        threads = _team.forward_threads(numel, rows, grain, SPLIT_NUMEL)
        bad = rows_call(x.data_ptr(), y.data_ptr(), rows, hidden, chunk, adds, n_adds, root, exact, w_ptr, b_ptr, e,
                        None, None, code, w_code, grain, threads)
        # A NaN row (or an exact row left to torch ops), or no scratch: the general path
        # gives it the torch-ops backend's bits (or raises); a caller's out is rewritten there.
        return None if bad else y

    routed.keep = recipe  # type: ignore[attr-defined]  # (holds the ADD triples' tensor)
    # The C face's packed arguments (face.py; the pipeline that keeps this entry keeps them).
    routed.face = module.layer_face_config(hidden, chunk, adds, n_adds, root, exact, grain)  # type: ignore[attr-defined]
    _face.install(module)
    return routed
