"""The triton executor: the reference's bits, checked in Triton's interpreter (CPU),
in the PTX the kernels compile to (CPU, no GPU needed), and on a GPU (``-m gpu``).

The interpreter runs the kernels' operations with numpy, so it checks the order
of every addition and the FINALIZE sequence; it does not model the GPU's
contraction or its square root.  Those are checked in the PTX (no fma, no
approximate or flush-to-zero instruction) and, on a device, by the ``gpu`` tests.
``TRITON_INTERPRET`` is set per test (monkeypatch): the rest of the suite never sees it.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import kernels
from taskgraph_norm.errors import ExecutionError
from taskgraph_norm.executors import reference_sum_of_squares, run_reference
from taskgraph_norm.lowering.lower import Plan, _builder_tree, lower
from taskgraph_norm.backends.triton import halving_positions, kernel_shape, run_triton, supports
from taskgraph_norm.backends.triton import layout, runner
from taskgraph_norm.graph import Graph
from .helpers import assert_bits_equal, bits_equal, run_compiled

from .conftest import FULL, gen

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def spread_input(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over six decades, so any change of summation order shows in the bits."""
    scale = torch.logspace(-3, 3, hidden)[torch.randperm(hidden, generator=gen(seed))]
    return (torch.randn(rows, hidden, generator=gen(seed + 1)) * scale).to(dtype)


def graph_and_plan(hidden: int, chunk: int, topology: str = "tree", accumulate: str = "float",
                   leaf: str = "pairwise") -> tuple[Graph, Plan]:
    g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology, leaf=leaf, accumulate=accumulate)
    return g, lower(g)


def check(g: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = run_triton(g, x, weight, eps, plan=plan)
    assert_bits_equal(y, run_reference(g, x, weight, eps), f"triton vs reference {plan}")
    return y


# -- the layout: folds perform the plan's additions (pure Python, no triton) --------


def halving_expr(items: list[str]) -> str:
    """kernels.pairwise_halving_'s additions, as an expression."""
    while len(items) > 1:
        half = (len(items) + 1) // 2
        items = [f"({items[i]}+{items[i + half]})" for i in range(len(items) - half)] + items[len(items) - half:half]
    return items[0]


def fold_expr(block: list[str | None], pairs: bool) -> str:
    """The kernels' folds over a padded block (``None`` is the +0 padding; x + 0 is x)."""
    def plus(a: str | None, b: str | None) -> str | None:
        return a if b is None else b if a is None else f"({a}+{b})"
    while len(block) > 1:
        w = len(block) // 2
        block = [plus(block[2 * i], block[2 * i + 1]) if pairs else plus(block[i], block[i + w]) for i in range(w)]
    assert block[0] is not None
    return block[0]


@pytest.mark.parametrize("length", range(1, 41))
def test_halving_positions_fold_in_the_reference_order(length: int) -> None:
    names = [f"s{i}" for i in range(length)]
    for width in (layout.next_pow2(length), 2 * layout.next_pow2(length)):
        block: list[str | None] = [None] * width
        for name, p in zip(names, halving_positions(length, width)):
            block[p] = name
        assert fold_expr(block, pairs=False) == halving_expr(names)
    # Negative control: the natural order folds differently (for these lengths).
    if length in (5, 6, 9, 10, 33):
        natural = names + [None] * (layout.next_pow2(length) - length)
        assert fold_expr(natural, pairs=False) != halving_expr(names)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 15, 143])
def test_pair_folds_are_the_builders_tree(n: int) -> None:
    slots = [f"p{i}" for i in range(n)]
    for level in _builder_tree(n):
        for dst, a, b in level:
            slots.append(f"({slots[a]}+{slots[b]})")
    block: list[str | None] = [f"p{i}" for i in range(n)]
    block += [None] * (layout.next_pow2(n) - n)
    assert fold_expr(block, pairs=True) == slots[-1]


def test_plans_the_kernels_refuse() -> None:
    assert supports(graph_and_plan(100, 7, "linear")[1])
    assert supports(graph_and_plan(100, 7, "race", "exact", leaf="native")[1])
    for topology, leaf in (("tree", "native"), ("cat", "pairwise")):
        plan = graph_and_plan(100, 7, topology, leaf=leaf)[1]
        assert not supports(plan)
        with pytest.raises(ExecutionError, match="torch.sum"):
            kernel_shape(plan)
    hand_made = Plan(hidden_size=4, chunk_size=1, n_full=4, tail=0, leaf="pairwise", accumulate="float",
                     merge="adds", adds=(((4, 0, 3), (5, 1, 2)), ((6, 4, 5),)), root=6)
    with pytest.raises(ExecutionError, match="executor='compiled'"):
        kernel_shape(hand_made)


