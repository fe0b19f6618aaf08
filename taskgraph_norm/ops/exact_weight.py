"""``weight_grad="exact"``: the weight gradient as an exact, order-free sum over tokens.

:class:`ExactWeightRMSNorm` is the norm with the forward's kernels (the same ``y``
bits as every other path) and a backward whose input gradient is the float
backward's (``dx`` through the forward's merge DAG) and whose weight gradient is
*this call's* exact sum of ``dy * x_hat`` (an :class:`ExactSum`), correctly rounded
to the weight's dtype and returned to autograd like any gradient: ``autograd.grad``
with respect to the weight, ``torch.func.grad`` and the weight's hooks see it.
``x_hat`` is the forward's normalised value without the weight, with the bits
``normalize(x, None)`` gives (``(x / rms)`` rounded to ``x``'s dtype); for fp32
``x`` the accumulator forms it itself (``add_normalized``), so no ``x_hat`` tensor
is written.

Only the accumulation into ``weight.grad`` across backward calls is exact
(:class:`GradWatch`, the weight's hooks): after autograd's ``AccumulateGrad`` has
added the float gradient, the post-accumulate hook replaces ``weight.grad`` with the
correctly rounded value of the exact sum carried by
:data:`taskgraph_norm.ops.exact_grad.exact_grads` plus this backward's exact
states.  So ``weight.grad`` after the same rows in 1, 2, 8 or N micro-batches, in
any order, is the same bits; ``tgn.distributed.all_reduce_exact_grads`` extends that
across data-parallel ranks (docs/training.md).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import kernels
from ..errors import ConfigError
from ..backends.triton import exact_dw as triton_dw
from ..kernels.backward import norm_tangent
from .exact_grad import ExactSum, exact_grads
from .exact_state import IdLookup, zero_
from . import backward as _backward
from . import forward as _forward
from .library import _composite_grads, rms_vmap_dim
from .routing import forward_ad_active

__all__ = ["ExactWeightRMSNorm", "GradWatch", "exact_apply", "exact_value", "grad_wanted", "plain_tensor",
           "watch_param"]

_functorch: Any = torch._C._functorch
_INT_OF_WIDTH = {4: torch.int32, 2: torch.int16}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (fp32, bf16 or fp16: the exact weights' dtypes)."""
    if (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.device == b.device and a.element_size() in _INT_OF_WIDTH):
        return True  # the same memory (autograd handed the hooks the tensor itself): no comparison to run
    return (a.shape == b.shape and a.dtype == b.dtype and a.element_size() in _INT_OF_WIDTH
            and torch.equal(a.contiguous().view(_INT_OF_WIDTH[a.element_size()]),
                            b.contiguous().view(_INT_OF_WIDTH[b.element_size()])))


class ExactWeightRMSNorm(torch.autograd.Function):
    """RMSNorm whose weight gradient is this call's exact sum, correctly rounded."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, config: tuple[Any, ...],
                watch: GradWatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        # config: (eps, chunk_size, topology, leaf, accumulate, casting_mode, offset)
        return _forward.forward(x, weight, *config)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.config, ctx.watch, ctx.pipe = inputs[2], inputs[3], None
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.save_for_forward(inputs[0], inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _drms: torch.Tensor | None) -> tuple[Any, ...]:
        return _exact_backward(ctx, dy)

    @staticmethod
    def jvp(ctx: Any, t_x: torch.Tensor | None, t_w: torch.Tensor | None, *_rest: Any) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors[:2]
        return norm_tangent(x, weight, ctx.config[0], t_x, t_w, ctx.config[5], ctx.config[6]), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, weight: torch.Tensor,
             config: tuple[Any, ...], watch: GradWatch | None) -> tuple[Any, tuple[int, int]]:
        return _apply(x.movedim(rms_vmap_dim(in_dims), 0), weight, config, watch), (0, 0)


class EagerExactRMSNorm(torch.autograd.Function):
    """:class:`ExactWeightRMSNorm` under eager autograd with no ``torch.func`` transform
    and no forward-mode level: ``y`` alone, in the one-output form whose ``apply`` costs
    least (as the float mode's ``EagerRMSNorm``); the same kernels, backward and bits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, config: tuple[Any, ...],
                watch: GradWatch | None) -> torch.Tensor:
        y, rms, ctx.pipe = _forward.forward_pipe(x, weight, *config)
        ctx.config, ctx.watch = config, watch
        ctx.save_for_backward(x, weight, rms)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        return _exact_backward(ctx, dy)


