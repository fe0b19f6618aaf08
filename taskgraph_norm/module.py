"""``taskgraph_norm.RMSNorm``: a drop-in ``torch.nn.RMSNorm`` with a fixed reduction order."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from . import ops
from .api import find_pipeline, normalize_sync
from .checks import PLAIN_TENSORS as _PLAIN
from .checks import check_input, resolve_eps
from .errors import ConfigError
from .topologies import build_graph

__all__ = ["GatedRMSNorm", "RMSNorm"]


_F = TypeVar("_F", bound=Callable[..., Any])
_eager_only: Callable[[_F], _F] = torch.compiler.disable  # (typed: torch's decorator is not)


def check_weight_grad(weight_grad: object, elementwise_affine: bool) -> None:
    """``weight_grad`` is ``"float"`` or ``"exact"``, and ``"exact"`` needs a weight."""
    if weight_grad not in ("float", "exact"):
        raise ConfigError("weight_grad", weight_grad, "'float' or 'exact'")
    if weight_grad == "exact" and not elementwise_affine:
        raise ConfigError("weight_grad", weight_grad, "'float' with elementwise_affine=False (no weight)")


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the trailing ``normalized_shape`` dims.

    Takes the same arguments as :class:`torch.nn.RMSNorm` and loads its
    ``state_dict``; the keyword-only options choose the merge graph (see
    :func:`taskgraph_norm.build_graph`).  A multi-dimensional
    ``normalized_shape`` reduces over all those dims as one hidden dim of size
    ``prod(normalized_shape)``, flattened in row-major order.

    Examples
    --------
    >>> norm = RMSNorm(8, topology="linear", chunk_size=4)
    >>> norm(torch.ones(2, 8)).shape
    torch.Size([2, 8])
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        topology: str = "tree",
        chunk_size: int = 64,
        leaf: str = "pairwise",
        accumulate: str = "float",
        casting_mode: str = "torch",
        offset: float = 0.0,
        weight_grad: str = "float",
    ) -> None:
        super().__init__()
        check_weight_grad(weight_grad, elementwise_affine)
        self.weight_grad = weight_grad
        dims: Sequence[int] = (
            (int(normalized_shape),) if isinstance(normalized_shape, numbers.Integral)
            else normalized_shape  # type: ignore[assignment]
        )
        self.normalized_shape: tuple[int, ...] = tuple(int(d) for d in dims)
        if not self.normalized_shape:
            raise ConfigError("normalized_shape", normalized_shape, "at least one dimension")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.topology, self.chunk_size, self.leaf, self.accumulate = (
            topology, chunk_size, leaf, accumulate,
        )
        # Build once now: a bad option fails at construction, not at the first forward.
        build_graph(
            max(math.prod(self.normalized_shape), 1),
            chunk_size=chunk_size, topology=topology, leaf=leaf, accumulate=accumulate,
            casting_mode=casting_mode, offset=offset,
        )
        # (an offset without a weight has no effect, as in Liger-Kernel)
        self.casting_mode, self.offset = casting_mode, float(offset)
        self._eager_configs: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def _options(self) -> dict[str, Any]:
        return dict(topology=self.topology, chunk_size=self.chunk_size, leaf=self.leaf, accumulate=self.accumulate,
                    casting_mode=self.casting_mode, offset=self.offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """``y``; with ``residual``, ``(y, h)``: ``h = x + residual`` and ``y`` its RMSNorm
        (a decoder layer's fused residual add; see :func:`taskgraph_norm.normalize`).
        Every call goes through :func:`taskgraph_norm.normalize_sync`, which decides where
        (the direct kernel, or the ops when a gradient is recorded or a tracer looks)."""
        weight = self.weight  # (once: a parameter is a slow attribute)
        if type(x) not in _PLAIN or (weight is not None and type(weight) not in _PLAIN):
            face = ops.dtensor_face("rms_module", x, weight, residual)
            if face is not None:  # a DTensor: taskgraph_norm.distributed.dtensor
                return face(self, x, residual)
        if self.weight_grad == "exact" and weight is not None and isinstance(x, torch.Tensor):
            route = ops.route(x, weight)
            if route == ops.EAGER:  # eager autograd: no tracer to break the graph for
                return self._forward_exact_eager(x, residual)
            if route == ops.TRACED:
                return self._forward_exact(x, residual)
        if len(self.normalized_shape) == 1 and residual is None and isinstance(x, torch.Tensor):
            if ops.route(x, weight) == ops.EAGER:
                config = self._eager_config(x, weight)
                if config is not None:  # the warm training path: the op's kernels under autograd
                    return ops.eager_apply(x, weight, config)
            # (the options by keyword: a dict and its unpacking cost ~0.5 us of a 5 us call)
            return normalize_sync(x, weight, self.eps, topology=self.topology, chunk_size=self.chunk_size,
                                  leaf=self.leaf, accumulate=self.accumulate, casting_mode=self.casting_mode,
                                  offset=self.offset)
        rows, w, r = self._rows(x, weight, residual)
        result = normalize_sync(rows, w, self.eps, residual=r, **self._options())
        if len(self.normalized_shape) == 1:
            return result
        if residual is None:
            return result.reshape(x.shape)
        return result[0].reshape(x.shape), result[1].reshape(x.shape)

    def _rows(
        self, x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``x``, the weight and the residual with the ``normalized_shape`` dims flattened
        into one hidden dim (row-major), after ``F.rms_norm``'s checks of ``x``."""
        k = len(self.normalized_shape)
        if k == 1:
            return x, weight, residual
        if not ops.jit_tracing():  # (jit sizes are tensors: a check would warn)
            check_input(x, self.normalized_shape, weight)
        hidden = math.prod(self.normalized_shape)
        flat = x.reshape(*x.shape[: x.dim() - k], hidden)
        w = None if weight is None else weight.reshape(hidden)
        r = residual
        if isinstance(residual, torch.Tensor) and residual.shape == x.shape:
            r = residual.reshape(flat.shape)
        return flat, w, r

    def _eager_config(self, x: torch.Tensor, w: torch.Tensor | None) -> tuple[Any, ...] | None:
        """The op's configuration for ``x`` (checked once per dtype and option set), or
        ``None`` when ``x`` or the weight ``w`` does not fit (the full checks then raise)."""
        hidden = self.normalized_shape[0]
        if not x.dim() or x.shape[-1] != hidden or (w is not None and (
                w.dim() != 1 or w.shape[0] != hidden or not (x.is_cpu and w.is_cpu or w.device == x.device))):
            return None
        key = (x.dtype, self.eps, self.chunk_size, self.topology, self.leaf, self.accumulate,
               self.casting_mode, self.offset)
        config = self._eager_configs.get(key)
        if config is None:
            check_input(x, self.normalized_shape, w)  # the dtype
            # every option checked as the faces check it (normalize_sync's pipeline lookup)
            find_pipeline(x, self.topology, self.chunk_size, self.leaf, self.accumulate, "auto", w,
                  self.casting_mode, self.offset, False)
            config = (resolve_eps(self.eps, x.dtype), self.chunk_size, self.topology, self.leaf,
                      self.accumulate, self.casting_mode, self.offset)
            self._eager_configs[key] = config
        return config

    def _forward_exact_eager(self, x: torch.Tensor, residual: torch.Tensor | None) -> Any:
        """The forward whose weight gradient is each call's exact sum, correctly rounded,
        accumulated exactly into ``weight.grad`` (``weight_grad="exact"``;
        :mod:`taskgraph_norm.ops.exact_weight`)."""
        from .ops.exact_weight import exact_apply

        h = x
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
                raise ConfigError("residual", type(residual).__name__, "a tensor of x's shape and dtype")
            h = x + residual  # elementwise, x's dtype: the bits of the fused residual's h
        weight = self.weight
        assert weight is not None
        k = len(self.normalized_shape)
        # one hidden dim: the float path's configuration (checked once per dtype and options)
        config = self._eager_config(h, weight) if k == 1 else None
        if config is not None:
            y = exact_apply(h, weight, config, weight)
            return y if residual is None else (y, h)
        check_input(h, self.normalized_shape, weight)
        hidden = math.prod(self.normalized_shape)
        flat = h if k == 1 else h.reshape(*h.shape[: h.dim() - k], hidden)
        w = weight if k == 1 else weight.reshape(hidden)
        config = (resolve_eps(self.eps, h.dtype), self.chunk_size, self.topology, self.leaf,
                  self.accumulate, self.casting_mode, self.offset)
        y = exact_apply(flat, w, config, weight)
        y = y if k == 1 else y.reshape(h.shape)
        return y if residual is None else (y, h)

    # the accumulator is Python state: eager, a graph break under compile
    _forward_exact = _eager_only(_forward_exact_eager)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, topology={self.topology!r}, "
            f"chunk_size={self.chunk_size}, leaf={self.leaf!r}, accumulate={self.accumulate!r}"
            + (f", casting_mode={self.casting_mode!r}" if self.casting_mode != "torch" else "")
            + (f", offset={self.offset!r}" if self.offset else "")
            + (f", weight_grad={self.weight_grad!r}" if self.weight_grad != "float" else "")
        )


