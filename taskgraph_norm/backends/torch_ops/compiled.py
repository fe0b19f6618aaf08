"""The compiled executor: a certified graph's :class:`Plan` run over row tiles.

Each tile of rows is squared once into a preallocated workspace; the leaves,
merges and FINALIZE run as a few tensor ops on views of it (views are built
once per workspace, so a call allocates nothing beyond the output).  Every op
is the reference's op on the same values in the same order, applied to more
elements at once: elementwise adds and divisions do not care how many
elements they see, and ``torch.sum`` is called on the same row shapes as the
reference calls it.  So the bits are the reference's, which the tests check
for every certified configuration.

Where a C compiler is available, the sums of a tile come from the native
kernels (:mod:`..native`): pairwise leaves with ADD merges, and every exact plan,
row by row in C with the same bits (tested against these torch ops and the
reference).  With fp32 accumulation (fp32, fp16 and bf16 inputs) the same C call
also runs FINALIZE on each row while it is in cache, in ``kernels.finalize``'s op
order; fp64 keeps the torch FINALIZE (torch's CPU fp64 ``sqrt`` is not correctly
rounded and C's is), as do the torch-ops path and the rows the reference finishes.

Tiles can be spread over a small pool of worker threads (torch releases the
GIL inside ops, the native extension's functions around their kernels); each thread
has its own workspaces.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ... import kernels
from ... import caches, torch_state
from ..native import loader as _native
from ...errors import ConfigError, ExecutionError
from ...graph import Graph
from .finish import Finish, finalize_tile, finish_for
from ...lowering import Plan
from .pools import on_worker, tile_pool  # fork-safe: a forked child makes its own
from ...kernels.reference import Cancelled, finish_from_h, run_reference
from .workspace import TILE_BYTES, WORKSPACES_PER_THREAD, Views, Workspace, default_tile_rows, workspace

__all__ = [
    "run_compiled", "default_tile_rows", "DEFAULT_THREADS",
    "TILE_BYTES", "WORKSPACES_PER_THREAD",
]

#: Worker threads for inputs of two tiles or more (each with its own workspaces).
DEFAULT_THREADS = 2


# --- one tile ------------------------------------------------------------------


def _square(xt: torch.Tensor, sq: torch.Tensor) -> None:
    # The reference squares x.to(acc) in acc: converting first keeps a bf16
    # product from being rounded to bf16.
    if xt.dtype == sq.dtype:
        torch.mul(xt, xt, out=sq)
    else:
        kernels.widen_into(sq, xt)
        sq.mul_(sq)


def _float_total(plan: Plan, v: Views, xt: torch.Tensor) -> torch.Tensor:
    if v.ybuf is not None:
        # x.to(acc) once, kept in ybuf for FINALIZE: a mixed-dtype op would
        # convert x again into a temporary of its own.
        kernels.widen_into(v.ybuf, xt)
        torch.mul(v.ybuf, v.ybuf, out=v.sq)
    else:
        torch.mul(xt, xt, out=v.sq)
    if plan.leaf == "native":
        if plan.n_full:
            torch.sum(v.full, dim=-1, out=v.native_out)
        if v.tail_copy is not None:
            v.tail_copy.copy_(v.tail)
            torch.sum(v.tail_copy, dim=-1, keepdim=True, out=v.parts[:, plan.n_full :])
    else:
        for dst, src in v.full_steps:
            dst.add_(src)
        for dst, src in v.tail_steps:
            dst.add_(src)
    for dst, src in v.gather:
        dst.copy_(src)
    if plan.merge == "cat":
        torch.sum(v.parts, dim=-1, keepdim=True, out=v.rms)
    for kind, dst, a, b in v.merge:
        if kind == "iadd":
            dst.add_(a)
        else:
            torch.add(a, b, out=dst)
    return v.total


def _exact_total(
    plan: Plan, v: Views, xt: torch.Tensor, sigmas: torch.Tensor, any_unscaled: bool
) -> torch.Tensor:
    """The exact pair of every row, summed over whole rows (exact in any order),
    combined in fp64: what the graph's FINALIZE computes from its merge.  The
    scales of the tile's rows come in ``sigmas`` (computed once per call)."""
    sq, q = v.sq, v.q
    _square(xt, sq)
    sigma1, sigma2 = sigmas[:, :1], sigmas[:, 1:]
    torch.add(sq, sigma1, out=q)
    q.sub_(sigma1)  # q1 = (v + sigma1) - sigma1
    sq.sub_(q)  # the remainder v - q1 (exact)
    if any_unscaled:  # Inf/NaN rows keep everything in fold 1
        sq.masked_fill_(sigma1 == 0, 0.0)
    sq.add_(sigma2)
    sq.sub_(sigma2)  # q2 = (r + sigma2) - sigma2
    torch.sum(q, dim=-1, keepdim=True, out=v.pair[:, :1])
    torch.sum(sq, dim=-1, keepdim=True, out=v.pair[:, 1:])
    torch.add(v.pair[:, :1], v.pair[:, 1:], out=v.total64)
    return v.total64


