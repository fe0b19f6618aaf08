"""The exact weight gradient's Triton kernel: the torch form's state, bit for bit.

In Triton's interpreter on CPU tensors (``TRITON_INTERPRET`` set per test, as in
tests/test_triton.py), and on a GPU (``-m gpu``): the int64 state after
``backends/triton/exact_dw.add_products_`` equals ``kernels.exact_sum.add_products_``'s
(and the C kernel's) for fp32 / bf16 / fp16 operands, wide dynamic range, zeros,
subnormal factors and products, NaN and infinities, rows and columns that are not
multiples of the block and the tile, several calls accumulated; the fused ``x / rms``
entry equals the products of ``ops.exact_weight._x_hat``.  Negative controls: a fold
constant too small for the block (inexact block sums) and a changed last bit change
the state.
"""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.errors import ExactSumError, ExactSumOverflowError, ExecutionError
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.ops.exact_grad import ExactSum
from taskgraph_norm.backends.triton import exact_dw
from taskgraph_norm.kernels import exact_sum as es
from taskgraph_norm.ops.exact_weight import _x_hat
from .conftest import gen
from .test_exact_grad import edge_columns, wide_rows

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA = torch.cuda.is_available()
TINY = 2.0**-149  # the smallest fp32 subnormal: TINY * TINY = 2**-298, the smallest product


