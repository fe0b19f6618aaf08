"""``taskgraph_norm.RMSNorm``: a drop-in ``torch.nn.RMSNorm`` with a fixed reduction order."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from . import ops
from .api import normalize_sync
from .checks import check_input
from .errors import ConfigError
from .topologies import build_graph

__all__ = ["RMSNorm"]


_F = TypeVar("_F", bound=Callable[..., Any])
_eager_only: Callable[[_F], _F] = torch.compiler.disable  # (typed: torch's decorator is not)


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
        self.topology, self.chunk_size, self.leaf, self.accumulate = (
            topology, chunk_size, leaf, accumulate,
        )
        # Build once now: a bad option fails at construction, not at the first forward.
        build_graph(
            max(math.prod(self.normalized_shape), 1),
            chunk_size=chunk_size, topology=topology, leaf=leaf, accumulate=accumulate,
            casting_mode=casting_mode, offset=offset,
        )
        self.casting_mode, self.offset = casting_mode, float(offset)
        if self.offset and not elementwise_affine:
            raise ConfigError("offset", offset, "0.0 with elementwise_affine=False (it is added to the weight)")
        self._eager_configs: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """``y``; with ``residual``, ``(y, h)``: ``h = x + residual`` and ``y`` its RMSNorm
        (a decoder layer's fused residual add; see :func:`taskgraph_norm.normalize`)."""
        k = len(self.normalized_shape)
        weight = self.weight  # (once: a parameter is a slow attribute)
        how = ops.route(x, weight) if isinstance(x, torch.Tensor) else ops.DIRECT
        if self.weight_grad == "exact" and how != ops.DIRECT and weight is not None:
            return self._forward_exact(x, residual)
        if residual is not None:
            if how == ops.DIRECT and isinstance(residual, torch.Tensor) and ops.needs_op(residual, None):
                how = ops.route(residual, None)
            if how != ops.DIRECT:
                return self._forward_op_residual(x, residual, k, how)
        elif how == ops.EAGER and k == 1:
            config = self._eager_config(x, weight)
            if config is not None:  # the warm training path: the op's kernels under autograd
                return ops.eager_apply(x, weight, config)
        if how != ops.DIRECT:
            return self._forward_op(x, k, how)  # a gradient to record, or a tracer looking
        options = dict(topology=self.topology, chunk_size=self.chunk_size, leaf=self.leaf,
                       accumulate=self.accumulate, casting_mode=self.casting_mode, offset=self.offset)
        if k == 1 and isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] == self.normalized_shape[0]:
            # the warm path: normalize_sync checks the rest
            return normalize_sync(x, self.weight, self.eps, residual=residual, **options)  # type: ignore[arg-type]
        check_input(x, self.normalized_shape, self.weight)
        hidden = math.prod(self.normalized_shape)
        flat = x if k == 1 else x.reshape(*x.shape[: x.dim() - k], hidden)
        w = self.weight if self.weight is None or k == 1 else self.weight.reshape(hidden)
        r = residual if residual is None or k == 1 or residual.shape != x.shape else residual.reshape(flat.shape)
        result = normalize_sync(flat, w, self.eps, residual=r, **options)  # type: ignore[arg-type]
        if k == 1:
            return result
        if residual is None:
            return result.reshape(x.shape)
        return result[0].reshape(x.shape), result[1].reshape(x.shape)

    def _eager_config(self, x: torch.Tensor, w: torch.Tensor | None) -> tuple[Any, ...] | None:
        """The op's configuration for ``x`` (checked once per dtype and option set), or
        ``None`` when ``x`` or the weight ``w`` does not fit (the full checks then raise)."""
        hidden = self.normalized_shape[0]
        if not x.dim() or x.shape[-1] != hidden or (w is not None and (
                w.dim() != 1 or w.shape[0] != hidden or w.device != x.device)):
            return None
        key = (x.dtype, self.eps, self.chunk_size, self.topology, self.leaf, self.accumulate,
               self.casting_mode, self.offset)
        config = self._eager_configs.get(key)
        if config is None:
            check_input(x, self.normalized_shape, w)  # the dtype
            config = (ops.resolve_eps_fast(self.eps, x.dtype), self.chunk_size, self.topology, self.leaf,
                      self.accumulate, self.casting_mode, self.offset)
            self._eager_configs[key] = config
        return config

    def _forward_op(self, x: torch.Tensor, k: int, how: int) -> torch.Tensor:
        """Through the ops (:mod:`taskgraph_norm.ops`): ``how`` is :func:`ops.route`'s answer."""
        if how == ops.EAGER or not ops.jit_tracing():  # (jit sizes are tensors: a check would warn)
            check_input(x, self.normalized_shape, self.weight)
        hidden = math.prod(self.normalized_shape)
        flat = x if k == 1 else x.reshape(*x.shape[: x.dim() - k], hidden)
        w = self.weight if self.weight is None or k == 1 else self.weight.reshape(hidden)
        y = ops.call_checked(flat, w, ops.resolve_eps_fast(self.eps, x.dtype), self.chunk_size, self.topology,
                             self.leaf, self.accumulate, self.casting_mode, self.offset, how=how)
        return y if k == 1 else y.reshape(x.shape)

    def _forward_op_residual(
        self, x: torch.Tensor, residual: torch.Tensor, k: int, how: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, h)`` through the residual op (a gradient to record, or a tracer looking)."""
        hidden = math.prod(self.normalized_shape)
        flat = x if k == 1 else x.reshape(*x.shape[: x.dim() - k], hidden)
        r = residual if k == 1 or not isinstance(residual, torch.Tensor) else residual.reshape(flat.shape)
        w = self.weight if self.weight is None or k == 1 else self.weight.reshape(hidden)
        y, h = ops.rms_norm_residual(flat, r, w, self.eps, topology=self.topology, chunk_size=self.chunk_size,
                                     leaf=self.leaf, accumulate=self.accumulate, casting_mode=self.casting_mode,
                                     offset=self.offset)
        return (y, h) if k == 1 else (y.reshape(x.shape), h.reshape(x.shape))

    @_eager_only  # the accumulator is Python state: eager, a graph break under compile
    def _forward_exact(self, x: torch.Tensor, residual: torch.Tensor | None) -> Any:
        """The forward whose weight gradient is each call's exact sum, correctly rounded,
        accumulated exactly into ``weight.grad`` (``weight_grad="exact"``;
        :mod:`taskgraph_norm.ops.exact_weight`)."""
        from .ops.exact_weight import exact_apply

        h = x
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
                raise ConfigError("residual", type(residual).__name__, "a tensor of x's shape and dtype")
            h = x + residual  # elementwise, x's dtype: the bits of the fused residual's h
        check_input(h, self.normalized_shape, self.weight)
        k = len(self.normalized_shape)
        hidden = math.prod(self.normalized_shape)
        flat = h if k == 1 else h.reshape(*h.shape[: h.dim() - k], hidden)
        assert self.weight is not None
        w = self.weight if k == 1 else self.weight.reshape(hidden)
        config = (ops.resolve_eps_fast(self.eps, h.dtype), self.chunk_size, self.topology, self.leaf,
                  self.accumulate, self.casting_mode, self.offset)
        y = exact_apply(flat, w, config, self.weight)
        y = y if k == 1 else y.reshape(h.shape)
        return y if residual is None else (y, h)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, topology={self.topology!r}, "
            f"chunk_size={self.chunk_size}, leaf={self.leaf!r}, accumulate={self.accumulate!r}"
            + (f", casting_mode={self.casting_mode!r}" if self.casting_mode != "torch" else "")
            + (f", offset={self.offset!r}" if self.offset else "")
            + (f", weight_grad={self.weight_grad!r}" if self.weight_grad != "float" else "")
        )
