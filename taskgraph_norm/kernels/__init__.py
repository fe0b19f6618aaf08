"""All torch numerics of taskgraph_norm, in one place: this package (NaN-bit widening
in ``nan_bits.py``, the exact domain in ``exact_domain.py`` and the backward in
``backward.py``, all importable from here).

Every function here is row-local: it reads and writes each row of ``(..., D)``
independently, with elementwise IEEE operations (add, multiply, divide, sqrt,
max) whose results do not depend on how many rows there are or how they are
vectorised (NaN bits included: :func:`widen`, :func:`bf16_nans`).  The only
exceptions are named for what they are: ``sumsq_native`` and ``catsum`` call
``torch.sum``, whose internal order is the backend's, and ``rms_norm_standard``
is torch's own kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .nan_bits import bf16_nans as bf16_nans
from .nan_bits import widen as widen
from .nan_bits import widen_into as widen_into
from .sqrt import sqrt_fp64 as sqrt_fp64

__all__ = [
    "accumulation_dtype",
    "widen",
    "widen_into",
    "bf16_nans",
    "sqrt_fp64",
    "DEFAULT_EPS",
    "default_eps",
    "sumsq_pairwise",
    "sumsq_native",
    "sumsq_exact",
    "pairwise_halving_",
    "add",
    "accumulate",
    "catsum",
    "rowmax_sq",
    "rowmax_sq_whole",
    "maximum",
    "exact_scale",
    "combine_exact",
    "CASTING_MODES",
    "output_dtype",
    "residual_add",
    "finalize_weight",
    "finalize_rms",
    "finalize",
    "rms_norm_standard",
    "grad_operands",
    "sum_pairwise",
    "sum_native",
    "sum_exact",
    "input_grad",
    "ROW_BLOCK",
    "weight_grad_float",
    "merge_blocks_",
    "merge_blocks_streamed",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32, fp16 and bf16 accumulate in fp32, as torch does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: What ``eps=None`` means per input dtype (:func:`default_eps`), read by the warm paths.
DEFAULT_EPS: dict[torch.dtype, float] = {}


def default_eps(dtype: torch.dtype) -> float:
    """What ``eps=None`` means in ``F.rms_norm``: the accumulation dtype's epsilon."""
    found = DEFAULT_EPS.get(dtype)
    if found is None:
        found = DEFAULT_EPS.setdefault(dtype, torch.finfo(accumulation_dtype(dtype)).eps)
    return found


def pairwise_halving_(s: torch.Tensor) -> torch.Tensor:
    """Sum the last dim of ``s`` by explicit halving, in place; returns ``s[..., :1]``.

    The order is fully specified: while the length ``L > 1``, with
    ``h = ceil(L / 2)``, element ``i < L - h`` becomes ``s[i] + s[i + h]``, and the
    middle element of an odd length is carried up unchanged.  The two halves never
    overlap, so each step is one elementwise add of disjoint slices.
    """
    length = s.shape[-1]
    while length > 1:
        half = (length + 1) // 2
        s[..., : length - half] += s[..., half:length]
        length = half
    return s[..., :1]


