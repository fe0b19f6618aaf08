"""The compiled executor's native kernels (backends/native/csrc/native.c) against the torch ops.

The native kernels must give the torch ops' bits: the exact pair ``(S1, S2)`` and
the scales of every row, and the float plan's total, operation for operation.
Bits are compared as int views; each equality has a negative control that must
find a difference.  tests/test_compiled.py runs its bit checks under both kernel
sets as well.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import kernels
from taskgraph_norm.backends.torch_ops import compiled as compiled_mod
from taskgraph_norm.executors import run_reference
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.backends.native.loader import FloatRecipe
from taskgraph_norm.graph import Graph, Node, Op
from .helpers import assert_bits_equal, bits_equal, compile_graph, run_compiled

from ._trust_helpers import CC, build_probe, build_runs, native_status
from .conftest import gen
NATIVE, WHY_NOT = native_status()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")


def spread(rows: int, hidden: int, dtype: torch.dtype, binades: int = 60, seed: int = 0) -> torch.Tensor:
    """Random signs and mantissas over +-``binades`` binades (clamped to the dtype's range)."""
    mant = torch.randn(rows, hidden, generator=gen(seed), dtype=torch.float64)
    exps = torch.randint(-binades, binades + 1, (rows, hidden), generator=gen(seed + 1)).double()
    return (mant * torch.exp2(exps)).to(dtype)


def adversarial_rows(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros, subnormals, extremes, Inf and NaN rows, among ordinary ones."""
    fi = torch.finfo(dtype)
    x = spread(24, hidden, dtype)
    x[0] = 0.0
    x[1] = -0.0
    x[2] = fi.smallest_normal * 2.0**-3 if dtype != torch.bfloat16 else 0.0  # subnormal
    x[3, 0] = float("inf")
    x[4, -1] = float("nan")
    x[5, 0], x[5, -1] = float("nan"), -float("nan")
    x[6] = fi.max
    x[7, :] = fi.tiny
    x[8, 0] = fi.max
    x[9, ::2] = float("-inf")
    x[10] = torch.linspace(-1, 1, hidden, dtype=torch.float64).to(dtype)
    return x


# -- the build ------------------------------------------------------------------------


def test_native_kernels_are_built_where_a_compiler_is() -> None:
    """Where cc exists (this machine, CI), the install built the native kernels and
    they load (unless TGN_NATIVE=0): the speed figures in docs/ depend on it.  In a
    source checkout, `python setup.py build_ext --inplace` builds them."""
    if CC is None or os.environ.get("TGN_NATIVE") == "0":
        pytest.skip("no C compiler here, or TGN_NATIVE=0")
    assert native.available(), native.why_unavailable()
    path = native.library_path()
    assert path is not None and path.exists()


PORTABLE_PROBE = build_probe("test_native", """
    import hashlib, torch, taskgraph_norm as tgn
    from taskgraph_norm.backends.native import loader as native
    from taskgraph_norm.testing import bits
    print(native.library_path().name if native.available() else None)
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(50, 777, generator=g, dtype=torch.float64)
    rows = rows * torch.exp2(torch.randint(-30, 30, (50, 777), generator=g))
    rows[3, 5] = float("nan"); rows[4] = 0.0; rows[5, 0] = float("inf")
    for chunk in (10, 7, 16, 64):  # 16, 64: eight chunks at a time on AVX
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for acc in ("float", "exact"):
                y = tgn.normalize_sync(rows.to(dtype), accumulate=acc, chunk_size=chunk)
                print(chunk, dtype, acc, hashlib.sha256(bits(y).numpy().tobytes()).hexdigest()[:16])
    from taskgraph_norm.ops.exact_grad import ExactSum  # the exact weight gradient's kernels
    x, dy = rows[:, :700].float(), rows[:, 77:].float()
    total = ExactSum(700).add_normalized(dy, x, x.abs().amax(1).clamp(min=1.0))
    print("dW", hashlib.sha256(total.state.numpy().tobytes()).hexdigest()[:16],
          *(hashlib.sha256(bits(total.result(d)).numpy().tobytes()).hexdigest()[:16]
            for d in (torch.float32, torch.bfloat16)))
""")


@needs_native
def test_the_portable_build_gives_the_host_builds_bits() -> None:
    """TGN_NATIVE=portable loads the portable build (the compiler's default target:
    SSE2 on x86-64, no AVX code), which gives the same bits as the -march=native one
    (512-bit vectors in the exact weight gradient on AVX-512) and as the torch ops,
    on edge cases too: the forward, and the exact weight gradient's state and
    rounding."""
    portable, default, off = build_runs(PORTABLE_PROBE)
    for proc in (portable, default, off):
        assert proc.returncode == 0, proc.stderr
    p, d, o = (proc.stdout.splitlines() for proc in (portable, default, off))
    assert p[0].startswith("_native_portable") and o[0] == "None"
    assert p[1:] == d[1:] == o[1:] and len(p) == 26
    # Negative control: the digests see a change of chunk size.
    assert [line.split()[-1] for line in p[1:7]] != [line.split()[-1] for line in p[7:]]
    if not d[0].startswith("_native_host"):
        pytest.skip(f"no host build loaded here ({native.describe()}): only portable against torch ops")


# -- the exact kernel -------------------------------------------------------------------


def torch_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch ops' pair and scales of whole rows (kernels.*)."""
    hidden = x.shape[-1]
    sigmas = kernels.exact_scale(kernels.rowmax_sq_whole(x), hidden)
    return kernels.sumsq_exact(x, 0, hidden, sigmas), sigmas


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hidden", [1, 2, 3, 7, 8, 9, 15, 64, 100, 1000, 4096])
def test_exact_pair_equals_the_torch_ops(dtype: torch.dtype, hidden: int) -> None:
    x = adversarial_rows(hidden, dtype)
    expected, sigmas = torch_pair(x)
    pair = torch.empty(len(x), 2, dtype=torch.float64)
    unscaled = native.exact_rows(x, pair)
    scaled = sigmas[:, 0] > 0
    assert unscaled == int((~scaled).sum()) > 0
    assert_bits_equal(pair[scaled], expected[scaled])
    assert pair[~scaled].isnan().all()  # marked for the reference


@needs_native
def test_exact_pair_reads_rows_with_a_stride() -> None:
    wide = spread(40, 300, torch.float32)
    x = wide[:, 17:273]  # unit stride along rows, rows 300 apart
    pair = torch.empty(40, 2, dtype=torch.float64)
    native.exact_rows(x, pair)
    assert_bits_equal(pair, torch_pair(x.contiguous())[0])
    with pytest.raises(ValueError, match="unit stride"):
        native.exact_rows(wide.t(), torch.empty(300, 2, dtype=torch.float64))


@needs_native
def test_exact_pair_negative_control() -> None:
    """The pair is sensitive: one ulp more on each row's largest element changes S1 or S2."""
    x = spread(16, 1000, torch.float32, binades=20)
    y = x.clone()
    at = x.abs().argmax(-1, keepdim=True)
    y.scatter_(1, at, torch.nextafter(x.gather(1, at), torch.tensor(float("inf"))))
    a, b = torch.empty(16, 2, dtype=torch.float64), torch.empty(16, 2, dtype=torch.float64)
    native.exact_rows(x, a)
    native.exact_rows(y, b)
    assert (a != b).any(-1).all()


SCALE_MAXIMA = [0.0, 5e-324, 2.0**-1074 * 3, 2.0**-1022, 2.0**-600, 1e-90, 2.0**-298, 0.5, 1.0,
                1.0 + 2.0**-52, 3.0, 2.0**60, 2.0**255 * 1.5, 1e300, 2.0**1000, 1.7e308, float("inf"),
                float("nan")]


@needs_native
@pytest.mark.parametrize("hidden", [1, 2, 3, 64, 1000, 4096, 2**20, 2**40 + 1])
def test_exact_scale_equals_kernels(hidden: int) -> None:
    maxima = SCALE_MAXIMA + [math.ldexp(1.0 + k / 7, e) for k in range(7) for e in range(-1070, 1020, 37)]
    top = 2.0**1023 / (2.0 * hidden)  # the largest M with a finite sigma1 = 2**1023
    maxima += [top, top * (1 + 2.0**-52), top * 1.5, math.nextafter(top, 0.0)]
    expected = kernels.exact_scale(torch.tensor(maxima, dtype=torch.float64)[:, None], hidden)
    got = torch.tensor([native.exact_scale(m, hidden) for m in maxima], dtype=torch.float64)
    assert_bits_equal(got, expected)


@pytest.mark.parametrize("kernels", ["native", "torch-ops"])
def test_fp64_rows_near_the_top_of_the_range_are_finite(kernels: str) -> None:
    """A row whose bound 2 D M passes 2**1023 would get sigma1 = inf and a NaN sum;
    it gets no scale instead (a plain fp64 sum, as torch's), on every executor."""
    if kernels == "native" and not native.available():
        pytest.skip(f"native kernels: {native.why_unavailable()}")
    hidden = 1000
    x = spread(6, hidden, torch.float64, binades=3)
    x = x / x.abs().amax(-1, keepdim=True)  # max |x| = 1 in every row
    magnitudes = [2.0**1023 / (2.0 * hidden) * f for f in (0.5, 1.0, 1.0001, 1.5, 4.0, 16.0)]
    x = x * torch.tensor(magnitudes, dtype=torch.float64).sqrt()[:, None]
    graph = tgn.build_graph(hidden, chunk_size=64, topology="tree", accumulate="exact")
    expected = run_reference(graph, x, None, 1e-6)
    assert torch.isfinite(expected).all()
    with native.disabled() if kernels == "torch-ops" else contextlib.nullcontext():
        assert_bits_equal(run_compiled(graph, x, None, 1e-6), expected)
    # Against torch's own kernel: close (a plain fp64 sum of squares there too).
    torch.testing.assert_close(expected, torch.nn.functional.rms_norm(x, (hidden,), eps=1e-6))


# -- the float kernel -------------------------------------------------------------------


def torch_total(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """The reference interpreter's float total of every row (the graph's FINALIZE input)."""
    from taskgraph_norm.kernels.reference import reference_sum_of_squares

    return reference_sum_of_squares(graph, x)


@needs_native
@pytest.mark.parametrize("topology", ["tree", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hidden,chunk", [(1, 1), (7, 1), (7, 3), (64, 64), (130, 64), (1000, 100), (1000, 7),
                                          (4096, 64), (4097, 4096), (96, 1),
                                          # eight full chunks at a time on AVX, plus tails
                                          (464, 16), (4096, 16), (1000, 32), (4096, 128),
                                          (2148, 256), (2048, 256), (520, 64),
                                          # short rows: a block of rows' chunks at a time, partial blocks
                                          (128, 64), (256, 64), (96, 32), (48, 16), (8, 2)])
def test_float_total_equals_the_reference(topology: str, dtype: torch.dtype, hidden: int, chunk: int) -> None:
    graph = tgn.build_graph(hidden, chunk_size=chunk, topology=topology)
    plan = compile_graph(graph)
    x = spread(23, hidden, dtype, binades=20)
    recipe = FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv), plan.root)
    total = torch.empty(23, 1, dtype=dtype)
    assert native.float_rows(x, recipe, total) == 0
    assert_bits_equal(total, torch_total(graph, x).to(dtype))


@needs_native
def test_float_total_negative_control() -> None:
    """The same rows through the linear recipe and the tree recipe differ: the kernel
    really follows the plan's order (so the equalities above are not vacuous)."""
    x = spread(64, 1000, torch.float32, binades=20)
    totals = []
    for topology in ("tree", "linear"):
        plan = compile_graph(tgn.build_graph(1000, chunk_size=10, topology=topology))
        recipe = FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv), plan.root)
        total = torch.empty(64, 1)
        native.float_rows(x, recipe, total)
        totals.append(total)
    assert not bits_equal(totals[0], totals[1])


