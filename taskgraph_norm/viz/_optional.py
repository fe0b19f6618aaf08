"""Lazy imports of optional drawing dependencies, with an install hint.

Importing :mod:`taskgraph_norm.viz` must cost nothing and need nothing beyond
the IR; matplotlib and graphviz are imported only when a picture is asked for.
"""

from __future__ import annotations

import importlib
import shutil
from types import ModuleType

from ..errors import MissingDependencyError

__all__ = ["VIZ_EXTRA", "require", "graphviz_available"]

#: The pip command that installs every optional drawing dependency.
VIZ_EXTRA = "pip install 'taskgraph-norm[viz]'"


def require(module: str, purpose: str, install: str = VIZ_EXTRA) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to get it.

    Parameters
    ----------
    module:
        Dotted module name, e.g. ``"matplotlib"``.
    purpose:
        What needs it, for the message (``"rendering a PNG without Graphviz"``).
    install:
        The command to suggest.

    Raises
    ------
    MissingDependencyError
        (an ``ImportError``) when the import fails.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], purpose, install) from exc


def graphviz_available() -> bool:
    """True when both the ``graphviz`` Python package and the ``dot`` program exist."""
    try:
        require("graphviz", "Graphviz rendering")
    except MissingDependencyError:
        return False
    return shutil.which("dot") is not None
