"""The three backends -- torch ops, native C, Triton -- and the choice among them.

Each class answers the protocol of :mod:`.base`; :func:`choose` walks the priority
list (Triton, native, torch ops) and returns the first that runs a plan on a device
and dtype, or raises one error listing every backend's reasons.  All three give the
same bits (the tests compare them): they differ in speed and in where they run.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .. import kernels
from ..constants import EXACT_DW_TILE, SPLIT_NUMEL, SPLIT_PRODUCTS
from ..errors import ExactSumOverflowError, ExecutionError
from ..graph import Graph
from ..kernels import exact_sum as _exact_sum
from ..lowering import Plan
from . import triton as _triton
from .base import Backend, Forward, LayerForward, allowed, triton_asked
from .native import grads as _native_grads
from .native import loader as _native
from .native import team as _team
from .native.team import BACKWARD_SPLIT_NUMEL
from .native.direct import DirectCall, advise_fresh, direct_call
from .native.layer import NativeLayer
from .torch_ops import layer as _layer
from .torch_ops.compiled import run_compiled
from .torch_ops.rowsum import plan_rms, plan_row_sum, torch_backward
from .triton import backward as _triton_backward
from .triton import exact_dw as _triton_dw
from .triton.layer import TritonLayer

__all__ = ["BACKENDS", "NativeBackend", "NoBackendError", "TorchOpsBackend", "TritonBackend", "accumulate_exact",
           "choose"]


class NoBackendError(ExecutionError):
    """No backend runs this plan on this device and dtype; the message lists why, per backend."""

    def __init__(self, device: torch.device, dtype: torch.dtype, reasons: dict[str, list[str]]) -> None:
        lines = "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())
        super().__init__(f"no backend runs this plan on {device} for {dtype} input ({lines})")
        self.reasons = reasons


def _stats(plan: Plan, y: torch.Tensor, h: torch.Tensor, eps: float, stats: bool) -> Forward:
    """``y`` and, when asked, each row's ``rms`` of ``h`` (what was normalised: ``x``, or a
    residual plan's ``x + residual``) summed again in the plan's order by torch ops."""
    return Forward(y, plan_rms(plan, h, eps) if stats else None)


class TorchOpsBackend:
    """The plan as a few level-batched torch ops over row tiles: any device, any dtype."""

    name = "torch_ops"

    def not_supported_reasons(self, plan: Plan, device: torch.device, dtype: torch.dtype) -> list[str]:
        return []

    def forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
        out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
        **options: Any,
    ) -> Forward:
        y = run_compiled(graph, x, weight, eps, plan=plan, out=out, cancel=cancel, residual=residual,
                         residual_out=residual_out, native=False, **options)
        return _stats(plan, y, x if residual_out is None else residual_out, eps, stats)

    def backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, *,
        input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:func:`~taskgraph_norm.backends.torch_ops.rowsum.torch_backward` in the plan's order."""
        return torch_backward(lambda v: plan_row_sum(plan, v), plan.accumulate == "exact", dy, x, weight, rms,
                              input_grad, weight_grad, offset, round_x_hat)

    def accumulate_exact(
        self, state: torch.Tensor, dy: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None,
    ) -> bool:
        if rms is not None:  # x_hat = x / rms, the fp32 division (normalize(x, None)'s bits)
            b = torch.div(_exact_sum.as_rows(b, state.shape[1], "x"), rms.reshape(-1, 1))
        _exact_sum.add_products_(state, dy, b)
        return True

    def backward_exact_dw(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
        state: torch.Tensor, dx: torch.Tensor | None, *, offset: float, fresh: bool = False,
        rounded: torch.Tensor | None = None,
    ) -> bool:
        return False  # the two passes: backward, then accumulate_exact

    def layer_forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        eps: float, *, out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
    ) -> LayerForward:
        """LayerNorm's plan as torch ops over row tiles (:func:`.torch_ops.layer.run_layer`)."""
        return _layer.run_layer(plan, x, weight, bias, eps, out=out, residual=residual, residual_out=residual_out,
                                stats=stats, cancel=cancel)

    def layer_backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
        den: torch.Tensor, *, input_grad: bool, weight_grad: bool, bias_grad: bool,
        weight_dtype: torch.dtype | None = None, bias_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """:func:`.torch_ops.layer.layer_backward` (``dx`` in the plan's order)."""
        return _layer.layer_backward(plan, dy, x, weight, mean, den, input_grad=input_grad, weight_grad=weight_grad,
                                     bias_grad=bias_grad, weight_dtype=weight_dtype, bias_dtype=bias_dtype)


