"""LayerNorm's Triton kernels (the forward of float and exact plans) in Triton's
interpreter on CPU: the torch-ops backend's bits (``y``, ``mean``, ``den``), with
negative controls; their PTX.  ``TRITON_INTERPRET`` is set per test, as in
tests/test_triton.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends import base as backends_base
from taskgraph_norm.backends.registry import NoBackendError
from taskgraph_norm.backends.torch_ops import layer as torch_layer
from taskgraph_norm.backends.triton import layer as triton_layer
from taskgraph_norm.backends.triton import layout
from taskgraph_norm.executors import run_reference
from taskgraph_norm.pipeline.layer import layer_pipeline

from .helpers import assert_bits_equal, bits_equal
from .test_triton import DTYPES, spread_input

#: (hidden, chunk, topology): natural layouts, tables (a ragged tail, odd chunks), one chunk.
CASES = [(256, 64, "tree"), (100, 32, "tree"), (300, 64, "linear"), (96, 10, "linear"), (7, 64, "tree"),
         (130, 16, "tree")]


def inputs(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    x = (spread_input(rows, hidden, torch.float32, seed).double() + 3.0).to(dtype)  # a mean to subtract
    g = torch.Generator().manual_seed(seed + 7)
    w = torch.randn(hidden, generator=g).to(dtype)
    b = torch.randn(hidden, generator=g).to(dtype)
    return x, w, b


def check(plan: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, label: str) -> None:
    """The kernel's ``y``, ``mean`` and ``den`` have the torch-ops backend's bits."""
    want = torch_layer.run_layer(plan, x, weight, bias, 1e-5, stats=True)
    got = triton_layer.run_triton_layer(plan, x, weight, bias, 1e-5, stats=True)
    assert_bits_equal(got.y, want.y, label)
    assert got.mean is not None and got.den is not None and want.mean is not None and want.den is not None
    assert_bits_equal(got.mean, want.mean, label + " mean")
    assert_bits_equal(got.den, want.den, label + " den")


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("hidden, chunk, topology", CASES)
def test_kernel_gives_the_torch_ops_bits(hidden: int, chunk: int, topology: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[str] = []
    launch = triton_layer._launch
    monkeypatch.setattr(triton_layer, "_launch", lambda *a: launched.append("kernel") or launch(*a))
    plan = layer_pipeline(hidden, chunk, topology).plan
    assert plan is not None
    for dtype in DTYPES:
        x, w, b = inputs(6, hidden, dtype)
        x[1] = -0.0  # a row of -0.0: the padding must add nothing, not turn -0.0 into +0.0
        x[2, : hidden // 2] = -x[2, : hidden // 2].abs()
        for weight, bias in ((w, b), (w, None), (None, None)):
            check(plan, x, weight, bias, f"{dtype} D={hidden} C={chunk} {topology} w={weight is not None}"
                  f" b={bias is not None}")
        if dtype == torch.float32:  # and the reference interpreter's, on the graph
            graph = tgn.topologies.build_layer_graph(hidden, chunk_size=chunk, topology=topology)
            assert_bits_equal(triton_layer.run_triton_layer(plan, x, w, b, 1e-5).y,
                              run_reference(graph, x, w, 1e-5, bias=b))
    assert len(launched) == 3 * 3 + 1  # every call above ran the kernel


@pytest.mark.usefixtures("interpreted")
def test_the_check_finds_a_kernel_that_merges_in_another_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # Negative control: launch the left fold's kernel for a tree plan.
    plan = layer_pipeline(256, 16, "tree").plan
    assert plan is not None
    x, w, b = inputs(8, 256, torch.float32, seed=3)
    want = torch_layer.run_layer(plan, x, w, b, 1e-5).y
    assert bits_equal(triton_layer.run_triton_layer(plan, x, w, b, 1e-5).y, want)
    linear = layout.kernel_shape(layer_pipeline(256, 16, "linear").plan)
    monkeypatch.setattr(triton_layer, "kernel_shape", lambda p: linear)
    assert not bits_equal(triton_layer.run_triton_layer(plan, x, w, b, 1e-5).y, want)


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_non_finite_rows_strided_input_and_out(accumulate: str) -> None:
    plan = layer_pipeline(100, 32, "tree", "pairwise", accumulate).plan
    assert plan is not None
    x, w, b = inputs(5, 100, torch.bfloat16, seed=5)
    x[0, 3] = float("inf")
    x[1, 50] = float("nan")
    x[2] = 0.0  # a zero row with eps = 0: den = 0, y = 0 / 0
    x[3, 7] = float("-inf")
    want = torch_layer.run_layer(plan, x, w, b, 0.0, stats=True)
    got = triton_layer.run_triton_layer(plan, x, w, b, 0.0, stats=True)
    assert_bits_equal(got.y, want.y)
    assert got.den is not None and want.den is not None and bits_equal(got.den, want.den)
    wide = torch.cat([x, x], dim=-1)[:, ::2]  # strided rows
    out = torch.empty(5, 100, dtype=torch.bfloat16)
    y = triton_layer.run_triton_layer(plan, wide, w, b, 1e-5, out=out).y
    assert y is out and bits_equal(out, torch_layer.run_layer(plan, wide.contiguous(), w, b, 1e-5).y)


@pytest.mark.usefixtures("interpreted")
def test_the_faces_run_it_by_name_and_are_batch_invariant() -> None:
    x, w, b = inputs(9, 130, torch.float16, seed=2)
    y = tgn.layer_norm_sync(x, w.float(), b.float(), chunk_size=16, executor="triton")
    assert bits_equal(y, tgn.layer_norm_sync(x, w.float(), b.float(), chunk_size=16))
    for r in (0, 4, 8):
        assert bits_equal(tgn.layer_norm_sync(x[r:r + 1], w.float(), b.float(), chunk_size=16, executor="triton"),
                          y[r:r + 1])
    exact = tgn.layer_norm_sync(x, w.float(), b.float(), accumulate="exact", executor="triton")
    assert bits_equal(exact, tgn.layer_norm_sync(x, w.float(), b.float(), accumulate="exact"))
    with pytest.raises(NoBackendError, match="cat"):
        tgn.layer_norm_sync(x, w.float(), b.float(), topology="cat", executor="triton")
    r = inputs(9, 130, torch.float16, seed=4)[0]
    y2, h = tgn.layer_norm_sync(x, w.float(), b.float(), chunk_size=16, residual=r, executor="triton")
    want_y, want_h = tgn.layer_norm_sync(x, w.float(), b.float(), chunk_size=16, residual=r)
    assert bits_equal(y2, want_y) and bits_equal(h, want_h)
    with backends_base.use("triton", "torch_ops"):  # by choice: triton takes the float plan
        pipe = layer_pipeline(130, 16, "tree")
        assert pipe.backend(x.device, x.dtype).name == "triton"


def hard_rows(hidden: int) -> torch.Tensor:
    """Rows whose exact mean sits on or next to an fp32 rounding boundary: where rounding
    ``RN64(S1 + S2) / D`` to fp32 gives another value than the correctly rounded mean."""
    rows = torch.zeros(4, hidden, dtype=torch.float64)
    rows[0, :3] = torch.tensor([1.0, 2.0**-24, 2.0**-70])  # kernels.layer.mean_exact's example (D = 4)
    rows[1, :3] = torch.tensor([1.0, -(2.0**-24), -(2.0**-70)])
    rows[2, :2] = torch.tensor([3.0 * 2.0**20, 1.0 + 2.0**-23])
    rows[3] = torch.linspace(-1.0, 1.0, hidden, dtype=torch.float64) * 2.0**-30 + 7.0
    return rows.float()


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("hidden, chunk, topology", [(4, 2, "tree"), (256, 64, "race"), (100, 7, "linear"),
                                                     (4099, 64, "tree")])
def test_exact_kernel_gives_the_torch_ops_bits(hidden: int, chunk: int, topology: str) -> None:
    plan = layer_pipeline(hidden, chunk, topology, "pairwise", "exact").plan
    assert plan is not None
    for dtype in DTYPES:
        x, w, b = inputs(5, hidden, dtype, seed=hidden)
        x = torch.cat([x, hard_rows(hidden).to(dtype), torch.full((1, hidden), -0.0, dtype=dtype)])
        for weight, bias in ((w, b), (None, None)):
            check(plan, x, weight, bias, f"exact {dtype} D={hidden}")


@pytest.mark.usefixtures("interpreted")
def test_the_exact_mean_is_correctly_rounded_where_double_rounding_is_not() -> None:
    # Negative control: on these rows RN32(RN64(S1 + S2) / D) is another fp32 value than
    # the correctly rounded mean, which the kernel gives.
    x = hard_rows(4)[:2]
    plan = layer_pipeline(4, 2, "tree", "pairwise", "exact").plan
    got = triton_layer.run_triton_layer(plan, x, None, None, 1e-5, stats=True).mean
    exact = x.double().sum(-1, keepdim=True) / 4  # exact here: few terms, far apart
    twice = (x.double().sum(-1, keepdim=True) / 4).float()
    assert got is not None and not bits_equal(got, twice)
    assert bits_equal(got, torch_layer.run_layer(plan, x, None, None, 1e-5, stats=True).mean)
    assert ((got.double() - exact).abs() <= (twice.double() - exact).abs()).all()


def test_without_the_interpreter_cpu_tensors_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan: Any = layer_pipeline(64, 16, "tree").plan
    with pytest.raises(tgn.ExecutionError, match="TRITON_INTERPRET"):
        triton_layer.run_triton_layer(plan, torch.ones(2, 64), None, None, 1e-5)


@pytest.mark.parametrize("hidden, chunk, topology, accumulate, dtype", [
    (4096, 64, "tree", "float", torch.bfloat16), (1000, 9, "tree", "float", torch.float32),
    (100, 7, "linear", "float", torch.float16), (1000, 64, "race", "exact", torch.float32),
])
def test_ptx_rounds_like_the_reference(hidden: int, chunk: int, topology: str, accumulate: str,
                                       dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from taskgraph_norm.backends.triton.ptx import forbidden_instructions, layer_ptx

    plan = layer_pipeline(hidden, chunk, topology, "pairwise", accumulate).plan
    ptx = layer_ptx(plan, dtype)
    assert forbidden_instructions(ptx) == []
    for needed in ("div.rn.f32", "sqrt.rn.f64", "cvt.rn.f32.f64", "add.rn.f32", "mul.rn.f32", "sub.rn.f32"):
        assert needed in ptx, needed
    if accumulate == "exact":
        assert "div.rn.f64" in ptx
    # Negative control: with contraction on (Triton's default), products meet sums as fmas
    # (d * d + ..., y * w + b; the exact kernel's Veltkamp split and pre-rounding).
    fused = forbidden_instructions(layer_ptx(plan, dtype, fp_fusion=True))
    assert any(line.startswith("fma.rn.f") for line in fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hidden, chunk, topology, accumulate", [
    (4096, 64, "tree", "float"), (1000, 9, "tree", "float"), (4096, 256, "linear", "float"), (100, 7, "linear", "float"),
    (4096, 64, "race", "exact"), (1000, 9, "tree", "exact")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_bits_match_cpu_torch_ops(hidden: int, chunk: int, topology: str, accumulate: str,
                                      dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    plan = layer_pipeline(hidden, chunk, topology, "pairwise", accumulate).plan
    x, w, b = inputs(61, hidden, dtype, seed=1)
    x = torch.cat([x, hard_rows(hidden).to(dtype)])
    x[3, 5] = float("inf")
    want = torch_layer.run_layer(plan, x, w, b, 1e-5, stats=True)
    got = triton_layer.run_triton_layer(plan, x.cuda(), w.cuda(), b.cuda(), 1e-5, stats=True)
    nan = want.y.isnan()  # NaN bits are the hardware's: the same places, every other value the same bits
    assert torch.equal(got.y.cpu().isnan(), nan)
    assert_bits_equal(got.y.cpu()[~nan], want.y[~nan], f"CUDA triton vs CPU torch ops {plan}")
    assert got.den is not None and want.den is not None and bits_equal(got.den.cpu(), want.den)
    alone = triton_layer.run_triton_layer(plan, x[:1].cuda(), w.cuda(), b.cuda(), 1e-5).y
    assert_bits_equal(alone.cpu(), got.y.cpu()[:1], "batch invariance on the device")