def _exact_backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
    """Both forms' backward: ``(dx, dW, None, None)``."""
    x, weight, rms = ctx.saved_tensors
    eps, *config = ctx.config
    dx = dw_composite = total = rounded = None
    fused = False
    w_needs = grad_wanted(ctx, 1)
    if torch.is_grad_enabled():  # create_graph=True, torch.func: differentiable ops
        dx, dw_composite = _composite_grads(dy, x, weight, eps, ctx.needs_input_grad[0], w_needs,
                                            config[4], config[5])
    elif w_needs and not torch._C._are_functorch_transforms_active():
        # dx and this call's exact sum in one pass where the backend has one, which
        # writes the state whole (its memory not zeroed first) and rounds fp32 dW
        cpu = x.device.type == "cpu"
        total = ExactSum(weight.numel(), x.device, blank=cpu)
        fused_backward: Any = _backward.fused_exact_backward
        fused, dx, rounded = fused_backward(dy, x, weight, rms, *config, total.state, ctx.needs_input_grad[0],
                                            fresh=cpu, rounded=cpu and weight.dtype == torch.float32,
                                            pipe=ctx.pipe)
        if not fused and cpu:
            zero_(total.state)
    if dx is None and ctx.needs_input_grad[0] and not torch.is_grad_enabled():
        float_backward: Any = _backward.backward
        dx, _ = float_backward(dy.contiguous(), x, weight, rms, *config, "float", [True, False])
    if not w_needs:
        return dx, None, None, None
    if total is None or not fused:  # (a state the one pass left untouched, zero, is added into)
        total = _call_sum(dy, x, rms, weight.numel(), total)
    if fused and rounded is not None:
        dw = rounded.view(weight.shape)
    else:
        with torch._C._DisableFuncTorch():
            dw = total.result(weight.dtype).view(weight.shape)
    if ctx.watch is not None:
        ctx.watch.pending_add(total, dw)
    if dw_composite is not None:  # the exact value, differentiable as the composite's
        dw = exact_value(dw_composite, dw)
    return dx, dw, None, None


class _ExactValue(torch.autograd.Function):
    """``exact``'s value with ``approx``'s derivatives (the exact ``dW`` under
    ``create_graph=True`` and ``torch.func``, differentiable as the composite's)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        return exact.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad, None

    @staticmethod
    def jvp(ctx: Any, t_approx: torch.Tensor | None, _t_exact: torch.Tensor | None) -> torch.Tensor | None:
        return t_approx


_apply: Any = ExactWeightRMSNorm.apply
# Function.apply binds the arguments to forward's signature at every call (~11 us, for
# a forward without defaults); outside torch.func's transforms, the C apply itself:
_eager_apply: Any = super(torch.autograd.Function, EagerExactRMSNorm).apply
exact_value: Any = _ExactValue.apply


def grad_wanted(ctx: Any, index: int) -> bool:
    """Whether this backward wants the gradient of its input ``index`` (a weight or a bias):
    not ``backward(inputs=[x])`` nor ``autograd.grad(loss, [x])``, which would drop an
    exact sum formed for nothing."""
    if not ctx.needs_input_grad[index]:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(ctx.next_functions[index][0]))
    except (RuntimeError, AttributeError, IndexError, TypeError):
        return True  # autograd.grad on the leaf itself (torch cannot say), or torch.func's ctx


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a plain tensor: ``torch.func.grad``'s wrappers peeled off.  A
    batched tensor (``vmap``: ``jacrev``, per-sample gradients) has one sum per sample."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            raise NotImplementedError(
                "weight_grad='exact' forms one exact weight gradient per call; under vmap (jacrev, "
                "hessian or per-sample gradients with respect to the weight) use weight_grad='float'")
        t = _functorch.get_unwrapped(t)
    return t


def _call_sum(dy: torch.Tensor, x: torch.Tensor, rms: torch.Tensor, numel: int,
              total: ExactSum | None = None) -> ExactSum:
    """This call's exact ``sum over rows of dy * x_hat`` (added into ``total``, a zero
    sum, when given)."""
    dy, x, rms = plain_tensor(dy), plain_tensor(x), plain_tensor(rms)
    with torch._C._DisableFuncTorch():  # plain tensors stay plain under torch.func's grad level
        return _rows_sum(dy, x, rms, numel, ExactSum(numel, x.device) if total is None else total)


def _rows_sum(dy: torch.Tensor, x: torch.Tensor, rms: torch.Tensor, numel: int, total: ExactSum) -> ExactSum:
    shape = (-1, numel)
    on_triton = triton_dw.runs(x)
    if rms.dtype == torch.float32 and (x.dtype == torch.float32 or on_triton):
        # x_hat = x / rms (rounded to x's dtype): normalize(x, None)'s bits, formed by the
        # accumulator's kernel (C on CPU fp32; Triton on CUDA, which widens dy itself)
        dy_rows = dy.reshape(shape) if on_triton else dy.reshape(shape).to(torch.float32)
        return total.add_normalized(dy_rows, x.reshape(shape), rms.reshape(-1))
    return total.add_products(dy.reshape(shape).to(torch.float32), _x_hat(x, rms).reshape(shape))


def _x_hat(x: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """``(x / rms)`` rounded to ``x``'s dtype (bf16, fp16), as fp32 ``(rows, D)``:
    ``normalize(x, None)``'s bits (FINALIZE without a weight)."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    x2, r2 = x.reshape(rows, hidden), rms.reshape(rows, 1)
    return (x2.to(kernels.accumulation_dtype(x.dtype)) / r2).to(x.dtype).to(torch.float32)


