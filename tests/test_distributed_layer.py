"""Tests for the sharded LayerNorm of taskgraph_norm.distributed (issue 23, item 6).

In one process: the placed graphs are proved (world-size invariant, the single
process's fingerprint; an edited merge is not) and every rank of world sizes 1-4 is
run in lock step (threads standing in for the collectives).  Then real gloo groups
over loopback at world sizes 1-4 compare the gathered outputs bit for bit with
single-process ``tgn.layer_norm_sync``, beside the naive all-reduce (the negative
control, which must differ).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.distributed import build_distributed_layer_graph, even_shard_sizes, for_layer_shards, run_local
from taskgraph_norm.topologies import build_layer_graph

from . import _distributed_layer_workers as workers
from ._distributed_workers import shard
from .helpers import assert_bits_equal, bits_equal
from .test_distributed import CERTIFIED, layouts


@pytest.mark.parametrize("topology, leaf, accumulate", CERTIFIED)
def test_prove_states_world_size_invariance(topology: str, leaf: str, accumulate: str) -> None:
    single = tgn.prove(build_layer_graph(1000, topology=topology, leaf=leaf, accumulate=accumulate))
    for world in (1, 2, 3, 4):
        for sizes in layouts(1000, world):
            proof = tgn.prove(build_distributed_layer_graph(1000, sizes, topology=topology, leaf=leaf,
                                                            accumulate=accumulate))
            assert proof.certified and proof.world_size_invariant is True, sizes
            assert proof.fingerprint == single.fingerprint and proof.rule == single.rule, sizes


def test_placement_of_a_cut_layout_and_an_edited_merge() -> None:
    g = build_distributed_layer_graph(256, (100, 0, 156), chunk_size=64)
    placed = {n.id: n.attrs["placement"] for n in g}
    assert placed["mean.p0"] == placed["var.p0"] == 0 and placed["mean.p2"] == placed["var.p3"] == 2
    assert placed["mean.p1"] == placed["var.p1"] == "replicated"  # 64..128 is cut at 100
    assert placed["mean"] == "replicated" and placed["finalize"] == "sharded"
    plan = for_layer_shards(256, (100, 0, 156), 64).plan
    assert plan is not None and [f.chunk for f in plan.fragments[0]] == [(64, 128)]
    assert plan.frontier[1] == (("var.p0",), (), ("var.tree1.1",)) and plan.widths == (37, 1)
    # Negative control: a merge with its operands swapped is deterministic, not the single process's.
    root = g["var.tree2.0"]
    proof = tgn.prove(g.replace_node(root.replace(inputs=root.inputs[::-1])))
    assert proof.deterministic and proof.world_size_invariant is False
    assert tgn.prove(build_distributed_layer_graph(256, (100, 156), topology="race")).rule == "refuted"
    with pytest.raises(tgn.ConfigError):
        build_distributed_layer_graph(256, (128, 128), topology="standard")


def lockstep(world: int, rank_fn: Callable[[int, Any, Any, Any], torch.Tensor]) -> list[torch.Tensor]:
    """Run ``rank_fn(rank, gather, reduce_max, reduce_sum)`` for every rank on threads
    whose collectives meet at a barrier; the all-reduces write their result into their
    input, as torch.distributed's do."""
    barrier, box, results = threading.Barrier(world), {}, [torch.empty(0)] * world

    def collective(rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        box[rank] = t.clone()
        barrier.wait()
        got = [box[r] for r in range(world)]
        barrier.wait()
        return got

    def add(ts: list[torch.Tensor]) -> torch.Tensor:
        total = ts[-1]
        for t in ts[-2::-1]:  # the other end first: order must not matter in the exact domain
            total = total + t
        return total

    def run(rank: int) -> None:
        results[rank] = rank_fn(rank, lambda t: collective(rank, t),
                                lambda t: t.copy_(torch.stack(collective(rank, t)).amax(0)),
                                lambda t: t.copy_(add(collective(rank, t))))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def simulate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, sizes: tuple[int, ...], **options: Any) -> torch.Tensor:
    pipe = for_layer_shards(x.shape[-1], sizes, options["chunk_size"], options["topology"], options["leaf"],
                            options["accumulate"])
    parts = [[shard(t, sizes, r) for t in (x, w, b)] for r in range(len(sizes))]
    return torch.cat(lockstep(len(sizes), lambda r, g, mx, sm: pipe(*parts[r], 1e-5, r, g, mx, sm)), dim=-1)


SIM_DTYPES = ("float32", "bfloat16", "float16", "float64")


