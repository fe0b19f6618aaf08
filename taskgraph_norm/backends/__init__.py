"""Backends: each runs a lowered :class:`~taskgraph_norm.lowering.Plan`.

* :mod:`.torch_ops`: the plan as tiles of torch ops (any device, no compiler needed),
  with its worker pool;
* :mod:`.native`: the C kernels (``csrc/``, built by ``setup.py``), their loader
  and the OpenMP team that shares a call's rows;
* :mod:`.triton`: the plan as one Triton kernel (CUDA; CPU tensors under
  ``TRITON_INTERPRET=1``).

Backends import the IR, the lowering and the kernels, never the prover (they are
handed a plan).  For now this module only re-exports their entry points.
"""

from __future__ import annotations

from .native.direct import DirectCall as DirectCall
from .native.direct import direct_call as direct_call
from .torch_ops.compiled import run_compiled as run_compiled
from .triton import run_triton as run_triton

__all__ = ["DirectCall", "direct_call", "run_compiled", "run_triton"]
