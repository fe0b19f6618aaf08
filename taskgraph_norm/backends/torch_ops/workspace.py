"""Workspaces of the compiled executor: preallocated buffers and the views into them.

One workspace per (plan, tile height, dtype, device) and per thread, kept across
calls; every operand view of a tile height is built once (:class:`Views`), so a
call does no slicing beyond its own input and output tiles.
"""

from __future__ import annotations

import contextlib

import threading
from collections import OrderedDict
from typing import Any

import torch

from ... import caches, kernels
from ...lowering import Plan, halving_steps, tree_levels

__all__ = ["TILE_BYTES", "WORKSPACES_PER_THREAD", "Views", "Workspace", "default_tile_rows", "workspace"]

#: Target size of one tile's square workspace (128 rows of 4096 fp32): measured the
#: best trade-off here between cache reuse and per-op overhead (docs/performance.md).
TILE_BYTES = 2 * 1024 * 1024


#: Workspaces a thread keeps (one per plan, tile and dtype); the oldest goes first.
WORKSPACES_PER_THREAD = 8

_local = threading.local()

def default_tile_rows(plan: Plan, dtype: torch.dtype, native: bool = False) -> int:
    """Rows per tile so that one tile's squares fill :data:`TILE_BYTES` (the native
    exact kernel keeps no squares: its tile is sized like a float one)."""
    wide = plan.accumulate == "exact" and not native
    elem = 8 if wide else kernels.accumulation_dtype(dtype).itemsize
    return max(1, TILE_BYTES // (plan.hidden_size * elem))



class Views:
    """Every operand view of one tile height, built once."""

    def __init__(self, plan: Plan, ws: Workspace, rows: int) -> None:
        d, c, nf = plan.hidden_size, plan.chunk_size, plan.n_full
        self.rms = ws.rms[:rows]
        self.ybuf = ws.ybuf[:rows] if ws.ybuf is not None else None
        if plan.accumulate == "exact":
            self.pair, self.total64 = ws.pair[:rows], ws.total64[:rows]
            if not ws.native:
                self.sq, self.q = ws.sq[:rows], ws.q[:rows]
            return
        if ws.native:
            return  # the native kernel writes the total straight into rms
        self.sq = ws.sq[:rows]
        full = self.sq[:, : nf * c].view(rows, nf, c)
        tail = self.sq[:, nf * c : d]
        self.full, self.tail = full, tail
        self.full_steps = [(full[..., : n - h], full[..., h:n]) for n, h in plan.halving_steps]
        self.tail_steps = [(tail[:, : n - h], tail[:, h:n]) for n, h in halving_steps(plan.tail)]
        self.parts = ws.parts[:rows]
        self.native_out = self.parts[:, :nf]
        self.tail_copy = ws.tail_copy[:rows] if ws.tail_copy is not None else None
        # Copies that put every leaf's result into one (rows, n) partials array.
        self.gather: list[tuple[torch.Tensor, torch.Tensor]] = []
        if plan.leaf == "pairwise" and (plan.tail == 0 or nf == 0) and plan.merge != "cat":
            # The partials can be read where the halving left them (stride C).
            self.leaf_parts = full[..., 0] if nf else tail[:, :1]
        else:
            self.leaf_parts = self.parts
            if plan.leaf == "pairwise":
                if nf:
                    self.gather.append((self.parts[:, :nf], full[..., 0]))
                if plan.tail:
                    self.gather.append((self.parts[:, nf:], tail[:, :1]))
        self.merge: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.total = self._merge_ops(plan, ws, rows)

    def _merge_ops(self, plan: Plan, ws: Workspace, rows: int) -> torch.Tensor:
        parts = self.leaf_parts
        if plan.merge == "single":
            return parts[:, :1]
        if plan.merge == "cat":
            return self.rms  # torch.sum writes the total straight into the rms buffer
        if plan.merge == "tree":
            # In place: a level's sum p[2i] + p[2i+1] lands on p[2i], so the next
            # level reads every other element, and an odd last element is already
            # where the next level expects it (carried up without a copy).
            src = parts
            for n in tree_levels(plan.n_chunks):
                p = n // 2
                self.merge.append(("iadd", src[:, 0 : 2 * p : 2], src[:, 1 : 2 * p : 2], src))
                src = src[:, 0::2]
            return src[:, :1]
        slots = ws.slots[:rows]
        if parts is not self.parts:
            self.gather.append((slots[:, : plan.n_chunks], parts))
        for level in plan.adds:
            for dst, a, b in level:
                self.merge.append(("add", slots[:, dst : dst + 1], slots[:, a : a + 1], slots[:, b : b + 1]))
        return slots[:, plan.root : plan.root + 1]


class Workspace:
    """Preallocated buffers of one (plan, tile height, dtype, device), for one thread.

    ``native``: the sums come from the native kernels (:mod:`..native`), which need
    no squares, only the exact pair (or the float plan's recipe) and the FINALIZE
    buffers.
    """

    def __init__(
        self, plan: Plan, rows: int, dtype: torch.dtype, device: torch.device, native: bool = False
    ) -> None:
        acc = kernels.accumulation_dtype(dtype)
        d, n = plan.hidden_size, plan.n_chunks

        def buf(*shape: int, of: torch.dtype = acc) -> torch.Tensor:
            return torch.empty(shape, dtype=of, device=device)

        exact = plan.accumulate == "exact"
        self.native = native
        self.rms = buf(rows, 1)
        self.ybuf = buf(rows, d) if dtype != acc else None
        if not native:
            self.sq = buf(rows, d, of=torch.float64 if exact else acc)
        if exact:
            if not native:
                self.q = buf(rows, d, of=torch.float64)
            self.pair = buf(rows, 2, of=torch.float64)
            self.total64 = buf(rows, 1, of=torch.float64)
        elif native:
            from ..native.loader import FloatRecipe

            adds = tuple(t for level in plan.adds for t in level)
            self.recipe = FloatRecipe(plan.chunk_size, plan.n_chunks, adds, plan.root)
        else:
            if plan.merge == "adds":
                self.slots = buf(rows, n + sum(len(level) for level in plan.adds))
                self.parts = self.slots[:, :n]  # the leaves are the first slots
            else:
                self.parts = buf(rows, n)
            # torch.sum of the ragged chunk sees a contiguous copy, as in kernels.sumsq_native.
            self.tail_copy = buf(rows, plan.tail) if plan.leaf == "native" and plan.tail else None
        self._views: dict[int, Views] = {}
        self.plan = plan

    def views(self, rows: int) -> Views:
        v = self._views.get(rows)
        if v is None:
            with _plain_tensors():
                v = self._views[rows] = Views(self.plan, self, rows)
        return v


def _plain_tensors() -> contextlib.ExitStack:
    """Buffers and views that later calls reuse are made as plain tensors, whatever the
    caller's mode: an inference tensor (made under ``inference_mode``) could not be
    written by a later call outside it, nor a view made under ``no_grad`` with grad on."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def workspace(
    plan: Plan, rows: int, dtype: torch.dtype, device: torch.device, native: bool = False
) -> Workspace:
    cache: OrderedDict[Any, Workspace] | None = getattr(_local, "workspaces", None)
    if cache is None or _local.generation != caches.generation():
        # First call on this thread, or clear_caches() ran since: start afresh.
        cache = _local.workspaces = OrderedDict()
        _local.generation = caches.generation()
    # Keyed by the plan's identity (plans are cached objects): hashing a plan
    # walks its fields, which a decode-sized call cannot afford.
    key = (id(plan), rows, dtype, device, native)
    ws = cache.get(key)
    if ws is None or ws.plan is not plan:
        with _plain_tensors():
            ws = cache[key] = Workspace(plan, rows, dtype, device, native)
        while len(cache) > WORKSPACES_PER_THREAD:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return ws