class _Claim:
    """What one backward's pre-accumulate hook hands its post-accumulate hook: the
    exact sum to add, its rounded value if known, the gradient seen and the grad's
    value before ``AccumulateGrad``."""

    __slots__ = ("total", "rounded", "grad", "before")

    def __init__(self, total: ExactSum, rounded: torch.Tensor | None, grad: torch.Tensor,
                 before: torch.Tensor | None) -> None:
        self.total, self.rounded, self.grad, self.before = total, rounded, grad, before


class GradWatch:
    """A weight's hooks that make the accumulation into ``weight.grad`` exact.

    The backward of each call records its exact state, keyed by the graph task
    (``pending_add``).  The tensor hook, registered again at a forward where another
    hook followed it (so that it runs after every hook registered before that forward),
    sees the gradient about to be
    accumulated: if it is the float sum of this backward's per-call ``dW`` (in their
    arrival order: what autograd adds), the exact states stand for it; otherwise a
    hook (or another use of the weight) changed it, and its value, exactly, does.
    After ``AccumulateGrad`` (``backward()`` only: ``autograd.grad`` and
    ``backward(inputs=[x])`` accumulate nothing, and their states are dropped at the
    next backward), the post-accumulate hook adds that to the carried exact sum and
    writes ``weight.grad`` as its correctly rounded value.  A grad changed after the
    tensor hook saw it (by a hook registered after the last forward) is left as
    autograd accumulated it; the next exact backward starts from its values.
    """

    __slots__ = ("param", "lock", "pending", "claims", "hook", "__weakref__")

    def __init__(self, param: torch.Tensor) -> None:
        self.param = weakref.ref(param)
        self.lock = threading.Lock()
        self.pending: dict[int, list[tuple[ExactSum, torch.Tensor]]] = {}
        self.claims: dict[int, _Claim] = {}
        self.hook: Any = None
        hooked: Any = param  # (torch's hook registration is untyped)
        hooked.register_post_accumulate_grad_hook(self._after_accumulate)

    def at_forward(self, param: torch.Tensor) -> None:
        hooks = getattr(param, "_backward_hooks", None)  # the tensor hooks, in the order they run
        if self.hook is not None:
            if hooks and next(reversed(hooks)) == self.hook.id:
                return  # still the last
            self.hook.remove()
        hooked: Any = param
        self.hook = hooked.register_hook(self._before_accumulate)

    def pending_add(self, total: ExactSum, dw: torch.Tensor) -> None:
        with self.lock:
            self.pending.setdefault(torch._C._current_graph_task_id(), []).append((total, dw))

    def _before_accumulate(self, grad: torch.Tensor) -> None:
        param = self.param()
        task = torch._C._current_graph_task_id()
        with self.lock:
            entries = self.pending.pop(task, [])
            self.pending.clear()  # other backward passes' states: never accumulated
            self.claims.clear()
        if param is None:
            return
        values = grad.detach() if grad.dim() == 1 else grad.detach().reshape(-1)
        total = _sum_if_unchanged(entries, values, grad)
        rounded = None
        if total is None:  # changed by a hook, or a gradient from elsewhere: its value, exactly
            total = ExactSum(values.numel(), values.device).add_values(values)
        elif len(entries) == 1:
            rounded = values  # one call's dW: its exact sum, rounded (the tensor param.grad may become)
        exact_grads.prepare(param)  # before AccumulateGrad changes the grad the carry stands behind
        before = param.grad
        with self.lock:
            self.claims[task] = _Claim(total, rounded, values, None if before is None else before.detach().clone())

    def _after_accumulate(self, param: torch.Tensor) -> None:
        with self.lock:
            claim = self.claims.pop(torch._C._current_graph_task_id(), None)
        grad = param.grad
        if claim is None or grad is None:
            return
        flat = grad.detach() if grad.dim() == 1 else grad.detach().reshape(-1)
        expected = claim.grad if claim.before is None else claim.before.reshape(-1) + claim.grad
        if bits_equal(flat, expected):  # AccumulateGrad added what the tensor hook saw
            # into the grad tensor when it is the one accumulated into, or carries
            # create_graph's graph (its value becomes the exact one, its graph stays)
            exact_grads.add_sum(param, claim.total, into_grad=claim.before is not None or grad.requires_grad,
                                rounded=claim.rounded, installed=True)


