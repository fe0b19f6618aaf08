"""The native exact weight gradient's fast routes against the torch form, bit for bit.

* ``tgn_exact_dw_rows_f32`` (``ExactSum.add_normalized``, ``native_grads.exact_dw(...,
  rms=)``) forms ``x_hat = x / rms`` in fp32 inside the kernel: its state must be the
  state :func:`kernels.exact_sum.add_products_` gives for ``dy`` and
  ``torch.div(x, rms)`` (one normal form: equal sums, equal int64 tensors).
* ``tgn_exact_round_f32`` (``ExactSum.result`` on CPU) must round every state as
  :func:`kernels.exact_sum.round_state` does, in fp32, bf16 and fp16.

Each comparison has a negative control that must see a difference.
"""

from __future__ import annotations

import pytest
import torch

from taskgraph_norm.errors import ExactSumError
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.backends.native import grads as native_grads
from taskgraph_norm.constants import SPLIT_PRODUCTS
from taskgraph_norm.ops.exact_grad import ExactGrad, ExactSum
from taskgraph_norm.kernels import exact_sum as es

from .helpers import assert_bits_equal, bits_equal

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_unavailable()}")

TINY = 2.0**-149
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def spread(rows: int, cols: int, binades: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mant = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return (mant * torch.exp2(torch.randint(-binades, binades + 1, (rows, cols), generator=g).double())).float()


def rms_of(x: torch.Tensor) -> torch.Tensor:
    """One fp32 value per row, as the forward's rms (any positive values do here)."""
    return x.double().pow(2).mean(1).add(1e-6).sqrt().float()


def hard_rows(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x, rms with wide dynamic ranges, zeros, -0.0, subnormals, NaN and inf."""
    dy, x = spread(rows, cols, 40, seed), spread(rows, cols, 20, seed + 1)
    rms = rms_of(x) * torch.exp2(torch.randint(-30, 30, (rows,), generator=torch.Generator().manual_seed(seed)))
    x[1] = 0.0
    x[2] = -0.0                                   # -0.0 products: they add nothing
    dy[3] = TINY * torch.randint(1, 9, (cols,)).float()  # subnormal dy ...
    x[3], rms[3] = TINY * 3, 1.0                   # ... times subnormal x: products near 2**-298
    x[4, ::3] = 2.0**100                          # with x[4, 1::3] about 1: many folds in one column
    dy[4] = torch.randn(cols, generator=torch.Generator().manual_seed(seed + 2))
    dy[5, 0] = float("nan")                       # NaN products
    x[6, -1] = float("inf")                       # +-inf products
    dy[7, :2] = float("-inf")
    rms[8] = 0.0                                  # x / 0: inf, -inf and NaN (0 / 0) x_hat
    x[8, 0] = 0.0
    rms[9] = float("inf")                         # x / inf: zeros
    return dy, x, rms


def torch_state(dy: torch.Tensor, x: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """The torch form's state with the x_hat the op would have written (torch.div)."""
    return es.add_products_(es.empty_state(x.shape[1]), dy, torch.div(x, rms.reshape(-1, 1)))


# rows: one row, within one 64-row block, not a multiple of it, several blocks;
# columns: within one 32-column tile, not a multiple of it, past a 1024-column panel.
SHAPES = [(1, 1), (12, 5), (64, 32), (65, 33), (130, 97), (70, 1100), (129, 2077)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_kernel_state_equals_the_torch_form(shape: tuple[int, int]) -> None:
    rows, cols = shape
    dy, x, rms = hard_rows(max(rows, 10), cols, rows * 31 + cols)
    dy, x, rms = dy[:rows], x[:rows], rms[:rows]
    want = torch_state(dy, x, rms)
    state = es.empty_state(cols)
    assert native_grads.exact_dw(state, dy, x, rms=rms) == 0
    assert torch.equal(state, want)
    assert torch.equal(ExactSum(cols).add_normalized(dy, x, rms).state, want)
    # the old entry over the torch x_hat: the same state again
    assert torch.equal(ExactSum(cols).add_products(dy, torch.div(x, rms.reshape(-1, 1))).state, want)


def test_fused_kernel_with_strides_column_ranges_and_threads() -> None:
    dy, x, rms = hard_rows(300, 1300, 3)  # 390,000 products: above SPLIT_PRODUCTS, caller and helper
    assert dy.numel() >= SPLIT_PRODUCTS
    want = torch_state(dy, x, rms)
    assert torch.equal(ExactSum(1300).add_normalized(dy, x, rms).state, want)
    wide_dy, wide_x = torch.cat([dy, dy], 1)[:, :1300], torch.cat([x, x], 1)[:, :1300]  # row stride 2600
    state = es.empty_state(1300)
    for c0, c1 in ((0, 7), (7, 700), (700, 1300)):  # any cut, not only multiples of the tile
        native_grads.exact_dw(state, wide_dy, wide_x, (c0, c1), rms)
    assert torch.equal(state, want)


def test_fused_kernel_negative_controls() -> None:
    dy, x, rms = hard_rows(80, 40, 7)
    want = torch_state(dy, x, rms)
    # one element of x one ulp away: the state sees it
    x2 = x.clone()
    x2[20, 5] = torch.nextafter(x2[20, 5], torch.tensor(float("inf")))
    assert not torch.equal(ExactSum(40).add_normalized(dy, x2, rms).state, want)
    # x * (1 / rms) is not the division's bits for every element: the state sees that too
    other = es.add_products_(es.empty_state(40), dy, x * (1 / rms.reshape(-1, 1)))
    assert not torch.equal(other, want)


def test_module_backward_uses_the_fused_route_with_the_same_bits() -> None:
    dy, x, rms = hard_rows(96, 64, 9)
    dy, x = dy[10:], x[10:]  # finite rows: what a training step would hand over
    param = torch.nn.Parameter(torch.ones(64))
    carrier = ExactGrad()
    carrier.accumulate_normalized(param, dy[:40], x[:40], rms_of(x[:40]))
    carrier.accumulate_normalized(param, dy[40:], x[40:], rms_of(x[40:]))
    carrier.finish(param)
    assert param.grad is not None
    whole = ExactSum(64).add_products(dy, torch.div(x, rms_of(x).reshape(-1, 1)))
    assert_bits_equal(param.grad, whole.result(torch.float32))
    assert torch.equal(carrier.state(param).state, whole.state)


def test_add_normalized_bad_inputs_are_clear_errors() -> None:
    s = ExactSum(4)
    with pytest.raises(ExactSumError, match="float32 x and rms"):
        s.add_normalized(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(2))
    with pytest.raises(ExactSumError, match="one value per row"):
        s.add_normalized(torch.ones(2, 4), torch.ones(2, 4), torch.ones(3))
    with pytest.raises(ExactSumError, match="same shape"):
        s.add_normalized(torch.ones(2, 4), torch.ones(3, 4), torch.ones(3))
    with pytest.raises(ExactSumError, match=r"\(\.\.\., 4\)"):
        ExactGrad().accumulate_normalized(torch.nn.Parameter(torch.ones(4)), torch.ones(2, 5),
                                          torch.ones(2, 5), torch.ones(2))
    with pytest.raises(ValueError, match="one per row"):
        native_grads.exact_dw(es.empty_state(4), torch.ones(2, 4), torch.ones(2, 4), rms=torch.ones(3))


# --- rounding in C ---------------------------------------------------------------------


def random_states(columns: int, seed: int) -> torch.Tensor:
    """Normalised states of every size: digits from the bottom to the top, either sign,
    the specials' counters set in a few columns."""
    g = torch.Generator().manual_seed(seed)
    state = es.empty_state(columns)
    tops = torch.randint(0, es.DIGITS, (columns,), generator=g)
    digits = torch.randint(-2**31, 2**31, (es.DIGITS, columns), generator=g)
    sparse = torch.rand(es.DIGITS, columns, generator=g) < 0.3  # zero runs: exact and sticky cases
    digits = torch.where(sparse, torch.zeros_like(digits), digits)
    keep = torch.arange(es.DIGITS).unsqueeze(1) <= tops
    state[:es.DIGITS] = torch.where(keep, digits, torch.zeros_like(digits))
    state[es.DIGITS - 1, :columns // 8] = torch.randint(-es.TOP_LIMIT, es.TOP_LIMIT, (columns // 8,), generator=g)
    for row, every in ((es.NAN_ROW, 97), (es.POS_INF_ROW, 89), (es.NEG_INF_ROW, 83)):
        state[row, ::every] = 1
    return es.normalize_(state)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_rounding_equals_round_state(dtype: torch.dtype) -> None:
    for state in (random_states(5000, 1), ExactSum(300).add_products(*hard_rows(150, 300, 4)[:2]).state):
        assert_bits_equal(native_grads.exact_round(state, dtype), es.round_state(state, dtype), str(dtype))
        assert_bits_equal(ExactSum.from_state(state).result(dtype), es.round_state(state, dtype))


def test_native_rounding_negative_control() -> None:
    # 1 + 2**-8 + 2**-30: above bf16's midpoint between 1 and 1 + 2**-7, so 1 + 2**-7;
    # rounding to fp32 first (to nearest) lands on the midpoint and then on 1.0.
    rows = torch.tensor([[1.0], [2.0**-8], [2.0**-30]])
    state = ExactSum(1).add_values(rows).state
    right = native_grads.exact_round(state, torch.bfloat16)
    assert right.item() == 1 + 2.0**-7
    assert not bits_equal(right, native_grads.exact_round(state, torch.float32).to(torch.bfloat16))
    # and a state one unit (2**-320) away rounds alike but is not equal: the comparison sees states
    bumped = state.clone()
    bumped[0] += 1
    assert not torch.equal(bumped, state)


def test_native_rounding_bad_inputs() -> None:
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        native_grads.exact_round(es.empty_state(3), torch.float64)
    with pytest.raises(ValueError, match="contiguous"):
        native_grads.exact_round(es.empty_state(6)[:, ::2], torch.float32)