def _squares(x: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    chunk = widen(x[..., start:stop], dtype)
    return chunk * chunk  # a fresh tensor: safe to reduce in place


def sumsq_pairwise(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of squares of ``x[..., start:stop]`` per row, pairwise halving order."""
    return pairwise_halving_(_squares(x, start, stop, accumulation_dtype(x.dtype)))


def sumsq_native(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of squares of ``x[..., start:stop]`` per row, ``torch.sum``'s own order.

    The chunk is made contiguous first so that a strided input reduces exactly
    like its contiguous copy.
    """
    s = _squares(x, start, stop, accumulation_dtype(x.dtype)).contiguous()
    return torch.sum(s, dim=-1, keepdim=True)


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Ordered binary merge ``a + b``."""
    return a + b


def accumulate(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``acc += p`` over ``parts`` in the given (arrival) order, starting from zero.

    ``0 + p0`` is ``p0`` exactly for the non-negative partials of RMSNorm, so the
    first arrival is copied rather than added to a zero tensor.
    """
    acc = parts[0].clone()
    for part in parts[1:]:
        acc += part
    return acc


def catsum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.sum(torch.cat(parts, -1), -1)``: the order inside is the backend's.

    Exact-domain pairs ``(..., 2)`` are summed channel by channel (each fold on its
    own grid), which is exact in any order.
    """
    channels = parts[0].shape[-1]
    cat = torch.cat(list(parts), dim=-1)
    if channels == 1:
        return torch.sum(cat, dim=-1, keepdim=True)
    return torch.sum(cat.reshape(*cat.shape[:-1], len(parts), channels), dim=-2)


# --- the end of every graph -----------------------------------------------------


def _sqrt_correctly_rounded(t: torch.Tensor) -> torch.Tensor:
    """IEEE sqrt of ``t`` on every device.

    torch's CUDA float32 ``sqrt`` is an approximation (it disagrees with the CPU in
    about 0.6% of elements on an H100), so fp32 goes through fp64.  A square root
    of an fp32 value computed in fp64 and rounded to fp32 is the correctly rounded
    fp32 one: the exact root of a 24-bit value is at least ``2**-49`` (relative)
    away from every midpoint between fp32 neighbours, far more than the fp64
    root's error, which is why torch's fp64 ``sqrt`` serves there although it is
    itself not correctly rounded on this project's CPU build (about 1.3% of random
    fp64 inputs differ from IEEE ``sqrt``, within one ulp, and which ones depends on
    the CPU).  An fp64 ``t`` takes :func:`~taskgraph_norm.kernels.sqrt.sqrt_fp64`, the
    IEEE root in torch ops.  It is one value per row, so the cost is nil.
    """
    if t.dtype == torch.float64:
        return sqrt_fp64(t)
    return torch.sqrt(t.double()).to(t.dtype)


#: What FINALIZE may do after the division (docs/user-guide.md, "Casting modes").
CASTING_MODES: tuple[str, ...] = ("torch", "llama", "gemma")


def output_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype | None, casting_mode: str) -> torch.dtype:
    """The dtype FINALIZE returns: ``x``'s, except ``"llama"`` with a weight, which
    multiplies in (and returns) the promoted dtype of the weight and ``x``, as
    Hugging Face's ``LlamaRMSNorm`` does (an fp32 weight and bf16 ``x`` give fp32)."""
    if casting_mode == "llama" and weight_dtype is not None:
        return torch.promote_types(weight_dtype, x_dtype)
    return x_dtype


def residual_add(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h = x + residual`` in ``x``'s dtype: one IEEE addition per element (fp16 and
    bf16 are added in fp32 and rounded once, which is the correctly rounded sum).
    ``out`` may be ``x`` or ``residual`` itself (each element is read before it is
    written).  A NaN bf16 sum is 0xFFFF (:func:`bf16_nans`)."""
    if out is None:
        return bf16_nans(x + residual)
    return bf16_nans(torch.add(x, residual, out=out))


def finalize_weight(weight: torch.Tensor, dtype: torch.dtype, offset: float) -> torch.Tensor:
    """The weight FINALIZE multiplies by: ``w.to(dtype) + offset`` in ``dtype``
    (Gemma stores ``w`` and multiplies by ``1 + w``).  ``offset=0`` adds nothing
    (so a ``-0.0`` weight keeps its sign)."""
    w = widen(weight, dtype)
    return bf16_nans(w + offset) if offset else w


def finalize_rms(total: torch.Tensor, hidden_size: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``sqrt(total / D + eps)`` per row in ``dtype`` (an exact pair is combined in
    fp64 and rounded once to ``dtype`` first)."""
    if total.shape[-1] == EXACT_CHANNELS:
        total = combine_exact(total)
    total = total.to(dtype)
    # A tensor divisor, not a Python number: CUDA turns division by a host scalar
    # into multiplication by its reciprocal, which rounds differently from the CPU.
    mean = total / torch.full_like(total, hidden_size) + eps
    return _sqrt_correctly_rounded(mean)