# -- bits in the interpreter ----------------------------------------------------------

CONFIGS = [  # (D, chunk, topology, accumulate): chunks dividing D and not, ragged tails
    (1, 1, "tree", "float"), (7, 3, "tree", "float"), (7, 64, "tree", "float"),
    (64, 16, "tree", "float"), (64, 64, "tree", "float"), (100, 7, "tree", "float"),
    (100, 32, "tree", "float"), (256, 64, "tree", "float"), (1000, 64, "tree", "float"),
    (1000, 3, "tree", "float"), (7, 3, "linear", "float"), (100, 32, "linear", "float"),
    (256, 64, "linear", "float"), (1000, 100, "linear", "float"), (64, 32, "race", "float"),
    (7, 3, "tree", "exact"), (100, 7, "race", "exact"), (256, 64, "linear", "exact"),
    (1000, 64, "race", "exact"), (1000, 9, "tree", "exact"),
]


@pytest.mark.parametrize("hidden,chunk,topology,accumulate", CONFIGS,
                         ids=[f"D{d}-C{c}-{t}-{a}" for d, c, t, a in CONFIGS])
def test_bits_match_reference_and_compiled(interpreted: None, hidden: int, chunk: int, topology: str,
                                           accumulate: str) -> None:
    g, plan = graph_and_plan(hidden, chunk, topology, accumulate)
    w = 1 + 0.1 * torch.randn(hidden, generator=gen(9))
    for dtype, (weight, eps) in itertools.product(DTYPES, ((None, kernels.default_eps(torch.float32)), (w, 1e-6))):
        x = spread_input(3, hidden, dtype, seed=hidden)
        y = check(g, plan, x, weight, eps)
        assert_bits_equal(y, run_compiled(g, x, weight, eps), "triton vs compiled")


