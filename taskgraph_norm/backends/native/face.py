"""The functional faces' warm call checked and run in C (``csrc/native_face.c``, the
checks; ``csrc/native_face_calls.c``, the calls).

On a ``(1, 4096)`` LayerNorm the kernel takes about 1 us; the Python checks before it
(:func:`taskgraph_norm.ops.route`, then each tensor's dtype, device, layout, shape and
address read one attribute at a time) took longer, and the call missed torch's own
eager kernel.  :data:`layer_face` makes the same checks in C and the same kernel call
with the same arguments as :mod:`.layer_direct`'s routed entry, so the same bits; a
tensor's metadata comes from one ``torch._C._to_dlpack`` call; it takes calls below
``SPLIT_NUMEL`` elements (one thread).  :data:`rms_face` does the same for RMSNorm,
with :mod:`.direct`'s configurations, with or without ``out``, and where the caller
allows (``normalize_sync`` and the module; the async face runs large calls on a worker
thread) calls of any size: their rows shared among :func:`.team.threads` threads with
the GIL released, as the Python path's.  A large call's Python checks cost 30-50 us
once the kernel before it has left the caches cold (docs/performance.md, "The C
face").  Anything else (a tracer, a gradient to record, a tensor subclass, strides,
another device or dtype, an ``out`` the direct path does not write, a context that
does not allow native C, a plan not yet run natively, a row the kernel leaves to torch
ops) returns ``None`` having done nothing, and the face runs its Python path.

:func:`install` hands the C side the Python objects it calls, once, when
:mod:`.layer_direct` or :mod:`.direct` first makes a native entry; until then both are
a function that returns ``None``.  Dynamo cannot trace a C function, so the face calls it
without a ``torch.compiler.is_compiling()`` guard only because :func:`install` gives
dynamo a stand-in that returns ``None`` (``torch._dynamo.substitute_in_graph``, torch
2.5 and later; on torch 2.4 the C face is not installed and the Python path runs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from torch.autograd import forward_ad

from ...kernels import DEFAULT_EPS
from ...kernels.layer import LAYER_EPS
from ..base import _allowed, _triton_asked
from . import team as _team

__all__ = ["install", "layer_face", "rms_face"]

#: ``torch._dynamo.substitute_in_graph`` (torch 2.5 and later), or ``None``.
_substitute_in_graph: Any = getattr(torch._dynamo, "substitute_in_graph", None)
_lock = threading.Lock()


def _not_installed(*args: object) -> None:
    return None


#: ``layer_face(by_config, x, weight, bias, eps, chunk_size, topology, leaf, accumulate,
#: executor) -> y | None``: ``by_config`` is :mod:`taskgraph_norm.pipeline.layer`'s
#: cache of pipelines, whose ``face`` (the plan's packed arguments) the C call reads.
layer_face: Callable[..., torch.Tensor | None] = _not_installed
#: ``rms_face(by_config, x, weight, eps, chunk_size, topology, leaf, accumulate, executor,
#: casting_mode, offset, out, large) -> y | None``: ``by_config`` is
#: :mod:`taskgraph_norm.pipeline.cache`'s cache of pipelines, whose ``face`` (the direct
#: call's configurations) the C call reads; ``out``: ``None`` or the tensor to write (then
#: returned); ``large``: calls of ``SPLIT_NUMEL`` elements or more are taken too (the
#: rows shared among the team's threads with the GIL released).
rms_face: Callable[..., torch.Tensor | None] = _not_installed


def install(module: Any) -> None:
    """Set the C face up in the loaded extension ``module`` (once)."""
    global layer_face, rms_face
    with _lock:
        if layer_face is _not_installed and _substitute_in_graph is not None:
            layer_face, rms_face = _install(module)


def _install(module: Any) -> tuple[Callable[..., torch.Tensor | None], Callable[..., torch.Tensor | None]]:
    layer, rms = module.layer_face, module.rms_face

    # What a tracer sees: None, so the face's Python path runs, then the op.
    def layer_traced(by_config: object, x: object, weight: object, bias: object, eps: object, chunk_size: object,
                     topology: object, leaf: object, accumulate: object, executor: object, /) -> None:
        return None

    def rms_traced(by_config: object, x: object, weight: object, eps: object, chunk_size: object, topology: object,
                   leaf: object, accumulate: object, executor: object, casting_mode: object, offset: object,
                   out: object, large: object, /) -> None:
        return None

    _substitute_in_graph(layer)(layer_traced)
    _substitute_in_graph(rms)(rms_traced)
    module.face_setup(torch.Tensor, torch.nn.Parameter, torch.empty_like, torch._C._to_dlpack,
                      torch._C._len_torch_dispatch_stack, torch._C._get_tracing_state,
                      torch._C._are_functorch_transforms_active, torch.is_grad_enabled, forward_ad, _allowed,
                      _triton_asked, DEFAULT_EPS, torch.float32, torch.bfloat16, torch.float16, _team.threads,
                      float(LAYER_EPS))
    return layer, rms
