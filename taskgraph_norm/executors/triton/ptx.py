"""The PTX a plan's kernel compiles to, for a CUDA target, without a GPU.

Triton ships its LLVM and ``ptxas``, so the kernels can be compiled for e.g.
``sm_90`` on any machine.  What the GPU will execute can then be read: the tests
check that no instruction rounds differently from the reference (no ``fma``, no
flush-to-zero, no approximate division, square root or reciprocal).  This is
the compile-side half of the proof; the device bit tests are the other half.
"""

from __future__ import annotations

import re

import torch

from ..lowering import Plan
from .layout import kernel_shape, next_pow2
from .runner import MAX_BLOCK, _kernels

__all__ = ["FORBIDDEN", "forbidden_instructions", "kernel_ptx"]

#: PTX opcodes (prefixes) that round differently from the CPU reference.
FORBIDDEN = ("fma.", "rsqrt.", "rcp.", "sqrt.approx", "div.approx", "div.full", "ex2.", "lg2.")
_FLOAT = re.compile(r"\.(f16|bf16|f32|f64)\b")

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def kernel_ptx(plan: Plan, dtype: torch.dtype, *, weight: bool, arch: int = 90, fp_fusion: bool = False) -> str:
    """The PTX of ``plan``'s kernel for ``dtype`` inputs on ``sm_<arch>`` (compiled here).

    ``fp_fusion=True`` compiles as Triton would by default, with contraction on
    (a negative control: :func:`forbidden_instructions` then finds fmas)."""
    import triton  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped, import-not-found, unused-ignore]

    k = _kernels(False)
    shape = kernel_shape(plan)
    d = shape.hidden_size
    signature = {"x_ptr": _PTR[dtype], "y_ptr": _PTR[dtype], "w_ptr": "*fp32"}
    constants: dict[str, object] = {
        "D": d, "BLOCK": min(next_pow2(d), MAX_BLOCK), "HAS_W": weight, "BF16": dtype == torch.bfloat16,
    }
    if shape.kind == "exact":
        fn = k.exact_kernel
        constants.update(LOG_BLOCK=min(next_pow2(d), MAX_BLOCK).bit_length() - 1, FOLDS=False)
    else:
        signature["table_ptr"] = "*i32"
        constants.update(CW=shape.chunk_width, LOG_C=shape.log_chunk, NATURAL=shape.natural)
        if shape.kind == "tree":
            fn = k.float_tree_kernel
            constants.update(NW=shape.chunks_width, LOG_N=shape.log_chunks)
        else:
            fn = k.float_linear_kernel
            constants.update(N=shape.n_chunks)
    signature.update({"flag_ptr": "*i8", "x_stride": "i32", "y_stride": "i32", "eps": "fp32"})
    signature.update({name: "constexpr" for name in constants})
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": fp_fusion})
    ptx: str = compiled.asm["ptx"]
    return ptx


def forbidden_instructions(ptx: str) -> list[str]:
    """The instructions of ``ptx`` that round differently from the reference, or use
    flush-to-zero (``.ftz``) arithmetic on floats."""
    found = []
    for line in ptx.splitlines():
        op = line.strip().split(" ")[0].split("\t")[0]
        is_float = _FLOAT.search(op) is not None
        if op.startswith(FORBIDDEN) or is_float and (op.startswith("mad.") or ".ftz" in op):
            found.append(line.strip())
    return found
