"""The triton executor with the model-facing semantics (docs/gpu.md; docs/design.md,
"Casting modes, offset and the fused residual add"):
casting modes, the weight offset and the fused residual add give the reference's
bits in Triton's interpreter, and in the PTX nothing rounds differently; ``gpu``
tests check the device.  Helpers and the interpreter fixture: tests/test_triton.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.registry import NoBackendError
from taskgraph_norm import kernels
from taskgraph_norm.errors import ExecutionError
from taskgraph_norm.executors import run_reference
from taskgraph_norm.lowering import Plan, lower
from taskgraph_norm.backends.triton import run_triton
from taskgraph_norm.backends.triton import runner
from taskgraph_norm.graph import Graph
from .conftest import FULL, gen
from .helpers import assert_bits_equal, bits_equal, run_compiled
from .test_triton import DTYPES, adversarial_rows, spread_input

EPS = 1e-6
#: (casting_mode, offset): every mode, offsets 0 and 1.0 (gemma's), in CI.
MODES = [("torch", 0.0), ("llama", 0.0), ("gemma", 1.0), ("llama", 1.0)]
WEIGHTS = (None, "same", torch.float32)


def semantics_graph(hidden: int, chunk: int, topology: str = "tree", accumulate: str = "float", *,
                    mode: str = "torch", offset: float = 0.0, residual: bool = False) -> tuple[Graph, Plan]:
    g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology, accumulate=accumulate,
                        casting_mode=mode, offset=offset, residual=residual)
    return g, lower(g)


def weight_for(kind: Any, dtype: torch.dtype, hidden: int, seed: int = 9) -> torch.Tensor | None:
    """``None``, ``"same"`` (x's dtype), ``"other"`` (the other 16-bit dtype) or a dtype."""
    if kind is None:
        return None
    if kind == "same":
        wdtype = dtype
    elif kind == "other":
        wdtype = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    else:
        wdtype = kind
    return (torch.randn(hidden, generator=gen(seed)) * 2).to(wdtype)


def run_both(g: Graph, plan: Plan, x: torch.Tensor, w: torch.Tensor | None, r: torch.Tensor | None,
             eps: float = EPS, **options: Any) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
    """``(y, h)`` of the triton executor and of the reference."""
    runs = []
    for run in (lambda **kw: run_triton(g, x, w, eps, plan=plan, **kw, **options),
                lambda **kw: run_reference(g, x, w, eps, **kw)):
        h = None if r is None else torch.empty_like(x)
        y = run() if r is None else run(residual=r, residual_out=h)
        runs.append((y, h))
    return tuple(runs)


def check_semantics(g: Graph, plan: Plan, x: torch.Tensor, w: torch.Tensor | None, r: torch.Tensor | None,
                    compiled: bool = True) -> torch.Tensor:
    (y, h), (y_ref, h_ref) = run_both(g, plan, x, w, r)
    what = f"{plan} x {x.dtype} w {None if w is None else w.dtype}"
    assert y.dtype == y_ref.dtype == kernels.output_dtype(x.dtype, None if w is None else w.dtype, plan.casting_mode)
    assert_bits_equal(y, y_ref, f"triton vs reference: {what}")
    if r is not None:
        assert h is not None and h_ref is not None
        assert_bits_equal(h, h_ref, f"h: {what}")
    if compiled:
        res = {} if r is None else dict(residual=r, residual_out=torch.empty_like(x))
        assert_bits_equal(y, run_compiled(g, x, w, EPS, **res), f"triton vs compiled: {what}")
    return y


# -- bits in the interpreter ----------------------------------------------------------

CONFIGS = [(100, 7, "tree", "float"), (100, 32, "linear", "float"), (64, 64, "tree", "float"),
           (100, 7, "race", "exact")]


@pytest.mark.parametrize("mode,offset", MODES, ids=[f"{m}-{o}" for m, o in MODES])
@pytest.mark.parametrize("hidden,chunk,topology,accumulate", CONFIGS,
                         ids=[f"D{d}-C{c}-{t}-{a}" for d, c, t, a in CONFIGS])
def test_modes_offsets_and_residual_match_reference_and_compiled(
    interpreted: None, hidden: int, chunk: int, topology: str, accumulate: str, mode: str, offset: float,
) -> None:
    for residual in (False, True):
        g, plan = semantics_graph(hidden, chunk, topology, accumulate, mode=mode, offset=offset, residual=residual)
        for dtype, kind in itertools.product(DTYPES, WEIGHTS):
            if kind is None and offset:
                continue  # an offset needs a weight
            x = spread_input(2, hidden, dtype, seed=hidden)
            r = spread_input(2, hidden, dtype, seed=hidden + 1) if residual else None
            check_semantics(g, plan, x, weight_for(kind, dtype, hidden), r)


def test_the_modes_and_offsets_differ(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative controls: the comparisons above see a mode or an offset ignored, and an
    offset added unrounded (torch rounds the scalar to a bf16 weight's dtype first)."""
    x = spread_input(8, 100, torch.bfloat16, seed=3)
    w = weight_for("same", torch.bfloat16, 100)
    runs = {}
    for mode, offset in (("torch", 0.0), ("llama", 0.0), ("gemma", 1.0), ("llama", 0.3)):
        g, plan = semantics_graph(100, 7, mode=mode, offset=offset)
        runs[mode, offset] = check_semantics(g, plan, x, w, None, compiled=False)
    assert not bits_equal(runs["torch", 0.0], runs["llama", 0.0])
    assert not bits_equal(runs["torch", 0.0], runs["gemma", 1.0])
    g, plan = semantics_graph(100, 7, mode="llama", offset=0.3)
    monkeypatch.setattr(runner, "_offset_in", lambda offset, dtype: float(torch.tensor(offset)))  # fp32
    assert not bits_equal(run_triton(g, x, w, EPS, plan=plan), runs["llama", 0.3])


def assert_bits_equal_but_nan_payloads(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Same bits except inside NaNs, which sit in the same places: torch's own NaN bits
    depend on which of its code paths (vector or scalar) met them."""
    nan = b.isnan()
    assert torch.equal(a.isnan(), nan), what
    assert_bits_equal(a[~nan], b[~nan], what)


@pytest.mark.parametrize("mode,offset", [("torch", 0.0), ("llama", 1.0)])
@pytest.mark.parametrize("accumulate,topology", [("float", "tree"), ("exact", "race")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_rows_with_a_residual(interpreted: None, accumulate: str, topology: str, dtype: torch.dtype,
                                          mode: str, offset: float) -> None:
    g, plan = semantics_graph(100, 32, topology, accumulate, mode=mode, offset=offset, residual=True)
    x, r = adversarial_rows(100, dtype), adversarial_rows(100, dtype).flip(0)
    x[9] = r[9] = torch.finfo(dtype).max  # h = x + r overflows to inf
    for w, eps in ((torch.linspace(-2, 2, 100).to(dtype), 1e-6), (torch.linspace(-2, 2, 100), 0.0)):
        (y, h), (y_ref, h_ref) = run_both(g, plan, x, w, r, eps)
        assert h is not None and h_ref is not None
        assert_bits_equal_but_nan_payloads(h, h_ref, "h")
        assert_bits_equal_but_nan_payloads(y, y_ref, "y")


def test_h_may_overwrite_x_or_the_residual(interpreted: None) -> None:
    g, plan = semantics_graph(100, 7, mode="llama", residual=True)
    x, r = spread_input(5, 100, torch.bfloat16, seed=4), spread_input(5, 100, torch.bfloat16, seed=5)
    x[2, 5] = float("inf")  # a flagged row: the reference finishes it from h
    w = weight_for(torch.float32, torch.bfloat16, 100)
    h_want = x + r
    y_want = run_reference(g, x, w, EPS, residual=r, residual_out=torch.empty_like(x))
    for into in ("x", "residual"):
        xi, ri = x.clone(), r.clone()
        target = xi if into == "x" else ri
        y = run_triton(g, xi, w, EPS, plan=plan, residual=ri, residual_out=target)
        assert_bits_equal(target, h_want, f"h written over {into}")
        assert_bits_equal(y, y_want, f"y with h written over {into}")


def test_strided_residual_out_and_llama_out(interpreted: None) -> None:
    g, plan = semantics_graph(100, 7, mode="llama", residual=True)
    x, r = spread_input(6, 100, torch.float16, seed=6), spread_input(6, 100, torch.float16, seed=7)
    w = weight_for(torch.float32, torch.float16, 100)
    y_want = run_reference(g, x, w, EPS, residual=r, residual_out=torch.empty_like(x))
    h = torch.zeros(6, 200, dtype=torch.float16)[:, ::2]
    out = torch.zeros(100, 6).t()  # fp32: llama's promoted dtype, column-major
    r_strided = torch.zeros(6, 200, dtype=torch.float16)
    r_strided[:, 1::2] = r
    assert run_triton(g, x, w, EPS, plan=plan, out=out, residual=r_strided[:, 1::2], residual_out=h) is out
    assert_bits_equal(h, x + r)
    assert_bits_equal(out, y_want)
    with pytest.raises(ExecutionError, match="dtype torch.float32"):
        run_triton(g, x, w, EPS, plan=plan, out=torch.empty_like(x), residual=r, residual_out=h)


@pytest.mark.parametrize("accumulate,topology,chunk", [("float", "tree", 7), ("exact", "race", 7)])
def test_batch_invariance_with_a_residual(interpreted: None, accumulate: str, topology: str, chunk: int) -> None:
    g, plan = semantics_graph(100, chunk, topology, accumulate, mode="gemma", offset=1.0, residual=True)
    x, r = spread_input(32, 100, torch.float32, seed=12), spread_input(32, 100, torch.float32, seed=13)
    w = weight_for("same", torch.float32, 100)

    def run(g: Graph, plan: Plan, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.empty_like(x[rows])
        return run_triton(g, x[rows], w, EPS, plan=plan, residual=r[rows], residual_out=h), h

    y_all, h_all = run(g, plan, slice(None))
    for i in (0, 31):
        y_one, h_one = run(g, plan, slice(i, i + 1))
        assert_bits_equal(h_one, h_all[i : i + 1], f"h of row {i} alone vs in a batch of 32")
        assert_bits_equal(y_one, y_all[i : i + 1], f"y of row {i} alone vs in a batch of 32")
    # Negative control: a batch-dependent choice of plan (another chunking; for the
    # exact plan, which every chunking gives the same bits, the float one) changes them.
    other = semantics_graph(100, chunk + 1 if accumulate == "float" else chunk, topology="tree", accumulate="float",
                            mode="gemma", offset=1.0, residual=True)
    assert not bits_equal(run(*other, slice(None))[0], y_all)


def test_residual_errors(interpreted: None) -> None:
    g, plan = semantics_graph(100, 7, residual=True)
    plain_g, plain_plan = semantics_graph(100, 7)
    x, r = spread_input(2, 100, torch.float32), spread_input(2, 100, torch.float32, seed=1)
    with pytest.raises(ExecutionError, match="pass residual= and residual_out="):
        run_triton(g, x, None, EPS, plan=plan)
    with pytest.raises(ExecutionError, match="adds no residual"):
        run_triton(plain_g, x, None, EPS, plan=plain_plan, residual=r, residual_out=torch.empty_like(x))
    with pytest.raises(ExecutionError, match="residual must have x's shape"):
        run_triton(g, x, None, EPS, plan=plan, residual=r[:1], residual_out=torch.empty_like(x))


def test_the_pipeline_runs_triton_with_the_settings(interpreted: None) -> None:
    x, r = spread_input(4, 100, torch.bfloat16, seed=8), spread_input(4, 100, torch.bfloat16, seed=9)
    w = weight_for(torch.float32, torch.bfloat16, 100)
    options: dict[str, Any] = dict(chunk_size=7, casting_mode="llama", offset=1.0)
    y, h = tgn.normalize_sync(x, w, EPS, residual=r, executor="triton", **options)
    y_ref, h_ref = tgn.normalize_sync(x, w, EPS, residual=r, executor="reference", **options)
    assert y.dtype == torch.float32
    assert_bits_equal(y, y_ref)
    assert_bits_equal(h, h_ref)
    graph = tgn.build_graph(100, chunk_size=7, casting_mode="gemma", offset=1.0, residual=True)
    pipe = tgn.Pipeline(graph, "compiled")
    # auto (and "compiled") on a CUDA tensor picks the kernels; on a CPU tensor only when asked for
    assert pipe.backend(torch.device("cuda"), torch.bfloat16).name == "triton"
    assert pipe.backend(torch.device("cpu"), torch.bfloat16).name == "native"
    with tgn.backends.use("triton"):
        assert pipe.backend(torch.device("cpu"), torch.bfloat16).name == "triton"
    with tgn.backends.use("torch_ops"):
        assert pipe.backend(torch.device("cuda"), torch.bfloat16).name == "torch_ops"
    with pytest.raises(NoBackendError, match="triton: .*fp64"):
        tgn.Pipeline(graph, "triton").backend(torch.device("cuda"), torch.float64)


# -- the PTX of the new paths (compiled here for sm_90) --------------------------------


@pytest.mark.parametrize("hidden,chunk,topology,accumulate,dtype,mode,offset,residual,weight", [
    (4096, 64, "tree", "float", torch.bfloat16, "llama", 1.0, True, torch.bfloat16),
    (1000, 9, "linear", "float", torch.float16, "gemma", 1.0, True, torch.float32),
    (1000, 64, "race", "exact", torch.bfloat16, "llama", 0.0, True, torch.float32),
    (100, 7, "tree", "float", torch.float32, "llama", 0.5, False, torch.float64),
])
def test_ptx_of_the_modes_rounds_like_the_reference(hidden: int, chunk: int, topology: str, accumulate: str,
                                                     dtype: torch.dtype, mode: str, offset: float,
                                                     residual: bool, weight: torch.dtype) -> None:
    pytest.importorskip("triton")
    from taskgraph_norm.backends.triton.ptx import forbidden_instructions, kernel_ptx

    plan = semantics_graph(hidden, chunk, topology, accumulate, mode=mode, offset=offset, residual=residual)[1]
    ptx = kernel_ptx(plan, dtype, weight=weight)
    assert forbidden_instructions(ptx) == []
    needed = ["div.rn.f32", "sqrt.rn.f64", "cvt.rn.f32.f64", "add.rn.f32"]
    needed.append("mul.rn.f64" if weight == torch.float64 else "mul.rn.f32")
    for op in needed:
        assert op in ptx, op
    stores = [line for line in ptx.splitlines() if "st.global" in line]
    assert len(stores) >= (3 if residual else 2)  # the flag, y and (with a residual) h
    # h may overwrite x or r: their loads must not take the non-coherent (read-only) path.
    assert "ld.global.nc" not in ptx
    # Negative control: with contraction on, x*x + sigma (exact) or a left fold's
    # x*x + y*y fuses (the tree's folds go through shuffles, which nothing fuses across).
    if topology != "tree":
        fused = kernel_ptx(plan, dtype, weight=weight, fp_fusion=True)
        assert any(line.startswith("fma.") for line in forbidden_instructions(fused))


# -- a larger matrix (TGN_FULL=1), and the device ----------------------------------------


def _full_cases() -> list[tuple[int, int, str, str, str, float]]:
    configs = [(7, 3, "tree", "float"), (256, 64, "tree", "float"), (1000, 64, "tree", "float"),
               (256, 64, "linear", "float"), (7, 3, "tree", "exact"), (1000, 9, "race", "exact")]
    modes = [(m, o) for m in kernels.CASTING_MODES for o in (0.0, 1.0, 0.3)]  # 0.3: rounded per dtype
    return [(*c, *m) for c in configs for m in modes]


@pytest.mark.slow
@pytest.mark.parametrize("hidden,chunk,topology,accumulate,mode,offset",
                         _full_cases() if FULL else _full_cases()[::27])
def test_semantics_full_matrix(interpreted: None, hidden: int, chunk: int, topology: str, accumulate: str,
                               mode: str, offset: float) -> None:
    for residual in (False, True):
        g, plan = semantics_graph(hidden, chunk, topology, accumulate, mode=mode, offset=offset, residual=residual)
        for dtype, kind in itertools.product(DTYPES, (None, "same", "other", torch.float32, torch.float64)):
            if kind is None and offset:
                continue
            x = spread_input(2, hidden, dtype, seed=hidden + 2)
            r = spread_input(2, hidden, dtype, seed=hidden + 3) if residual else None
            check_semantics(g, plan, x, weight_for(kind, dtype, hidden), r, compiled=False)


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("hidden,chunk,topology,accumulate", [(4096, 64, "tree", "float"), (1000, 9, "race", "exact")])
@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_modes_and_residual_match_cpu_reference(hidden: int, chunk: int, topology: str, accumulate: str,
                                                    mode: str, offset: float, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    g, plan = semantics_graph(hidden, chunk, topology, accumulate, mode=mode, offset=offset, residual=True)
    x = torch.cat([spread_input(61, hidden, dtype, seed=1), adversarial_rows(hidden, dtype)])
    r = torch.cat([spread_input(61, hidden, dtype, seed=2), adversarial_rows(hidden, dtype).flip(0)])
    for kind in ("same", torch.float32):
        w = weight_for(kind, dtype, hidden)
        assert w is not None
        h_dev = torch.empty_like(x.cuda())
        y_dev = run_triton(g, x.cuda(), w.cuda(), EPS, plan=plan, residual=r.cuda(), residual_out=h_dev)
        h_ref = torch.empty_like(x)
        y_ref = run_reference(g, x, w, EPS, residual=r, residual_out=h_ref)
        # NaN bits are the hardware's (x86 and CUDA make different default NaNs).
        assert_bits_equal_but_nan_payloads(h_dev.cpu(), h_ref, f"CUDA h vs CPU {plan}")
        assert_bits_equal_but_nan_payloads(y_dev.cpu(), y_ref, f"CUDA triton vs CPU reference {plan}")
        h_one = torch.empty_like(h_dev[:1])
        y_one = run_triton(g, x[:1].cuda(), w.cuda(), EPS, plan=plan, residual=r[:1].cuda(), residual_out=h_one)
        assert_bits_equal(y_one.cpu()[0], y_dev.cpu()[0], "batch invariance on the device")
