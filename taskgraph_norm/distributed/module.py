"""``taskgraph_norm.distributed.RMSNorm`` and ``LayerNorm``: norms over hidden states
sharded across ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .api import normalize_sync
from .graph import build_distributed_graph, even_shard_sizes
from .layer_api import layer_norm_sync

__all__ = ["LayerNorm", "RMSNorm"]


class _ShardedNorm(nn.Module):
    """A norm over hidden states whose hidden dim is split across ``group``: the shard
    sizes, the weight's slice and the first call's agreement (see :class:`RMSNorm`)."""

    def __init__(
        self,
        hidden_size: int,
        shard_size: int | None = None,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        group: Any = None,
        topology: str = "tree",
        chunk_size: int = 64,
        leaf: str = "pairwise",
        accumulate: str = "float",
    ) -> None:
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if shard_size is None:
            shard_size = even_shard_sizes(hidden_size, world)[rank]
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 0:
            raise ConfigError("shard_size", shard_size, "an integer >= 0 or None")
        self.hidden_size, self.shard_size, self.eps = hidden_size, shard_size, eps
        self.elementwise_affine, self.group = elementwise_affine, group
        self.options: dict[str, Any] = {"topology": topology, "chunk_size": chunk_size, "leaf": leaf,
                        "accumulate": accumulate}
        # Fail on a bad option now (the one-rank layout is always valid), not at forward.
        build_distributed_graph(hidden_size, (hidden_size,), **self.options)
        self._shard_sizes: tuple[int, ...] | None = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shard_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def offset(self) -> int:
        """Where this rank's shard starts in the full hidden dim (one all-gather, cached)."""
        sizes = self._sizes()
        return sum(sizes[: dist.get_rank(self.group)])

    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's slice of a full ``(hidden_size,)`` weight into ``self.weight``."""
        self._load_slice("weight", weight)

    def _load_slice(self, name: str, full: torch.Tensor) -> None:
        mine = getattr(self, name)
        if mine is None:
            raise ConfigError("elementwise_affine" if name == "weight" else "bias", False,
                              f"True to load a {name}")
        start = self.offset()
        with torch.no_grad():
            mine.copy_(full[start:start + self.shard_size])

    def _sizes(self) -> tuple[int, ...]:
        if self._shard_sizes is None:
            world = dist.get_world_size(self.group)
            mine = torch.tensor([self.shard_size], dtype=torch.int64,
                                device=self.weight.device if self.weight is not None else "cpu")
            table = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(table, mine, group=self.group)
            self._shard_sizes = tuple(int(t) for t in table)
        return self._shard_sizes

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        # The first call checks, on every rank together, that the calls fit; later
        # calls reuse the shard sizes and skip that exchange.
        first = self._shard_sizes is None
        y = self._norm(x_shard, None if first else self._shard_sizes)
        if first:
            self._sizes()
        return y

    def _norm(self, x_shard: torch.Tensor, sizes: tuple[int, ...] | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, shard_size={self.shard_size}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, "
                + ", ".join(f"{k}={v!r}" for k, v in self.options.items()))


class RMSNorm(_ShardedNorm):
    """Tensor-parallel RMSNorm: each rank holds a contiguous shard of the hidden dim.

    The result is bit-identical to :class:`taskgraph_norm.RMSNorm` on the full hidden
    states with the same options, at every world size.  ``weight`` is this rank's
    shard ``(shard_size,)``; :meth:`load_full_weight` copies it out of a full weight.

    Parameters
    ----------
    hidden_size:
        The global hidden size ``D``.
    shard_size:
        This rank's share of ``D``; None: ``torch.tensor_split``'s even split
        (:func:`even_shard_sizes`).  Uneven and empty shards work.
    eps, elementwise_affine, device, dtype:
        As in :class:`torch.nn.RMSNorm`.
    group:
        The process group over which the hidden dim is split (None: the default group).
    topology, chunk_size, leaf, accumulate:
        The merge graph, as in :func:`taskgraph_norm.build_graph`.
    """

    def _norm(self, x_shard: torch.Tensor, sizes: tuple[int, ...] | None) -> torch.Tensor:
        return normalize_sync(x_shard, self.weight, hidden_size=self.hidden_size, group=self.group,
                              eps=self.eps, shard_sizes=sizes, **self.options)


class LayerNorm(_ShardedNorm):
    """Tensor-parallel LayerNorm: each rank holds a contiguous shard of the hidden dim.

    Bit-identical to :class:`taskgraph_norm.LayerNorm` on the full hidden states with
    the same options, at every world size.  ``weight`` and ``bias`` are this rank's
    shards ``(shard_size,)``; :meth:`load_full_weight` and :meth:`load_full_bias` copy
    them out of full ones.  Arguments as :class:`RMSNorm` (``eps=1e-5`` by default),
    plus ``bias`` (as in :class:`torch.nn.LayerNorm`).
    """

    def __init__(
        self,
        hidden_size: int,
        shard_size: int | None = None,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        group: Any = None,
        topology: str = "tree",
        chunk_size: int = 64,
        leaf: str = "pairwise",
        accumulate: str = "float",
    ) -> None:
        super().__init__(hidden_size, shard_size, eps, elementwise_affine, device, dtype, group=group,
                         topology=topology, chunk_size=chunk_size, leaf=leaf, accumulate=accumulate)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(self.shard_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def load_full_bias(self, bias: torch.Tensor) -> None:
        """Copy this rank's slice of a full ``(hidden_size,)`` bias into ``self.bias``."""
        self._load_slice("bias", bias)

    def _norm(self, x_shard: torch.Tensor, sizes: tuple[int, ...] | None) -> torch.Tensor:
        return layer_norm_sync(x_shard, self.weight, self.bias, hidden_size=self.hidden_size, group=self.group,
                               eps=self.eps, shard_sizes=sizes, **self.options)
