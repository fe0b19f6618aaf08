"""Executors: each runs a validated graph on a checked input and returns ``y``.

``reference`` is the sequential oracle.  ``auto`` picks the best executor this
version has for a graph; today that is ``reference``.  The concurrent and
compiled executors named in DESIGN.md section 6 plug in here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..graph import Graph
from .reference import ReferenceInterpreter, reference_sum_of_squares, run_reference

__all__ = [
    "EXECUTORS",
    "ReferenceInterpreter",
    "reference_sum_of_squares",
    "resolve_executor",
    "run_reference",
]

Runner = Callable[..., torch.Tensor]

#: The executors this version can run, by name.
EXECUTORS: dict[str, Runner] = {"reference": run_reference}


def resolve_executor(name: str, graph: Graph) -> tuple[str, Runner]:
    """The executor to use for ``graph``: ``(name, runner)``.

    Raises ConfigError (a ValueError) for a name this version does not provide.
    """
    if name == "auto":
        name = "reference"
    runner: Any = EXECUTORS.get(name)
    if runner is None:
        raise ConfigError("executor", name, "'auto' or one of " + ", ".join(repr(k) for k in EXECUTORS))
    return name, runner
