"""LayerNorm's warm path (backends/native/layer_direct.py): ``layer_norm_sync`` and
``tgn.LayerNorm`` (no gradient recorded) with a cached pipeline make one C call after the
checks it needs inline.  Its bits are the general path's and the torch-ops backend's
(fp32/bf16/fp16, fp32 parameters of a half input, weight and bias present or not,
``out=``, float and exact plans, one thread and two); whatever is unusual goes to the
general path (NaN and Inf rows, fp64, strided, an in-place ``out``, a gradient to
record, a context without native C); and the path is really taken (a spy on the
general path's forward sees no call)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.errors import ConfigError
from taskgraph_norm.pipeline import layer as pipeline_layer
from taskgraph_norm.pipeline.layer import LayerPipeline, cached_layer
from taskgraph_norm.testing import bits_equal

from ._trust_helpers import native_status

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def general(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the general path's forwards (:meth:`LayerPipeline.forward`), in a fresh
    pipeline cache."""
    calls: list[int] = []
    real = LayerPipeline.forward

    def forward(self: LayerPipeline, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LayerPipeline, "forward", forward)
    monkeypatch.setattr(pipeline_layer, "LAYER_PIPELINES", {})
    yield calls


def _data(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * 3 + 1.5
    w = 1 + 0.5 * torch.randn(hidden, generator=g)
    b = torch.randn(hidden, generator=g)
    return x.to(dtype), w.to(dtype), b.to(dtype)


def _torch_ops(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    with tgn.backends.use("torch_ops"):
        return tgn.layer_norm_sync(x, *args, **kwargs)


def _warm(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """A call on a cached pipeline (the first call builds and caches it)."""
    tgn.layer_norm_sync(x, *args, **kwargs)
    return tgn.layer_norm_sync(x, *args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_the_warm_path_gives_the_general_bits(dtype: torch.dtype, accumulate: str, general: list[int]) -> None:
    for rows, hidden in ((1, 4096), (3, 100), (7, 33)):
        x, w, b = _data(rows, hidden, dtype, seed=rows)
        w32, b32 = w.float(), b.float()
        for wt, bt in ((w, b), (w, None), (None, b), (None, None), (w32, b32)):
            if dtype == torch.float32 and wt is w32:
                continue
            kwargs = dict(accumulate=accumulate, topology="linear" if rows == 3 else "tree")
            tgn.layer_norm_sync(x, wt, bt, **kwargs)  # builds and caches the pipeline
            before = len(general)
            y = tgn.layer_norm_sync(x, wt, bt, **kwargs)
            o = torch.full_like(x, 7.0)
            y_out = tgn.layer_norm_sync(x, wt, bt, out=o, **kwargs)
            assert len(general) == before, "the warm path was not taken"
            assert y_out is o
            want = _torch_ops(x, wt, bt, **kwargs)
            assert bits_equal(y, want) and bits_equal(o, want), (rows, wt is None, bt is None)
            assert len(general) > before  # (the torch-ops call is the general path's)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_one_thread_and_two_give_the_same_bits(dtype: torch.dtype, accumulate: str, general: list[int]) -> None:
    x, w, b = _data(3000, 64, dtype, seed=3)  # (rows shared among threads from SPLIT_NUMEL elements)
    x2, w2, b2 = _data(40, 4096, dtype, seed=4)
    threads = torch.get_num_threads()
    try:
        found = []
        for n in (1, 2):
            torch.set_num_threads(n)
            found.append((_warm(x, w, b, accumulate=accumulate), _warm(x2, w2, b2, accumulate=accumulate)))
    finally:
        torch.set_num_threads(threads)
    assert len(general) == 2  # (one building call per shape: the rest warm)
    (one, one2), (two, two2) = found
    assert bits_equal(one, two) and bits_equal(one2, two2)
    assert bits_equal(one, _torch_ops(x, w, b, accumulate=accumulate))
    assert bits_equal(one2, _torch_ops(x2, w2, b2, accumulate=accumulate))


def test_a_different_plan_gives_different_bits(general: list[int]) -> None:
    """The negative control: the warm calls of two plans (tree and linear merges, float
    and exact) differ somewhere on rows where the order matters."""
    x, w, b = _data(64, 4096, torch.float32, seed=5)
    tree = _warm(x, w, b)
    assert not bits_equal(tree, _warm(x, w, b, topology="linear"))
    assert not bits_equal(tree, _warm(x, w, b, accumulate="exact"))
    assert len(general) == 3


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_rows_go_to_the_general_path(accumulate: str, bad: float, general: list[int]) -> None:
    x, w, b = _data(5, 256, torch.float32, seed=6)
    x[2, 17] = bad
    _warm(x[:1], w, b, accumulate=accumulate)  # (the pipeline cached: the next calls try the warm path)
    before = len(general)
    y = tgn.layer_norm_sync(x, w, b, accumulate=accumulate)
    assert len(general) == before + 1
    want = _torch_ops(x, w, b, accumulate=accumulate)
    assert bits_equal(y, want)
    w_nan = w.clone()
    w_nan[3] = float("nan")
    before = len(general)
    y = tgn.layer_norm_sync(x[:1], w_nan, b, accumulate=accumulate)
    assert len(general) == before + 1
    assert bits_equal(y, _torch_ops(x[:1], w_nan, b, accumulate=accumulate))


def test_unusual_calls_go_to_the_general_path(general: list[int]) -> None:
    x, w, b = _data(4, 128, torch.float32, seed=7)
    _warm(x, w, b)
    cases: list[tuple[torch.Tensor, Any, Any, dict[str, Any]]] = [
        (x.double(), w.double(), b.double(), {}),                  # fp64
        (x.t().contiguous().t(), w, b, {}),                          # strided x
        (x, w[::1].repeat(2)[::2], b, {}),                           # strided weight
        (x, w, b, {"eps": 1}),                                       # an int eps
    ]
    for xi, wi, bi, kwargs in cases:
        before = len(general)
        y = tgn.layer_norm_sync(xi, wi, bi, **kwargs)
        assert len(general) == before + 1
        assert bits_equal(y, _torch_ops(xi, wi, bi, **kwargs))
    inplace = x.clone()
    before = len(general)
    y = tgn.layer_norm_sync(inplace, w, b, out=inplace)  # out over x: the general path's in-place call
    assert y is inplace and len(general) == before + 1
    assert bits_equal(inplace, _torch_ops(x, w, b))
    with tgn.backends.use("torch_ops"):
        before = len(general)
        tgn.layer_norm_sync(x, w, b)
        assert len(general) == before + 1


def test_bad_input_raises_the_general_errors(general: list[int]) -> None:
    x, w, b = _data(4, 128, torch.float32, seed=8)
    _warm(x, w, b)
    with pytest.raises(RuntimeError):
        tgn.layer_norm_sync(x, w[:64], b)
    with pytest.raises(RuntimeError):
        tgn.layer_norm_sync(x, w, b.to(torch.bfloat16))
    with pytest.raises(RuntimeError):
        tgn.layer_norm_sync(x.to(torch.bfloat16), w.to(torch.float16), b.to(torch.float16))
    for bad in ({"out": torch.empty(4, 64)}, {"out": torch.empty(4, 128, dtype=torch.float64)}, {"eps": "1e-5"}):
        with pytest.raises(ConfigError):
            tgn.layer_norm_sync(x, w, b, **bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_module_takes_the_warm_path_without_grad(dtype: torch.dtype, general: list[int]) -> None:
    x, _, _ = _data(6, 96, dtype, seed=9)
    norm = tgn.LayerNorm(96, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        first = norm(x)
        before = len(general)
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                assert bits_equal(norm(x), first)
        assert len(general) == before
    want = torch.nn.functional.layer_norm(x.double(), (96,), norm.weight.double(), norm.bias.double()).to(dtype)
    assert (first.double() - want.double()).abs().max() < (1e-5 if dtype == torch.float32 else 0.05)
    assert bits_equal(first, _torch_ops(x, norm.weight.detach(), norm.bias.detach()))
    y = norm(x)  # a gradient to record: the op's path
    assert y.requires_grad and bits_equal(y.detach(), first)
    assert len(general) > before


def test_the_warm_lookup_is_the_cache() -> None:
    tgn.layer_norm_sync(torch.ones(1, 24))
    assert cached_layer(24, 64, "tree", "pairwise", "float", "auto") is not None
    assert cached_layer(24, 64.0, "tree", "pairwise", "float", "auto") is None  # type: ignore[arg-type]
    assert cached_layer(24, 64, ["tree"], "pairwise", "float", "auto") is None  # type: ignore[arg-type]
    for options in itertools.product((16, 64), ("tree", "linear")):
        assert cached_layer(25, *options, "pairwise", "float", "auto") is None
