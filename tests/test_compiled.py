"""The compiled executor: the reference's bits for every certified graph, in every tiling.

Bit equality is checked with :func:`assert_bits_equal` (int views, NaN-safe).
Each invariance claim has a negative control that must find a difference.
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.lowering import Plan
from taskgraph_norm.errors import ExecutionError, GraphError
from taskgraph_norm.executors import EXECUTORS, run_reference
from taskgraph_norm.executors import run_compiled as compiled_runner

from .helpers import compile_graph, executor_of, run_compiled
from taskgraph_norm.backends.torch_ops import compiled as compiled_mod
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.backends.torch_ops import workspace as workspace_mod
from taskgraph_norm.graph import Graph, Node, Op
from .helpers import assert_bits_equal, bits_equal

from .conftest import FULL, gen

DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
EPS = 1e-6


def spread_input(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over six decades, so any change of summation order shows in the bits."""
    scale = torch.logspace(-3, 3, hidden)[torch.randperm(hidden, generator=gen(seed))]
    return (torch.randn(rows, hidden, generator=gen(seed + 1)) * scale).to(dtype)


def weight_for(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(hidden, generator=gen(99))).to(dtype)


def certified_configs(hiddens, chunks):
    for topology, leaf, acc, hidden, chunk in itertools.product(
        ("tree", "linear", "cat", "race"), ("pairwise", "native"), ("float", "exact"), hiddens, chunks
    ):
        if topology == "race" and acc == "float" and -(-hidden // chunk) > 2:
            continue  # refuted (a float race over 3+ partials); skip the witness search
        g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology, leaf=leaf, accumulate=acc)
        if tgn.prove(g).certified:
            yield pytest.param(g, id=f"{topology}-{leaf}-{acc}-D{hidden}-C{chunk}")


# -- bits: compiled == reference ---------------------------------------------------

REDUCED = list(certified_configs((7, 1000), (64, 9)))
FULL_MATRIX = list(
    certified_configs((1, 7, 64, 130, 1000, 4096), (1, 3, 64, 100, 4096))
    if FULL else certified_configs((1, 64, 130, 4096), (1, 64, 100))
)


def kernel_sets():
    """Run the block under each of the compiled executor's kernel sets: the native
    kernels (when a C compiler is there, as on CI) and the torch ops."""
    modes = [("native", contextlib.nullcontext)] if native.available() else []
    for name, ctx in modes + [("torch-ops", native.disabled)]:
        with ctx():
            yield name


def check_against_reference(graph: Graph, dtype: torch.dtype, rows: int, tiles, threads) -> None:
    hidden = graph.meta["hidden_size"]
    x, w = spread_input(rows, hidden, dtype), weight_for(hidden, dtype)
    expected = run_reference(graph, x, w, EPS)
    for kernels in kernel_sets():
        for tile, thread_count in itertools.product(tiles, threads):
            got = run_compiled(graph, x, w, EPS, tile_rows=tile, threads=thread_count)
            assert_bits_equal(got, expected, f"{kernels}, tile {tile}, threads {thread_count}, rows {rows}")


