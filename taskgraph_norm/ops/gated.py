"""Gated, grouped RMSNorm (docs/design.md section 15) and its ``torch.library`` ops.

One construction, on every face: the groups are the same merge graph at hidden size
``group_size`` over ``rows * groups`` rows (a view of the input), so a group's bits
depend on its own ``group_size`` values only; the gate is an elementwise step
before the norm (``norm_before_gate=False``, Mamba2) or after the weight
(``norm_before_gate=True``, Qwen3-Next), with its own cast order.  With
``acc`` the accumulation dtype, ``s = silu(gate)`` in ``acc``
(:func:`taskgraph_norm.kernels.gate.silu`, position-invariant bits) and ``n`` each
group's ``h / rms(h)`` from the merge graph:

* ``casting_mode="torch"``/``"gemma"``: ``h = x * s`` (before) or ``x``, in ``acc``;
  ``y = n * (w + offset) [* s]`` in ``acc``, cast once to ``x.dtype``.
* ``casting_mode="llama"`` (the Hugging Face families): before (Mamba2, Bamba,
  NemotronH, GraniteMoeHybrid, Zamba2) ``h = x * s`` in fp32, ``n`` rounded to
  ``x.dtype``, ``y = n * (w + offset)`` in the promoted dtype of ``w`` and ``x``;
  after (Qwen3-Next, Qwen3.5, OLMo-hybrid) ``n`` rounded to ``x.dtype``, ``m = n *
  (w + offset)`` in the promoted dtype, ``y = (m * s)`` rounded to ``x.dtype``.

The ops: ``taskgraph_norm::gated_rms_norm(x, gate?, weight?, eps, group_size,
norm_before_gate, <config>) -> y`` and its backward ``gated_rms_norm_backward(dy, x,
gate?, weight?, ...) -> (dx, dgate, dW)``, one opaque node each under
``torch.compile`` and ``torch.export`` (so a compiled call has the eager bits).  The
backward runs the eager construction again under autograd: ``dx`` through the merge
graph's backward, ``dgate`` elementwise, ``dW`` over fixed row blocks
(:mod:`.gated_weight`).  A call that records no gradient runs the construction in one
native pass where it can (:mod:`taskgraph_norm.backends.native.gated_rows`: the same
operations in the same order, so the same bits).

Forward-mode AD and ``torch.func``: the op has no forward rule and its autograd does not
run under the grad transforms (its guard refuses both, naming :data:`GATED_FACES`); the
faces run the construction's pieces instead, each with a ``jvp`` and a ``vmap`` rule
(:class:`~.library.FuncRMSNorm`, :class:`~.gate_silu.GateSilu`,
:class:`~.gated_weight.GatedWeight`, torch ops), never the one pass while an input
carries a tangent: the plain call's bits, and tangents from plain torch ops.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import caches, kernels, pipeline
from ..checks import check_input, resolve_eps
from ..errors import ConfigError, DeviceMismatchError, GateShapeError
from ..backends.base import allowed
from ..backends.native import gate as native_gate
from ..backends.native.gated_rows import GatedCall, gated_call
from . import library as _library_mod
from .forward import check_model_options
from .gate_silu import gate_silu as _gate_silu
from .gate_silu import is_wrapped as _is_wrapped
from .gate_silu import real as _real
from .gated_weight import weight_product
from .library import LIBRARY, _register_autograd, eager_apply
from .routing import DIRECT, TRACED, dual, dtensor_face, route

__all__ = ["check_gated", "gated_forward", "gated_rms_norm", "gated_rms_norm_op", "gated_rms_norm_backward_op"]

#: The dtypes the C gate reads and writes.
_GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CONFIG = "int chunk_size, str topology, str leaf, str accumulate, str casting_mode, float offset"
_GATED = "float eps, int group_size, bool norm_before_gate"


def check_gated(x: object, gate: object, weight: object, group_size: object) -> int:
    """``x``, the weight (as ``F.rms_norm`` checks them over the whole hidden dim), the
    gate (``x``'s shape and device) and ``group_size`` (``None``: the hidden size; else a
    positive divisor of it); returns the group size."""
    check_input(x, (x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 1,), weight)
    assert isinstance(x, torch.Tensor)
    hidden = x.shape[-1]
    if group_size is None:
        size = hidden
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or (
            hidden % group_size):
        raise ConfigError("group_size", group_size, f"None or a positive divisor of the hidden size {hidden}")
    else:
        size = group_size
    if gate is not None:
        if not isinstance(gate, torch.Tensor):
            raise TypeError(f"gate must be a torch.Tensor or None, got {type(gate).__name__}")
        if gate.shape != x.shape:
            raise GateShapeError(tuple(gate.shape), tuple(x.shape))
        if gate.device != x.device:
            raise DeviceMismatchError(gate.device, x.device)
        if not gate.dtype.is_floating_point:
            raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
    return size


def _norm(h: torch.Tensor, eps: float, config: tuple[Any, ...], executor: str,
          llama_weight: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Each row of ``h`` (already viewed as groups) over its last dim, no weight, through
    the merge graph: ``(h / rms)`` rounded to ``h``'s dtype.  ``llama_weight``, for a
    call that records no gradient: ``(weight, offset)`` multiplied in by FINALIZE in
    ``casting_mode="llama"`` (the bits of :func:`.gated_weight.weight_product` after it)."""
    chunk_size, topology, leaf, accumulate = config
    if h.numel() == 0:
        return h.clone()  # (no rows: empty, and still a function of h for autograd)
    if llama_weight is not None:
        pipe = pipeline.for_config(h.shape[-1], chunk_size, topology, leaf, accumulate, executor, "llama",
                                   llama_weight[1])
        weighted: torch.Tensor = pipe(h, llama_weight[0], eps)
        return weighted
    how = route(h, None)
    if how == DIRECT:
        pipe = pipeline.for_config(h.shape[-1], chunk_size, topology, leaf, accumulate, executor)
        y: torch.Tensor = pipe(h, None, eps)
        return y
    if how == TRACED:
        traced: torch.Tensor = _library_mod.rms_norm_op(h, None, eps, chunk_size, topology, leaf, accumulate,
                                                        "torch", 0.0)[0]
        return traced
    return eager_apply(h, None, (eps, chunk_size, topology, leaf, accumulate, "torch", 0.0))


