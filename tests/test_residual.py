"""The fused residual add (docs/design.md, "Casting modes, offset and the
fused residual add"): ``(y, h) = normalize(x, w, residual=r)``
gives ``h`` the bits of ``x + r`` and ``y`` those of ``normalize(h, w)``, on every
executor, batch-invariantly."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import pipeline
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.errors import ConfigError, DeviceMismatchError

from .helpers import spy_direct_calls, assert_bits_equal, bits_equal

D = 200
EPS = 1e-6


def _inputs(dtype: torch.dtype, rows: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(rows, D, generator=gen) * 2).to(dtype), torch.randn(rows, D, generator=gen).to(dtype)
    return x, r, torch.randn(D, generator=gen).to(dtype)


def _norm(x: torch.Tensor, w: torch.Tensor, **options: Any) -> Any:
    return tgn.normalize_sync(x, w, EPS, chunk_size=64, **options)


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(("mode", "offset"), [("torch", 0.0), ("llama", 0.0), ("gemma", 1.0)])
def test_h_is_x_plus_r_and_y_is_the_norm_of_h(dtype: torch.dtype, accumulate: str, mode: str, offset: float) -> None:
    x, r, w = _inputs(dtype)
    options = dict(accumulate=accumulate, casting_mode=mode, offset=offset)
    h_want = x + r
    y_want = _norm(h_want, w, executor="reference", **options)
    runs = {ex: _norm(x, w, residual=r, executor=ex, **options) for ex in ("reference", "concurrent", "compiled")}
    with native.disabled():
        runs["torch ops"] = _norm(x, w, residual=r, executor="compiled", **options)
    for y, h in runs.values():
        assert_bits_equal(h, h_want)
        assert_bits_equal(y, y_want)


def test_out_and_residual_out_receive_y_and_h() -> None:
    x, r, w = _inputs(torch.float32)
    y_buf, h_buf = torch.empty_like(x), torch.empty_like(x)
    y, h = _norm(x, w, residual=r, out=y_buf, residual_out=h_buf)
    assert y is y_buf and h is h_buf
    assert_bits_equal(h, x + r)
    assert_bits_equal(y, _norm(x + r, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("into", ["x", "residual"])
def test_h_may_overwrite_x_or_the_residual(dtype: torch.dtype, into: str) -> None:
    x, r, w = _inputs(dtype)
    x[2, 5] = float("nan")  # a NaN row: the reference finishes it from h
    h_want = x + r
    y_want = _norm(h_want, w, executor="reference")
    target = x if into == "x" else r
    y, h = _norm(x, w, residual=r, residual_out=target)
    assert h is target
    assert_bits_equal(h, h_want)
    assert_bits_equal(y, y_want)


def test_a_row_alone_gets_its_bits_in_any_batch() -> None:
    x, r, w = _inputs(torch.float32, rows=64)
    y_all, h_all = _norm(x, w, residual=r)
    for i in (0, 17, 63):
        y_one, h_one = _norm(x[i : i + 1], w, residual=r[i : i + 1])
        assert_bits_equal(h_one, h_all[i : i + 1])
        assert_bits_equal(y_one, y_all[i : i + 1])


def test_the_batch_comparison_can_fail() -> None:
    """Negative control: a chunking that depends on the batch size (what a kernel
    tuned per shape does) changes a row's bits, and the comparison above sees it."""
    x, r, w = _inputs(torch.float32, rows=64)
    y_all, _ = _norm(x, w, residual=r)
    differs = False
    for i in range(64):
        y_one, _ = tgn.normalize_sync(x[i : i + 1], w, EPS, chunk_size=8, residual=r[i : i + 1])
        differs |= not bits_equal(y_one, y_all[i : i + 1])
    assert differs


def test_the_fast_paths_take_the_native_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = spy_direct_calls(monkeypatch)
    x, r, w = _inputs(torch.float32)
    _norm(x, w, residual=r)
    assert taken == [True]  # fp32: one C call adds, writes h and normalises
    rows: list[Any] = []
    real_rows = native.float_rows

    def float_rows(*args: Any, **kwargs: Any) -> int:
        rows.append(kwargs)
        result: int = real_rows(*args, **kwargs)
        return result

    monkeypatch.setattr(native, "float_rows", float_rows)
    xb, rb, wb = _inputs(torch.bfloat16)
    y, h = _norm(xb, wb, residual=rb)
    assert taken == [True, True] and not rows  # bf16: one C call too (native_narrow.c)
    assert_bits_equal(h, xb + rb)
    y2, h2 = _norm(xb, wb.double(), residual=rb)  # an fp64 weight: not the direct call's
    assert taken[-1] is False and rows  # torch adds, C sums and normalises
    assert_bits_equal(h2, xb + rb)
    tgn.clear_caches()


def test_async_normalize_and_execute_take_a_residual() -> None:
    x, r, w = _inputs(torch.float32, rows=256)
    y, h = anyio.run(lambda: tgn.normalize(x, w, EPS, chunk_size=64, residual=r))
    assert_bits_equal(h, x + r)
    assert_bits_equal(y, _norm(x + r, w))
    graph = tgn.build_graph(D, chunk_size=64, residual=True)
    y2, h2 = tgn.execute_sync(graph, x, w, EPS, residual=r)
    assert_bits_equal(y2, y)
    assert_bits_equal(h2, h)


def test_rmsnorm_forward_with_a_residual() -> None:
    x, r, _ = _inputs(torch.bfloat16)
    norm = tgn.RMSNorm(D, eps=EPS, chunk_size=64, dtype=torch.bfloat16, casting_mode="llama")
    with torch.no_grad():
        y, h = norm(x, residual=r)
        assert_bits_equal(h, x + r)
        assert_bits_equal(y, norm(x + r))
        shaped = tgn.RMSNorm((8, 25), eps=EPS, chunk_size=64)
        y3, h3 = shaped(x.float().reshape(6, 8, 25), residual=r.float().reshape(6, 8, 25))
        assert y3.shape == h3.shape == (6, 8, 25)
        assert_bits_equal(h3, (x.float() + r.float()).reshape(6, 8, 25))


def test_bad_residuals_are_rejected() -> None:
    x, r, w = _inputs(torch.float32)
    with pytest.raises(ConfigError, match="residual"):
        _norm(x, w, residual=r[:3])
    with pytest.raises(ConfigError, match="residual"):
        _norm(x, w, residual=r.double())
    with pytest.raises(ConfigError, match="residual_out"):
        _norm(x, w, residual=r, residual_out=torch.empty(3, D))
    with pytest.raises(TypeError, match="residual"):
        _norm(x, w, residual=[1.0])
    with pytest.raises(DeviceMismatchError):
        _norm(x, w, residual=r.to("meta"))
    with pytest.raises(ConfigError, match="residual"):
        tgn.execute_sync(tgn.build_graph(D, chunk_size=64), x, w, EPS, residual=r)