class GatedRMSNorm(nn.Module):
    """Gated, grouped RMSNorm over the last dim: Mamba2's and Qwen3-Next's norms.

    ``forward(x, gate=None)`` takes the gate second and positional, as Hugging Face's
    gated modules are called.  ``norm_before_gate=False`` gates first (``x *
    silu(gate)``, then the norm: Mamba2, Bamba, NemotronH); ``True`` normalises first
    (the norm, the weight, then ``* silu(gate)``: Qwen3-Next).  ``group_size``
    normalises each group of that many values of the hidden dim on its own, each
    group a row of the merge graph.  ``casting_mode="llama"`` reproduces the Hugging
    Face modules' cast order; the other options are :class:`RMSNorm`'s
    (:func:`taskgraph_norm.ops.gated_rms_norm`, docs/model.md).

    Examples
    --------
    >>> norm = GatedRMSNorm(8, group_size=4)
    >>> norm(torch.ones(2, 8), torch.zeros(2, 8)).shape
    torch.Size([2, 8])
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float | None = None,
        *,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        topology: str = "tree",
        chunk_size: int = 64,
        leaf: str = "pairwise",
        accumulate: str = "float",
        casting_mode: str = "torch",
        offset: float = 0.0,
        weight_grad: str = "float",
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, numbers.Integral) or hidden_size < 1:
            raise ConfigError("hidden_size", hidden_size, "a positive int")
        check_weight_grad(weight_grad, elementwise_affine)
        if not isinstance(norm_before_gate, bool):
            raise ConfigError("norm_before_gate", norm_before_gate, "True or False")
        self.hidden_size: int = int(hidden_size)
        size = self.hidden_size if group_size is None else group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or self.hidden_size % size:
            raise ConfigError("group_size", group_size, f"None or a positive divisor of {self.hidden_size}")
        build_graph(size, chunk_size=chunk_size, topology=topology, leaf=leaf, accumulate=accumulate,
                    casting_mode=casting_mode, offset=offset)  # a bad option fails here
        self.eps: float | None = eps
        self.group_size: int | None = group_size
        self.norm_before_gate: bool = norm_before_gate
        self.topology: str = topology
        self.chunk_size: int = chunk_size
        self.leaf: str = leaf
        self.accumulate: str = accumulate
        self.casting_mode: str = casting_mode
        self.offset: float = float(offset)
        self.weight_grad: str = weight_grad
        self.elementwise_affine: bool = elementwise_affine
        self.weight: nn.Parameter | None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight
        if self.weight_grad == "exact" and weight is not None and isinstance(x, torch.Tensor) and (
                ops.route(x, weight) != ops.DIRECT):
            return self._forward_exact(x, gate)
        return ops.gated_rms_norm(x, gate, weight, self.eps, group_size=self.group_size,
                                  norm_before_gate=self.norm_before_gate, topology=self.topology,
                                  chunk_size=self.chunk_size, leaf=self.leaf, accumulate=self.accumulate,
                                  casting_mode=self.casting_mode, offset=self.offset)

    @_eager_only  # the accumulator is Python state: eager, a graph break under compile
    def _forward_exact(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        assert self.weight is not None
        return ops.gated_rms_norm(x, gate, self.weight, self.eps, group_size=self.group_size,
                                  norm_before_gate=self.norm_before_gate, topology=self.topology,
                                  chunk_size=self.chunk_size, leaf=self.leaf, accumulate=self.accumulate,
                                  casting_mode=self.casting_mode, offset=self.offset, exact_param=self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}, topology={self.topology!r}, chunk_size={self.chunk_size}"
            + (f", casting_mode={self.casting_mode!r}" if self.casting_mode != "torch" else "")
            + (f", offset={self.offset!r}" if self.offset else "")
            + (f", weight_grad={self.weight_grad!r}" if self.weight_grad != "float" else "")
        )
