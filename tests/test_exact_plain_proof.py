"""The exact forward's plain-sum proof (native_exact.c, tgn_exact_rows_f32) against the torch forms.

Where a call wants ``y`` and no pairs (the direct call: no gradient recorded), each
fp32 row's exact total ``RN32(RN64(S1 + S2))`` is first proved from a plain fp64 sum of
``x**2`` (tgn_squares_total_f32's error bound and midpoint test); rows it cannot prove
form the pair.  Bits compared with the torch-ops backend (int views): ordinary rows
split across threads, rows whose plain sum sits on an fp32 midpoint while the pair's
value is above it (the proof must refuse them: the negative control shows the plain
sum rounds to another total), and rows with zeros, subnormals, huge values, Inf and NaN.
bf16 rows (widened into fp32 rows: the same kernel) are compared too; rounding y to
bf16 hides the one-ulp moves of the rms, so the fp32 rows carry the negative control.
"""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import loader as native

from .helpers import assert_bits_equal, spy_direct_calls

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_unavailable()}")

#: Squares 1, 2^-24 and four of 2^-54: the pair's value is 1 + 2^-24 + 2^-52, above the
#: fp32 midpoint 1 + 2^-24, while a plain fp64 sum loses each 2^-54 and lands on it.
TIE = [1.0, 2.0**-12, 2.0**-27, 2.0**-27, 2.0**-27, 2.0**-27]


def tie_rows(hidden: int) -> torch.Tensor:
    """TIE scaled by 2^k, k in [-10, 10): every row's total sits so."""
    x = torch.zeros(20, hidden)
    x[:, :len(TIE)] = torch.tensor(TIE)
    return x * 2.0 ** torch.arange(-10.0, 10.0)[:, None]


def rms_of_total(total: float, hidden: int) -> float:
    """FINALIZE's rms of an fp32 total (native_finalize.h), with the default eps."""
    f32 = torch.float32
    mean = torch.tensor(total, dtype=f32) / torch.tensor(float(hidden), dtype=f32) + torch.finfo(f32).eps
    return float(torch.tensor(mean.item(), dtype=torch.float64).sqrt().float())


def ours_and_torch_ops(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    tgn.normalize_sync(x[:1], w, accumulate="exact")  # (the first call fills the warm path's defaults)
    ours = tgn.normalize_sync(x, w, accumulate="exact")
    with tgn.backends.use("torch_ops"):
        ref = tgn.normalize_sync(x, w, accumulate="exact")
    return ours, ref


@pytest.mark.parametrize("rows", [1, 7, 3000])
def test_ordinary_rows_match_the_torch_ops(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_direct_calls(monkeypatch)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4096, generator=g) * 3 + 0.25
    w = torch.rand(4096, generator=g) + 0.5
    tgn.normalize_sync(x[:1], w, accumulate="exact")
    calls.clear()
    ours, ref = ours_and_torch_ops(x, w)
    assert calls[0]  # the direct call ran (its no-pair form)
    assert_bits_equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [len(TIE), 100, 4096])
def test_rows_on_a_midpoint_take_the_pair(hidden: int, dtype: torch.dtype) -> None:
    x = tie_rows(hidden).to(dtype)  # (powers of two: bf16 holds them; bf16 rows widen to fp32 rows)
    ours, ref = ours_and_torch_ops(x, None)
    assert_bits_equal(ours, ref)
    # negative control: each row's plain sum lands on the midpoint (it loses the 2^-54s),
    # so its total rounds to 1 (times 4^k) where the pair's rounds up, and for some rows
    # that moves the rms: a kernel that trusted the plain sum would give other bits
    plain = x.double().pow(2).sum(-1)
    pair = (1 + 2.0**-24 + 2.0**-52) * 4.0 ** torch.arange(-10.0, 10.0, dtype=torch.float64)
    assert torch.equal(plain, (1 + 2.0**-24) * 4.0 ** torch.arange(-10.0, 10.0, dtype=torch.float64))
    moved = [k for k in range(20) if rms_of_total(float(plain[k].float()), hidden)
             != rms_of_total(float(pair[k].float()), hidden)]
    assert len(moved) >= 2
    for k in moved:
        assert_bits_equal(ref[k], (x[k].float() / rms_of_total(float(pair[k].float()), hidden)).to(dtype))


def test_edge_rows_match_the_torch_ops() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4096, generator=g)
    x[0] = 0.0                                     # a zero row
    x[1] = 2.0**-149                               # subnormal squares
    x[2, ::3] = 2.0**-140
    x[3] = 3e38                                    # a total past fp32's range
    x[4, 5] = 1.8e19                               # a square near the top of fp32
    x[5] = torch.tensor(TIE + [0.0] * (4096 - len(TIE)))
    ours, ref = ours_and_torch_ops(x, None)
    assert_bits_equal(ours, ref)
    for bad in (float("inf"), float("nan")):
        y = x.clone()
        y[6, 9] = bad
        ours, ref = ours_and_torch_ops(y, None)
        assert_bits_equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorded_calls_keep_the_torch_ops_bits(dtype: torch.dtype) -> None:
    """Under grad the ops ask the kernel for each row's total (its rms for the backward):
    a proved row's pair comes back as (total, 0); y, dx and dW stay the torch ops' bits."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([tie_rows(4096), torch.randn(300, 4096, generator=g) * 2 + 0.5]).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    got = []
    for backend in (None, "torch_ops"):
        norm = tgn.RMSNorm(4096, accumulate="exact", dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(4096, generator=torch.Generator().manual_seed(6)) + 0.5)
        xr = x.clone().requires_grad_()
        if backend is None:
            y = norm(xr)
        else:
            with tgn.backends.use(backend):
                y = norm(xr)
        y.backward(dy)
        assert xr.grad is not None and norm.weight.grad is not None
        got.append((y.detach(), xr.grad, norm.weight.grad))
    for ours, ref in zip(*got):
        assert_bits_equal(ours, ref)
