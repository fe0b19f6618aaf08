"""Rank functions for tests/test_distributed_layer.py (sharded LayerNorm), run in spawned
processes by run_local; like tests/_distributed_workers.py, a spawned rank imports only
this module and the library."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import torch
import torch.distributed as dist

import taskgraph_norm as tgn
from taskgraph_norm.kernels import layer

from ._distributed_workers import Case, case_sizes, make_input, shard


def make_layer_input(seed: int, rows: int, hidden: int, dtype: str) -> tuple[torch.Tensor, ...]:
    """Rows with a wide exponent spread around a large common offset (so both the mean's
    and the variance's rounding show), a weight and a bias."""
    x, w = make_input(seed, rows, hidden, dtype)
    x = (x.double() + 3.0 * 2.0 ** 10).to(x.dtype)
    return x, w, (w.double() - 1.0).to(w.dtype)


def naive_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, hidden: int) -> torch.Tensor:
    """The usual tensor-parallel LayerNorm (the negative control): ``torch.sum`` of the
    local shard, ``all_reduce(SUM)``, the mean, the same for the squared deviations."""
    def reduced(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    total = reduced(layer.xsum_native(x, 0, x.shape[-1]))
    mean = layer.mean_float(total, hidden)
    var = reduced(layer.sumsq_centered_native(x, 0, x.shape[-1], mean))
    return layer.finalize_layer(x, var, mean, hidden, 1e-5, w, b)


def run_layer_checks(rank: int, world: int, cases: list[Case], rows: int, extras_hidden: int) -> dict[str, Any]:
    """Every case through the sharded layer_norm_sync and the naive all-reduce, then the
    async face, the module and calls that must fail on every rank together."""
    out: dict[str, Any] = {"ours": [], "naive": []}
    for n, case in enumerate(cases):
        dtype, hidden, _, topology, leaf, accumulate, chunk = case
        sizes = case_sizes(case, world)
        x, w, b = (shard(t, sizes, rank) for t in make_layer_input(n, rows, hidden, dtype))
        out["ours"].append(tgn.distributed.layer_norm_sync(
            x, w, b, hidden_size=hidden, topology=topology, leaf=leaf, accumulate=accumulate, chunk_size=chunk,
            shard_sizes=sizes if n % 2 else None))
        out["naive"].append(naive_layer_norm(x, w, b, hidden))
    hidden = extras_hidden
    sizes = tgn.distributed.even_shard_sizes(hidden, world)
    x, w, b = make_layer_input(1234, 5, hidden, "float32")
    xs, ws, bs = shard(x, sizes, rank), shard(w, sizes, rank), shard(b, sizes, rank)
    out["async"] = anyio.run(functools.partial(tgn.distributed.layer_norm, xs, ws, bs, hidden_size=hidden,
                                               topology="linear", accumulate="exact"))
    norm = tgn.distributed.LayerNorm(hidden, topology="tree", chunk_size=16)
    norm.load_full_weight(w)
    norm.load_full_bias(b)
    out["module"] = [norm(xs), norm(xs.unsqueeze(0)).squeeze(0)]
    errors = []
    for bad in ({"hidden_size": hidden + 1}, {"rows": rank}, {"rms": rank == 0}):
        try:
            x_bad = xs[: bad.get("rows", 5)]
            if bad.get("rms"):
                tgn.distributed.normalize_sync(x_bad, hidden_size=hidden)
            else:
                tgn.distributed.layer_norm_sync(x_bad, hidden_size=bad.get("hidden_size", hidden))
        except tgn.ShardMismatchError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out
