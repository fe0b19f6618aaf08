"""Backends: the objects that run a lowered plan (torch ops, native C, Triton).

Each answers one protocol (:class:`Backend`: ``not_supported_reasons``, ``forward``,
``backward``, ``accumulate_exact``); the pipeline picks one per (device, dtype).  :func:`use` restricts the choice for a block of code (per thread and
task, a ``contextvars`` variable): ``with tgn.backends.use("torch_ops"):`` runs every
plan on torch ops alone.  The backends themselves and the choice are in
:mod:`.registry` (``BACKENDS``, ``choose``, ``NoBackendError``), which imports the
kernels' loaders; this package imports only :mod:`.base`, which those loaders read.
"""

from __future__ import annotations

from .base import BACKEND_NAMES as BACKEND_NAMES
from .base import Backend as Backend
from .base import Forward as Forward
from .base import allowed as allowed
from .base import use as use

__all__ = ["BACKEND_NAMES", "Backend", "Forward", "allowed", "use"]
