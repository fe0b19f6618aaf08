"""The torch.library ops: schema and fake rules, autograd, the native backward's bits
against the oracle (kernels.py's backward over the reference interpreter), batch
invariance of dx with a negative control, dW determinism."""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.registry import BACKENDS
from taskgraph_norm.errors import ConfigError
from taskgraph_norm import kernels, ops
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.kernels.reference import reference_sum_of_squares
from taskgraph_norm.backends.torch_ops.rowsum import reference_row_sum

from .helpers import assert_bits_equal, backend_backward, bits_equal

#: (hidden, options): float trees and folds, a ragged last chunk, a single chunk,
#: native leaves, a cat merge, exact accumulation, an uncertified race (reference
#: order), and torch's own kernel.
CONFIGS = [
    (96, dict(topology="tree", chunk_size=16)),
    (100, dict(topology="tree", chunk_size=16)),
    (100, dict(topology="linear", chunk_size=8)),
    (40, dict(topology="tree", chunk_size=64)),
    (100, dict(topology="tree", chunk_size=16, leaf="native")),
    (100, dict(topology="cat", chunk_size=16)),
    (100, dict(topology="tree", chunk_size=16, accumulate="exact")),
    (100, dict(topology="race", chunk_size=16, accumulate="exact")),
    (100, dict(topology="race", chunk_size=16)),
]
IDS = [f"{d}-" + "-".join(str(v) for v in o.values()) for d, o in CONFIGS]


def oracle(graph: tgn.Graph, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None,
           eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx, dW)`` by kernels.py's backward over the reference interpreter."""
    hidden = x.shape[-1]
    acc = kernels.accumulation_dtype(x.dtype)
    rms = kernels.finalize_rms(reference_sum_of_squares(graph, x), hidden, eps, acc)
    xa, g = kernels.grad_operands(x, dy, w)
    exact = tgn.Op.SCALE in graph.ops
    v = g.double() * xa.double() if exact else g * xa
    dx = kernels.input_grad(xa, g, rms, reference_row_sum(graph, v), x.dtype)
    dw = None if w is None else kernels.weight_grad_float(x, dy, rms, w.dtype)
    return dx, dw


def grads(x: torch.Tensor, w: torch.Tensor | None, dy: torch.Tensor, **opts: object) -> tuple[torch.Tensor, ...]:
    xg = x.detach().clone().requires_grad_()
    wg = None if w is None else w.detach().clone().requires_grad_()
    y = ops.rms_norm(xg, wg, None, **opts)  # type: ignore[arg-type]
    y.backward(dy)
    assert xg.grad is not None
    return (y.detach(), xg.grad) + (() if wg is None else (wg.grad,))  # type: ignore[operator]


# --- schema, fake and autograd rules -------------------------------------------------


@pytest.mark.parametrize("weighted", [True, False])
def test_opcheck(weighted: bool) -> None:
    x = torch.randn(3, 20, requires_grad=True)
    w = torch.randn(20, requires_grad=True) if weighted else None
    config = (8, "tree", "pairwise", "float", "torch", 0.0)
    torch.library.opcheck(ops.rms_norm_op, (x, w, 1e-6, *config))
    torch.library.opcheck(ops.rms_norm_residual_op, (x, torch.randn(3, 20, requires_grad=True), w, 1e-6, *config))
    rms = torch.rand(3, 1) + 0.5
    torch.library.opcheck(ops.rms_norm_backward_op,
                          (torch.randn(3, 20), x.detach(), w, rms, *config, "float", [True, weighted]))


def test_fake_tensors_never_reach_the_kernels() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(4, 64))
        y, rms = ops.rms_norm_op(x, None, 1e-6, 8, "tree", "pairwise", "float", "torch", 0.0)
    assert y.shape == (4, 64) and rms.shape == (4, 1) and rms.dtype == torch.float32


def test_bad_options_are_clear_errors() -> None:
    x = torch.randn(2, 16)
    with pytest.raises(tgn.ConfigError, match="casting_mode"):
        ops.rms_norm_op(x, None, 1e-6, 8, "tree", "pairwise", "float", "llama2", 0.0)
    with pytest.raises(tgn.ConfigError, match="topology"):
        ops.rms_norm(x, topology="nope")
    with pytest.raises(tgn.ConfigError, match="weight_grad"):
        ops.rms_norm_backward_op(x, x, None, torch.ones(2, 1), 8, "tree", "pairwise", "float", "torch", 0.0,
                                 "bogus", [True, False])
    with pytest.raises(RuntimeError):  # F.rms_norm's error type for a wrong weight shape
        ops.rms_norm(x, torch.ones(3))


