"""LayerNorm's backward in C (native_layer_backward.c, backends/native/layer_grads.py): the
torch-ops backend's bits for ``dx``, ``dW`` and ``db`` (fp32, bf16, fp16; weight and bias
present or not; hidden sizes off the chunk; one row to thousands; one thread or all),
through the ops' autograd too; ``dx`` batch-invariant (with a negative control); calls
with non-finite values, fp64 and strided rows left to torch ops."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import layer_grads
from taskgraph_norm.backends.torch_ops.layer import layer_backward, run_layer
from taskgraph_norm.pipeline.layer import layer_pipeline
from taskgraph_norm.testing import bits_equal, count_bit_differences

from ._trust_helpers import native_status, spy_taken

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL = max(2, torch.get_num_threads())


def _data(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * 3 + 1.5
    dy = torch.randn(rows, hidden, generator=g)
    w = 1 + 0.5 * torch.randn(hidden, generator=g)
    b = torch.randn(hidden, generator=g)
    return x.to(dtype), dy.to(dtype), w.to(dtype), b.to(dtype)


def _both(plan: Any, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, bias: bool,
          threads: int) -> tuple[Any, Any]:
    """(torch ops' grads, the C kernel's) of one call, the statistics from the forward."""
    rows = x.shape[0]
    fw = run_layer(plan, x, w, None, 1e-5, stats=True)
    mean, den = fw.mean.reshape(rows, 1), fw.den.reshape(rows, 1)
    kw: dict[str, Any] = dict(input_grad=True, weight_grad=w is not None, bias_grad=bias,
                              weight_dtype=None if w is None else w.dtype, bias_dtype=x.dtype)
    want = layer_backward(plan, dy, x, w, mean, den, **kw)
    got = layer_grads.layer_backward_rows(plan, dy, x, w, mean, den, threads=threads, **kw)
    assert got is not None
    return want, got


def _assert_same(want: Any, got: Any, what: Any) -> None:
    for a, c, name in zip(want, got, ("dx", "dW", "db")):
        assert (a is None) == (c is None), (name, what)
        assert a is None or bits_equal(a, c), (name, what, count_bit_differences(a, c))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 100), (7, 77), (33, 4096), (300, 1000), (3000, 256)])
def test_the_kernel_gives_the_torch_ops_bits(dtype: torch.dtype, rows: int, hidden: int) -> None:
    x, dy, w, _ = _data(rows, hidden, dtype, seed=rows)
    for (chunk, topology), weight, bias, threads in itertools.product(
            ((64, "tree"), (10, "linear"), (256, "tree")), (w, w.float(), None), (True, False), (1, ALL)):
        if dtype == torch.float32 and weight is not None and weight is not w:
            continue
        plan = layer_pipeline(hidden, chunk, topology).plan
        want, got = _both(plan, x, dy, weight, bias, threads)
        _assert_same(want, got, (chunk, topology, weight is None, bias, threads))


def test_one_thread_and_all_give_the_same_bits() -> None:
    x, dy, w, _ = _data(4099, 512, torch.float32, seed=3)  # thousands of rows: blocks on every thread
    plan = layer_pipeline(512).plan
    fw = run_layer(plan, x, w, None, 1e-5, stats=True)
    calls = [layer_grads.layer_backward_rows(plan, dy, x, w, fw.mean, fw.den, input_grad=True, weight_grad=True,
                                             bias_grad=True, threads=t) for t in (1, ALL, 3)]
    for got in calls[1:]:
        _assert_same(calls[0], got, "threads")


def _grads(norm: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xr = x.clone().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    norm(xr).backward(dy)
    return xr.grad, norm.weight.grad, norm.bias.grad  # type: ignore[return-value]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_ops_autograd_runs_the_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = spy_taken(monkeypatch, (layer_grads, tgn.backends.native.layer), "layer_backward_rows")
    x, dy, _, _ = _data(600, 1000, dtype, seed=4)
    norm = tgn.LayerNorm(1000, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_()
    got = _grads(norm, x.view(20, 30, 1000), dy.view(20, 30, 1000))
    assert taken == [True]
    with tgn.backends.use("torch_ops"):
        want = _grads(norm, x.view(20, 30, 1000), dy.view(20, 30, 1000))
    assert len(taken) == 1
    for a, c in zip(got, want):
        assert bits_equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dx_is_batch_invariant(dtype: torch.dtype) -> None:
    x, dy, w, _ = _data(1500, 1000, dtype, seed=5)
    plan = layer_pipeline(1000).plan
    _, batch = _both(plan, x, dy, w, True, ALL)
    for i in (0, 1, 777, 1499):
        _, alone = _both(plan, x[i:i + 1], dy[i:i + 1], w, True, 1)
        assert bits_equal(alone[0], batch[0][i:i + 1]), i
    # negative control: the comparison sees another merge order's bits
    _, other = _both(layer_pipeline(1000, 16, "linear").plan, x, dy, w, True, ALL)
    assert count_bit_differences(other[0], batch[0]) > 0


def test_non_finite_calls_are_left_to_torch_ops() -> None:
    x, dy, w, _ = _data(64, 256, torch.float32, seed=6)
    plan = layer_pipeline(256).plan
    fw = run_layer(plan, x, w, None, 1e-5, stats=True)
    kw: dict[str, Any] = dict(input_grad=True, weight_grad=True, bias_grad=True)
    assert layer_grads.layer_backward_rows(plan, dy, x, w, fw.mean, fw.den, **kw) is not None
    bad = dy.clone()
    bad[3, 5] = float("inf")
    assert layer_grads.layer_backward_rows(plan, bad, x, w, fw.mean, fw.den, **kw) is None
    xn = x.clone()
    xn[7, 0] = float("nan")
    fwn = run_layer(plan, xn, w, None, 1e-5, stats=True)
    assert layer_grads.layer_backward_rows(plan, dy, xn, w, fwn.mean, fwn.den, **kw) is None
    # through the backend: the torch-ops bits
    pipe = layer_pipeline(256)
    got = pipe.backward(bad, x, w, fw.mean, fw.den, **kw)
    want = layer_backward(plan, bad, x, w, fw.mean, fw.den, **kw)
    _assert_same(want, got, "inf")


def test_fp64_and_strided_rows_are_left_to_torch_ops() -> None:
    # (exact plans run in C: tests/test_native_layer_exact.py)
    x, dy, w, _ = _data(8, 64, torch.float32, seed=7)
    kw: dict[str, Any] = dict(input_grad=True, weight_grad=True, bias_grad=True)
    plan = layer_pipeline(64).plan
    fw = run_layer(plan, x.double(), w.double(), None, 1e-5, stats=True)
    assert layer_grads.layer_backward_rows(plan, dy.double(), x.double(), w.double(), fw.mean, fw.den, **kw) is None
    xs = x.t().contiguous().t()
    fw = run_layer(plan, x, w, None, 1e-5, stats=True)
    assert layer_grads.layer_backward_rows(plan, dy, xs, w, fw.mean, fw.den, **kw) is None
