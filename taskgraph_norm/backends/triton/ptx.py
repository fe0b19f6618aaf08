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

from ... import kernels
from ...lowering import Plan
from .layout import kernel_shape
from .runner import _kernels, launch_spec

__all__ = ["FORBIDDEN", "backward_ptx", "exact_dw_ptx", "forbidden_instructions", "kernel_ptx",
           "layer_backward_ptx", "layer_ptx"]

#: PTX opcodes (prefixes) that round differently from the CPU reference.
FORBIDDEN = ("fma.", "rsqrt.", "rcp.", "sqrt.approx", "div.approx", "div.full", "ex2.", "lg2.")
_FLOAT = re.compile(r"\.(f16|bf16|f32|f64)\b")

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}


def kernel_ptx(
    plan: Plan, dtype: torch.dtype, *, weight: bool | torch.dtype = True, arch: int = 90, fp_fusion: bool = False,
) -> str:
    """The PTX of ``plan``'s kernel for ``dtype`` inputs on ``sm_<arch>`` (compiled here).

    ``weight``: the weight's dtype (``True``: fp32, ``False``: none).  The plan's
    casting mode, offset and residual are compiled in as the runner launches them.
    ``fp_fusion=True`` compiles as Triton would by default, with contraction on
    (a negative control: :func:`forbidden_instructions` then finds fmas)."""
    w_dtype = torch.float32 if weight is True else None if weight is False else weight
    out_dtype = kernels.output_dtype(dtype, w_dtype, plan.casting_mode)
    shape = kernel_shape(plan)
    name, constants, _ = launch_spec(shape, plan, w_dtype, out_dtype, interpret=False)
    x_ptr = _PTR[dtype]
    signature = {"x_ptr": x_ptr, "r_ptr": x_ptr, "h_ptr": x_ptr, "y_ptr": _PTR[out_dtype],
                 "w_ptr": _PTR[w_dtype or out_dtype]}
    if shape.kind != "exact":
        signature["table_ptr"] = "*i32"
    signature["flag_ptr"] = "*i8"
    signature.update({s: "i32" for s in ("x_stride", "r_stride", "h_stride", "y_stride")})
    signature["eps"] = "fp32"
    signature.update({c: "constexpr" for c in constants})
    return _compile(getattr(_kernels(False), name), signature, constants, arch, fp_fusion)


def backward_ptx(
    plan: Plan, dtype: torch.dtype, *, part: str = "dx", weight: bool | torch.dtype = True, offset: float = 0.0,
    round_x_hat: bool = False, arch: int = 90, fp_fusion: bool = False,
) -> str:
    """The PTX of the backward's kernel for ``dtype`` inputs (``dy`` too) on ``sm_<arch>``:
    ``part="dx"`` (``plan``'s ``dx`` kernel; ``weight`` as in :func:`kernel_ptx`, with
    ``offset``) or ``"dw"`` (the row blocks' ``dW`` kernel; ``round_x_hat``: llama's)."""
    from .backward import dw_launch_spec, dx_launch_spec

    x_ptr = _PTR[dtype]
    if part == "dw":
        name, constants, _ = dw_launch_spec(plan.hidden_size, round_x_hat)
        signature = {"x_ptr": x_ptr, "dy_ptr": x_ptr, "rms_ptr": "*fp32", "tail_ptr": "*i32", "out_ptr": "*fp32",
                     "n_full": "i32", "x_stride": "i32", "dy_stride": "i32"}
    else:
        w_dtype = torch.float32 if weight is True else dtype if weight is False else weight
        shape = kernel_shape(plan)
        name, constants, _ = dx_launch_spec(shape, weight is not False, offset, interpret=False)
        signature = {"x_ptr": x_ptr, "dy_ptr": x_ptr, "dx_ptr": x_ptr, "w_ptr": _PTR[w_dtype], "rms_ptr": "*fp32"}
        if shape.kind != "exact":
            signature["table_ptr"] = "*i32"
        signature.update({"flag_ptr": "*i8", "x_stride": "i32", "dy_stride": "i32", "dx_stride": "i32"})
    signature.update({c: "constexpr" for c in constants})
    return _compile(getattr(_kernels(False, "backward_kernels"), name), signature, constants, arch, fp_fusion)


