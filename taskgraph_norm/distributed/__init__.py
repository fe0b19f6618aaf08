"""RMSNorm and LayerNorm over a hidden dim sharded across ranks, with the single-process bits.

The ranks run the single-process merge graph, split by placement: chunks stay
global, rank-local subtrees are merged where their chunks live, one all-gather
moves their roots (and the elements of chunks a shard boundary cuts), and every
rank finishes the same merge.  In the exact domain a MAX and a SUM all-reduce
suffice, because every addition is exact.  Each sharded configuration is built once
(:func:`for_shards`: its graph, proof and plan, a :class:`ShardedPipeline`).  See
docs/distributed.md.

Data parallel: :func:`all_reduce_exact_grads` sums the exact weight-gradient
accumulators of every rank with one integer all-reduce (docs/training.md).
"""

from __future__ import annotations

from typing import Any

from .api import naive_normalize_sync as naive_normalize_sync
from .api import normalize as normalize
from .api import normalize_sync as normalize_sync
from .api import payload_bytes_per_row as payload_bytes_per_row
from .exact_grads import all_reduce_exact_grads as all_reduce_exact_grads
from .exact_grads import exact_parameters as exact_parameters
from .exact_grads import exclude_from_ddp as exclude_from_ddp
from .graph import DistributedPlan as DistributedPlan
from .graph import build_distributed_graph as build_distributed_graph
from .graph import build_naive_graph as build_naive_graph
from .graph import distributed_plan as distributed_plan
from .graph import even_shard_sizes as even_shard_sizes
from .graph import shard_offsets as shard_offsets
from .launch import run_local as run_local
from .layer_api import layer_norm as layer_norm
from .layer_api import layer_norm_sync as layer_norm_sync
from .layer_graph import build_distributed_layer_graph as build_distributed_layer_graph
from .layer_runtime import ShardedLayerPipeline as ShardedLayerPipeline
from .layer_runtime import for_layer_shards as for_layer_shards
from .module import LayerNorm as LayerNorm
from .pipeline import ShardedPipeline as ShardedPipeline
from .pipeline import for_shards as for_shards
from .module import RMSNorm as RMSNorm
from ..ops.routing import DTENSOR_LOADER as _LOADER
from . import dtensor_ops as _dtensor_ops


def _dtensor_faces() -> dict[str, Any]:
    """The faces' DTensor calls (:mod:`.dtensor`), imported on the first DTensor call."""
    from . import dtensor, dtensor_gated

    return {**dtensor.faces(), **dtensor_gated.faces()}


_LOADER[:] = [_dtensor_faces]
_dtensor_ops.register()  # the ops' DTensor rules, for DTensors handed to the ops themselves

__all__ = [
    "DistributedPlan",
    "LayerNorm",
    "RMSNorm",
    "ShardedLayerPipeline",
    "ShardedPipeline",
    "all_reduce_exact_grads",
    "build_distributed_graph",
    "build_distributed_layer_graph",
    "build_naive_graph",
    "distributed_plan",
    "even_shard_sizes",
    "exact_parameters",
    "exclude_from_ddp",
    "for_layer_shards",
    "for_shards",
    "layer_norm",
    "layer_norm_sync",
    "naive_normalize_sync",
    "normalize",
    "normalize_sync",
    "payload_bytes_per_row",
    "run_local",
    "shard_offsets",
]
