"""Pictures of merge DAGs: DOT and Mermaid text, SVG/PNG files, run timelines.

Layering: this package imports only :mod:`taskgraph_norm.graph` and
:mod:`taskgraph_norm.errors`; matplotlib and graphviz are imported lazily when
a picture is drawn, and a missing one raises
:class:`~taskgraph_norm.errors.MissingDependencyError` with the command that
installs it.
"""

from __future__ import annotations

from .render import render as render
from .scene import COLLAPSE_THRESHOLD as COLLAPSE_THRESHOLD
from .scene import Scene as Scene
from .scene import build_scene as build_scene
from .text import to_dot as to_dot
from .timeline import TimelineEvent as TimelineEvent
from .timeline import critical_path as critical_path
from .timeline import render_timeline as render_timeline
from .text import to_mermaid as to_mermaid

__all__ = [
    "COLLAPSE_THRESHOLD",
    "Scene",
    "TimelineEvent",
    "build_scene",
    "critical_path",
    "render",
    "render_timeline",
    "to_dot",
    "to_mermaid",
]
