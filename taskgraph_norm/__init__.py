"""taskgraph_norm: RMSNorm as an explicit merge DAG that gives the same bits every time.

The public names are re-exported here explicitly; ``__all__`` is the API.
"""

from __future__ import annotations

from .api import execute as execute
from .api import normalize as normalize
from .api import normalize_sync as normalize_sync
from .errors import ConfigError as ConfigError
from .errors import CycleError as CycleError
from .errors import GraphError as GraphError
from .errors import TaskGraphError as TaskGraphError
from .graph import Graph as Graph
from .graph import Node as Node
from .graph import Op as Op
from .execute.lowering import Plan as Plan
from .graph import validate as validate
from .module import RMSNorm as RMSNorm
from .prove import Proof as Proof
from .prove import prove as prove
from .topologies import TOPOLOGIES as TOPOLOGIES
from .topologies import build_graph as build_graph
from .witness import Witness as Witness

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CycleError",
    "Graph",
    "GraphError",
    "Node",
    "Op",
    "Plan",
    "Proof",
    "RMSNorm",
    "TOPOLOGIES",
    "TaskGraphError",
    "Witness",
    "build_graph",
    "execute",
    "normalize",
    "normalize_sync",
    "prove",
    "validate",
]