@pytest.mark.parametrize("hidden", [7, 97, 1000])
def test_simulated_ranks_give_single_process_bits(hidden: int) -> None:
    for dtype in SIM_DTYPES:
        x, w, b = workers.make_layer_input(hidden, 6, hidden, dtype if dtype != "float16" else "float32")
        x, w, b = (t.to(getattr(torch, dtype)) for t in (x, w, b))
        x[1, hidden // 2] = float("inf")
        x[2, 0] = float("nan")
        for topology, leaf, accumulate in CERTIFIED:
            options = dict(topology=topology, leaf=leaf, accumulate=accumulate, chunk_size=64 if hidden > 7 else 2)
            expected = tgn.layer_norm_sync(x, w, b, **options)
            for world in (1, 2, 3, 4):
                for sizes in layouts(hidden, world):
                    assert_bits_equal(simulate(x, w, b, sizes, **options), expected, f"{dtype} {sizes} {options}")


# --- real process groups (gloo over loopback, spawned ranks) ---------------------------


def group_cases(world: int) -> list[Any]:
    return [(dtype, hidden, sizes, topology, leaf, accumulate, 64)
            for dtype in ("float32", "bfloat16") for hidden in (97, 1000)
            for topology, leaf, accumulate in CERTIFIED
            for sizes in layouts(hidden, world)[: 3 if hidden == 1000 else 1]]


def assemble(results: list[dict[str, Any]], key: str, n: int | None = None) -> torch.Tensor:
    return torch.cat([r[key] if n is None else r[key][n] for r in results], dim=-1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_process_group_bits_equal_single_process(world: int) -> None:
    cases, rows, extras_hidden = group_cases(world), 6, 300
    results = run_local(workers.run_layer_checks, world, cases, rows, extras_hidden, timeout=240)
    naive_differs = 0
    for n, case in enumerate(cases):
        dtype, hidden, _, topology, leaf, accumulate, chunk = case
        x, w, b = workers.make_layer_input(n, rows, hidden, dtype)
        expected = tgn.layer_norm_sync(x, w, b, topology=topology, leaf=leaf, accumulate=accumulate,
                                       chunk_size=chunk)
        assert_bits_equal(assemble(results, "ours", n), expected, f"world {world}: {case}")
        naive_differs += not bits_equal(assemble(results, "naive", n), expected)
    # Negative control on the same inputs: the naive all-reduce's bits are not ours.
    assert naive_differs > 0, "the naive all-reduce matched every case: the test cannot fail"
    x, w, b = workers.make_layer_input(1234, 5, extras_hidden, "float32")
    assert_bits_equal(assemble(results, "async"), tgn.layer_norm_sync(x, w, b, topology="linear",
                                                                      accumulate="exact"), "async")
    reference = tgn.LayerNorm(extras_hidden, topology="tree", chunk_size=16)
    with torch.no_grad():
        reference.weight.copy_(w)
        reference.bias.copy_(b)
        expected = reference(x)
    for call in range(2):  # the first call gathers the shard sizes, the second reuses them
        assert_bits_equal(torch.cat([r["module"][call] for r in results], -1), expected, f"module call {call}")
    for r in results:  # every rank rejected the mismatched calls instead of hanging
        errors = r["errors"]
        assert "hidden_size" in errors[0]
        if world > 1:
            assert len(errors) == 3 and "row count" in errors[1] and "options" in errors[2], errors


def test_naive_control_moves_with_the_world_size() -> None:
    # In one process: the naive reduction's bits follow the shard boundaries.
    x, w, b = workers.make_layer_input(5, 8, 1000, "float32")
    one = naive_in_one_process(x, w, b, (1000,))
    assert any(not bits_equal(naive_in_one_process(x, w, b, even_shard_sizes(1000, k)), one) for k in (2, 3, 4))


def naive_in_one_process(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    from taskgraph_norm.kernels import layer

    parts = [shard(x, sizes, r) for r in range(len(sizes))]
    total = sum(layer.xsum_native(p, 0, p.shape[-1]) for p in parts)
    mean = layer.mean_float(total, 1000)  # type: ignore[arg-type]
    var = sum(layer.sumsq_centered_native(p, 0, p.shape[-1], mean) for p in parts)
    return layer.finalize_layer(x, var, mean, 1000, 1e-5, w, b)  # type: ignore[arg-type]


def test_calling_without_a_process_group_fails_clearly() -> None:
    with pytest.raises(tgn.ShardMismatchError, match="not initialized"):
        tgn.distributed.layer_norm_sync(torch.ones(2, 8), hidden_size=8)
