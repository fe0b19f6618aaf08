"""How a lowered :class:`Plan` becomes the static shape of a Triton kernel (no triton import).

A Triton program holds a row in registers as power-of-two blocks, and the only
cheap data movement between lanes is a reshape.  The kernels therefore reduce
with one primitive, *fold*: a block of width ``2W`` becomes ``b[i] + b[i + W]``
(``i < W``).  This module places the row's elements so that folds perform the
plan's additions exactly, operation for operation:

* a pairwise leaf over a chunk of length ``L`` (``kernels.pairwise_halving_``:
  with ``h = ceil(L/2)``, ``s[i] += s[i + h]`` for ``i < L - h``, an odd middle
  element carried up) is folded from a width ``P >= L`` (a power of two) with the
  chunk's elements at :func:`halving_positions` and ``+0`` everywhere else.  A
  carried element meets a ``+0`` and ``s + 0 == s`` exactly for every square
  (squares are never ``-0``); padding meets padding (``0 + 0 = +0``).
* the builder's tree merge pairs ``(2i, 2i + 1)`` with an odd last partial carried
  up: the partials sit in index order in a power-of-two block padded with ``+0``
  and each level is a fold of adjacent pairs.
* a left fold (``linear``) is a loop over the chunks in index order.
* the exact domain adds on a fixed-point grid: every order gives the same bits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ...errors import ExecutionError
from ...lowering import Plan

__all__ = ["KernelShape", "float_layout", "halving_positions", "kernel_shape", "next_pow2"]

#: Kernels by what they run: ``tree`` (also ``single``: a tree of one chunk),
#: ``linear`` (a left fold over the chunks) and ``exact``.
KINDS = ("tree", "linear", "exact")


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def halving_positions(length: int, width: int) -> tuple[int, ...]:
    """Where element ``i`` of a chunk of ``length`` sits in a block of ``width`` so that
    ``log2(width)`` folds add exactly what ``kernels.pairwise_halving_`` adds.

    The first halving adds ``s[i] + s[i + h]`` (``h = ceil(length / 2)``); a fold
    adds ``b[p] + b[p + width / 2]``: so ``s[i]`` and ``s[i + h]`` go to the same
    position ``p`` of the two halves, ``p`` being where the shorter vector of the
    next halving step puts its element ``i`` (recursively).  ``width`` must be a
    power of two ``>= length``.
    """
    if length < 1 or width < length or width & (width - 1):
        raise ValueError(f"need 1 <= length <= width, width a power of two; got {length}, {width}")
    if length == 1:
        return (0,)
    half = (length + 1) // 2
    inner = halving_positions(half, width // 2)
    return inner + tuple(inner[i] + width // 2 for i in range(length - half))


@dataclass(frozen=True)
class KernelShape:
    """The compile-time shape of one plan's kernel.

    ``kind``: one of :data:`KINDS`.  ``chunk_width``: the power-of-two block of one
    chunk (``>= C``); ``chunks_width``: the power-of-two block of the partials
    (``>= n_chunks``).  ``table``: for every slot of the ``(chunks_width,
    chunk_width)`` block (row-major), the column of ``x`` that goes there, or
    ``-1`` for a ``+0``; empty when the layout is the natural one (``C`` a power of
    two dividing ``D``: slot ``c * C + j`` holds column ``c * C + j``) or for ``exact``.
    """

    kind: str
    hidden_size: int
    n_chunks: int
    chunk_width: int
    chunks_width: int
    table: tuple[int, ...]

    @property
    def log_chunk(self) -> int:
        return self.chunk_width.bit_length() - 1

    @property
    def log_chunks(self) -> int:
        return self.chunks_width.bit_length() - 1

    @property
    def natural(self) -> bool:
        return not self.table


def _left_fold(n: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """The ``adds`` levels of ``((p0 + p1) + p2) + ...`` over ``n`` leaves."""
    return tuple(((n + j, n + j - 1 if j else 0, j + 1),) for j in range(n - 1))


def kernel_kind(plan: Plan) -> str:
    """Which kernel runs ``plan``; raises :class:`ExecutionError` saying why none can."""
    if plan.accumulate == "exact":
        return "exact"  # every addition exact: leaf kind, topology and chunking are irrelevant
    if plan.leaf != "pairwise":
        raise ExecutionError(
            f"the triton executor cannot run {plan.leaf!r} leaves: their order is torch.sum's, "
            "which a kernel cannot reproduce (use executor='compiled', or leaf='pairwise')"
        )
    if plan.merge in ("single", "tree"):
        return "tree"
    if plan.merge == "adds" and plan.adds == _left_fold(plan.n_chunks) and plan.root == 2 * plan.n_chunks - 2:
        return "linear"
    if plan.merge == "cat":
        raise ExecutionError(
            "the triton executor cannot run a 'cat' merge: its order is torch.sum's "
            "(use executor='compiled', or topology='tree' / 'linear')"
        )
    raise ExecutionError(
        f"the triton executor runs the builder's tree, a left fold or one chunk; this plan's "
        f"{plan.merge!r} merge is another shape (use executor='compiled')"
    )


@functools.lru_cache(maxsize=256)
def kernel_shape(plan: Plan) -> KernelShape:
    """The static shape of ``plan``'s kernel (cached).  Raises what :func:`kernel_kind` raises."""
    kind = kernel_kind(plan)
    d, c, n = plan.hidden_size, plan.chunk_size, plan.n_chunks
    if kind == "exact":
        return KernelShape(kind, d, n, 1, 1, ())
    cw = next_pow2(min(c, d))
    nw = next_pow2(n) if kind == "tree" else n
    if cw == c and plan.tail == 0:
        return KernelShape(kind, d, n, cw, nw, ())
    table = [-1] * (nw * cw)
    for k in range(n):
        start = k * c
        length = min(c, d - start)
        for i, p in enumerate(halving_positions(length, cw)):
            table[k * cw + p] = start + i
    return KernelShape(kind, d, n, cw, nw, tuple(table))


def float_layout(shape: KernelShape, block: int, constants: dict[str, Any],
                 kernels: tuple[str, str]) -> tuple[str, int]:
    """A float plan's row layout as compile-time arguments, added to ``constants``: the
    one mapping the forward and the ``dx`` kernels share, so both place a row's chunks
    identically.  Returns the kernel for the plan's merge, ``kernels[0]`` for a tree
    (or single chunk) and ``kernels[1]`` for a left fold, and the width its warps are
    sized by."""
    constants.update(CW=shape.chunk_width, LOG_C=shape.log_chunk, NATURAL=shape.natural)
    if shape.kind == "tree":
        constants.update(NW=shape.chunks_width, LOG_N=shape.log_chunks)
        return kernels[0], max(shape.chunks_width * shape.chunk_width, block)
    constants.update(N=shape.n_chunks)
    return kernels[1], max(shape.chunk_width, block)
