"""LayerNorm's exact plans in C (native_layer_exact.c through native_layer.c and
native_layer_backward.c): the torch-ops backend's bits for ``y``, ``mean``, ``den`` and the
exact backward's ``dx`` (fp32, bf16, fp16; one row to thousands; one thread or all), on
rows built to hit the correctly rounded mean's ties and near-ties, zero and constant rows,
rows spanning many binades; rows without an exact scale left to torch ops; and the exact
bits independent of the graph (a negative control: float plans differ)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import layer as native_layer
from taskgraph_norm.backends.native import layer_grads
from taskgraph_norm.backends.torch_ops.layer import layer_backward, run_layer
from taskgraph_norm.pipeline.layer import layer_pipeline
from taskgraph_norm.testing import bits_equal, count_bit_differences

from ._trust_helpers import build_probe, builds_agree, native_status

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL = max(2, torch.get_num_threads())


def _rows(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    span = 10 if dtype != torch.float16 else 4
    x = torch.randn(rows, hidden, generator=g) * torch.exp2(
        torch.randint(-span, span, (rows, hidden), generator=g).float()) + 1.5
    dy = torch.randn(rows, hidden, generator=g)
    w = 1 + 0.5 * torch.randn(hidden, generator=g)
    b = torch.randn(hidden, generator=g)
    return x.to(dtype), dy.to(dtype), w.to(dtype), b.to(dtype)


def _forward_same(plan: Any, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, threads: int) -> None:
    want = run_layer(plan, x, w, b, 1e-5, stats=True)
    got = native_layer.layer_rows(plan, x, w, b, 1e-5, stats=True, threads=threads)
    assert got is not None
    for a, c, name in zip(want, got, ("y", "mean", "den")):
        assert a is not None and c is not None and bits_equal(a, c), (name, count_bit_differences(a, c))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 100), (7, 77), (300, 4096), (3000, 256)])
def test_the_forward_gives_the_torch_ops_bits(dtype: torch.dtype, rows: int, hidden: int) -> None:
    x, _, w, b = _rows(rows, hidden, dtype, seed=rows)
    plan = layer_pipeline(hidden, accumulate="exact").plan
    for threads in (1, ALL):
        _forward_same(plan, x, w, b, threads)
    _forward_same(plan, x, None, None, 1)
    if dtype != torch.float32:
        _forward_same(plan, x, w.float(), b.float(), 1)  # fp32 parameters of a half x


def test_hard_rows_give_the_torch_ops_bits() -> None:
    g = torch.Generator().manual_seed(1)
    hard = torch.tensor([
        [1.0, 2.0 ** -24, 2.0 ** -70, 0.0],  # the fp64 path double-rounds this mean
        [0.0, 0.0, 0.0, 0.0], [-0.0, -0.0, -0.0, -0.0], [7.0, 7.0, 7.0, 7.0],
        [1e-30, -1e-30, 1e-38, 0.0], [2.0 ** -149, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0 ** -60, 2.0 ** -61],
        [1.0, 1.0 + 2.0 ** -23, 1.0, 1.0], [1e18, -1e18, 1.0, 2.0 ** -100]])
    # sums near the midpoints between fp32 neighbours of the mean
    ties = torch.randint(-2 ** 20, 2 ** 20, (3000, 4), generator=g).float() * 2.0 ** -20 + 1
    x = torch.cat([hard, ties])
    plan = layer_pipeline(4, accumulate="exact").plan
    _forward_same(plan, x, None, None, 1)
    _forward_same(plan, x, None, None, ALL)


def test_sums_a_plain_fp64_sum_cannot_decide_take_the_pair() -> None:
    """The C rows prove the mean and the variance from plain fp64 sums where they can
    (tgn_mean_total_f32, tgn_dev_total_f32) and form the pairs where they cannot.  Here
    each exact sum lies just above a midpoint between fp32 neighbours by a term the plain
    sum loses (2^-80 beside 63, 2^-86 beside 2): the plain sum sits on the tie and would
    round to even, the pair rounds up; a kernel that trusted the plain sum gives other
    bits (checked by mutants of both functions)."""
    mean_row = torch.ones(64)
    mean_row[62], mean_row[63] = 1.0 + 2.0 ** -19, 2.0 ** -80  # sum 63 + 2^-19 + 2^-80: mean 63/64 + 2^-25 + ...
    m = 2.0 ** -20  # the variance's row: mean 2^-20, deviations whose squares sum to 2 + 2^-23 + 2^-85
    dev = torch.zeros(64, dtype=torch.float64)
    dev[:6] = torch.tensor([1.0, -1.0, 2.0 ** -12, -(2.0 ** -12), 2.0 ** -43, -(2.0 ** -43)], dtype=torch.float64)
    var_row = (dev + m).float()
    assert torch.equal(var_row.double() - m, dev)  # (each x and deviation exact in fp32)
    x = torch.stack([mean_row, var_row])
    plan = layer_pipeline(64, accumulate="exact").plan
    _forward_same(plan, x, None, None, 1)
    got = native_layer.layer_rows(plan, x, None, None, 1e-5, stats=True)
    assert got is not None and got.mean is not None
    assert got.mean[0].item() == 63 / 64 + 2.0 ** -24  # rounded up, off the tie
    assert got.mean[1].item() == m


def test_rows_without_an_exact_scale_are_left_to_torch_ops() -> None:
    x, _, w, b = _rows(16, 64, torch.float32, seed=2)
    plan = layer_pipeline(64, accumulate="exact").plan
    for bad in (float("inf"), float("nan")):
        xb = x.clone()
        xb[5, 3] = bad
        assert native_layer.layer_rows(plan, xb, w, b, 1e-5, stats=True) is None
        with tgn.backends.use("torch_ops"):
            want = tgn.layer_norm_sync(xb, w, b, accumulate="exact")
        assert bits_equal(tgn.layer_norm_sync(xb, w, b, accumulate="exact"), want)
    big = x.clone()
    big[2, ::2], big[2, 1::2] = 3e38, -3e38  # the variance overflows: den = inf, left to torch ops
    assert native_layer.layer_rows(plan, big, w, b, 1e-5, stats=True) is None
    with tgn.backends.use("torch_ops"):
        want = tgn.layer_norm_sync(big, w, b, accumulate="exact")
    assert bits_equal(tgn.layer_norm_sync(big, w, b, accumulate="exact"), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_exact_backward_gives_the_torch_ops_bits(dtype: torch.dtype) -> None:
    x, dy, w, _ = _rows(2000, 300, dtype, seed=3)
    plan = layer_pipeline(300, accumulate="exact").plan
    fw = run_layer(plan, x, w, None, 1e-5, stats=True)
    kw: dict[str, Any] = dict(input_grad=True, weight_grad=True, bias_grad=True, weight_dtype=dtype,
                              bias_dtype=dtype)
    want = layer_backward(plan, dy, x, w, fw.mean, fw.den, **kw)
    for threads in (1, ALL):
        got = layer_grads.layer_backward_rows(plan, dy, x, w, fw.mean, fw.den, threads=threads, **kw)
        assert got is not None
        for a, c, name in zip(want, got, ("dx", "dW", "db")):
            assert a is not None and c is not None and bits_equal(a, c), (name, count_bit_differences(a, c))


def test_the_exact_bits_do_not_depend_on_the_graph() -> None:
    x, _, w, b = _rows(200, 1000, torch.float32, seed=4)
    ys = [tgn.layer_norm_sync(x, w, b, accumulate="exact", topology=t, chunk_size=c)
          for t, c in (("tree", 64), ("linear", 16), ("tree", 1000))]
    assert all(bits_equal(y, ys[0]) for y in ys[1:])
    # negative control: float plans of those graphs give other bits on these rows
    floats = [tgn.layer_norm_sync(x, w, b, topology=t, chunk_size=c) for t, c in (("tree", 64), ("linear", 16))]
    assert count_bit_differences(floats[0], floats[1]) > 0


PROBE = build_probe("test_native_layer_exact", """
    import hashlib, torch, taskgraph_norm as tgn
    from taskgraph_norm.backends.native import loader as native
    from taskgraph_norm.testing import bits
    print(native.library_path().name if native.available() else None)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(300, 777, generator=g) * torch.exp2(torch.randint(-8, 8, (300, 777), generator=g).float()) + 1
    dy = torch.randn(300, 777, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for accumulate in ("float", "exact"):
            norm = tgn.LayerNorm(777, chunk_size=10, accumulate=accumulate, dtype=dtype)
            with torch.no_grad():
                norm.weight.normal_(1.0, 0.5, generator=g)
                norm.bias.normal_(generator=g)
            x = rows.to(dtype).clone().requires_grad_()
            y = norm(x)
            y.backward(dy.to(dtype))
            digest = hashlib.sha256()
            for t in (y, x.grad, norm.weight.grad, norm.bias.grad):
                digest.update(bits(t.detach()).numpy().tobytes())
            print(dtype, accumulate, digest.hexdigest()[:16])
""")


def test_the_portable_build_gives_the_host_builds_bits() -> None:
    """The forward and backward, float and exact, in TGN_NATIVE=portable (no vector forms),
    the default build and torch ops (TGN_NATIVE=0): the same bits."""
    p, _ = builds_agree(PROBE)
    assert len(p) == 7
    assert len({line.split()[-1] for line in p[1:]}) == 6  # negative control: the digests see dtype and plan
