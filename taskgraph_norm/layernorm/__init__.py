"""LayerNorm's faces (issue 23): ``layer_norm_sync``, ``await layer_norm`` and the
``LayerNorm`` module, over :mod:`taskgraph_norm.pipeline.layer` (docs/layernorm.md)."""

from __future__ import annotations

from .api import layer_norm as layer_norm
from .api import layer_norm_sync as layer_norm_sync
from .module import LayerNorm as LayerNorm

__all__ = ["LayerNorm", "layer_norm", "layer_norm_sync"]