@needs_native
def test_bad_arguments_are_value_errors() -> None:
    x = spread(4, 100, torch.float32)
    plan = compile_graph(tgn.build_graph(100, chunk_size=10))
    recipe = FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv), plan.root)
    total, pair = torch.empty(4, 1), torch.empty(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunks"):
        native.float_rows(spread(4, 130, torch.float32), recipe, total)
    with pytest.raises(ValueError, match="total"):
        native.float_rows(x, recipe, torch.empty(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="y must"):
        native.float_rows(x, recipe, total, y=torch.empty(4, 99))
    with pytest.raises(ValueError, match="weight"):
        native.exact_rows(x, pair, y=torch.empty_like(x), weight=torch.ones(100, dtype=torch.float64))
    with pytest.raises(ValueError, match="pair"):
        native.exact_rows(x, torch.empty(4, 2))
    with pytest.raises(ValueError, match="slots"):
        FloatRecipe(10, 10, ((10, 0, 11),), 10)
    with pytest.raises(ValueError, match="float32/float64"):
        native.exact_rows(x.half(), pair)
    with pytest.raises(ValueError, match="float32 rows only"):
        native.exact_rows(x.double(), pair, y=torch.empty(4, 100, dtype=torch.float64))


@needs_native
def test_fused_finalize_equals_the_reference() -> None:
    """The kernels' own FINALIZE (fp32 accumulation) against kernels.finalize, with a
    weight and an eps that fp32 cannot hold; fp64 rows keep torch's FINALIZE."""
    x = spread(40, 1000, torch.float32, binades=20)
    w = 1 + 0.1 * torch.randn(1000, generator=gen(5))
    for accumulate in ("float", "exact"):
        graph = tgn.build_graph(1000, chunk_size=64, accumulate=accumulate)
        total = torch.empty(40, 1)
        y = torch.empty_like(x)
        if accumulate == "exact":
            native.exact_rows(x, torch.empty(40, 2, dtype=torch.float64), y, w, 1e-6)
        else:
            plan = compile_graph(graph)
            recipe = FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv),
                                 plan.root)
            native.float_rows(x, recipe, total, y, w, 1e-6)
        assert_bits_equal(y, run_reference(graph, x, w, 1e-6), accumulate)
        # Negative control: the same rows with a reciprocal multiply instead of the division.
        rms = torch.sqrt((torch_total(graph, x) / 1000 + 1e-6).double()).float()
        assert not bits_equal(x * (1 / rms) * w, y)