#: What the other backends fall back on for the rows or dtypes they do not take.
_TORCH_OPS = TorchOpsBackend()


class NativeBackend(NativeLayer):
    """The C kernels (built at install): each row read once with the row in cache,
    rows shared among torch's threads; CPU, every plan with pairwise leaves and ADD
    merges, and every exact plan (LayerNorm: float plans, :mod:`.native.layer`)."""

    name = "native"

    def not_supported_reasons(self, plan: Plan, device: torch.device, dtype: torch.dtype) -> list[str]:
        reasons = self.layer_reasons(plan)
        if device.type != "cpu":
            reasons.append(f"runs on CPU tensors, not {device.type}")
        if not _native.runs_plan(plan):
            reasons.append(f"no kernel for {plan.leaf} leaves with a {plan.merge!r} merge (torch.sum's order)")
        if not _native.available():
            reasons.append(f"the C kernels are not available ({_native.why_unavailable()})")
        return reasons

    def direct(self, plan: Plan) -> DirectCall | None:
        """The plan's one-call entry for fp32, bf16 and fp16 CPU rows
        (:func:`~taskgraph_norm.backends.native.direct.direct_call`)."""
        return direct_call(plan)

    def forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
        out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
        direct: DirectCall | None = None, **options: Any,
    ) -> Forward:
        if direct is not None and not options and residual is None:
            found = self._direct_forward(plan, direct, x, weight, eps, out, stats)
            if found is not None:
                return found
        y = run_compiled(graph, x, weight, eps, plan=plan, out=out, cancel=cancel, residual=residual,
                         residual_out=residual_out, native=True, **options)
        return _stats(plan, y, x if residual_out is None else residual_out, eps, stats)

    def _direct_forward(
        self, plan: Plan, direct: DirectCall, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
        out: torch.Tensor | None, stats: bool,
    ) -> Forward | None:
        """``y`` (and ``rms``) from one native call, or ``None`` where it does not apply."""
        if not stats:
            y = direct(x, weight, eps, out, None, None)
            return None if y is None else Forward(y, None)
        hidden = plan.hidden_size
        exact = plan.accumulate == "exact"
        total = torch.empty(x.numel() // hidden, 2 if exact else 1, dtype=torch.float64 if exact else torch.float32)
        y = direct(x, weight, eps, out, None, None, total)
        if y is None:
            return None
        # a float plan's kernel wrote each row's rms itself; an exact pair becomes its rms here
        rms = _native_grads.rms_of_totals(total, hidden, eps) if exact else total
        return Forward(y, rms if x.dim() == 2 else rms.view(*x.shape[:-1], 1))

    def backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, *,
        input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """fp32 rows in one C pass (whose whole row blocks torch's threads share from
        :data:`BACKWARD_SPLIT_NUMEL` elements on); other dtypes, llama's rounded ``x_hat`` and
        non-finite rows on torch ops (their NaNs' signs and payloads are torch's)."""
        if x.dtype == torch.float32 and not round_x_hat and (weight is None or weight.dtype == torch.float32):
            w_g = weight if weight is None or not offset else kernels.finalize_weight(weight, torch.float32, offset)
            found = self.backward_rows(plan, dy, x, None if w_g is None else w_g.contiguous(), rms,
                                       input_grad, weight_grad)
            if found is not None:
                return found
        return _TORCH_OPS.backward(plan, dy, x, weight, rms, input_grad=input_grad, weight_grad=weight_grad,
                                        offset=offset, round_x_hat=round_x_hat)

    def backward_rows(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
        input_grad: bool, weight_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """The C pass over fp32 rows (``weight``: what ``g = dy * weight`` multiplies by,
        ``w + offset`` made in fp32), or ``None`` where a row is not finite."""
        rows, hidden = x.shape
        dx = None
        if input_grad:
            dx = torch.empty_like(x)
            advise_fresh(dx)
        dw = torch.empty(hidden, dtype=torch.float32) if weight_grad and weight is not None else None
        threads = _team.threads() if x.numel() >= BACKWARD_SPLIT_NUMEL and rows > kernels.ROW_BLOCK else 1
        # Each thread runs whole row blocks, and C merges the block sums in one order.
        bad = _native_grads.backward_rows(x, dy, weight, rms, _native_grads.recipe_of(plan), dx, dw,
                                          exact=plan.accumulate == "exact", threads=threads, grain=kernels.ROW_BLOCK)
        return None if bad else (dx, dw)

    def backward_exact_dw(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
        state: torch.Tensor, dx: torch.Tensor | None, *, offset: float, fresh: bool = False,
        rounded: torch.Tensor | None = None,
    ) -> bool:
        """fp32 rows in one C pass: each thread adds its row blocks' exact products right
        after their ``dx``, while the rows are in its cache (native_dw_fused.c); its rows
        shared among torch's threads from :data:`SPLIT_NUMEL` elements on (the pass does
        twice the backward's work per row); a fresh state is written whole and rounded
        from the digit rows the sum reached.  ``False`` for other operands, and where a
        row is not finite (whose NaNs torch's ops make)."""
        fp32 = torch.float32
        rows, hidden = x.shape
        if (x.dtype != fp32 or dy.dtype != fp32 or rms.dtype != fp32 or state.device.type != "cpu"
                or rows > _exact_sum.ROWS_PER_ADD or (weight is not None and weight.dtype != fp32)):
            return False
        w_g = weight if weight is None or not offset else kernels.finalize_weight(weight, fp32, offset)
        if dx is not None:
            advise_fresh(dx)  # (a fresh dx faulted in 4 KiB pages costs ms: as backward_rows's)
        threads = _team.threads() if x.numel() >= SPLIT_NUMEL and rows > kernels.ROW_BLOCK else 1
        bad = _native_grads.backward_exact_dw(x, dy, None if w_g is None else w_g.contiguous(), rms,
                                              _native_grads.recipe_of(plan), dx, state,
                                              exact=plan.accumulate == "exact", threads=threads,
                                              grain=kernels.ROW_BLOCK, fresh=fresh, rounded=rounded)
        return bad == 0

    def accumulate_exact(
        self, state: torch.Tensor, dy: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None,
    ) -> bool:
        """The C kernel over fp32 rows (bf16/fp16 widen exactly), in pieces of
        ``ROWS_PER_ADD`` rows; with ``rms`` it forms ``x / rms`` itself (no ``x_hat``
        tensor).  Its columns are shared among torch's threads from
        :data:`SPLIT_PRODUCTS` products on."""
        if state.device.type != "cpu" or not _native.available():
            return False
        n = state.shape[1]
        a, b = _exact_sum.as_rows(dy, n, "dy"), _exact_sum.as_rows(b, n, "x_hat" if rms is None else "x")
        if a.shape[1] > 1 and (a.stride(1) != 1 or b.stride(1) != 1):
            a, b = a.contiguous(), b.contiguous()
        r = None if rms is None else rms.reshape(-1, 1).contiguous()
        step = _exact_sum.ROWS_PER_ADD
        if a.shape[0] <= step:  # one piece (every call below 2**24 rows): no views to make
            self._exact_piece(state, a, b, r)
            return True
        for start in range(0, a.shape[0], step):
            self._exact_piece(state, a[start:start + step], b[start:start + step],
                              None if r is None else r[start:start + step])
        return True

    @staticmethod
    def _exact_piece(state: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None) -> None:
        n = state.shape[1]
        threads = _team.threads() if a.numel() >= SPLIT_PRODUCTS and n >= 2 * EXACT_DW_TILE else 1
        # columns are independent: one block of whole tiles per thread (each block call
        # allocates the kernel's 0.5 MiB panel buffer, which a smaller grain would pay
        # again per block)
        grain = max(EXACT_DW_TILE, -(-n // threads // EXACT_DW_TILE) * EXACT_DW_TILE)
        over = _native_grads.exact_dw(state, a, b, rms=rms, threads=threads, grain=grain)
        if over:
            raise ExactSumOverflowError(over, f"|sum| must stay below 2**{40 + 256}")


class TritonBackend(TritonLayer):
    """The Triton kernels: one program per row, the plan's order operation for
    operation (float) or exactly (exact), FINALIZE fused; CUDA tensors, and CPU
    tensors in Triton's interpreter (``TRITON_INTERPRET=1``) when asked for by name
    (LayerNorm: the forward, :mod:`.triton.layer`)."""

    name = "triton"

    def __init__(self, by_name: bool = False) -> None:
        #: Asked for by name (``executor="triton"``): CPU tensors run in the interpreter.
        self.by_name = by_name

    def not_supported_reasons(self, plan: Plan, device: torch.device, dtype: torch.dtype) -> list[str]:
        reasons = self.layer_reasons(plan)
        if not _triton.available():
            reasons.append("triton is not installed (pip install 'taskgraph-norm[triton]')")
        if device.type == "cpu":
            if not (_triton.interpreting() and (self.by_name or triton_asked())):
                reasons.append("CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1), "
                               "when asked for by name (executor='triton' or backends.use('triton'))")
        elif device.type != "cuda":
            reasons.append(f"runs on CUDA tensors, not {device.type}")
        if dtype == torch.float64:
            reasons.append("no fp64 kernels")
        if _triton.available() and not _triton.supports(plan):
            reasons.append(f"no kernel for {plan.leaf} leaves with a {plan.merge!r} merge")
        return reasons

    def forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
        out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
        **options: Any,
    ) -> Forward:
        if options:
            raise ExecutionError(f"the triton backend takes no options {sorted(options)} (the compiled executor's)")
        extra = {} if residual is None else {"residual": residual, "residual_out": residual_out}
        y = _triton.run_triton(graph, x, weight, eps, plan=plan, out=out, **extra)
        return _stats(plan, y, x if residual_out is None else residual_out, eps, stats)

    def backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, *,
        input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The Triton kernels' ``(dx, dW)``; the rows they flag (a non-finite ``s`` or
        ``rms``, a zero ``rms``, a NaN in ``dx``) and a non-finite ``dW`` are computed
        again by torch ops on the CPU, whose NaNs they then carry."""
        if not _triton_backward.supports_backward(plan, x, dy, weight, rms, on_cpu=True):
            return _TORCH_OPS.backward(plan, dy, x, weight, rms, input_grad=input_grad,
                                              weight_grad=weight_grad, offset=offset, round_x_hat=round_x_hat)
        dx, dw, bad = _triton_backward.run_backward(plan, dy, x, weight, rms, input_grad, weight_grad, offset,
                                                    round_x_hat)
        cpu = torch.device("cpu")
        w_cpu = None if weight is None else weight.to(cpu)
        if dx is not None and len(bad):
            fixed, _ = _TORCH_OPS.backward(plan, dy[bad].to(cpu), x[bad].to(cpu), w_cpu, rms[bad].to(cpu),
                                                  input_grad=True, weight_grad=False, offset=offset)
            assert fixed is not None
            dx[bad] = fixed.to(dx.device)
        if dw is not None and not bool(torch.isfinite(dw).all()):
            dw_cpu = kernels.weight_grad_float(x.to(cpu), dy.to(cpu), rms.to(cpu), dw.dtype, round_x_hat=round_x_hat)
            dw = dw_cpu.to(dw.device)
        return dx, dw

    def accumulate_exact(
        self, state: torch.Tensor, dy: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None,
    ) -> bool:
        if not _triton_dw.runs(state):
            return False
        _triton_dw.add_products_(state, dy, b, rms)  # with rms: x / rms rounded to x's dtype in the kernel
        return True

    def backward_exact_dw(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
        state: torch.Tensor, dx: torch.Tensor | None, *, offset: float, fresh: bool = False,
        rounded: torch.Tensor | None = None,
    ) -> bool:
        return False  # the two kernels: backward, then accumulate_exact


#: Every backend by name, in priority order (:data:`.base.BACKEND_NAMES`).
BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), NativeBackend(), _TORCH_OPS)}


#: Triton asked for by name (``executor="triton"``).
TRITON_BY_NAME = TritonBackend(by_name=True)


def accumulate_exact(state: torch.Tensor, dy: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None) -> None:
    """Add ``sum over rows of dy * b`` (``b / rms`` with ``rms``) to the exact ``state``
    on the first backend of this context that takes it (Triton on CUDA, the C kernel on
    CPU, torch ops anywhere): the same state either way."""
    for name in allowed():
        if BACKENDS[name].accumulate_exact(state, dy, b, rms):
            return
    BACKENDS["torch_ops"].accumulate_exact(state, dy, b, rms)


def choose(plan: Plan, device: torch.device, dtype: torch.dtype, names: tuple[str, ...] | None = None,
           by_name: bool = False) -> Backend:
    """The first backend of ``names`` (default: this context's :func:`.base.allowed`, in
    priority order) that runs ``plan`` on ``device`` for ``dtype`` input (``by_name``:
    the caller named the backend, as ``executor="triton"`` does).

    Raises
    ------
    NoBackendError
        when none does; its message lists every backend's reasons.
    """
    reasons: dict[str, list[str]] = {}
    for name in (allowed() if names is None else names):
        backend = TRITON_BY_NAME if by_name and name == "triton" else BACKENDS[name]
        why = backend.not_supported_reasons(plan, device, dtype)
        if not why:
            return backend
        reasons[name] = why
    raise NoBackendError(device, dtype, reasons)
