"""Every LayerNorm face -- sync, async, module, compiled (fullgraph), exported -- against
the reference interpreter's bits (int views), for fp32/bf16/fp16 at several shapes, one
torch thread and all, under grad, no_grad and inference_mode; batch invariance with a
negative control (issue 23)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import anyio
import pytest
import torch
import torch.nn.functional as F

import taskgraph_norm as tgn
from taskgraph_norm.kernels.reference import run_reference
from taskgraph_norm.prover.witness import bits
from taskgraph_norm.topologies import build_layer_graph

# torch 2.13's inductor touches torch.jit.script_method on its first compile (its warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

SHAPES = ((5, 100), (300, 4096), (2000, 1024))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-5


@pytest.fixture(params=[1, "all"], ids=["1thread", "allthreads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(1 if request.param == 1 else max(before, 2))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _inputs(rows: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    x = (torch.randn(rows, hidden, generator=g) * 2 + 3).to(dtype)
    return x, torch.randn(hidden, generator=g).to(dtype), torch.randn(hidden, generator=g).to(dtype)


def _module(hidden: int, w: torch.Tensor, b: torch.Tensor) -> tgn.LayerNorm:
    m = tgn.LayerNorm(hidden, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eager_faces_are_the_reference(shape: tuple[int, int], dtype: torch.dtype, threads: int) -> None:
    rows, hidden = shape
    x, w, b = _inputs(rows, hidden, dtype)
    want = bits(run_reference(build_layer_graph(hidden), x, w, EPS, bias=b))
    m = _module(hidden, w, b)
    for mode in ("grad", "no_grad", "inference"):
        ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]()
        with ctx:
            assert torch.equal(bits(tgn.layer_norm_sync(x, w, b)), want), mode
            assert torch.equal(bits(anyio.run(lambda: tgn.layer_norm(x, w, b))), want), mode
            assert torch.equal(bits(m(x)), want), mode  # (parameters require grad: the op under grad)
    xg = x.clone().requires_grad_()
    assert torch.equal(bits(tgn.layer_norm_sync(xg, w, b).detach()), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_and_exported_module_are_the_reference(dtype: torch.dtype) -> None:
    rows, hidden = 300, 4096
    x, w, b = _inputs(rows, hidden, dtype)
    want = bits(run_reference(build_layer_graph(hidden), x, w, EPS, bias=b))
    m = _module(hidden, w, b)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(bits(compiled(x)), want)
    assert torch.equal(bits(compiled(x).detach()), want)  # under grad: the op with its autograd
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0
    exported = torch.export.export(m, (x,))
    assert torch.equal(bits(exported.module()(x).detach()), want)
    assert any("layer_norm" in str(n.target) for n in exported.graph.nodes)


def test_compiled_functional_face_with_residual() -> None:
    x, w, b = _inputs(16, 256, torch.bfloat16)
    r = _inputs(16, 256, torch.bfloat16)[0].flip(0)

    def f(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = tgn.layer_norm_sync(x, w, b, residual=r, chunk_size=32)
        return y, h

    want_y, want_h = f(x, r)
    torch._dynamo.reset()
    got_y, got_h = torch.compile(f, fullgraph=True)(x, r)
    assert torch.equal(bits(got_y), bits(want_y)) and torch.equal(got_h, want_h)


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_invariance(accumulate: str, dtype: torch.dtype) -> None:
    x, w, b = _inputs(1000, 1024, dtype)
    batch = tgn.layer_norm_sync(x, w, b, accumulate=accumulate)
    for i in (0, 1, 499, 999):
        alone = tgn.layer_norm_sync(x[i:i + 1], w, b, accumulate=accumulate)
        assert torch.equal(bits(alone[0]), bits(batch[i]))
    # and under a gradient: the op's forward and its dx are per-row too
    xg = x[:64].clone().requires_grad_()
    dy = torch.randn(64, 1024).to(dtype)
    tgn.layer_norm_sync(xg, w, b, accumulate=accumulate).backward(dy)
    one = x[5:6].clone().requires_grad_()
    tgn.layer_norm_sync(one, w, b, accumulate=accumulate).backward(dy[5:6])
    assert xg.grad is not None and one.grad is not None
    assert torch.equal(bits(xg.grad[5]), bits(one.grad[0]))


def test_negative_control_finds_a_difference() -> None:
    # A float race over many chunks: some arrival order changes some row's bits, and a
    # different chunk size does too (the invariance above is not vacuous).
    hidden, chunk = 1024, 16
    x, w, b = _inputs(64, hidden, torch.float32)
    graph = build_layer_graph(hidden, chunk_size=chunk, topology="race")
    base = bits(run_reference(graph, x, w, EPS, bias=b))
    n = hidden // chunk
    g = torch.Generator().manual_seed(3)
    found = False
    for _ in range(20):
        order = torch.randperm(n, generator=g).tolist()
        arrival = {"mean.accumulate": order, "var.accumulate": order}
        if not torch.equal(bits(run_reference(graph, x, w, EPS, bias=b, arrival=arrival)), base):
            found = True
            break
    assert found
    assert not torch.equal(bits(tgn.layer_norm_sync(x, w, b, chunk_size=16)),
                           bits(tgn.layer_norm_sync(x, w, b, chunk_size=64)))


def test_compiled_f_layer_norm_for_comparison() -> None:
    # Informational: torch.compile(F.layer_norm) is not asked to be batch-invariant; we
    # only record whether a row alone differs from the row in a batch (no assertion on it).
    x, w, b = _inputs(1000, 1024, torch.float32)
    torch._dynamo.reset()
    f = torch.compile(lambda t: F.layer_norm(t, (1024,), w, b, EPS))
    batch = f(x)
    differs = [not torch.equal(bits(f(x[i:i + 1])[0]), bits(batch[i])) for i in (0, 500, 999)]
    print(f"torch.compile(F.layer_norm) row alone vs batch: {sum(differs)}/3 rows differ")
    torch.testing.assert_close(batch, F.layer_norm(x, (1024,), w, b, EPS))


@pytest.mark.parametrize("topology,leaf,accumulate", list(itertools.product(
    ["linear", "tree", "cat"], ["pairwise", "native"], ["float", "exact"])))
def test_module_options_reach_the_reference(topology: str, leaf: str, accumulate: str) -> None:
    x, w, b = _inputs(7, 300, torch.bfloat16)
    m = tgn.LayerNorm(300, dtype=torch.bfloat16, topology=topology, chunk_size=48, leaf=leaf, accumulate=accumulate)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    graph = build_layer_graph(300, chunk_size=48, topology=topology, leaf=leaf, accumulate=accumulate)
    want = bits(run_reference(graph, x, w, EPS, bias=b))
    with torch.no_grad():
        assert torch.equal(bits(m(x)), want)
    assert torch.equal(bits(m(x).detach()), want)