def gated_forward(
    x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, eps: float, group_size: int,
    norm_before_gate: bool, chunk_size: int, topology: str, leaf: str, accumulate: str, casting_mode: str,
    offset: float, *, executor: str = "auto", exact_param: torch.Tensor | None = None,
) -> torch.Tensor:
    """The construction of the module doc on checked input (``eps`` resolved), as
    differentiable pieces: the merge graph's ops and elementwise torch ops."""
    acc = kernels.accumulation_dtype(x.dtype)
    llama = casting_mode == "llama"
    # No gradient to record, no tangent: the gate's product in one C pass (the same bits).
    fused = gate is not None and acc == torch.float32 and not (torch.is_grad_enabled() and (
        x.requires_grad or gate.requires_grad or (weight is not None and weight.requires_grad))) and (
        "native" in allowed()) and _real(gate, x) and not dual(x, gate, weight) and native_gate.runs(gate, x)
    if fused and executor in ("auto", "compiled"):
        assert gate is not None
        y = _one_pass(x, gate, weight, eps, group_size, norm_before_gate, (chunk_size, topology, leaf, accumulate),
                      casting_mode, offset, executor)
        if y is not None:
            return y
    if gate is not None and not norm_before_gate:
        h = native_gate.gate_product(gate, x, acc) if fused else kernels.widen(x, acc) * _gate_silu(gate, acc)
    else:
        h = x if llama else kernels.widen(x, acc)
    hidden = x.shape[-1]
    groups = hidden // group_size if group_size else 1
    if groups > 1:
        h = h.reshape(*h.shape[:-1], groups, group_size)
    config = (chunk_size, topology, leaf, accumulate)
    if fused and llama and weight is not None and groups == 1 and norm_before_gate:
        assert gate is not None
        m = _norm(h, eps, config, executor, (weight, offset))  # FINALIZE multiplies by the weight
        return _gate_after(gate, m, acc, x.dtype, fused)
    n = _norm(h, eps, config, executor)
    if llama:
        n = n.to(x.dtype)
    m = n
    if weight is not None:
        wide = torch.promote_types(weight.dtype, x.dtype) if llama else acc
        w = weight if groups == 1 else weight.reshape(groups, group_size)
        m = weight_product(n, w, offset, wide, exact_param)
    if groups > 1:
        m = m.reshape(x.shape)
    if gate is not None and norm_before_gate:
        return _gate_after(gate, m, acc, x.dtype, fused)
    return m if llama else m.to(x.dtype)