def finalize(
    x: torch.Tensor,
    total: torch.Tensor,
    hidden_size: int,
    eps: float,
    weight: torch.Tensor | None,
    casting_mode: str = "torch",
    offset: float = 0.0,
) -> torch.Tensor:
    """``x / sqrt(total / D + eps) * (offset + w)``, rounded as ``casting_mode`` says.

    ``acc`` is the accumulation dtype (fp32 for fp32/fp16/bf16 ``x``, fp64 for fp64):

    * ``"torch"`` (``torch.nn.RMSNorm``): ``y = x.to(acc) / rms``, ``y * (w.to(acc) +
      offset)`` in ``acc``, cast once to ``x.dtype``.
    * ``"gemma"`` (Hugging Face Gemma, Gemma 2 and 3 with ``offset=1``): everything in
      ``acc`` with the weight ``(offset + w)`` made in ``acc``, cast once -- the
      same operations as ``"torch"``, named for the models that use them.
    * ``"llama"`` (Hugging Face Llama, Qwen, Mistral): ``y = (x.to(acc) / rms).to(x.dtype)``,
      then ``y.to(p) * (w.to(p) + offset)`` in ``p``, the promoted dtype of the
      weight and ``x`` (:func:`output_dtype`).

    Division and an fp64-computed ``sqrt`` rounded to fp32 are correctly rounded on
    every IEEE backend (``rsqrt`` and torch's CUDA fp32 ``sqrt`` are not), so this
    form gives the same bits on every device for fp32, fp16 and bf16 inputs (fp64
    inputs: see :func:`_sqrt_correctly_rounded`).  Hugging Face multiplies by
    ``rsqrt`` instead; that rounding is the only difference from its formulas.
    """
    dtype = accumulation_dtype(x.dtype)
    y = widen(x, dtype) / finalize_rms(total, hidden_size, eps, dtype)
    if casting_mode == "llama":
        y = y.to(x.dtype)
        if weight is None:
            return y
        wide = torch.promote_types(weight.dtype, x.dtype)
        return bf16_nans(widen(y, wide) * finalize_weight(weight, wide, offset))
    if weight is not None:
        y = y * finalize_weight(weight, dtype, offset)
    return y.to(x.dtype)


def rms_norm_standard(
    x: torch.Tensor, hidden_size: int, eps: float, weight: torch.Tensor | None
) -> torch.Tensor:
    """torch's own kernel, the report's baseline (its order is the backend's).

    torch's CPU kernel reduces a strided row in another order than a contiguous
    one, so the kernel sees a contiguous copy and the result is put back in the
    input's layout: every topology gives a strided input its contiguous copy's bits.
    """
    if x.is_contiguous():
        return F.rms_norm(x, (hidden_size,), weight, eps)
    y = F.rms_norm(x.contiguous(), (hidden_size,), weight, eps)
    return torch.empty_like(x).copy_(y)


# The exact domain's kernels live in kernels/exact_domain.py (imported here, after
# _squares, which it uses); kernels/backward.py reads them from this module.
from .exact_domain import EXACT_CHANNELS as EXACT_CHANNELS  # noqa: E402
from .exact_domain import _pow2_at_least as _pow2_at_least  # noqa: E402
from .exact_domain import _preround as _preround  # noqa: E402
from .exact_domain import combine_exact as combine_exact  # noqa: E402
from .exact_domain import exact_scale as exact_scale  # noqa: E402
from .exact_domain import maximum as maximum  # noqa: E402
from .exact_domain import rowmax_sq as rowmax_sq  # noqa: E402
from .exact_domain import rowmax_sq_whole as rowmax_sq_whole  # noqa: E402
from .exact_domain import sumsq_exact as sumsq_exact  # noqa: E402

# The backward's numerics live in kernels/backward.py (imported last: it uses the above).
from .backward import ROW_BLOCK as ROW_BLOCK  # noqa: E402
from .backward import grad_operands as grad_operands  # noqa: E402
from .backward import input_grad as input_grad  # noqa: E402
from .backward import merge_blocks_ as merge_blocks_  # noqa: E402
from .backward import merge_blocks_streamed as merge_blocks_streamed  # noqa: E402
from .backward import sum_exact as sum_exact  # noqa: E402
from .backward import sum_native as sum_native  # noqa: E402
from .backward import sum_pairwise as sum_pairwise  # noqa: E402
from .backward import weight_grad_float as weight_grad_float  # noqa: E402