@needs_native
def test_float_nan_rows_are_counted() -> None:
    plan = compile_graph(tgn.build_graph(100, chunk_size=10))
    recipe = FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv), plan.root)
    x = spread(5, 100, torch.float32, binades=5)
    x[1, 3], x[3, 99] = float("nan"), -float("nan")
    x[2, 0] = float("inf")
    total = torch.empty(5, 1)
    assert native.float_rows(x, recipe, total) == 2
    assert total[:, 0].isnan().tolist() == [False, True, False, True, False]


@needs_native
def test_hand_made_adds_plan_runs_natively() -> None:
    """A merge the builder never makes ((p2 + p0) + p1, a 'adds' plan) runs on the
    native kernel in the plan's order, and matches the reference."""
    nodes = [Node("x", Op.INPUT)]
    for k in range(3):
        nodes.append(Node(f"s{k}", Op.SUMSQ, ("x",), {"start": 10 * k, "stop": 10 * k + 10, "leaf": "pairwise"}))
    nodes += [Node("a", Op.ADD, ("s2", "s0")), Node("b", Op.ADD, ("a", "s1")),
              Node("f", Op.FINALIZE, ("x", "b"), {"hidden_size": 30}), Node("y", Op.OUTPUT, ("f",))]
    graph = Graph(nodes, "y", {"hidden_size": 30})
    plan = compile_graph(graph)
    assert plan.merge == "adds"
    x = spread(9, 30, torch.float32, binades=20)
    calls = []
    real = native.float_rows

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    compiled_mod._native.float_rows = spy  # type: ignore[assignment]
    try:
        got = run_compiled(graph, x, None, 1e-6)
    finally:
        compiled_mod._native.float_rows = real  # type: ignore[assignment]
    assert calls
    assert_bits_equal(got, run_reference(graph, x, None, 1e-6))