def _sum_if_unchanged(entries: list[tuple[ExactSum, torch.Tensor]], values: torch.Tensor,
                      grad: torch.Tensor | None = None) -> ExactSum | None:
    """The merged exact states of ``entries`` if ``values`` (``grad`` flattened) is the
    float sum autograd forms of their ``dW`` (added in arrival order), else ``None``."""
    if not entries:
        return None
    if len(entries) == 1 and entries[0][1] is grad:
        return entries[0][0]  # the one backward's dW itself, as it returned it
    folded = entries[0][1].reshape(-1)
    for _, dw in entries[1:]:
        folded = folded + dw.reshape(-1)
    if not bits_equal(folded, values):
        return None
    total = entries[0][0]
    for other, _ in entries[1:]:
        total.merge(other)
    return total


_watches: WeakIdKeyDictionary = WeakIdKeyDictionary()
_watches_lock = threading.Lock()
_fast_watches: IdLookup[GradWatch] = IdLookup()  # the watches, found on every forward


def watch_param(param: torch.Tensor) -> GradWatch | None:
    """``param``'s hooks (made on its first exact forward), or ``None`` where there is no
    ``.grad`` to accumulate into: a non-leaf weight, or a ``torch.func`` transform."""
    if not (param.is_leaf and param.requires_grad) or torch._C._are_functorch_transforms_active():
        return None
    watch = _fast_watches.get(param)
    if watch is None:
        with _watches_lock:
            watch = _watches.get(param)  # type: ignore[no-untyped-call]
            if watch is None:
                exact_grads.register(param)
                watch = _watches[param] = GradWatch(param)
            _fast_watches.put(param, watch, len(_watches))
    assert watch is not None
    watch.at_forward(param)
    return watch


def exact_apply(x: torch.Tensor, weight: torch.Tensor, config: tuple[Any, ...],
                param: torch.Tensor) -> torch.Tensor:
    """The norm of ``x`` with ``weight`` (``param`` itself, or its flattened view) whose
    gradient is this call's exact sum, accumulated exactly into ``param.grad``."""
    if x.dtype == torch.float64 or param.dtype == torch.float64:
        raise ConfigError("weight_grad", "exact", "fp32, bf16 or fp16 inputs and weights (the exact "
                          "accumulator sums products of fp32 values; docs/training.md)")
    watch = watch_param(param)
    if torch._C._are_functorch_transforms_active() or forward_ad_active():
        return _apply(x, weight, config, watch)[0]  # type: ignore[no-any-return]
    y: torch.Tensor = _eager_apply(x, weight, config, watch)
    return y
