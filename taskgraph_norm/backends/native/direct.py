"""Calls straight to the native kernel: whole rows in C, no tiles, no workspaces.

The native kernels work row by row with the row in cache, so on CPU input they need
no tiling: the pipeline asks :func:`direct_call` once per configuration for a
function that takes a checked input and makes one native call (whose rows torch's
threads share when the input is large enough: :mod:`.team`).  fp32 rows go to the
row kernels as they are; bf16 and fp16 rows are widened into fp32 scratch a few rows
at a time in C, run through the same kernels and rounded back (``native_narrow.c``),
so a call allocates its output and nothing else.  Same kernel, same per-row order,
same bits as the compiled executor's tiles (the tests compare them).  What FINALIZE
does per dtype pair (output dtype, llama's roundings, the dtype ``w + offset`` is
made in) is :func:`~..torch_ops.finish.finish_rule`'s, read once per (x dtype,
weight dtype); the weight, of any of the three dtypes, is made in fp32 in C.

It returns ``None`` for an input it does not take (fp64 anywhere, another device, a
strided input, a NaN in a row's total or narrowed result, a gradient to record, the
native kernels switched off, a residual written over ``x`` or itself), and the caller
runs the general path.

A fresh output of at least 32 MiB is advised to the kernel as a huge-page candidate
(``madvise(MADV_HUGEPAGE)``, Linux) before the kernel first writes it: glibc serves
such a block with a fresh ``mmap`` every time, and faulting it in page by page costs
more than normalising it (docs/performance.md, "Page faults").  Smaller outputs come
from glibc's heap, where they are usually still mapped from the last call; where the
heap was trimmed meanwhile, the advice makes refaulting them slower, not faster
(6.9 against 4.1 ms for a 16 MiB output: docs/performance.md, "Page faults"), so
they are not advised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ... import kernels
from ...constants import DTYPE_BF16, DTYPE_F16, DTYPE_F32, HUGE_BYTES, SPLIT_NUMEL, TEAM_GRAIN
from ...lowering import Plan
from ..base import allowed as _allowed
from ..torch_ops.finish import finish_rule
from . import face as _face
from . import loader as _native
from . import team as _team

__all__ = ["DirectCall", "HUGE_BYTES", "SPLIT_NUMEL", "TEAM_GRAIN", "direct_call"]

#: ``fn(x, weight, eps, out, residual=None, residual_out=None, total=None) -> y | None``
#: (``None``: not taken, run the general path; with a residual, ``h`` is then in
#: ``residual_out``), for a checked input; its attribute ``routed(x, weight, eps, out)``
#: is the faces' entry for a call :func:`taskgraph_norm.ops.route` sent straight to the
#: kernel (``x`` and the weight plain tensors, no gradient recorded), whose last dim is
#: the plan's hidden size: it checks the weight's shape, ``out`` and ``eps`` itself.
#: With ``total`` (contiguous, ``(rows, 1)`` fp32 for a float plan, ``(rows, 2)`` fp64
#: exact pairs for an exact one) each row's rms (float plans) or
#: exact total pair (exact plans) is written there: what the backward needs of the
#: forward (:mod:`taskgraph_norm.ops`).
DirectCall = Callable[..., "torch.Tensor | None"]

# From SPLIT_NUMEL elements on, the rows are shared among torch's threads (:mod:`.team`:
# torch's own OpenMP team, or ``native_team.c``'s worker; each thread runs its own part
# of the rows, then steals blocks of about TEAM_GRAIN elements left in the others', so
# none waits for another to wake); under OMP_WAIT_POLICY=PASSIVE, above
# team.PASSIVE_SERIAL_NUMEL.  Both are module attributes the tests set.

#: Tensors whose data pointer is real (a FakeTensor or FunctionalTensor has none).
_PLAIN = (torch.Tensor, torch.nn.Parameter)

#: (bound once: each attribute lookup shows on a 5 us call)
_grad_enabled = torch.is_grad_enabled
_overlaps = torch._C._overlaps
_DEFAULT_EPS = kernels.DEFAULT_EPS

#: The dtypes the C side reads and writes, by their codes there.
_CODES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_F16}


def _advise(ptr: int, nbytes: int) -> None:
    """Advise a fresh output's pages as huge-page candidates (``tgn_advise_huge``)."""
    _native.module().advise_huge(ptr, nbytes)