@needs_native
def test_native_kernels_are_used_and_disabled(monkeypatch) -> None:
    """The compiled executor calls the native kernels for pairwise float plans and
    exact plans (not for cat or native leaves), and none inside native.disabled();
    so does the one-call path of small inputs."""
    from taskgraph_norm import pipeline

    used = []
    for name in ("exact_rows", "float_rows"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    big = spread(3000, 256, torch.float32, binades=5)  # more rows than one tile
    small = big[:8]
    cases = [({"topology": "tree"}, "float_rows"), ({"topology": "linear"}, "float_rows"),
             ({"topology": "race", "accumulate": "exact"}, "exact_rows"), ({"topology": "cat"}, None),
             ({"topology": "tree", "leaf": "native"}, None)]
    for options, kernel in cases:
        used.clear()
        graph = tgn.build_graph(256, **options)  # type: ignore[arg-type]
        y = tgn.execute_sync(graph, big, executor="compiled", tile_rows=1024)  # the tiled path
        assert set(used) == ({kernel} if kernel else set()), options
        used.clear()
        with native.disabled():
            assert_bits_equal(tgn.execute_sync(graph, big, executor="compiled", tile_rows=1024), y)
            assert_bits_equal(tgn.normalize_sync(big, executor="compiled", **options), y)
        assert used == [], options
        assert_bits_equal(tgn.normalize_sync(big, executor="compiled", **options), y)  # direct path
        config = (256, 64, options["topology"], options.get("leaf", "pairwise"),
                  options.get("accumulate", "float"), "compiled")
        pipe = pipeline.for_config(*config)
        assert_bits_equal(tgn.normalize_sync(small, executor="compiled", **options), y[:8])
        assert (pipe._direct is not None) == (kernel is not None), options
        if pipe._direct is not None:
            assert pipe._direct(small, None, 1e-6, None) is not None
            with native.disabled():
                assert pipe._direct(small, None, 1e-6, None) is None  # declined: torch ops run


def test_describe_says_which_kernels_run() -> None:
    """The report and bench headers say which kernels their timings come from."""
    expected = "native C" if native.available() else "unavailable"
    assert expected in native.describe()
    with native.disabled():
        assert "torch ops" in native.describe() and "off" in native.describe()
    assert "off" in native.describe(False)


def test_a_direct_entry_point_keeps_the_tensor_its_configuration_points_to() -> None:
    """The direct call's configuration holds the address of the plan's ADD triples: the
    entry point a pipeline hands out must keep that tensor alive by itself (two threads'
    first calls each made one and the pipeline kept the second; the first thread's call
    then read freed memory and crashed, tests/test_native_team.py's concurrent callers)."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    import gc

    from taskgraph_norm import pipeline
    from taskgraph_norm.backends.native.direct import direct_call

    plan = pipeline.for_config(2048, 64, "tree", "pairwise", "float", "auto").plan
    assert plan is not None
    routed = direct_call(plan).routed  # the call object itself is dropped at once
    gc.collect()
    n_adds = sum(len(level) for level in plan.adds)
    junk = [torch.zeros(3 * n_adds, dtype=torch.int64) for _ in range(2000)]  # reuse what was freed
    x = torch.randn(64, 2048, generator=gen(5))
    y = routed(x, None, 1e-6, None)
    assert y is not None
    assert_bits_equal(y, tgn.normalize_sync(x, None, 1e-6, executor="reference"))
    del junk