#: The weight's types the one pass reads (a module's Parameter is one).
_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: The one-pass kernel per configuration (``None``: none for it).
_one_pass_calls: dict[tuple[Any, ...], GatedCall | None] = {}
caches.register(_one_pass_calls.clear)


def _one_pass(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor | None, eps: float, group_size: int,
              norm_before_gate: bool, config: tuple[Any, ...], casting_mode: str, offset: float,
              executor: str) -> torch.Tensor | None:
    """The whole construction in one native pass (:mod:`~taskgraph_norm.backends.native.gated_rows`,
    the same bits) for a call that records no gradient, or ``None`` where it does not
    run (strided or empty input, a weight that is not a plain CPU tensor, no native
    form for the plan, a NaN in a row): the caller runs the construction."""
    if not (x.is_contiguous() and gate.is_contiguous() and x.numel()) or (weight is not None and not (
            type(weight) in _PLAIN and not _is_wrapped(weight) and weight.device.type == "cpu"
            and weight.is_contiguous())):
        return None
    groups = x.shape[-1] // group_size
    key = (group_size, groups, *config, executor, casting_mode, offset)
    try:
        call = _one_pass_calls[key]
    except KeyError:
        chunk_size, topology, leaf, accumulate = config
        pipe = pipeline.for_config(group_size, chunk_size, topology, leaf, accumulate, executor)
        call = None if pipe.executor != "compiled" or pipe.plan is None else gated_call(
            pipe.plan, groups, casting_mode, offset)
        if len(_one_pass_calls) >= 64:
            _one_pass_calls.clear()
        _one_pass_calls[key] = call
    if call is None:
        return None
    return call(x, gate, weight, eps, norm_before_gate,
                output_dtype(x, gate, weight, casting_mode, norm_before_gate))


def _gate_after(gate: torch.Tensor, m: torch.Tensor, acc: torch.dtype, dtype: torch.dtype,
                fused: bool) -> torch.Tensor:
    """``(m * silu(gate))`` rounded to ``dtype``: in one C pass when ``fused`` (no gradient)."""
    if fused and m.dtype in _GATE_DTYPES:
        return native_gate.gate_product(gate, m, dtype)
    return _same_nans((m * _gate_silu(gate, acc)).to(dtype))