# --- forward bits --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("hidden", "opts"), CONFIGS, ids=IDS)
def test_forward_bits_and_rms(hidden: int, opts: dict[str, object], dtype: torch.dtype) -> None:
    x = torch.randn(7, hidden, dtype=dtype)
    w = torch.randn(hidden, dtype=dtype)
    eps = kernels.default_eps(dtype)
    y, rms = ops.rms_norm_op(x, w, eps, opts["chunk_size"], opts["topology"], opts.get("leaf", "pairwise"),
                             opts.get("accumulate", "float"), "torch", 0.0)
    assert_bits_equal(y, tgn.normalize_sync(x, w, **opts))  # type: ignore[arg-type]
    graph = tgn.build_graph(hidden, **opts)  # type: ignore[arg-type]
    expected = kernels.finalize_rms(reference_sum_of_squares(graph, x), hidden, eps, kernels.accumulation_dtype(dtype))
    assert_bits_equal(rms, expected)


@pytest.mark.parametrize("shape", [(1, 4096), (64, 4096), (3, 5, 96)])
def test_grad_enabled_output_bits_equal_no_grad_bits(shape: tuple[int, ...]) -> None:
    norm = tgn.RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape)
    with torch.no_grad():
        plain = norm(x)
    traced = norm(x.requires_grad_())
    assert traced.grad_fn is not None
    assert_bits_equal(traced, plain)
    assert_bits_equal(tgn.normalize_sync(x, norm.weight), plain)


