"""The pipeline: build → prove → lower → pick a backend → run, one cached object per configuration.

:class:`Pipeline` (:mod:`.core`) is one configuration made once; :func:`for_config`
and :func:`for_graph` (:mod:`.cache`) find or make the cached pipeline of a normalize
configuration or of a graph someone built; :func:`layer_pipeline` (:mod:`.layer`) that of
a LayerNorm configuration.
"""

from __future__ import annotations

from ..executors.concurrent.loops import run_coroutine_sync as run_coroutine_sync
from .cache import PIPELINES as PIPELINES
from .cache import _by_graph as _by_graph
from .cache import cached as cached
from .cache import for_config as for_config
from .cache import for_graph as for_graph
from .core import OFFLOAD_NUMEL as OFFLOAD_NUMEL
from .core import Pipeline as Pipeline
from .core import check_executor as check_executor
from .layer import LayerPipeline as LayerPipeline
from .layer import layer_pipeline as layer_pipeline

__all__ = ["OFFLOAD_NUMEL", "LayerPipeline", "Pipeline", "cached", "check_executor", "for_config", "for_graph", "layer_pipeline", "run_coroutine_sync"]