def _same_nans(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each bf16/fp16 NaN made 0xFFFF (in place, outside autograd), as
    :func:`~taskgraph_norm.kernels.gate.gate_product` and the C gate write it: torch's
    casts write a NaN by the element's position."""
    with torch.no_grad():
        d = t.detach()
        if d.element_size() == 2 and d.device.type == "cpu":
            nan = d.isnan()
            if _is_wrapped(d) or bool(nan.any()):  # (torch.func: no data-dependent branch)
                d.view(torch.int16).masked_fill_(nan, -1)
    return t


def output_dtype(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, casting_mode: str,
                 norm_before_gate: bool) -> torch.dtype:
    """``y``'s dtype: ``x``'s, except ``"llama"`` with a weight and no gate after it (the
    promoted dtype of the weight and ``x``, as Mamba2's module returns)."""
    if casting_mode == "llama" and weight is not None and not (gate is not None and norm_before_gate):
        return torch.promote_types(weight.dtype, x.dtype)
    return x.dtype


# --- the ops -----------------------------------------------------------------------

LIBRARY.define(f"gated_rms_norm(Tensor x, Tensor? gate, Tensor? weight, {_GATED}, {_CONFIG}) -> Tensor")
LIBRARY.define(f"gated_rms_norm_backward(Tensor dy, Tensor x, Tensor? gate, Tensor? weight, {_GATED}, {_CONFIG}, "
               "bool[3] output_mask) -> (Tensor, Tensor, Tensor)")


def _forward_kernel(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                    group_size: int, norm_before_gate: bool, *config: Any) -> torch.Tensor:
    check_gated(x, gate, weight, group_size)
    check_model_options(config[4], config[5])
    return gated_forward(x, gate, weight, eps, group_size, norm_before_gate, *config)


def _backward_kernel(dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
                     eps: float, group_size: int, norm_before_gate: bool, *rest: Any
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager construction's gradients, by ``torch.func.vjp`` (its own autograd level:
    it works below the dispatcher's autograd keys too, as in a dispatch mode's kernel)."""
    *config, mask = rest
    given = [t for t in (x, gate, weight) if t is not None]
    flags = [t is not None for t in (x, gate, weight)]

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        found = iter(tensors)
        args = [next(found) if present else None for present in flags]
        return gated_forward(args[0], args[1], args[2], eps, group_size,  # type: ignore[arg-type]
                             norm_before_gate, *config)

    vjp: Any = torch.func.vjp
    _, pullback = vjp(forward, *given)
    found = iter(pullback(dy))
    grads = [next(found) if present else None for present in flags]
    return tuple(  # type: ignore[return-value]
        g.detach() if g is not None and need else x.new_empty(0)
        for g, need in zip(grads, mask))


LIBRARY.impl("gated_rms_norm", _forward_kernel, "CompositeExplicitAutograd")
LIBRARY.impl("gated_rms_norm_backward", _backward_kernel, "CompositeExplicitAutograd")
LIBRARY.impl("gated_rms_norm_backward", torch.library.fallthrough_kernel, "Autograd")

gated_rms_norm_op = torch.ops.taskgraph_norm.gated_rms_norm.default
gated_rms_norm_backward_op = torch.ops.taskgraph_norm.gated_rms_norm_backward.default


def _forward_fake(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                  group_size: int, norm_before_gate: bool, *config: Any) -> torch.Tensor:
    return torch.empty_like(x, dtype=output_dtype(x, gate, weight, config[4], norm_before_gate))


def _backward_fake(dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
                   *rest: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = rest[-1]
    return tuple(  # type: ignore[return-value]
        t.new_empty(t.shape) if t is not None and need else x.new_empty(0)
        for t, need in zip((x, gate, weight), mask))


_register_fake: Any = torch.library.register_fake
_register_fake("taskgraph_norm::gated_rms_norm", _forward_fake, lib=LIBRARY)
_register_fake("taskgraph_norm::gated_rms_norm_backward", _backward_fake, lib=LIBRARY)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs[:3])
    ctx.config = inputs[3:]


def _backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
    x, gate, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1] and gate is not None, needs[2] and weight is not None]
    dx, dgate, dw = gated_rms_norm_backward_op(dy, x, gate, weight, *ctx.config, mask)
    return (dx if mask[0] else None, dgate if mask[1] else None, dw if mask[2] else None) + (None,) * 9


#: The faces that carry a tangent and the torch.func transforms (named by the op's refusal).
GATED_FACES = ("tgn.normalize_sync / tgn.normalize with gate= or group_size=, tgn.GatedRMSNorm or "
               "taskgraph_norm.ops.gated_rms_norm")
_register_autograd("gated_rms_norm", _backward, _setup, GATED_FACES)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor | None = None, weight: torch.Tensor | None = None,
    eps: float | None = None, *, group_size: int | None = None, norm_before_gate: bool = False,
    topology: str = "tree", chunk_size: int = 64, leaf: str = "pairwise", accumulate: str = "float",
    casting_mode: str = "torch", offset: float = 0.0, executor: str = "auto",
    exact_param: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated, grouped RMSNorm of ``x`` over its last dim (the module doc's construction).

    A traced call (``torch.compile``, ``torch.export``) is the op ``gated_rms_norm``;
    an eager call runs the construction directly (under autograd when a gradient is
    recorded: the same bits).  ``exact_param``: ``weight_grad="exact"`` (eager only)."""
    if not isinstance(norm_before_gate, bool):
        raise ConfigError("norm_before_gate", norm_before_gate, "True or False")
    face = dtensor_face("gated", x, gate, weight)
    if face is not None:  # a DTensor: taskgraph_norm.distributed.dtensor_gated
        return face(x, gate, weight, eps, dict(  # type: ignore[no-any-return]
            group_size=group_size, norm_before_gate=norm_before_gate, topology=topology, chunk_size=chunk_size,
            leaf=leaf, accumulate=accumulate, casting_mode=casting_mode, offset=offset, executor=executor),
            exact_param)
    size = check_gated(x, gate, weight, group_size)
    check_model_options(casting_mode, offset)
    e = resolve_eps(eps, x.dtype)
    config = (chunk_size, topology, leaf, accumulate, casting_mode, float(offset))
    if route(x, weight) == TRACED or (gate is not None and route(gate, None) == TRACED):
        pipeline.check_executor(executor)
        y: torch.Tensor = gated_rms_norm_op(x, gate, weight, e, size, norm_before_gate, *config)
        return y
    return gated_forward(x, gate, weight, e, size, norm_before_gate, *config, executor=executor,
                         exact_param=exact_param)
