"""LayerNorm's float rows in C (native_layer.c, backends/native/layer.py): the bits of
the torch-ops backend (and of the reference interpreter) for fp32, bf16 and fp16 rows,
every float plan the kernel runs (tree and linear merges, full and ragged chunks),
weight and bias present or not, one thread or all, ``out=``, the statistics the
backward keeps; NaN rows left to torch ops; the portable build's bits the host build's;
and the native backend really chosen where it runs, with a reason where not."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import layer as native_layer
from taskgraph_norm.backends.registry import BACKENDS
from taskgraph_norm.kernels.reference import run_reference
from taskgraph_norm.pipeline.layer import layer_pipeline
from taskgraph_norm.testing import bits_equal

from ._trust_helpers import build_probe, builds_agree, native_status, spy_layer_taken

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((5, 100), (300, 4096), (2000, 1024), (8192, 64))


def _data(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1.5  # an offset mean: the two passes matter
    w = 1 + 0.5 * torch.randn(shape[1], generator=g)
    b = torch.randn(shape[1], generator=g)
    return x.to(dtype), w.to(dtype), b.to(dtype)


def _torch_ops(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    with tgn.backends.use("torch_ops"):
        return tgn.layer_norm_sync(x, *args, **kwargs)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records whether each native LayerNorm call was taken (True) or left to torch ops
    (the general path's and the warm path's)."""
    return spy_layer_taken(monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_gives_the_torch_ops_bits(dtype: torch.dtype, shape: tuple[int, int],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    taken = _spy(monkeypatch)
    x, w, b = _data(shape, dtype, seed=shape[0])
    affine = [(w, b), (None, None)] if shape != (5, 100) else [(w, b), (w, None), (None, b), (None, None)]
    for chunk, topology, (wt, bt) in itertools.product((64, 10, 256), ("tree", "linear"), affine):
        y = tgn.layer_norm_sync(x, wt, bt, chunk_size=chunk, topology=topology)
        want = _torch_ops(x, wt, bt, chunk_size=chunk, topology=topology)
        assert bits_equal(y, want), (chunk, topology, wt is None, bt is None)
    assert taken and all(taken)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernel_gives_the_reference_bits(dtype: torch.dtype) -> None:
    x, w, b = _data((7, 300), dtype, seed=1)
    for chunk, topology in itertools.product((64, 10), ("tree", "linear")):
        pipe = layer_pipeline(300, chunk, topology)
        y = tgn.layer_norm_sync(x, w, b, chunk_size=chunk, topology=topology)
        assert bits_equal(y, run_reference(pipe.graph, x, w, 1e-5, bias=b)), (chunk, topology)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_statistics_and_out_are_the_torch_ops_ones(dtype: torch.dtype) -> None:
    x, w, b = _data((300, 1000), dtype, seed=2)
    pipe = layer_pipeline(1000, 64, "tree")
    assert pipe.plan is not None
    native = pipe.backend(x.device, dtype)
    assert native.name == "native"
    with tgn.backends.use("torch_ops"):
        want = pipe.backend(x.device, dtype).layer_forward(pipe.graph, pipe.plan, x, w, b, 1e-5, stats=True)
    out = torch.empty_like(x)
    got = native.layer_forward(pipe.graph, pipe.plan, x, w, b, 1e-5, out=out, stats=True)
    assert got.y is out
    for a, c in zip(got, want):
        assert a is not None and c is not None and bits_equal(a, c)


def test_one_thread_and_all_give_the_same_bits() -> None:
    x, w, b = _data((2000, 1024), torch.float32, seed=3)
    plan = layer_pipeline(1024).plan
    assert plan is not None
    one = native_layer.layer_rows(plan, x, w, b, 1e-5, stats=True, threads=1)
    many = native_layer.layer_rows(plan, x, w, b, 1e-5, stats=True, threads=max(2, torch.get_num_threads()))
    assert one is not None and many is not None
    for a, c in zip(one, many):
        assert a is not None and c is not None and bits_equal(a, c)


def test_rows_with_a_nan_get_the_torch_ops_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = _spy(monkeypatch)
    x, w, b = _data((64, 256), torch.float32, seed=4)
    x[3, 7], x[9, 0], x[10, 1] = float("nan"), float("inf"), float("-inf")
    assert bits_equal(tgn.layer_norm_sync(x, w, b), _torch_ops(x, w, b))
    x, _, _ = _data((64, 256), torch.bfloat16, seed=4)
    w[5] = float("nan")  # a NaN weight: NaN in every row
    assert bits_equal(tgn.layer_norm_sync(x, w.bfloat16()), _torch_ops(x, w.bfloat16()))
    zeros = torch.zeros(4, 256)
    assert bits_equal(tgn.layer_norm_sync(zeros, eps=0.0), _torch_ops(zeros, eps=0.0))  # den = 0: 0 / 0
    w[5] = float("inf")  # inf * 0: a row of equal values has zero quotients, so a NaN
    flat = torch.cat([x[:3], torch.full((1, 256), 0.5, dtype=torch.bfloat16)])
    assert bits_equal(tgn.layer_norm_sync(flat, w.bfloat16()), _torch_ops(flat, w.bfloat16()))
    for wd in (torch.float32, torch.bfloat16):  # b infinite too: inf + -inf in some row
        assert bits_equal(tgn.layer_norm_sync(x, w.to(wd), -w.to(wd)), _torch_ops(x, w.to(wd), -w.to(wd)))
    assert taken == [False] * 6
    # An infinite weight against nonzero quotients makes infinities, no NaN: IEEE's bits,
    # torch's, from the kernel (it finds NaNs in its results, not in the weight).
    assert bits_equal(tgn.layer_norm_sync(x, w.bfloat16()), _torch_ops(x, w.bfloat16()))
    assert taken[-1] is True


def test_edge_values_and_mixed_dtypes_give_the_torch_ops_bits() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 333, generator=g) * torch.exp2(torch.randint(-60, 60, (40, 1), generator=g)).float()
    x[0] = 0.0
    x[1] = -0.0
    x[2, ::2] = 1e-30  # tiny deviations: the quotient's checked path
    x[3] = 7.0  # a constant row: every deviation zero
    w = torch.randn(333, generator=g)
    for dtype in DTYPES:
        xd = x.to(dtype)
        for wt in (w, w.to(dtype)):  # fp32 parameters of a half x ("mixed dtype"), or x's own
            assert bits_equal(tgn.layer_norm_sync(xd, wt, wt * 0.5, chunk_size=10),
                              _torch_ops(xd, wt, wt * 0.5, chunk_size=10)), dtype
    xh, _, _ = _data((8, 333), torch.bfloat16, seed=6)
    assert bits_equal(tgn.layer_norm_sync(xh, w.bfloat16(), None), _torch_ops(xh, w.bfloat16(), None))


def test_wide_rows_at_the_fused_variances_edges_give_the_torch_ops_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of eight chunks or more take the one-pass variance (tgn_chunk_sqdev_f32),
    whose quotient skips the deviations' range test where |mean| >= 2^-26: means at
    that bound and either side of it, deviations of one ulp, tiny and subnormal
    elements beside a large mean, constant rows, and chunk counts that leave a tail."""
    taken = _spy(monkeypatch)
    g = torch.Generator().manual_seed(11)
    for hidden in (512, 1000, 4096):
        x = torch.randn(24, hidden, generator=g)
        for k, mean in enumerate((2.0 ** -26, -(2.0 ** -26), 2.0 ** -26 * 0.75, 2.0 ** -25, 3.0, 1e-30)):
            row = torch.full((hidden,), mean)
            row[::3] = torch.nextafter(row[::3], torch.tensor(float("inf")))  # one ulp off the mean
            row[1::5] = 1e-38 if k % 2 else 2e-45  # tiny and subnormal elements
            x[k] = row
        x[8] = 7.0  # constant
        x[9, ::2] = 0.0  # half zeros around a mean of about 1/2 the rest
        x[10] = (torch.randn(hidden, generator=g) * 1e-20 + 3.0 * 2.0 ** -26)
        half = torch.where(torch.rand(hidden // 64, 32, generator=g) < 0.5, 1.0, -1.0)
        tiny = torch.randint(1, 2 ** 23, half[:, ::2].shape, generator=g, dtype=torch.int32).view(torch.float32)
        half[:, ::2] = tiny  # subnormal deviations and quotients: the quotient's checked path
        x[11, :hidden // 64 * 64] = torch.cat([half, -half], 1).flatten()  # each 64-chunk's pairs cancel
        x[11, hidden // 64 * 64:] = 0.0  # (and a zero tail): mean 0
        for dtype in DTYPES:
            xd = x.to(dtype)
            for chunk in (64, 16):
                got = tgn.layer_norm_sync(xd, chunk_size=chunk)
                assert bits_equal(got, _torch_ops(xd, chunk_size=chunk)), (hidden, dtype, chunk)
    assert taken and all(taken)


def test_a_residual_plan_runs_the_kernel_on_h(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = _spy(monkeypatch)
    x, w, b = _data((50, 512), torch.bfloat16, seed=7)
    r = x.flip(0)
    y, h = tgn.layer_norm_sync(x, w, b, residual=r)
    wy, wh = _torch_ops(x, w, b, residual=r)
    assert bits_equal(y, wy) and bits_equal(h, wh) and taken == [True]


def test_the_native_backend_is_chosen_where_it_runs() -> None:
    cpu = torch.device("cpu")
    assert layer_pipeline(512, 64, "tree").backend(cpu, torch.float32).name == "native"
    assert layer_pipeline(512, 64, "cat").backend(cpu, torch.float32).name == "torch_ops"
    exact = layer_pipeline(512, 64, "tree", accumulate="exact")
    assert exact.plan is not None and exact.backend(cpu, torch.float32).name == "native"
    assert BACKENDS["native"].not_supported_reasons(exact.plan, cpu, torch.float32) == []
    x, w, b = _data((9, 512), torch.float32, seed=8)
    for topology, accumulate in (("cat", "float"), ("tree", "exact")):  # torch ops' bits
        y = tgn.layer_norm_sync(x, w, b, topology=topology, accumulate=accumulate)
        assert bits_equal(y, _torch_ops(x, w, b, topology=topology, accumulate=accumulate))


def test_fp64_and_strided_rows_go_to_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = _spy(monkeypatch)
    x, w, b = _data((30, 200), torch.float64, seed=9)
    assert bits_equal(tgn.layer_norm_sync(x, w, b), _torch_ops(x, w, b))
    xs = _data((200, 30), torch.float32, seed=9)[0].t()
    ws, bs = w.float(), b.float()
    assert bits_equal(tgn.layer_norm_sync(xs, ws, bs), _torch_ops(xs, ws, bs))
    assert taken == [False, False]


def test_negative_control_another_order_changes_the_bits() -> None:
    # The comparisons above can fail: a linear chain and a tree over the same chunks,
    # or F.layer_norm's own order, give other bits on these rows.
    x, w, b = _data((300, 4096), torch.float32, seed=10)
    tree = tgn.layer_norm_sync(x, w, b, topology="tree")
    assert not bits_equal(tree, tgn.layer_norm_sync(x, w, b, topology="linear"))
    assert not bits_equal(tree, torch.nn.functional.layer_norm(x, (4096,), w, b))
    assert torch.allclose(tree, torch.nn.functional.layer_norm(x, (4096,), w, b), atol=1e-5)


PROBE = build_probe("test_native_layer", """
    import hashlib, torch, taskgraph_norm as tgn
    from taskgraph_norm.backends.native import loader as native
    from taskgraph_norm.testing import bits
    print(native.library_path().name if native.available() else None)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(300, 777, generator=g) * 2 + 1
    rows[::7] *= 1e-16  # tiny deviations: the quotient's checked path
    w, b = torch.randn(777, generator=g), torch.randn(777, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = rows.to(dtype)
        for chunk, topology in ((64, "tree"), (10, "linear"), (256, "tree")):
            y = tgn.layer_norm_sync(x, w.to(dtype), b.to(dtype), chunk_size=chunk, topology=topology)
            print(dtype, chunk, topology, hashlib.sha256(bits(y).numpy().tobytes()).hexdigest()[:16])
""")


def test_the_portable_build_gives_the_host_builds_bits() -> None:
    """TGN_NATIVE=portable (scalar leaves and the divider) against the default build
    (the vector leaves and quotient where built) and torch ops (TGN_NATIVE=0)."""
    p, _ = builds_agree(PROBE)
    assert len(p) == 10
    assert len({line.split()[-1] for line in p[1:]}) == 9  # negative control: the digests see dtype and plan