def adversarial_rows(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    x = spread_input(10, hidden, torch.float32, seed=3)
    x[0] = 0.0
    x[1] = info.smallest_normal / 4  # subnormal in every dtype
    x[2, ::2] = info.max / 2  # squares overflow fp32 for fp32 inputs: an Inf total
    x[3, hidden // 2] = float("inf")
    x[4, 0], x[4, -1] = float("inf"), -float("inf")
    x[5, hidden // 3] = float("nan")
    x[6] = -x[6]
    x[7, ::3] = info.smallest_normal  # tiny values among normal ones
    x[8] = info.tiny * torch.arange(hidden)  # zero and subnormal/tiny mixed
    return x.to(dtype)


@pytest.mark.parametrize("accumulate,topology", [("float", "tree"), ("float", "linear"), ("exact", "race")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_rows_match_reference(interpreted: None, accumulate: str, topology: str,
                                          dtype: torch.dtype) -> None:
    g, plan = graph_and_plan(100, 32, topology, accumulate)
    x = adversarial_rows(100, dtype)
    w = torch.linspace(-2, 2, 100)
    for weight, eps in ((None, 1e-6), (w, 0.0)):  # eps = 0: the zero row divides 0 by 0
        check(g, plan, x, weight, eps)


@pytest.mark.parametrize("accumulate,topology,chunk", [("float", "tree", 7), ("float", "linear", 32),
                                                        ("exact", "race", 7)])
def test_batch_invariance(interpreted: None, accumulate: str, topology: str, chunk: int) -> None:
    g, plan = graph_and_plan(100, chunk, topology, accumulate)
    batch = spread_input(32, 100, torch.float32, seed=11)
    whole = run_triton(g, batch, None, 1e-6, plan=plan)
    for i in (0, 31):
        alone = run_triton(g, batch[i : i + 1], None, 1e-6, plan=plan)
        assert_bits_equal(alone[0], whole[i], f"row {i} alone vs in a batch of 32")
    assert_bits_equal(run_triton(g, batch[1:4], None, 1e-6, plan=plan), whole[1:4])
    # Negative control: a batch-dependent choice of chunking would change these bits.
    other_g, other_plan = graph_and_plan(100, chunk + 1, topology, accumulate)
    if accumulate == "float":
        assert not bits_equal(run_triton(other_g, batch, None, 1e-6, plan=other_plan), whole)


def test_wrong_merge_order_or_layout_is_caught(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative controls: the bit comparison finds a kernel that adds in another order."""
    g, plan = graph_and_plan(300, 9, "tree")
    x = spread_input(32, 300, torch.float32, seed=5)
    check(g, plan, x, None, 1e-6)
    right = kernel_shape(plan)
    wrong_shapes = {
        "a left fold instead of the tree": layout.KernelShape("linear", 300, right.n_chunks, 16, right.n_chunks,
                                                                right.table[: right.n_chunks * 16]),
        "chunks in natural order": layout.KernelShape(
            "tree", 300, right.n_chunks, 16, right.chunks_width,
            tuple(k * 9 + i if i < 9 and k * 9 + i < 300 else -1
                  for k in range(right.chunks_width) for i in range(16))),
    }
    for what, shape in wrong_shapes.items():
        monkeypatch.setattr(runner, "kernel_shape", lambda _plan, shape=shape: shape)
        y = run_triton(g, x, None, 1e-6, plan=plan)
        assert not bits_equal(y, run_reference(g, x, None, 1e-6)), what


def test_reciprocal_finalize_would_differ(interpreted: None) -> None:
    """Negative control for FINALIZE: ``x * (1 / rms)`` from the same total differs
    from the kernel's ``x / rms`` in some bits, so the comparison would see it."""
    g, plan = graph_and_plan(1000, 64)
    x = spread_input(8, 1000, torch.float32, seed=7)
    y = check(g, plan, x, None, 1e-6)
    total = reference_sum_of_squares(g, x)
    rms = torch.sqrt((total / 1000 + 1e-6).double()).float()
    assert not bits_equal(x * (1 / rms), y)


def test_each_launch_patches_the_language_once_and_restores_it(interpreted: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # tests/_triton_interpreter.py: a helper inside a launch skips Triton's second patch;
    # each launch still patches triton.language itself and leaves it as it was.
    import triton.language as tl
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_patch_lang_core"):
        pytest.skip("this Triton's interpreter patches the language otherwise: the fixture leaves it alone")
    calls: dict[str, list[Any]] = {"_patch_lang": [], "_patch_lang_core": []}
    for name, seen in calls.items():  # the fixture's _patch_lang, and the patch it calls per launch
        monkeypatch.setattr(interpreter, name, lambda *a, real=getattr(interpreter, name), seen=seen:
                            seen.append(a) or real(*a))
    g, plan = graph_and_plan(96, 10, "linear")  # a kernel whose helpers are jit functions
    x = spread_input(3, 96, torch.float32)
    for _ in range(2):
        check(g, plan, x, None, 1e-6)
    assert len(calls["_patch_lang"]) > 100  # the launches and every helper call
    assert len(calls["_patch_lang_core"]) == 2  # the language was patched once per launch
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)


def test_shapes_out_and_layouts(interpreted: None) -> None:
    g, plan = graph_and_plan(100, 7)
    x = spread_input(6, 100, torch.float32, seed=2)
    ref = run_reference(g, x, None, 1e-6)
    out = torch.full_like(x, 7.0)
    assert run_triton(g, x, None, 1e-6, plan=plan, out=out) is out
    assert_bits_equal(out, ref)
    x3 = x.reshape(2, 3, 100)
    assert_bits_equal(run_triton(g, x3, None, 1e-6, plan=plan), ref.reshape(2, 3, 100))
    wide = torch.zeros(6, 200)
    wide[:, ::2] = x
    strided = wide[:, ::2]  # a strided last dim: copied, same bits
    assert_bits_equal(run_triton(g, strided, None, 1e-6, plan=plan), ref)
    col_major = x.t().contiguous().t()
    y = run_triton(g, col_major, None, 1e-6, plan=plan)
    assert y.stride() == col_major.stride()
    assert_bits_equal(y, ref)
    strided_out = torch.zeros(6, 200)[:, ::2]
    run_triton(g, x, None, 1e-6, plan=plan, out=strided_out)
    assert_bits_equal(strided_out, ref)
    assert run_triton(g, x[:0], None, 1e-6, plan=plan).shape == (0, 100)


def test_inputs_the_runner_refuses(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    g, plan = graph_and_plan(100, 7)
    with pytest.raises(ExecutionError, match="fp64 keeps the torch-ops plan"):
        run_triton(g, torch.ones(2, 100, dtype=torch.float64), None, 1e-6, plan=plan)
    with pytest.raises(ExecutionError, match="last dimension of 100"):
        run_triton(g, torch.ones(2, 99), None, 1e-6, plan=plan)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ExecutionError, match="TRITON_INTERPRET=1"):
        run_triton(g, torch.ones(2, 100), None, 1e-6, plan=plan)


def test_gradients_go_through_the_reference(interpreted: None) -> None:
    g, plan = graph_and_plan(100, 7)
    x = spread_input(2, 100, torch.float32).requires_grad_()
    y = run_triton(g, x, None, 1e-6, plan=plan)
    y.sum().backward()
    assert x.grad is not None
    assert_bits_equal(y.detach(), run_reference(g, x.detach(), None, 1e-6))


# -- the PTX the GPU would run (compiled here for sm_90; no GPU needed) ---------------


@pytest.mark.parametrize("hidden,chunk,topology,accumulate,dtype", [
    (4096, 64, "tree", "float", torch.bfloat16), (1000, 9, "tree", "float", torch.float32),
    (100, 7, "linear", "float", torch.float16), (1000, 64, "race", "exact", torch.float32),
])
def test_ptx_rounds_like_the_reference(hidden: int, chunk: int, topology: str, accumulate: str,
                                       dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from taskgraph_norm.backends.triton.ptx import forbidden_instructions, kernel_ptx

    plan = graph_and_plan(hidden, chunk, topology, accumulate)[1]
    ptx = kernel_ptx(plan, dtype, weight=True)
    assert forbidden_instructions(ptx) == []
    for needed in ("div.rn.f32", "sqrt.rn.f64", "cvt.rn.f32.f64", "add.rn.f32", "mul.rn.f32"):
        assert needed in ptx, needed
    if accumulate == "exact":
        # Negative control: with contraction on (Triton's default), x*x + sigma is an fma.
        fused = kernel_ptx(plan, dtype, weight=True, fp_fusion=True)
        assert any(line.startswith("fma.rn.f64") for line in forbidden_instructions(fused))


# -- the full matrix (TGN_FULL=1), and the device ---------------------------------------


def _full_configs() -> list[tuple[int, int, str, str]]:
    out = []
    for d, c, t, a in itertools.product((1, 7, 64, 100, 256, 1000), (1, 3, 16, 64, 100),
                                        ("tree", "linear", "race"), ("float", "exact")):
        n = -(-d // c)
        if (t == "race" and a == "float" and n > 2) or (t == "linear" and n > 64):
            continue  # refuted; or a fold too long for the interpreter's patience
        out.append((d, c, t, a))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("hidden,chunk,topology,accumulate", _full_configs() if FULL else _full_configs()[::9])
def test_bits_full_matrix(interpreted: None, hidden: int, chunk: int, topology: str, accumulate: str) -> None:
    g, plan = graph_and_plan(hidden, chunk, topology, accumulate)
    w = torch.randn(hidden, generator=gen(4)).to(torch.bfloat16)  # a narrower weight
    for dtype, rows in itertools.product(DTYPES, (1, 5)):
        x = spread_input(rows, hidden, dtype, seed=rows)
        check(g, plan, x, w, 1e-5)


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("hidden,chunk,topology,accumulate", [
    (4096, 64, "tree", "float"), (1000, 9, "tree", "float"), (4096, 256, "linear", "float"),
    (100, 7, "linear", "float"), (4096, 64, "race", "exact"), (1000, 9, "tree", "exact"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_bits_match_cpu_reference(hidden: int, chunk: int, topology: str, accumulate: str,
                                      dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    g, plan = graph_and_plan(hidden, chunk, topology, accumulate)
    w = 1 + 0.1 * torch.randn(hidden, generator=gen(9))
    x = torch.cat([spread_input(61, hidden, dtype, seed=1), adversarial_rows(hidden, dtype)])
    for weight, eps in ((None, 1e-6), (w, 0.0)):
        y = run_triton(g, x.cuda(), None if weight is None else weight.cuda(), eps, plan=plan).cpu()
        ref = run_reference(g, x, weight, eps)
        # NaN bits are the hardware's (x86 and CUDA make different default NaNs):
        # NaNs must sit in the same places, every other value has the same bits.
        nan = ref.isnan()
        assert torch.equal(y.isnan(), nan)
        assert_bits_equal(y[~nan], ref[~nan], f"CUDA triton vs CPU reference {plan}")
        alone = run_triton(g, x[:1].cuda(), None if weight is None else weight.cuda(), eps, plan=plan)
        assert_bits_equal(alone.cpu()[0], y[0], "batch invariance on the device")