def torch_state(dy: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return es.add_products_(es.empty_state(dy.shape[-1]), dy, x_hat)


def triton_state(dy: torch.Tensor, x_hat: torch.Tensor, rms: torch.Tensor | None = None) -> torch.Tensor:
    return exact_dw.add_products_(es.empty_state(dy.shape[-1], dy.device), dy, x_hat, rms)


def hard_operands(rows: int, cols: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Products over the whole exponent range in each column (in the operands' dtype),
    with zero columns, subnormal factors and products, cancellation, NaN and infinities."""
    lo, hi = {torch.float32: (-60, 60), torch.bfloat16: (-60, 60), torch.float16: (-12, 7)}[dtype]
    g = gen(seed)
    dy = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(lo, hi, (rows, cols), generator=g).float())
    x_hat = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(lo, hi, (rows, cols), generator=g).float())
    dy, x_hat = dy.to(dtype), x_hat.to(dtype)
    tiny = torch.finfo(dtype).smallest_normal * 2.0**-3  # a subnormal of the dtype
    dy[:, 0] = 0.0                                   # a zero column (-0 products too)
    x_hat[::2, 0] = -1.0
    dy[:, 1], x_hat[:, 1] = tiny, tiny               # subnormal x subnormal
    dy[::3, 2], x_hat[::3, 2] = torch.finfo(dtype).max, -torch.finfo(dtype).max  # the largest products...
    dy[1::3, 2], x_hat[1::3, 2] = tiny, tiny         # ... with the smallest in one column
    dy[2, 3], dy[3, 3], x_hat[2, 3], x_hat[3, 3] = 2.0, 2.0, 3.0, -3.0  # exact cancellation
    dy[5, 4], x_hat[6, 4] = float("nan"), float("inf")
    dy[7, 5], x_hat[7, 5], dy[8, 6], x_hat[8, 6] = float("inf"), -1.0, float("-inf"), 0.0  # -inf; 0 * inf: NaN
    dy[9, 7], x_hat[9, 7], dy[10, 7], x_hat[10, 7] = float("inf"), 1.0, float("inf"), -1.0  # +inf and -inf
    return dy, x_hat


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_matches_the_torch_form(interpreted: None, dtype: torch.dtype) -> None:
    # 70 rows: a full block of 64 and a tail; 100 columns: a tile of 64 and a tail.
    dy, x_hat = hard_operands(70, 100, dtype, seed=1)
    want = torch_state(dy, x_hat)
    assert torch.equal(triton_state(dy, x_hat), want)
    assert int(want[es.NAN_ROW].sum()) == 2 and int(want[es.POS_INF_ROW:].sum()) == 4  # the specials were seen


def test_mixed_dtypes_and_the_c_kernel(interpreted: None) -> None:
    dy, x_hat = wide_rows(130, 40, 3)
    for a, b in ((dy, x_hat.bfloat16()), (dy.half(), x_hat)):
        assert torch.equal(triton_state(a, b), torch_state(a, b))
    if native.available():  # the C route to the same integers
        assert torch.equal(triton_state(dy, x_hat), ExactSum(40).add_products(dy, x_hat).state)


def test_edge_columns_and_extremes(interpreted: None) -> None:
    dy, x_hat = edge_columns()
    assert torch.equal(triton_state(dy, x_hat), torch_state(dy, x_hat))
    # The widest column there is: 2**-298 products under 2**254 ones (13 folds), one row each.
    col = torch.tensor([[TINY, 1.9 * 2.0**127, -TINY, 3.0 * 2.0**-140]]).T
    other = torch.tensor([[TINY, 1.9 * 2.0**127, TINY, 2.0**-10]]).T
    assert torch.equal(triton_state(col, other), torch_state(col, other))


def test_calls_accumulate_as_one(interpreted: None) -> None:
    """Three calls of 1, 64 and 5 rows into one state equal one torch call of all rows."""
    dy, x_hat = hard_operands(70, 37, torch.float32, seed=2)
    state = es.empty_state(37)
    for part in (slice(0, 1), slice(1, 65), slice(65, 70)):
        exact_dw.add_products_(state, dy[part], x_hat[part])
    assert torch.equal(state, torch_state(dy, x_hat))
    assert torch.equal(state, triton_state(dy.flip(0), x_hat.flip(0)))  # rows in another order


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_x_and_rms_matches_the_x_hat_products(interpreted: None, dtype: torch.dtype) -> None:
    g = gen(4)
    x = (torch.randn(67, 70, generator=g) * torch.logspace(-4, 4, 70)).to(dtype)
    dy = torch.randn(67, 70, generator=g).to(dtype)
    rms = (x.float().square().mean(-1, keepdim=True) + 1e-6).sqrt()
    rms[3] = 0.0  # x / 0: +-inf, and NaN for x = 0 (counted, as the torch form counts them)
    x[3, :4] = 0.0
    x[5, 7] = float("nan")
    x_hat = _x_hat(x, rms)
    want = torch_state(dy, x_hat)
    assert int(want[es.NAN_ROW].sum()) >= 5
    assert torch.equal(triton_state(dy, x, rms), want)
    if dtype != torch.float32:  # negative control: x_hat not rounded to x's dtype differs
        assert not torch.equal(want, torch_state(dy, x.float() / rms))


def test_exact_sum_and_the_module_use_it(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    dy, x_hat = wide_rows(20, 48, 5)
    calls: list[int] = []
    real = exact_dw.add_products_

    def spy(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(exact_dw, "add_products_", spy)
    expected = ExactSum(48).add_products(dy, x_hat).state  # the flag is off: C or torch
    assert calls == []
    monkeypatch.setattr(exact_dw, "TRITON_ON_CPU", True)
    assert torch.equal(ExactSum(48).add_products(dy, x_hat).state, expected) and calls == [1]
    # weight_grad="exact" end to end: the same weight.grad bits with the kernel.
    x = torch.randn(2, 9, 48, generator=gen(6)).bfloat16()
    grads = []
    for on_cpu in (True, False):
        monkeypatch.setattr(exact_dw, "TRITON_ON_CPU", on_cpu)
        norm = tgn.RMSNorm(48, weight_grad="exact", dtype=torch.bfloat16)
        norm(x).float().square().sum().backward()
        assert norm.weight.grad is not None
        grads.append(norm.weight.grad.view(torch.int16))
    assert len(calls) >= 2 and torch.equal(grads[0], grads[1])


def test_negative_controls(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 rows of full 48-bit products in one block: with L = 1 instead of 7 the block's
    # sum of pre-rounded products passes 2**53 units and rounds.
    g = gen(7)
    dy = 1 + torch.rand(64, 8, generator=g)
    x_hat = 1 + torch.rand(64, 8, generator=g)
    want = torch_state(dy, x_hat)
    assert torch.equal(triton_state(dy, x_hat), want)
    changed = x_hat.clone()
    changed[40, 3] = torch.nextafter(changed[40, 3], torch.tensor(2.0))
    assert not torch.equal(triton_state(dy, changed), want)  # one last bit shows
    monkeypatch.setattr(exact_dw, "FOLD_L", 1)
    assert not torch.equal(triton_state(dy, x_hat), want)


def test_errors(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    state = es.empty_state(4)
    with pytest.raises(ExactSumError, match="float32, bfloat16 or float16"):
        exact_dw.add_products_(state, torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ExactSumError, match="same shape"):
        exact_dw.add_products_(state, torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(ExactSumError, match="whole rows"):
        exact_dw.add_products_(state, torch.ones(5), torch.ones(5))
    with pytest.raises(ExactSumError, match="rms must be float32"):
        exact_dw.add_products_(state, torch.ones(2, 4), torch.ones(2, 4), torch.ones(3))
    big = torch.full((1, 4), 1.99 * 2.0**127)
    state[es.DIGITS - 1] = es.TOP_LIMIT  # as if 2**40 of the largest products were in
    with pytest.raises(ExactSumOverflowError) as info:
        exact_dw.add_products_(state, big, big)
    assert info.value.columns == 4
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ExecutionError, match="TRITON_INTERPRET"):
        exact_dw.add_products_(es.empty_state(4), torch.ones(2, 4), torch.ones(2, 4))
    assert not exact_dw.runs(es.empty_state(4))


def test_gpu_bench_exact_dw_dry_run(interpreted: None, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/gpu_bench.py's exact-dW bits check and timing table, on CPU tensors
    through the interpreted kernel (what the GPU run does, at a toy size)."""
    from benchmarks import gpu_bench

    monkeypatch.setattr(gpu_bench, "DEVICE", "cpu")
    monkeypatch.setattr(exact_dw, "TRITON_ON_CPU", True)
    assert gpu_bench.check_exact_dw_bits(6, 40, torch.bfloat16)
    medians = gpu_bench.bench_exact_dw(6, 40, torch.float32, rounds=1, inner=1)
    assert len(medians) == 5 and "| exact backward (dx, exact dW) |" in capsys.readouterr().out


@pytest.mark.parametrize("dtype,from_x", [(torch.float32, False), (torch.bfloat16, True)])
def test_ptx_rounds_like_the_cpu(dtype: torch.dtype, from_x: bool) -> None:
    """Compiled for sm_90 here: no contraction, flush-to-zero or approximation; fp64
    adds and multiplies, an exact fp64 -> int64 conversion, int64 reductions into
    the state.  Negative control: with contraction on, ``a * b + sigma`` is an fma."""
    pytest.importorskip("triton")
    from taskgraph_norm.backends.triton.ptx import exact_dw_ptx, forbidden_instructions

    ptx = exact_dw_ptx(dtype, from_x=from_x)
    assert forbidden_instructions(ptx) == []
    for op in ("red.global.gpu.relaxed.add.u64", "add.rn.f64", "mul.rn.f64", "cvt.rzi.s64.f64"):
        assert op in ptx, op
    assert ("div.rn.f32" in ptx) == from_x
    if not from_x:
        assert "red.global.gpu.relaxed.add.u32" in exact_dw_ptx(dtype, part="normalize")  # the overflow count
        assert any(op.startswith("fma.rn.f64") for op in forbidden_instructions(exact_dw_ptx(dtype, fp_fusion=True)))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_state_matches_cpu(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    for rows, cols in ((70, 100), (5000, 4096)):
        dy, x_hat = hard_operands(rows, cols, dtype, seed=rows)
        want = ExactSum(cols).add_products(dy, x_hat).state  # the CPU's: C (or torch ops)
        assert torch.equal(triton_state(dy.cuda(), x_hat.cuda()).cpu(), want), (rows, cols)
        assert torch.equal(ExactSum(cols, "cuda").add_products(dy.cuda(), x_hat.cuda()).state.cpu(), want)
        rms = (x_hat.float().square().mean(-1, keepdim=True) + 1e-6).sqrt()
        want_x = ExactSum(cols).add_products(dy, _x_hat(x_hat, rms)).state
        assert torch.equal(triton_state(dy.cuda(), x_hat.cuda(), rms.cuda()).cpu(), want_x)
    x = torch.randn(3, 300, 512, generator=gen(8)).to(dtype)
    grads = []
    for device in ("cpu", "cuda"):
        norm = tgn.RMSNorm(512, weight_grad="exact", dtype=dtype, device=device)
        norm(x.to(device)).float().square().sum().backward()
        assert norm.weight.grad is not None
        grads.append(norm.weight.grad.cpu())
    assert torch.equal(grads[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       grads[1].view(torch.int16 if dtype != torch.float32 else torch.int32))