# --- the backward against the oracle -------------------------------------------------


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "torch-ops"])
@pytest.mark.parametrize(("hidden", "opts"), CONFIGS, ids=IDS)
def test_backward_bits_match_the_oracle(hidden: int, opts: dict[str, object], native_on: bool) -> None:
    rows = 70  # two full row blocks and a ragged one
    x, w, dy = torch.randn(rows, hidden), torch.randn(hidden), torch.randn(rows, hidden)
    x[3] *= 1e-3
    if native_on:
        assert native.available()
        _, dx, dw = grads(x, w, dy, **opts)
    else:
        with native.disabled():
            _, dx, dw = grads(x, w, dy, **opts)
    want_dx, want_dw = oracle(tgn.build_graph(hidden, **opts), x, dy, w, kernels.default_eps(x.dtype))  # type: ignore[arg-type]
    assert_bits_equal(dx, want_dx)
    assert_bits_equal(dw, want_dw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
def test_backward_other_dtypes_match_the_oracle(dtype: torch.dtype) -> None:
    opts = dict(topology="tree", chunk_size=16)
    x, w, dy = (torch.randn(40, 100, dtype=dtype), torch.randn(100, dtype=dtype), torch.randn(40, 100, dtype=dtype))
    _, dx, dw = grads(x, w, dy, **opts)
    want_dx, want_dw = oracle(tgn.build_graph(100, **opts), x, dy, w, kernels.default_eps(dtype))  # type: ignore[arg-type]
    assert_bits_equal(dx, want_dx)
    assert_bits_equal(dw, want_dw)


def test_backward_without_weight_and_with_weight_only() -> None:
    x, dy = torch.randn(5, 64), torch.randn(5, 64)
    _, dx = grads(x, None, dy, chunk_size=8)
    assert_bits_equal(dx, oracle(tgn.build_graph(64, chunk_size=8), x, dy, None, kernels.default_eps(x.dtype))[0])
    w = torch.ones(64, requires_grad=True)
    y = ops.rms_norm(x, w, chunk_size=8)  # x needs no grad: only dW
    y.backward(dy)
    assert w.grad is not None and x.grad is None


def test_non_finite_rows_take_the_torch_path_with_its_bits() -> None:
    x, w, dy = torch.randn(6, 64), torch.randn(64), torch.randn(6, 64)
    x[1, 5] = float("inf")
    dy[2, 0] = float("nan")
    _, dx, dw = grads(x, w, dy, chunk_size=8)
    with native.disabled():
        _, dx2, dw2 = grads(x, w, dy, chunk_size=8)
    assert_bits_equal(dx, dx2)
    assert_bits_equal(dw, dw2)


# --- invariance and determinism ------------------------------------------------------


@pytest.mark.parametrize("opts", [dict(topology="tree"), dict(topology="linear", chunk_size=32),
                                  dict(accumulate="exact")], ids=["tree", "linear", "exact"])
def test_dx_is_batch_invariant(opts: dict[str, object]) -> None:
    batch, w, dy = torch.randn(37, 4096), torch.randn(4096), torch.randn(37, 4096)
    _, dx_batch, _ = grads(batch, w, dy, **opts)
    for i in (0, 17, 36):
        _, dx_row, _ = grads(batch[i : i + 1], w, dy[i : i + 1], **opts)
        assert_bits_equal(dx_row[0], dx_batch[i])


def test_dx_negative_control_finds_a_batch_dependent_chunking() -> None:
    """A row alone with another chunking than its batch: the same comparison must fail."""
    batch, w, dy = torch.randn(37, 4096), torch.randn(4096), torch.randn(37, 4096)
    _, dx_batch, _ = grads(batch, w, dy, chunk_size=64)
    differs = [not bits_equal(grads(batch[i : i + 1], w, dy[i : i + 1], chunk_size=32)[1][0], dx_batch[i])
               for i in range(8)]
    assert any(differs)


def test_dw_is_deterministic_and_its_order_is_seen() -> None:
    x, w, dy = torch.randn(300, 256), torch.randn(256), torch.randn(300, 256)
    first = grads(x, w, dy)[2]
    for _ in range(3):
        assert_bits_equal(grads(x, w, dy)[2], first)
    # negative control: the same rows in another order go through another merge order
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert not bits_equal(grads(x[perm], w, dy[perm])[2], first)


# --- gradcheck --------------------------------------------------------------------------


@pytest.mark.parametrize(("hidden", "opts"), CONFIGS + [(12, dict(topology="standard", chunk_size=4))],
                         ids=IDS + ["standard"])
def test_gradcheck_and_gradgradcheck_fp64(hidden: int, opts: dict[str, object]) -> None:
    hidden = min(hidden, 24)
    x = torch.randn(3, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(hidden, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: ops.rms_norm(a, b, 1e-5, **opts)  # type: ignore[arg-type]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))
    r = torch.randn(3, hidden, dtype=torch.float64, requires_grad=True)
    res = lambda a, b, c: ops.rms_norm_residual(a, b, c, 1e-5, **opts)  # type: ignore[arg-type]  # noqa: E731
    assert torch.autograd.gradcheck(res, (x, r, w))


def test_residual_bits() -> None:
    x, r, w = torch.randn(9, 96, dtype=torch.bfloat16), torch.randn(9, 96), torch.randn(96, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="residual"):  # h is x's dtype: never promoted, as on every face
        ops.rms_norm_residual(x, r, w, chunk_size=16)
    with pytest.raises(ConfigError, match="residual"):  # nor broadcast
        ops.rms_norm_residual(x, r[0].bfloat16(), w, chunk_size=16)
    r = r.bfloat16()
    y, h = ops.rms_norm_residual(x, r, w, chunk_size=16)
    assert h.dtype == torch.bfloat16
    assert_bits_equal(h, x + r)
    assert_bits_equal(y, tgn.normalize_sync(h, w, chunk_size=16))


def _native_backward_has_torch_bits(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, chunk: int = 64,
                                    topology: str = "tree", accumulate: str = "float") -> torch.Tensor:
    """The C backward's dx (and dW, given a weight) against the torch ops', bit for bit,
    given the forward's rms (returned: a test may check it)."""
    from taskgraph_norm import pipeline
    from taskgraph_norm.ops import backward as bw

    pipe = pipeline.for_config(x.shape[-1], chunk, topology, "pairwise", accumulate, "auto")
    _, rms = ops.rms_norm_op(x, w, 1e-6, chunk, topology, "pairwise", accumulate, "torch", 0.0)
    found = BACKENDS["native"].backward_rows(pipe.plan, dy, x, w, rms, True, w is not None)
    assert found is not None
    want = backend_backward("torch_ops", pipe, dy, x, w, rms, True, w is not None)
    assert_bits_equal(found[0], want[0])
    if w is not None:
        assert_bits_equal(found[1], want[1])
    return rms


@pytest.mark.parametrize("opts", [dict(topology="tree"), dict(topology="linear", chunk_size=48),
                                  dict(accumulate="exact")], ids=["tree", "linear", "exact"])
def test_native_backward_runs_split_with_the_torch_ops_bits(opts: dict[str, object]) -> None:
    """Large enough to split over two threads (whole row blocks each side)."""
    rows, hidden = 601, 1000
    from taskgraph_norm.backends import registry
    assert rows * hidden >= registry.BACKWARD_SPLIT_NUMEL
    x, w, dy = torch.randn(rows, hidden), torch.randn(hidden), torch.randn(rows, hidden)
    _native_backward_has_torch_bits(x, dy, w, int(opts.get("chunk_size", 64)), str(opts.get("topology", "tree")),
                                    str(opts.get("accumulate", "float")))


@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_native_backward_quotients_on_hard_rows_have_the_torch_ops_bits(accumulate: str) -> None:
    """The C backward's g / r and x / r come from native_quotient.h's fma quotient (the
    divider outside its range): rows of scales 2**-70 to 2**50, zeros of both signs,
    subnormals, and a width off the vector lanes give the torch ops' bits."""
    rows, hidden = 40, 1003
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    x *= torch.exp2(torch.linspace(-70, 50, rows)).unsqueeze(1)
    x[3, ::7] = 0.0
    x[4, ::5] = -0.0
    x[5, ::3] = 1e-41  # subnormal
    dy[6, ::4] = -0.0
    w = torch.randn(hidden, generator=g)
    _native_backward_has_torch_bits(x, dy, w, accumulate=accumulate)


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("chunk", [16, 32, 64, 128, 256, 48])
def test_native_backward_dot_in_every_chunk_size(chunk: int, weighted: bool) -> None:
    """The C backward sums s = sum(g * x) eight power-of-two chunks at a time, forming
    the products g * x = (dy * w) * x as it loads them (native_sums.c's
    tgn_chunk_dots_f32: the forward's add network), the rest one by one: every chunk
    size, with and without a weight, with whole groups of eight and tails, over values
    of many magnitudes (so any other pairing of the additions, or a product fused into
    an fma, rounds differently), gives the torch ops' bits."""
    hidden = chunk * 19 + 5  # two groups of eight chunks, three more, and a tail
    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(37, hidden, generator=g) * torch.exp2(torch.randint(-12, 12, (37, hidden), generator=g).float())
    dy, w = torch.randn(37, hidden, generator=g), torch.randn(hidden, generator=g)
    _native_backward_has_torch_bits(x, dy, w if weighted else None, chunk)


def test_native_backward_quotients_on_subnormal_ties() -> None:
    """A row whose rms is exactly 98 and whose g = dy * w and x are k 49 2**-149 (k odd):
    g / r and x / r land exactly on subnormal rounding midpoints, where only IEEE
    division's ties-to-even is right (a quotient formed outside the fma quotient's range
    fails here)."""
    hidden = 4096
    ties = (torch.arange(1, 2 * hidden - 1, 2, dtype=torch.float64)[: hidden - 1] * 49.0 * 2.0**-149).float()
    x = torch.zeros(2, hidden)
    x[:, 0] = 6272.0  # sum of squares / 4096 = 9604 = 98**2
    x[:, 1:] = ties
    dy = torch.zeros(2, hidden)
    dy[:, 1:] = ties
    w = torch.ones(hidden)
    rms = _native_backward_has_torch_bits(x, dy, w)
    assert float(rms[0]) == 98.0


def test_registered_autograd_of_the_op_matches_eager_autograd() -> None:
    """The op's own autograd (what torch.compile and export use) and EagerRMSNorm (what
    eager autograd runs) give the same bits, forward and backward; so does the residual op."""
    x, w, dy = torch.randn(40, 96), torch.randn(96), torch.randn(40, 96)
    y, dx, dw = grads(x, w, dy, chunk_size=16, topology="linear")
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_op = ops.rms_norm_op(xg, wg, kernels.default_eps(x.dtype), 16, "linear", "pairwise", "float", "torch", 0.0)[0]
    y_op.backward(dy)
    assert_bits_equal(y_op, y)
    assert_bits_equal(xg.grad, dx)
    assert_bits_equal(wg.grad, dw)
    zero = torch.zeros_like(x)
    xr, rr, wr = x.clone().requires_grad_(), zero.clone().requires_grad_(), w.clone().requires_grad_()
    yr, h = ops.rms_norm_residual(xr, rr, wr, chunk_size=16, topology="linear")
    yr.backward(dy)
    assert_bits_equal(yr, y)
    assert_bits_equal(xr.grad, dx)
    assert_bits_equal(rr.grad, dx)
    assert_bits_equal(wr.grad, dw)


def test_module_training_path_checks_like_torch_and_handles_every_shape() -> None:
    norm = tgn.RMSNorm(16)
    with pytest.raises(RuntimeError):  # F.rms_norm's error for a wrong trailing dim
        norm(torch.randn(2, 8, requires_grad=True))
    with pytest.raises(NotImplementedError):  # and for an integer input
        norm(torch.ones(2, 16, dtype=torch.int64))
    multi = tgn.RMSNorm([4, 8], chunk_size=8)
    x = torch.randn(3, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    y = multi(x)
    with torch.no_grad():
        assert_bits_equal(y, multi(x))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and multi.weight.grad is not None


def test_one_autograd_node_per_norm() -> None:
    """The training graph holds one node for the norm (before the ops: about 1,800)."""
    norm = tgn.RMSNorm(4096)
    y = norm(torch.randn(2, 4096, requires_grad=True))
    seen, stack = set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    assert sorted(type(fn).__name__ for fn in seen) == ["AccumulateGrad", "AccumulateGrad", "EagerRMSNormBackward"]
