"""taskgraph_norm: RMSNorm as an explicit merge DAG that gives the same bits every time.

The public names are re-exported here explicitly; ``__all__`` is the API.
"""

from __future__ import annotations

from . import backends as backends
from . import distributed as distributed
from . import ops as ops
from .executors.concurrent import schedules as schedules
from .api import execute as execute
from .api import execute_sync as execute_sync
from .api import normalize as normalize
from .api import normalize_sync as normalize_sync
from .caches import clear_caches as clear_caches
from .errors import ConfigError as ConfigError
from .errors import CycleError as CycleError
from .errors import DeviceMismatchError as DeviceMismatchError
from .errors import DtypeError as DtypeError
from .errors import ExactSumError as ExactSumError
from .errors import ExactSumOverflowError as ExactSumOverflowError
from .errors import ExecutionError as ExecutionError
from .errors import GateShapeError as GateShapeError
from .errors import GraphError as GraphError
from .errors import InputRankError as InputRankError
from .errors import InputShapeError as InputShapeError
from .errors import MissingDependencyError as MissingDependencyError
from .errors import NativeKernelsWarning as NativeKernelsWarning
from .errors import OverlapError as OverlapError
from .errors import PoolClosedError as PoolClosedError
from .errors import ScheduleError as ScheduleError
from .errors import ShardMismatchError as ShardMismatchError
from .errors import TaskGraphError as TaskGraphError
from .errors import UnsupportedNormError as UnsupportedNormError
from .errors import WeightShapeError as WeightShapeError
from .executors.concurrent.devices import WorkerPool as WorkerPool
from .executors.concurrent.trace import Trace as Trace
from .graph import Graph as Graph
from .graph import Node as Node
from .graph import Op as Op
from .graph import validate as validate
from .module import GatedRMSNorm as GatedRMSNorm
from .module import RMSNorm as RMSNorm
from .layernorm import LayerNorm as LayerNorm
from .layernorm import layer_norm as layer_norm
from .layernorm import layer_norm_sync as layer_norm_sync
from .prover import Proof as Proof
from .prover import prove as prove
from .topologies import TOPOLOGIES as TOPOLOGIES
from .topologies import build_graph as build_graph
from .topologies import build_input_grad_graph as build_input_grad_graph
from .topologies import build_weight_grad_graph as build_weight_grad_graph
from .pipeline import Pipeline as Pipeline
from .viz import render as render
from .viz import render_timeline as render_timeline
from .viz import to_dot as to_dot
from .viz import to_mermaid as to_mermaid
from .prover import Witness as Witness

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CycleError",
    "DeviceMismatchError",
    "DtypeError",
    "ExactSumError",
    "ExactSumOverflowError",
    "ExecutionError",
    "GateShapeError",
    "GatedRMSNorm",
    "Graph",
    "GraphError",
    "InputRankError",
    "InputShapeError",
    "LayerNorm",
    "MissingDependencyError",
    "NativeKernelsWarning",
    "Node",
    "Op",
    "Pipeline",
    "OverlapError",
    "PoolClosedError",
    "Proof",
    "RMSNorm",
    "ScheduleError",
    "ShardMismatchError",
    "TOPOLOGIES",
    "TaskGraphError",
    "UnsupportedNormError",
    "Trace",
    "WeightShapeError",
    "Witness",
    "WorkerPool",
    "build_graph",
    "build_input_grad_graph",
    "build_weight_grad_graph",
    "clear_caches",
    "execute",
    "execute_sync",
    "layer_norm",
    "layer_norm_sync",
    "normalize",
    "normalize_sync",
    "prove",
    "render",
    "render_timeline",
    "to_dot",
    "to_mermaid",
    "validate",
]
