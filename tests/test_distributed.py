"""Tests for taskgraph_norm.distributed: the hidden dim sharded across ranks.

Two layers.  In one process, the rank functions (payload, exchange, finish) are run
for every rank of simulated world sizes 1..8 and every shard layout, and the placed
graphs are proved.  Then real gloo process groups over loopback (spawned ranks, one
group per world size for many checks) at world sizes 1, 2, 3 and 4 compare the
gathered outputs bit for bit with single-process ``normalize_sync``, next to the
naive all-reduce (the negative control, which must differ at 3 and 4 ranks).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

import taskgraph_norm as tgn
from taskgraph_norm import kernels
from taskgraph_norm.distributed import (
    build_distributed_graph,
    build_naive_graph,
    distributed_plan,
    even_shard_sizes,
    run_local,
    shard_offsets,
)
from taskgraph_norm.distributed.runtime import (
    exact_local_max,
    exact_local_pair,
    float_finish,
    float_payload,
)
from .helpers import assert_bits_equal, bits_equal

from . import _distributed_workers as workers
from .conftest import FULL

ROOT = Path(__file__).resolve().parents[1]

CERTIFIED = [  # (topology, leaf, accumulate): every configuration the prover certifies
    ("tree", "pairwise", "float"),
    ("linear", "pairwise", "float"),
    ("cat", "pairwise", "float"),
    ("tree", "native", "float"),
    ("tree", "pairwise", "exact"),
    ("race", "pairwise", "exact"),
]


def layouts(hidden: int, world: int) -> list[tuple[int, ...]]:
    """Even shards, one rank holding nearly everything, and empty shards."""
    out = [even_shard_sizes(hidden, world)]
    if world > 1 and hidden > 2 * world:
        out.append((3, hidden - 3 - (world - 2), *([1] * (world - 2))))
        out.append((0,) * (world - 1) + (hidden,))
    return out


def simulate(x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...], *, topology: str,
             leaf: str, accumulate: str, chunk_size: int, reverse: bool = False) -> torch.Tensor:
    """Every rank's part in one process; ``reverse`` reverses the all-reduce's order."""
    hidden, eps = x.shape[-1], kernels.default_eps(x.dtype)
    xs = [workers.shard(x, sizes, r) for r in range(len(sizes))]
    ws = [workers.shard(w, sizes, r) for r in range(len(sizes))]
    if accumulate == "exact":
        sigmas = kernels.exact_scale(torch.stack([exact_local_max(a) for a in xs]).amax(0), hidden)
        pairs = [exact_local_pair(a, sigmas) for a in xs]
        total = pairs[-1] if reverse else pairs[0]
        for pair in (pairs[-2::-1] if reverse else pairs[1:]):
            total = total + pair
        return torch.cat([kernels.finalize(a, total, hidden, eps, b) for a, b in zip(xs, ws)], -1)
    plan = distributed_plan(build_distributed_graph(
        hidden, sizes, chunk_size=chunk_size, topology=topology, leaf=leaf, accumulate=accumulate))
    payloads = [float_payload(plan, r, xs[r]) for r in range(len(sizes))]
    return torch.cat([float_finish(plan, r, xs[r], ws[r], eps, payloads)
                      for r in range(len(sizes))], dim=-1)


# --- the placed graph -----------------------------------------------------------------


def test_placement_and_plan_of_a_cut_layout() -> None:
    g = build_distributed_graph(1000, (334, 333, 333), chunk_size=64, topology="tree")
    placed = {n.id: n.attrs["placement"] for n in g}
    assert placed["x"] == placed["finalize"] == placed["y"] == "sharded"
    assert placed["p0"] == 0 and placed["p6"] == 1 and placed["p11"] == 2
    assert placed["p5"] == placed["p10"] == "replicated"  # 320..384 and 640..704 are cut
    plan = distributed_plan(g)
    assert [f.chunk for f in plan.fragments[1]] == [(320, 384), (640, 704)]
    assert plan.width == max(plan.payload_width(r) for r in range(3))
    # Aligned shards send one subtree root each and no raw elements.
    aligned = distributed_plan(build_distributed_graph(4096, (1024,) * 4))
    assert aligned.frontier == (("tree4.0",), ("tree4.1",), ("tree4.2",), ("tree4.3",))
    assert aligned.width == 1


def test_distributed_graph_has_the_single_process_nodes() -> None:
    single = tgn.build_graph(777, chunk_size=32, topology="linear")
    placed = build_distributed_graph(777, (100, 0, 677), chunk_size=32, topology="linear")
    strip = [n.replace(attrs={k: v for k, v in n.attrs.items() if k != "placement"})
             for n in placed]
    assert tuple(strip) == single.nodes


@pytest.mark.parametrize("bad", [
    {"shard_sizes": (10, 10)}, {"shard_sizes": (30, -10)}, {"shard_sizes": ()},
    {"topology": "standard"}, {"chunk_size": 0},
])
def test_bad_layouts_and_options_are_config_errors(bad: dict[str, object]) -> None:
    kwargs = {"shard_sizes": (10, 10, 10), "topology": "tree", "chunk_size": 8} | bad
    sizes = kwargs.pop("shard_sizes")
    with pytest.raises(tgn.ConfigError):
        build_distributed_graph(30, sizes, **kwargs)  # type: ignore[arg-type]


def test_distributed_is_a_submodule_not_an_export() -> None:
    assert tgn.distributed.normalize_sync is not None
    assert "distributed" not in tgn.__all__
    assert set(tgn.distributed.__all__) <= set(dir(tgn.distributed))


def test_calling_without_a_process_group_fails_clearly() -> None:
    with pytest.raises(tgn.ShardMismatchError, match="init_process_group"):
        tgn.distributed.normalize_sync(torch.ones(2, 4), hidden_size=4)


# --- the prover on placed graphs -------------------------------------------------------


@pytest.mark.parametrize(("topology", "leaf", "accumulate"), CERTIFIED)
def test_prove_states_world_size_invariance(topology: str, leaf: str, accumulate: str) -> None:
    single = tgn.prove(tgn.build_graph(1000, topology=topology, leaf=leaf, accumulate=accumulate))
    assert single.world_size_invariant is None
    for world in (1, 2, 3, 4, 8):
        for sizes in layouts(1000, world):
            proof = tgn.prove(build_distributed_graph(
                1000, sizes, topology=topology, leaf=leaf, accumulate=accumulate))
            assert proof.certified and proof.world_size_invariant is True, sizes
            assert proof.fingerprint == single.fingerprint, sizes
            assert proof.rule == single.rule
            assert "why world-size invariant:" in proof.explain()
            assert any("distributed" in a for a in proof.assumptions)


def test_prove_negative_controls_for_world_size() -> None:
    # The naive all-reduce: its leaves follow the shards.  Two ranks: deterministic
    # (a+b == b+a) but another expression; three or more: a race, refuted.
    two = tgn.prove(build_naive_graph(1000, (500, 500)))
    assert two.deterministic and two.world_size_invariant is False
    assert "NOT world-size invariant" in two.explain()
    for world in (3, 4, 8):
        proof = tgn.prove(build_naive_graph(1000, even_shard_sizes(1000, world)))
        assert proof.rule == "refuted" and proof.world_size_invariant is False
        assert proof.witness is not None and proof.witness.differs()
    # A placed float graph whose merge someone edits (swapped operands) keeps being
    # deterministic but no longer equals the single-process graph.
    g = build_distributed_graph(256, (128, 128), topology="tree")
    root = g["tree2.0"]
    edited = g.replace_node(root.replace(inputs=root.inputs[::-1]))
    proof = tgn.prove(edited)
    assert proof.deterministic and proof.world_size_invariant is False
    assert proof.fingerprint != tgn.prove(g).fingerprint
    # A collective reduction that claims an operand order is not readable.
    bad = g.replace_node(root.replace(attrs=dict(root.attrs) | {"placement": "all_reduce"}))
    assert tgn.prove(bad).rule == "unknown"


# --- every rank's part, simulated in one process ---------------------------------------


SIM_HIDDEN = (1, 7, 97, 256, 1000, 4096) if FULL else (7, 97, 1000)
SIM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64) if FULL else (
    torch.float32, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", SIM_HIDDEN)
def test_simulated_ranks_give_single_process_bits(hidden: int) -> None:
    for dtype in SIM_DTYPES:
        x, w = workers.make_input(hidden, 6, hidden, "float64")
        x, w = x.to(dtype), w.to(dtype)
        for topology, leaf, accumulate in CERTIFIED:
            for chunk in ((64, 5) if FULL else (64,)):
                expected = tgn.normalize_sync(x, w, topology=topology, leaf=leaf,
                                              accumulate=accumulate, chunk_size=chunk)
                for world in (1, 2, 3, 4, 8):
                    for sizes in layouts(hidden, world):
                        for reverse in ((False, True) if accumulate == "exact" else (False,)):
                            got = simulate(x, w, sizes, topology=topology, leaf=leaf,
                                           accumulate=accumulate, chunk_size=chunk,
                                           reverse=reverse)
                            assert_bits_equal(got, expected, f"{dtype} {sizes} {topology} "
                                              f"{leaf} {accumulate} C={chunk}")


def test_exact_all_reduce_keeps_inf_and_nan_rows() -> None:
    x, w = workers.make_input(5, 4, 96, "float32")
    x[1, 70] = float("inf")
    x[2, 10] = float("nan")
    expected = tgn.normalize_sync(x, w, accumulate="exact")
    for sizes in ((50, 46), (32, 32, 32), (0, 96)):
        got = simulate(x, w, sizes, topology="tree", leaf="pairwise", accumulate="exact",
                       chunk_size=64)
        assert_bits_equal(got, expected, str(sizes))


# --- real process groups (gloo over loopback, spawned ranks) ---------------------------


GROUP_HIDDEN = (97, 256, 1000)  # 97 divides by no world size > 1
GROUP_DTYPES = ("float32", "bfloat16")


def group_cases(world: int) -> list[workers.Case]:
    cases: list[workers.Case] = []
    for dtype in GROUP_DTYPES:
        for hidden in GROUP_HIDDEN:
            for topology, leaf, accumulate in CERTIFIED:
                # Even and uneven shards everywhere; empty shards too at D=1000.
                for sizes in layouts(hidden, world)[: 3 if hidden == 1000 else 2]:
                    cases.append((dtype, hidden, sizes, topology, leaf, accumulate, 64))
    return cases


def assemble(shards: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(shards, dim=-1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_process_group_bits_equal_single_process(world: int) -> None:
    """One group per world size: the matrix, the naive control, async, module, errors."""
    cases, rows, extras_hidden = group_cases(world), 8, 300
    port = tgn.distributed.launch.free_port()
    results = run_local(workers.run_group_checks, world, cases, rows, extras_hidden,
                        port=port, timeout=240)
    naive_differs = naive_moves = 0
    for n, case in enumerate(cases):
        dtype, hidden, _, topology, leaf, accumulate, chunk = case
        x, w = workers.make_input(n, rows, hidden, dtype)
        expected = tgn.normalize_sync(x, w, topology=topology, leaf=leaf,
                                      accumulate=accumulate, chunk_size=chunk)
        got = assemble([r["matrix"]["ours"][n] for r in results])
        assert_bits_equal(got, expected, f"world {world}: {case} vs single-process")
        naive = assemble([r["matrix"]["naive"][n] for r in results])
        naive_differs += not bits_equal(naive, expected)
        # The naive code on one process: torch.sum over the whole row.
        one_process = kernels.finalize(x, kernels.sumsq_native(x, 0, hidden), hidden,
                                       kernels.default_eps(x.dtype), w)
        naive_moves += not bits_equal(naive, one_process)
    # Negative control on the same exponent-spread inputs: the naive all-reduce gives
    # other bits than our single-process result, and than its own one-process bits.
    if world >= 3:
        assert naive_differs > 0, "the naive all-reduce matched every case: the test cannot fail"
        assert naive_moves > 0, "the naive all-reduce did not change with the world size"
    check_extras([r["extras"] for r in results], world, extras_hidden)
    # The group is gone: no child process left, and the rendezvous port binds again.
    assert not multiprocessing.active_children()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def check_extras(results: list[dict[str, object]], world: int, hidden: int) -> None:
    x, w = workers.make_input(1234, 5, hidden, "float32")
    assert_bits_equal(assemble([r["async"] for r in results]),  # type: ignore[misc]
                      tgn.normalize_sync(x, w, topology="linear"), "async")
    reference = tgn.RMSNorm(hidden, topology="tree", chunk_size=16)
    with torch.no_grad():
        reference.weight.copy_(w)
    for call in range(2):  # the first call gathers the shard sizes, the second reuses them
        shards = [r["module"][call] for r in results]  # type: ignore[index]
        assert_bits_equal(assemble(shards), reference(x), f"module call {call}")
    for r in results:  # every rank rejected the mismatched calls instead of hanging
        errors = r["errors"]
        assert "hidden_size" in errors[0]  # type: ignore[index]
        if world > 1:
            assert len(errors) == 2 and "row count" in errors[1]  # type: ignore[arg-type,index]


def test_a_dead_rank_fails_the_run_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(ProcessExitedException):
        run_local(workers.die_before_collective, 2, timeout=90, collective_timeout=30)
    assert time.monotonic() - start < 90
    assert not multiprocessing.active_children()


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="8 spawned ranks take ~1 min on 2 cores: TGN_FULL=1")
def test_process_group_world_size_8() -> None:
    cases = [c for c in group_cases(8) if c[1] != 97][:12]
    results = run_local(workers.run_matrix, 8, cases, 4, timeout=400)
    for n, case in enumerate(cases):
        dtype, hidden, _, topology, leaf, accumulate, chunk = case
        x, w = workers.make_input(n, 4, hidden, dtype)
        expected = tgn.normalize_sync(x, w, topology=topology, leaf=leaf,
                                      accumulate=accumulate, chunk_size=chunk)
        assert_bits_equal(assemble([r["ours"][n] for r in results]), expected, str(case))


def test_docs_example_under_torchrun(tmp_path: Path) -> None:
    """The torchrun example of docs/distributed.md, run by torchrun at three ranks."""
    page = (ROOT / "docs" / "distributed.md").read_text()
    example = page.split("## Runnable example")[1].split("```python\n")[1].split("```")[0]
    script = tmp_path / "tp_rmsnorm.py"
    script.write_text(example)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        "OMP_NUM_THREADS": "1"}
    if interface := tgn.distributed.launch._loopback_interface():
        env.setdefault("GLOO_SOCKET_IFNAME", interface)
    port = tgn.distributed.launch.free_port()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "3",
         "--master-addr", "127.0.0.1", "--master-port", str(port), str(script)],
        env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 3: bit-identical to one process: True" in done.stdout


def test_shard_offsets() -> None:
    assert shard_offsets((3, 0, 4)) == (0, 3, 3)
    assert even_shard_sizes(10, 4) == (3, 3, 2, 2)


def test_each_sharded_configuration_is_built_once() -> None:
    """``normalize_sync`` calls through one cached ShardedPipeline per configuration:
    its graph, its proof (world-size invariance) and its plan, emptied by clear_caches."""
    from taskgraph_norm.distributed import ShardedPipeline, for_shards

    tgn.clear_caches()
    tree = for_shards(256, (100, 156), 16, "tree")
    assert isinstance(tree, ShardedPipeline) and for_shards(256, (100, 156), 16, "tree") is tree
    assert tree.proof.certified and tree.plan is not None and tree.graph.meta["shard_sizes"] == (100, 156)
    race = for_shards(256, (100, 156), 16, "race")
    assert not race.proof.certified  # the arrival order is not world-size invariant
    exact = for_shards(256, (100, 156), 16, "race", accumulate="exact")
    assert exact.proof.certified and exact.plan is None
    tgn.clear_caches()
    assert for_shards(256, (100, 156), 16, "tree") is not tree