def layer_ptx(plan: Plan, dtype: torch.dtype, *, weight: bool | torch.dtype = True, bias: bool = True,
              arch: int = 90, fp_fusion: bool = False) -> str:
    """The PTX of a LayerNorm plan's forward kernel for ``dtype`` inputs on
    ``sm_<arch>`` (``weight``: its dtype, ``True`` for fp32 or ``False`` for none; the
    bias, when there is one, of the weight's dtype)."""
    from .layer import layer_launch_spec

    w_dtype = torch.float32 if weight is True else dtype if weight is False else weight
    shape = kernel_shape(plan)
    name, constants, _ = layer_launch_spec(shape, weight is not False, bias)
    signature = {"x_ptr": _PTR[dtype], "y_ptr": _PTR[dtype], "w_ptr": _PTR[w_dtype], "b_ptr": _PTR[w_dtype]}
    if shape.kind != "exact":
        signature["table_ptr"] = "*i32"
    signature.update({"mean_ptr": "*fp32", "den_ptr": "*fp32", "flag_ptr": "*i8", "x_stride": "i32",
                      "y_stride": "i32", "eps": "fp32"})
    signature.update({c: "constexpr" for c in constants})
    return _compile(getattr(_kernels(False, "layer_kernels"), name), signature, constants, arch, fp_fusion)


def layer_backward_ptx(plan: Plan, dtype: torch.dtype, *, part: str = "dx", weight: bool | torch.dtype = True,
                       arch: int = 90, fp_fusion: bool = False) -> str:
    """The PTX of LayerNorm's backward kernel for ``dtype`` inputs (``dy`` too) on
    ``sm_<arch>``: ``part="dx"`` (``plan``'s ``dx`` kernel; ``weight`` as in
    :func:`layer_ptx`) or ``"dwb"`` (the row blocks' ``dW`` and ``db`` kernel)."""
    from .layer_backward import layer_dw_launch_spec, layer_dx_launch_spec

    x_ptr = _PTR[dtype]
    if part == "dwb":
        name, constants, _ = layer_dw_launch_spec(plan.hidden_size, True, True)
        signature = {"x_ptr": x_ptr, "dy_ptr": x_ptr, "mean_ptr": "*fp32", "den_ptr": "*fp32", "tail_ptr": "*i32",
                     "dw_ptr": "*fp32", "db_ptr": "*fp32", "n_full": "i32", "x_stride": "i32", "dy_stride": "i32"}
    else:
        w_dtype = torch.float32 if weight is True else dtype if weight is False else weight
        shape = kernel_shape(plan)
        name, constants, _ = layer_dx_launch_spec(shape, weight is not False, interpret=False)
        signature = {"x_ptr": x_ptr, "dy_ptr": x_ptr, "dx_ptr": x_ptr, "w_ptr": _PTR[w_dtype], "mean_ptr": "*fp32",
                     "den_ptr": "*fp32"}
        if shape.kind != "exact":
            signature["table_ptr"] = "*i32"
        signature.update({"flag_ptr": "*i8", "x_stride": "i32", "dy_stride": "i32", "dx_stride": "i32"})
    signature.update({c: "constexpr" for c in constants})
    _kernels(False, "layer_kernels")  # (the backward's kernels call its helpers)
    return _compile(getattr(_kernels(False, "layer_backward_kernels"), name), signature, constants, arch, fp_fusion)


def exact_dw_ptx(dtype: torch.dtype, hidden: int = 4096, *, from_x: bool = False, part: str = "dw",
                 arch: int = 90, fp_fusion: bool = False) -> str:
    """The PTX of the exact weight gradient's kernel (``part="dw"``; ``from_x``: the
    fused ``x / rms`` entry) or of its normalisation (``"normalize"``) for ``dtype``
    operands and ``hidden`` columns on ``sm_<arch>``."""
    from .exact_dw import launch_constants

    dw_constants, norm_constants = launch_constants(hidden, from_x, interpret=False)
    if part == "dw":
        name, constants = "exact_dw_kernel", dw_constants
        signature = {"dy_ptr": _PTR[dtype], "b_ptr": _PTR[dtype], "rms_ptr": "*fp32", "state_ptr": "*i64",
                     "flag_ptr": "*i32", "rows": "i32", "groups": "i32", "dy_stride": "i32", "b_stride": "i32"}
    else:
        name, constants = "normalize_kernel", norm_constants
        signature = {"state_ptr": "*i64", "flag_ptr": "*i32"}
    signature.update({c: "constexpr" for c in constants})
    return _compile(getattr(_kernels(False, "exact_dw_kernels"), name), signature, constants, arch, fp_fusion)


def _compile(fn: object, signature: dict[str, str], constants: dict[str, object], arch: int, fp_fusion: bool) -> str:
    import triton  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped, import-not-found, unused-ignore]

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