def _native_tile(
    plan: Plan, ws: Workspace, v: Views, xt: torch.Tensor, yt: torch.Tensor, fin: Finish,
    r0: int, redo: list[int], res: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """One tile on the native kernels, with the bits of :func:`_float_total` /
    :func:`_exact_total` + :func:`finalize_tile`.  A narrower x is widened into ybuf
    (exactly), normalised there in fp32 and cast back.  With fp32 accumulation the
    kernels run FINALIZE too, row by row (where ``fin.c_flags`` says C can); fp64
    accumulation keeps the torch ops' FINALIZE, because torch's CPU fp64 ``sqrt``
    is not correctly rounded (about 1% of values differ from IEEE ``sqrt`` here),
    while every fp32 square root taken in fp64 and rounded is.  ``res``: the tile's
    residual and ``h`` (C adds them in the same pass for fp32/fp64 rows; torch adds
    narrower ones before the widening).  Rows the reference must finish (a NaN
    total, an exact row with no scale) are appended to ``redo`` as global row numbers."""
    wide = v.ybuf
    x_acc = xt
    rt = ht = None
    if res is not None:
        if wide is None:
            rt, ht = res
        else:
            xt = kernels.residual_add(xt, res[0], out=res[1])
    if wide is not None:
        wide.copy_(xt)  # (a NaN's bits here never reach y: its row's total is NaN, redone)
        x_acc = wide
    fused = x_acc.dtype == torch.float32 and fin.c_flags is not None
    target = (yt if yt.dtype == torch.float32 else wide) if fused else None
    flags = fin.c_flags or 0
    if plan.accumulate == "exact":
        if _native.exact_rows(x_acc, v.pair, target, fin.c_weight, fin.eps, check=False, flags=flags,
                              residual=rt, h=ht):
            redo.extend((v.pair[:, 0].isnan().nonzero()[:, 0] + r0).tolist())
    elif _native.float_rows(x_acc, ws.recipe, v.rms, target, fin.c_weight, fin.eps, check=False, flags=flags,
                            residual=rt, h=ht):
        redo.extend((v.rms[:, 0].isnan().nonzero()[:, 0] + r0).tolist())
    if ht is not None:
        xt = ht
    if not fused:
        if plan.accumulate == "exact":
            torch.add(v.pair[:, :1], v.pair[:, 1:], out=v.total64)
            total = v.total64
        else:
            total = v.rms
        finalize_tile(plan, v, xt, total, yt, fin, True)
    elif target is not yt:
        assert wide is not None  # a narrower result was normalised in ybuf
        yt.copy_(wide)


def _run_tiles(
    plan: Plan, x2: torch.Tensor, y2: torch.Tensor, fin: Finish,
    tile: int, start: int, stop: int, scales: tuple[torch.Tensor, bool] | None, redo: list[int] | None,
    cancel: threading.Event | None = None, res: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Tiles of rows ``[start, stop)``; ``cancel``, when set, stops the loop before
    the next tile (:class:`Cancelled`).  ``scales``: an exact plan's ``(sigmas,
    any_unscaled)`` for the torch ops.  ``redo``: ``None`` on the torch ops; on the
    native kernels, a list that collects the rows the reference must finish.
    ``res``: the residual and ``h`` of a residual plan on the native kernels (the
    torch ops get ``x2 = h`` instead)."""
    native = redo is not None
    ws = workspace(plan, tile, x2.dtype, x2.device, native)
    for r0 in range(start, stop, tile):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the caller was cancelled; stopped between tiles")
        r1 = min(r0 + tile, stop)
        v = ws.views(r1 - r0)
        xt, yt = x2[r0:r1], y2[r0:r1]
        if redo is not None:
            _native_tile(plan, ws, v, xt, yt, fin, r0, redo, None if res is None else (res[0][r0:r1], res[1][r0:r1]))
            continue
        if scales is not None:
            total = _exact_total(plan, v, xt, scales[0][r0:r1], scales[1])
        else:
            total = _float_total(plan, v, xt)
        # The float path has put x.to(acc) in ybuf already; the exact torch ops have not.
        finalize_tile(plan, v, xt, total, yt, fin, scales is None)


# --- entry point -----------------------------------------------------------------


def run_compiled(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    plan: Plan,
    out: torch.Tensor | None = None,
    tile_rows: int | None = None,
    threads: int | None = None,
    cancel: threading.Event | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """Run a certified ``graph`` on ``x`` (already checked) through its compiled plan.

    Parameters
    ----------
    plan:
        The graph's plan, from :func:`lower_certified` (the pipeline lowers each
        configuration once and hands the plan over).
    out:
        Written in place and returned, when given (``x``'s shape and device, the
        dtype of :func:`kernels.output_dtype`).
    residual, residual_out:
        A residual plan's residual (``x``'s shape and dtype) and the tensor
        ``h = x + residual`` is written into (may be ``x`` or ``residual`` itself).
    tile_rows:
        Rows per tile (default: :func:`default_tile_rows`).  The bits never depend on it.
    threads:
        Worker threads the tiles are spread over (``1``: the caller's thread).
        Default: :data:`DEFAULT_THREADS` capped by torch's intra-op thread count
        (measured fastest on the 2-core machine of docs/performance.md).
        The bits never depend on it.  A call made from one of the tile workers
        (a nested call) runs on its own thread.
    cancel:
        An event the caller sets to stop the run between tiles (it then raises
        :class:`Cancelled`): how ``await normalize`` honours cancellation.
    native:
        Whether the tiles' sums (and fp32 FINALIZE) may run on the native kernels
        (the native backend) or only on torch ops (``False``: the torch-ops
        backend); ``None``: wherever the kernels are available.
    """
    if tile_rows is not None or (threads is not None and (type(threads) is not int or threads < 1)):
        for name, value in (("tile_rows", tile_rows), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(name, value, "an integer >= 1")
    if threads is None:
        threads = min(DEFAULT_THREADS, torch.get_num_threads())
    if on_worker():
        threads = 1  # a nested call from inside a tile must not wait on its own pool
    if plan.residual and (residual is None or residual_out is None):
        raise ExecutionError("this plan adds a residual: pass residual= and residual_out=")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual)):
        # out= ops do not record gradients: the reference's ops (same bits) do.
        y_ref = run_reference(graph, x, weight, eps, residual=residual, residual_out=residual_out)
        return y_ref if out is None else out.copy_(y_ref)
    d = plan.hidden_size
    x2 = x.reshape(-1, d)
    rows = x2.shape[0]
    use_native = (
        _native.runs_plan(plan)
        and x.device.type == "cpu" and (d == 1 or x2.stride(1) == 1) and native is not False
        and _native.available()
    )
    fin = finish_for(plan, x.dtype, weight, eps, use_native)
    direct = x.is_contiguous() and (out is None or out.is_contiguous())
    if direct:
        y = out if out is not None else torch.empty_like(x, dtype=fin.out_dtype)
    else:
        y = torch.empty(x.shape, dtype=fin.out_dtype, device=x.device)
    y2 = y.view(-1, d)
    res: tuple[torch.Tensor, torch.Tensor] | None = None
    if plan.residual:
        assert residual is not None and residual_out is not None
        h2 = residual_out.view(-1, d) if residual_out.is_contiguous() else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        if use_native:
            res = (residual.contiguous().view(-1, d), h2)
        else:  # the torch ops run on h, made in one pass first
            x2 = kernels.residual_add(x2, residual.reshape(-1, d), out=h2)
    if x.device.type != "cpu":
        tile = rows  # tiling buys nothing on an accelerator, and keeps reduction shapes
    else:
        tile = tile_rows or default_tile_rows(plan, x.dtype, use_native)
    scales: tuple[torch.Tensor, bool] | None = None
    # On the native kernels: rows the reference must finish (the exact kernel
    # computes each row's scale itself).
    redo: list[int] | None = [] if use_native else None
    if plan.accumulate == "exact" and rows and not use_native:
        # The row maxima and scales of the whole input, once: a dozen small ops per
        # call instead of per tile, and a pass over x instead of over fp64 squares.
        row_max = kernels.rowmax_sq_whole(x2)
        sigmas = kernels.exact_scale(row_max, d)
        scales = (sigmas, bool((sigmas[:, :1] == 0).any()))
    tiles = -(-rows // tile) if rows else 0
    workers = min(threads, tiles)
    if workers <= 1:
        _run_tiles(plan, x2, y2, fin, tile, 0, rows, scales, redo, cancel, res)
    else:
        per = -(-tiles // workers) * tile
        pool = tile_pool(workers)
        state = torch_state.capture()  # the workers run under the caller's grad/inference mode
        futures = [
            pool.submit(state.run, _run_tiles, plan, x2, y2, fin, tile, s, min(s + per, rows), scales, redo, cancel, res)
            for s in range(0, rows, per)
        ]
        for f in futures:
            f.result()
    h_all = x2 if res is None else res[1]  # what the rows were normalised from
    if redo:
        _reference_rows(graph, h_all, y2, weight, eps, torch.tensor(sorted(redo), dtype=torch.long), plan.residual)
    elif scales is not None and scales[1]:
        _reference_rows(graph, h_all, y2, weight, eps, (scales[0][:, 0] == 0).nonzero()[:, 0], plan.residual)
    if plan.residual and residual_out is not None and not residual_out.is_contiguous():
        residual_out.copy_(h_all.view(x.shape))
    if not direct:
        # A strided input or output: the result keeps the input's layout, as torch's does.
        return (out if out is not None else torch.empty_like(x, dtype=fin.out_dtype)).copy_(y)
    return y


def _reference_rows(
    graph: Graph, x2: torch.Tensor, y2: torch.Tensor, weight: torch.Tensor | None, eps: float,
    rows: torch.Tensor, from_h: bool = False,
) -> None:
    """These rows take the reference's bits: exact rows with no scale (Inf, NaN, or
    fp64 rows near the top of the range: their sums are plain, order-dependent
    fp64 sums, and with NaNs of both signs which NaN survives depends on the order
    too), and, on the native kernels, float rows whose total is NaN (or whose
    llama rounding met a NaN).  The reference is row-local, so running it on those
    rows alone gives their bits in the whole batch.  ``from_h``: ``x2`` holds a
    residual graph's ``h`` (already written), which the rows are normalised from."""
    if len(rows):
        if from_h:
            y2[rows] = finish_from_h(graph, x2[rows], weight, eps)
        else:
            y2[rows] = run_reference(graph, x2[rows], weight, eps)
