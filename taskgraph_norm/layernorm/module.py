"""``taskgraph_norm.LayerNorm``: a drop-in ``torch.nn.LayerNorm`` with a fixed reduction order."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .. import ops
from ..backends.native import face as _face
from ..errors import ConfigError, InputShapeError
from ..pipeline import layer as _pipelines
from ..pipeline.layer_checks import autocast_layer_inputs, check_layer_input, resolve_layer_eps
from ..topologies import build_layer_graph
from .api import layer_norm_sync, layer_route, warm_layer

_F = TypeVar("_F", bound=Callable[..., Any])
_eager_only: Callable[[_F], _F] = torch.compiler.disable  # (typed: torch's decorator is not)

__all__ = ["LayerNorm"]


class LayerNorm(nn.Module):
    """Layer normalisation over the trailing ``normalized_shape`` dims, through the
    LayerNorm merge graph (docs/layernorm.md).

    Takes the arguments of :class:`torch.nn.LayerNorm` (``normalized_shape``, ``eps``,
    ``elementwise_affine``, ``bias``, ``device``, ``dtype``) and loads its
    ``state_dict``; the keyword-only options choose the graph (see
    :func:`taskgraph_norm.topologies.build_layer_graph`).  A multi-dimensional
    ``normalized_shape`` reduces over all those dims as one hidden dim of size
    ``prod(normalized_shape)``, flattened in row-major order (the weight and bias keep
    their shape).  ``weight_grad="float"`` sums ``dW`` and ``db`` over fixed row blocks;
    ``"exact"`` makes them each call's exact sums, correctly rounded and accumulated
    exactly across backward calls (:mod:`taskgraph_norm.ops.exact_layer`; eager: a graph
    break under ``torch.compile``).

    Examples
    --------
    >>> norm = LayerNorm(8, topology="linear", chunk_size=4)
    >>> norm(torch.ones(2, 8)).shape
    torch.Size([2, 8])
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        topology: str = "tree",
        chunk_size: int = 64,
        leaf: str = "pairwise",
        accumulate: str = "float",
        weight_grad: str = "float",
    ) -> None:
        super().__init__()
        if weight_grad not in ("float", "exact"):
            raise ConfigError("weight_grad", weight_grad, "'float' or 'exact'")
        if weight_grad == "exact" and not elementwise_affine:
            raise ConfigError("weight_grad", weight_grad, "'float' with elementwise_affine=False (no weight)")
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
        self.topology, self.chunk_size, self.leaf, self.accumulate = topology, chunk_size, leaf, accumulate
        # Build once now: a bad option fails at construction, not at the first forward.
        build_layer_graph(max(math.prod(self.normalized_shape), 1), chunk_size=chunk_size, topology=topology,
                          leaf=leaf, accumulate=accumulate)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """``y``; with ``residual``, ``(y, h)``: ``h = x + residual`` and ``y`` its LayerNorm
        (see :func:`taskgraph_norm.layer_norm_sync`, which every call goes through)."""
        weight, bias = self.weight, self.bias
        if residual is None and len(self.normalized_shape) == 1:  # the warm paths (layer_norm_sync's)
            chunk, topology, leaf, accumulate = self.chunk_size, self.topology, self.leaf, self.accumulate
            y = _face.layer_face(_pipelines.LAYER_PIPELINES, x, weight, bias, self.eps, chunk, topology, leaf,
                                 accumulate, "auto")
            if y is None:
                y = warm_layer(x, weight, bias, self.eps, None, chunk, topology, leaf, accumulate, "auto")
            if y is not None:
                return y
        if self.weight_grad == "exact" and weight is not None and isinstance(x, torch.Tensor) and (
                layer_route(x, weight, bias, residual) != ops.DIRECT):
            if ops.dtensor_face("layer_norm", x, weight, bias, residual) is not None:
                raise NotImplementedError("LayerNorm(weight_grad='exact') takes plain tensors; DTensor inputs "
                                          "use weight_grad='float' (the tensor-parallel LayerNorm)")
            return self._forward_exact(x, residual)
        options: dict[str, Any] = dict(topology=self.topology, chunk_size=self.chunk_size, leaf=self.leaf,
                                       accumulate=self.accumulate)
        k = len(self.normalized_shape)
        face = ops.dtensor_face("layer_module", x, weight, bias, residual) if k > 1 else None
        if face is not None:  # a DTensor: taskgraph_norm.distributed.dtensor
            return face(self, x, residual)
        if k == 1:
            return layer_norm_sync(x, weight, bias, self.eps, residual=residual, **options)
        # several trailing dims: one hidden dim of their product, row-major
        hidden = math.prod(self.normalized_shape)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise InputShapeError(self.normalized_shape, tuple(x.shape))  # torch's RuntimeError
        flat = x.reshape(*x.shape[: x.dim() - k], hidden)
        w = None if weight is None else weight.reshape(hidden)
        b = None if bias is None else bias.reshape(hidden)
        r = residual.reshape(flat.shape) if isinstance(residual, torch.Tensor) and residual.shape == x.shape else (
            residual)
        result = layer_norm_sync(flat, w, b, self.eps, residual=r, **options)
        if residual is None:
            return result.reshape(x.shape)
        return result[0].reshape(x.shape), result[1].reshape(x.shape)

    @_eager_only  # the accumulator is Python state: eager, a graph break under compile
    def _forward_exact(self, x: torch.Tensor, residual: torch.Tensor | None) -> Any:
        """The forward whose ``dW`` and ``db`` are each call's exact sums, correctly rounded,
        accumulated exactly into the parameters' ``grad`` (``weight_grad="exact"``)."""
        from ..ops.exact_layer import exact_layer_apply

        h = x
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
                raise ConfigError("residual", type(residual).__name__, "a tensor of x's shape and dtype")
            h = x + residual  # elementwise, x's dtype: the bits of the fused residual's h
        assert self.weight is not None
        h, weight, bias = autocast_layer_inputs(h, self.weight, self.bias)
        k = len(self.normalized_shape)
        if h.dim() < k or tuple(h.shape[h.dim() - k:]) != self.normalized_shape:
            raise InputShapeError(self.normalized_shape, tuple(h.shape))  # torch's RuntimeError
        hidden = math.prod(self.normalized_shape)
        flat = h.reshape(*h.shape[: h.dim() - k], hidden)
        assert weight is not None
        w, b = weight.reshape(hidden), None if bias is None else bias.reshape(hidden)
        check_layer_input(flat, hidden, w, b)
        config = (resolve_layer_eps(self.eps), self.chunk_size, self.topology, self.leaf, self.accumulate)
        y = exact_layer_apply(flat, w, b, config, (self.weight, self.bias)).reshape(h.shape)
        return y if residual is None else (y, h)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"topology={self.topology!r}, chunk_size={self.chunk_size}, leaf={self.leaf!r}, "
                f"accumulate={self.accumulate!r}"
                + (f", weight_grad={self.weight_grad!r}" if self.weight_grad != "float" else ""))