def direct_call(plan: Plan) -> DirectCall | None:
    """The direct kernel for ``plan``, or ``None`` when the plan has no native kernel.

    The returned function takes an input already checked by the caller (shape,
    weight shape and device, ``out``'s shape and device) and ``eps`` resolved.
    """
    exact = plan.accumulate == "exact"
    if not _native.runs_plan(plan):
        return None
    if not _native.available():
        return None
    hidden = plan.hidden_size
    keep: list[Any] = []
    # Rows per block of the team: about TEAM_GRAIN elements.
    base: dict[str, Any] = {"hidden": hidden, "offset": plan.offset, "grain": max(1, TEAM_GRAIN // max(hidden, 1))}
    if exact:
        # the totals the ops ask for become each row's rms (rms_of_totals: (float)(t1 + t2)),
        # so a pair proved from a plain sum may be left as (that value, 0)
        base.update(exact=1, total_flags=_native.TOTAL_ROUNDED)
    else:
        adds = tuple(t for level in plan.adds for t in level)
        recipe = _native.FloatRecipe(plan.chunk_size, plan.n_chunks, adds, plan.root)
        keep.append(recipe)  # holds the adds tensor whose address the configurations hold
        base.update(exact=0, chunk=recipe.chunk_size, adds=recipe.adds.data_ptr(), n_adds=recipe.n_adds,
                    root=recipe.root, total_flags=_native.TOTAL_AS_RMS)
    rows_config, rows_call = _native.module().rows_config, _native.module().rows_call
    offset, grain, w_shape = plan.offset, base["grain"], (hidden,)
    #: (x dtype, weight dtype) -> (configuration, output dtype), or None: not taken
    configs: dict[tuple[torch.dtype, torch.dtype | None], tuple[bytes, torch.dtype] | None] = {}
    #: The C face's (face.py) configurations: x's code * 4 + the weight's code + 1 (0: no
    #: weight) -> configuration, for the pairs whose output is x's dtype.
    faces: dict[int, bytes] = {}

    def configure(x_dtype: torch.dtype, w_dtype: torch.dtype | None) -> tuple[bytes, torch.dtype] | None:
        rule = finish_rule(plan.casting_mode, x_dtype, w_dtype)
        codes = (_CODES.get(x_dtype), _CODES.get(rule.out_dtype),
                 DTYPE_F32 if w_dtype is None else _CODES.get(w_dtype),
                 DTYPE_F32 if rule.weight_dtype is None else _CODES.get(rule.weight_dtype))
        found = None
        if rule.flags is not None and None not in codes:  # (fp64 anywhere: torch's FINALIZE)
            x_code, y_code, w_code, w_round = codes
            found = (rows_config(**base, flags=rule.flags, x_dtype=x_code, y_dtype=y_code, w_dtype=w_code,
                                 w_round=w_round), rule.out_dtype)
            if y_code == x_code and not (w_dtype is None and offset):  # (routed's cases: below)
                assert x_code is not None and w_code is not None
                faces[x_code * 4 + (0 if w_dtype is None else w_code + 1)] = found[0]
        configs[(x_dtype, w_dtype)] = found
        return found

    def call(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor | None,
             residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
             total: torch.Tensor | None = None) -> torch.Tensor | None:
        if type(x) not in _PLAIN:
            return None
        if total is None and _grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
            return None  # (the ops ask with ``total``, under their own autograd)
        return routed(x, weight, eps, out, residual, residual_out, total, False)

    def routed(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, out: torch.Tensor | None,
               residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
               total: torch.Tensor | None = None, faces: bool = True) -> torch.Tensor | None:
        # (loader.enabled() inline: TGN_NATIVE=0, read at import, gives no direct call at all)
        if not x.is_cpu or not x.is_contiguous() or "native" not in _allowed():
            return None
        x_dtype = x.dtype
        if faces:  # check_input's, check_out's and resolve_eps's checks the direct path needs
            if weight is not None and weight.shape != w_shape:
                return None
            if out is not None and (not isinstance(out, torch.Tensor) or out.shape != x.shape
                                    or _overlaps(out, x) or (weight is not None and _overlaps(out, weight))):
                return None  # (the full checks raise, or run an in-place call)
            if eps is None:
                eps = _DEFAULT_EPS.get(x_dtype)  # (filled by the first cold call's check)
                if eps is None:
                    return None
            elif type(eps) is not float:
                return None
        if weight is None:
            if offset:
                return None  # the general path says why an offset needs a weight
            key: tuple[torch.dtype, torch.dtype | None] = (x_dtype, None)
        elif not weight.is_cpu or not weight.is_contiguous():
            return None  # (another device: the general path raises DeviceMismatchError)
        else:
            key = (x_dtype, weight.dtype)
        try:
            found = configs[key]
        except KeyError:
            found = configure(*key)
        if found is None:
            return None
        cfg, out_dtype = found
        rp = hp = None
        if residual is not None:
            # h over x or the residual could not be undone for a NaN row's general path.
            if (residual_out is None or residual.dtype is not x_dtype or residual_out.dtype is not x_dtype
                    or not residual.is_contiguous() or not residual_out.is_contiguous()
                    or residual_out.data_ptr() in (x.data_ptr(), residual.data_ptr())
                    or residual.requires_grad and _grad_enabled()):
                return None
            rp, hp = residual.data_ptr(), residual_out.data_ptr()
        if out is not None and (not out.is_cpu or not out.is_contiguous() or out.dtype is not out_dtype):
            return None  # (another dtype: the general path raises)
        numel = x.numel()
        mapped = False  # a fresh mapping, faulted in as it is written: no streaming stores (csrc)
        if out is None:
            y = torch.empty_like(x) if out_dtype is x_dtype else torch.empty(x.shape, dtype=out_dtype)
            mapped = advise_fresh(y)
        else:
            y = out
        rows = numel // hidden
        threads = _team.forward_threads(numel, rows, grain, SPLIT_NUMEL)
        bad = rows_call(cfg, x.data_ptr(), y.data_ptr(), rows, None if weight is None else weight.data_ptr(),
                        eps, None if total is None else total.data_ptr(), rp, hp, threads, mapped)
        # A NaN total or result (or an exact row with no scale): the general path gives
        # it the reference's bits; what was written to a caller's out is overwritten there.
        return None if bad else y

    # The configurations hold the adds tensor's address: each entry point holds its
    # tensor (a running call's frame holds its function), so a pipeline that drops this
    # call (two threads' first calls each made one; a cleared cache) cannot free the
    # tensor under a call still running.
    call.keep = routed.keep = keep  # type: ignore[attr-defined]
    call.routed = routed  # type: ignore[attr-defined]
    call.face = faces  # type: ignore[attr-defined]  # (its pipeline keeps it beside keep)
    _face.install(_native.module())
    return call


def advise_fresh(t: torch.Tensor) -> bool:
    """Advise a fresh CPU tensor ``t`` of at least :data:`HUGE_BYTES` as a huge-page
    candidate before anything writes it, as the direct call does its output (the
    backward's ``dx``: a fresh 64 MiB tensor faulted in 4 KiB pages costs ms).  Returns
    whether it did: ``t`` is then a fresh mapping, which ``rows_call`` writes with
    ordinary stores (its ``mapped``)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_BYTES or not _native.available():
        return False
    _advise(t.data_ptr(), nbytes)
    return True
