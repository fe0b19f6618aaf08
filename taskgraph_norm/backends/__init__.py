"""Backends: each runs a lowered :class:`~taskgraph_norm.lowering.Plan`.

* :mod:`.torch_ops`: the plan as tiles of torch ops (any device, no compiler needed),
  with its worker pool;
* :mod:`.native`: the C kernels (``csrc/``, built by ``setup.py``), their loader
  and the OpenMP team that shares a call's rows;
* :mod:`.triton`: the plan as one Triton kernel (CUDA; CPU tensors in Triton's
  interpreter under ``TRITON_INTERPRET=1``, when asked for by name).

Each answers one protocol (:class:`Backend`: ``not_supported_reasons``, ``forward``,
``backward``, ``accumulate_exact``); the pipeline picks one per (device, dtype).
:func:`use` restricts the choice for a block of code (per thread and task, a
``contextvars`` variable): ``with tgn.backends.use("torch_ops"):`` runs every plan on
torch ops alone.  The three objects and the choice are in :mod:`.registry`
(``BACKENDS``, ``choose``, ``NoBackendError``), which imports the kernels' loaders;
this package imports only :mod:`.base`, which those loaders read.  Backends import
the IR, the lowering and the kernels, never the prover (they are handed a plan).
"""

from __future__ import annotations

from .base import BACKEND_NAMES as BACKEND_NAMES
from .base import Backend as Backend
from .base import Forward as Forward
from .base import allowed as allowed
from .base import use as use

__all__ = ["BACKEND_NAMES", "Backend", "Forward", "allowed", "use"]
