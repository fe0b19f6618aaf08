"""The triton executor: a certified plan as one Triton kernel per call (docs/gpu.md).

Float plans with pairwise leaves and a tree, left-fold or single-chunk merge are
run operation for operation; exact plans (any topology) over whole rows.
FINALIZE is fused, in every casting mode and with the weight offset, and so is
the residual add (``h = x + r`` written out, ``y`` the norm of ``h``).  LayerNorm's plans
(the same float ones, and exact ones) run their forward here too (:mod:`.layer`).  The bits are
the CPU reference's for float32, bfloat16 and float16 inputs.  CUDA tensors run compiled kernels; with ``TRITON_INTERPRET=1``
the kernels run in Triton's interpreter, on CPU tensors too (how they are tested
without a GPU).  ``triton`` is optional: ``pip install "taskgraph-norm[triton]"``.
"""

from __future__ import annotations

from .layout import KernelShape as KernelShape
from .layout import halving_positions as halving_positions
from .layout import kernel_shape as kernel_shape
from .runner import available as available
from .runner import interpreting as interpreting
from .runner import run_triton as run_triton
from .runner import supports as supports

__all__ = ["KernelShape", "available", "halving_positions", "interpreting", "kernel_shape", "run_triton", "supports"]