@pytest.mark.parametrize("graph", REDUCED)
def test_compiled_matches_reference_fp32_and_bf16(graph: Graph) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(graph, dtype, rows=37, tiles=(5, 16, None), threads=(1, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_compiled_matches_reference_fp64_fp16(dtype: torch.dtype, accumulate: str) -> None:
    for topology in ("tree", "linear", "cat"):
        g = tgn.build_graph(1000, chunk_size=64, topology=topology, accumulate=accumulate)
        check_against_reference(g, dtype, rows=19, tiles=(4, None), threads=(1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("graph", FULL_MATRIX if FULL else FULL_MATRIX[::5])
def test_compiled_matches_reference_full_matrix(graph: Graph) -> None:
    for dtype, rows in itertools.product(DTYPES, (1, 3, 64, 129)):
        check_against_reference(graph, dtype, rows, tiles=(1, 7, 64, None), threads=(1, 2))


@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_special_values_match_reference(accumulate: str) -> None:
    inf, nan, tiny = float("inf"), float("nan"), 1e-45
    rows = torch.zeros(8, 130)
    rows[1, 5] = inf
    rows[2, 7] = nan
    rows[3, 9], rows[3, 90] = inf, -inf
    rows[4] = tiny
    rows[5] = 3e38
    rows[6, ::2] = -0.0
    rows[7, 3], rows[7, 100] = nan, -nan  # NaNs of both signs: which one survives is order-dependent
    for kernels in kernel_sets():  # a generator of contexts: loop over it directly, never product() it
        for topology, tile in itertools.product(("tree", "linear", "cat"), (1, 3, None)):
            g = tgn.build_graph(130, chunk_size=64, topology=topology, accumulate=accumulate)
            assert_bits_equal(run_compiled(g, rows, None, EPS, tile_rows=tile), run_reference(g, rows, None, EPS),
                              f"{topology}, {kernels}, tile {tile}")


@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_strided_inputs_match_reference(accumulate: str) -> None:
    g = tgn.build_graph(96, chunk_size=64, accumulate=accumulate)
    base = spread_input(96, 40, torch.float32)
    rows_with_a_gap = spread_input(6, 128, torch.float32)[:, :96]  # unit stride along rows, rows 128 apart
    inputs = (base.t(), spread_input(4, 2 * 96, torch.float32)[:, ::2], rows_with_a_gap,
              spread_input(2 * 3 * 5, 96, torch.float32).view(2, 3, 5, 96))
    for kernels in kernel_sets():
        for x in inputs:
            expected = run_reference(g, x.reshape(-1, 96), None, torch.finfo(torch.float32).eps).reshape(x.shape)
            assert_bits_equal(tgn.normalize_sync(x, chunk_size=64, accumulate=accumulate), expected, kernels)


# -- batch invariance on the compiled path ------------------------------------------


def rows_alone_vs_batched(fn, rows: torch.Tensor, batches) -> list[int]:
    """Batch sizes at which a probe row gives other bits than when run alone."""
    alone = [fn(r[None])[0] for r in rows]
    bad = []
    for b in batches:
        batch = torch.randn(b, rows.shape[-1], generator=gen(b)).to(rows.dtype)
        positions = [(7 * i + 3) % b for i in range(min(b, len(rows)))]
        for p, r in zip(positions, rows):
            batch[p] = r
        out = fn(batch)
        if not all(bits_equal(out[p], alone[i]) for i, p in enumerate(positions)):
            bad.append(b)
    return bad


STRADDLE = (1, 15, 16, 17, 31, 33, 64, 65)  # around tiles of 16 rows


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("topology", ["tree", "linear", "cat"])
def test_compiled_rows_are_batch_invariant_across_tile_boundaries(topology: str, accumulate: str) -> None:
    g = tgn.build_graph(1000, chunk_size=64, topology=topology, accumulate=accumulate)
    rows = spread_input(3, 1000, torch.float32)
    for kernels in kernel_sets():
        for threads in (1, 2):
            def fn(t: torch.Tensor, threads: int = threads) -> torch.Tensor:
                return run_compiled(g, t, None, EPS, tile_rows=16, threads=threads)

            assert rows_alone_vs_batched(fn, rows, STRADDLE) == [], kernels


def test_negative_control_batch_dependent_chunking_is_caught() -> None:
    """The same checker finds a difference when the graph depends on the batch size."""
    candidates = spread_input(64, 1000, torch.float32)
    g64, g10 = (tgn.build_graph(1000, chunk_size=c, topology="tree") for c in (64, 10))
    differ = (run_reference(g64, candidates, None, EPS) != run_reference(g10, candidates, None, EPS)).any(-1)
    rows = candidates[differ][:4]  # rows whose bits the two chunkings do change
    assert len(rows) > 0

    def batch_dependent(t: torch.Tensor) -> torch.Tensor:
        g = tgn.build_graph(1000, chunk_size=64 if t.shape[0] < 16 else 10, topology="tree")
        return run_compiled(g, t, None, EPS, tile_rows=16)

    assert rows_alone_vs_batched(batch_dependent, rows, STRADDLE) != []


def test_negative_control_topologies_give_different_bits() -> None:
    x = spread_input(8, 1000, torch.float32)
    outs = [run_compiled(tgn.build_graph(1000, topology=t), x, None, EPS) for t in ("tree", "linear", "cat")]
    assert not bits_equal(outs[0], outs[1]) and not bits_equal(outs[0], outs[2])


# -- executor choice -----------------------------------------------------------------


def test_auto_picks_compiled_for_certified_graphs() -> None:
    for topology, acc in (("tree", "float"), ("linear", "float"), ("cat", "float"), ("race", "exact")):
        g = tgn.build_graph(4096, topology=topology, accumulate=acc)
        assert executor_of(g) == "compiled"
    assert executor_of(tgn.build_graph(128, topology="race")) == "compiled"  # 2 partials


def test_uncertified_graph_is_never_compiled() -> None:
    race = tgn.build_graph(4096, topology="race")
    assert not tgn.prove(race).certified
    assert executor_of(race) == "reference"
    with pytest.raises(ExecutionError, match="certified"):
        compile_graph(race)
    with pytest.raises(ExecutionError):
        tgn.normalize_sync(torch.randn(2, 4096), topology="race", executor="compiled")
    standard = tgn.build_graph(64, topology="standard")
    assert executor_of(standard) == "reference"


def _spy_direct(monkeypatch: pytest.MonkeyPatch, hidden: int, seen: list[int]) -> None:
    from taskgraph_norm import pipeline

    tgn.normalize_sync(torch.randn(1, hidden))  # make the pipeline and its small call
    pipe = pipeline.for_config(hidden, 64, "tree", "pairwise", "float", "auto")
    small, routed = pipe._direct, pipe.routed  # (routed: the faces' entry)
    assert small is not None, "the native kernels are built in this environment"

    def spy(*args):
        seen.append(threading.get_ident())
        return small(*args)

    def spy_routed(*args):
        seen.append(threading.get_ident())
        return routed(*args)

    monkeypatch.setattr(pipe, "_direct", spy)
    monkeypatch.setattr(pipe, "routed", spy_routed)
    monkeypatch.setattr(pipe, "face", None)  # (the C face, test_rms_face.py: the spies see every call)


def test_normalize_uses_compiled_by_default(monkeypatch) -> None:
    calls = []
    original = compiled_mod._run_tiles

    def spy(*args, **kwargs):
        calls.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(compiled_mod, "_run_tiles", spy)
    small: list[int] = []
    _spy_direct(monkeypatch, 256, small)
    x = spread_input(5, 256, torch.float32)
    y = tgn.normalize_sync(x, chunk_size=64)
    assert small and not calls, "an fp32 call goes straight to the native kernel"
    assert_bits_equal(y, tgn.normalize_sync(x, chunk_size=64, executor="reference"))
    wide = spread_input(5000, 256, torch.float32)  # the direct path splits it over two threads
    assert_bits_equal(tgn.normalize_sync(wide, chunk_size=64)[:5], y)
    assert not calls
    half = spread_input(5000, 256, torch.bfloat16)  # bf16: the direct kernel too (native_narrow.c)
    y = tgn.normalize_sync(half, chunk_size=64)
    assert not calls
    assert_bits_equal(y[:5], tgn.normalize_sync(half[:5], chunk_size=64, executor="reference"))
    double = spread_input(5000, 256, torch.float64)  # not a direct kernel's dtype: tiles
    y = tgn.normalize_sync(double, chunk_size=64)
    assert calls, "normalize did not go through the compiled executor"
    assert_bits_equal(y[:5], tgn.normalize_sync(double[:5], chunk_size=64, executor="reference"))


async def test_large_inputs_run_off_the_event_loop_thread_compiled(monkeypatch) -> None:
    seen = []
    original = compiled_mod._run_tiles

    def spy(*args, **kwargs):
        seen.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(compiled_mod, "_run_tiles", spy)
    small: list[int] = []
    _spy_direct(monkeypatch, 16, small)
    large: list[int] = []
    _spy_direct(monkeypatch, 4096, large)
    await tgn.normalize(torch.randn(64, 4096))  # fp32: the direct kernel, on a worker thread
    await tgn.normalize(torch.randn(64, 4096, dtype=torch.float64))  # fp64: tiles, on a worker thread
    await tgn.normalize(torch.randn(1, 16))
    assert large and large[0] != threading.get_ident()
    assert seen and seen[0] != threading.get_ident() and small == [threading.get_ident()]


def test_bad_options_are_config_errors() -> None:
    g = tgn.build_graph(64)
    for bad in ({"tile_rows": 0}, {"threads": 0}, {"threads": True}):
        with pytest.raises(ValueError):
            run_compiled(g, torch.randn(2, 64), None, EPS, **bad)


def test_gradients_fall_back_to_the_reference_ops() -> None:
    x = torch.randn(3, 128, requires_grad=True)
    w = torch.ones(128, requires_grad=True)
    tgn.normalize_sync(x, w).sum().backward()
    assert x.grad is not None and w.grad is not None


# -- the plan -------------------------------------------------------------------------


def test_plan_is_frozen_and_printable() -> None:
    plan = compile_graph(tgn.build_graph(4096, chunk_size=64))
    assert isinstance(plan, Plan) and plan.merge == "tree" and plan.n_full == 64
    with pytest.raises(AttributeError):
        plan.merge = "cat"  # type: ignore[misc]
    text = str(plan)
    assert "6 halving steps" in text and "merge level 6" in text and "finalize" in text
    assert plan.fingerprint == tgn.prove(tgn.build_graph(4096, chunk_size=64)).fingerprint
    ragged = compile_graph(tgn.build_graph(1000, chunk_size=64, topology="linear", leaf="native"))
    assert ragged.tail == 40 and ragged.merge == "adds" and "ragged" in str(ragged)


def test_hand_edited_tree_lowers_as_what_it_is() -> None:
    g = tgn.build_graph(256, chunk_size=64, topology="tree")
    node = g["tree1.0"]
    swapped = g.replace_node(node.replace(inputs=node.inputs[::-1]))
    plan = compile_graph(swapped)
    assert plan.merge == "adds"  # not the builder's tree any more
    x = spread_input(9, 256, torch.float32)
    assert_bits_equal(run_compiled(swapped, x, None, EPS), run_reference(swapped, x, None, EPS))


def test_non_uniform_chunking_is_refused_and_auto_falls_back() -> None:
    g = tgn.build_graph(256, chunk_size=64, topology="tree")
    moved = g.replace_node(g["p0"].replace(attrs={**g["p0"].attrs, "stop": 32}))
    moved = moved.replace_node(moved["p1"].replace(attrs={**moved["p1"].attrs, "start": 32}))
    with pytest.raises(GraphError, match="uniform"):
        compile_graph(moved)
    if tgn.prove(moved).certified:
        assert executor_of(moved) == "reference"


# -- out= and workspaces ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_is_written_in_place(dtype: torch.dtype) -> None:
    x = spread_input(40, 512, dtype)
    out = torch.empty_like(x)
    ptr = out.data_ptr()
    y = tgn.normalize_sync(x, out=out)
    assert y is out and out.data_ptr() == ptr
    assert_bits_equal(out, tgn.normalize_sync(x, executor="reference"))
    strided = torch.empty(512, 40, dtype=dtype).t()
    assert tgn.normalize_sync(x, out=strided) is strided
    assert_bits_equal(strided, out)
    in_place = x.clone()
    tgn.normalize_sync(in_place, out=in_place)
    assert_bits_equal(in_place, out)


async def test_await_normalize_with_out() -> None:
    x = spread_input(300, 512, torch.float32)
    out = torch.empty_like(x)
    assert await tgn.normalize(x, out=out) is out
    assert_bits_equal(out, tgn.normalize_sync(x, executor="reference"))


def test_workspaces_are_reused_across_calls() -> None:
    g = tgn.build_graph(512)
    x = torch.randn(70, 512)
    run_compiled(g, x, None, EPS, tile_rows=32)
    plan = compile_graph(g)
    ws = workspace_mod.workspace(plan, 32, x.dtype, x.device)
    ptr = ws.sq.data_ptr()
    for _ in range(3):
        run_compiled(g, x, None, EPS, tile_rows=32)
    assert workspace_mod.workspace(plan, 32, x.dtype, x.device).sq.data_ptr() == ptr
    assert ws.sq.numel() * ws.sq.element_size() <= 4 * 1024 * 1024


def test_compiled_is_registered() -> None:
    assert EXECUTORS["compiled"] is compiled_runner


def test_plan_handles_one_chunk_and_tiny_rows() -> None:
    for hidden, chunk in ((1, 64), (7, 7), (64, 64), (65, 64)):
        for topology in ("tree", "linear", "cat", "race"):
            g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology)
            if not tgn.prove(g).certified:
                continue
            x = spread_input(3, hidden, torch.float32)
            assert_bits_equal(run_compiled(g, x, None, EPS, tile_rows=2), run_reference(g, x, None, EPS))


def test_hand_made_graph_with_accumulate_of_two() -> None:
    nodes = [
        Node("x", Op.INPUT),
        Node("a", Op.SUMSQ, ("x",), {"start": 0, "stop": 64, "leaf": "pairwise"}),
        Node("b", Op.SUMSQ, ("x",), {"start": 64, "stop": 128, "leaf": "pairwise"}),
        Node("acc", Op.ACCUMULATE, ("b", "a")),
        Node("f", Op.FINALIZE, ("x", "acc"), {"hidden_size": 128}),
        Node("y", Op.OUTPUT, ("f",)),
    ]
    g = Graph(nodes, "y", {"hidden_size": 128})
    x = spread_input(5, 128, torch.float32)
    assert_bits_equal(run_compiled(g, x, None, EPS), run_reference(g, x, None, EPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_row_max_equals_the_chunked_max(dtype: torch.dtype) -> None:
    from taskgraph_norm import kernels

    x = spread_input(6, 130, torch.float64).to(dtype)
    x[1, 3], x[2, 4], x[3] = float("nan"), float("-inf"), -0.0
    if dtype == torch.float64:
        x[4, 7] = 1e200  # its square overflows to inf
    chunked = kernels.maximum(kernels.rowmax_sq(x, 0, 64), kernels.rowmax_sq(x, 64, 130))
    assert_bits_equal(kernels.rowmax_sq_whole(x)[~chunked.isnan()], chunked[~chunked.isnan()])
    assert torch.equal(kernels.rowmax_sq_whole(x).isnan(), chunked.isnan())
