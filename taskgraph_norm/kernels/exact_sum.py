"""Exact, order-free column sums of products: the long accumulator of ``weight_grad="exact"``.

The state of ``n`` column sums is one int64 tensor of shape ``(STATE_ROWS, n)``
(docs/training.md has the argument in full):

* rows ``0 .. DIGITS-1``: a long fixed-point number per column, in radix
  ``2**32``: ``value[j] = sum_k state[k, j] * 2**(32 k + BASE_EXPONENT)``.
  ``BASE_EXPONENT = -320`` is below ``2**-298``, the quantum of every product
  of two fp32 values (the smallest subnormal squared), and the top digit's weight
  ``2**256`` is above the largest such product, so **every product of two fp32
  values is an integer number of units**: adding it is integer addition, exact,
  associative and commutative.
* rows ``NAN_ROW``, ``POS_INF_ROW``, ``NEG_INF_ROW``: how many products were NaN,
  +inf and -inf (counts add the same way).

After :func:`normalize_` the digits are *balanced*: digits ``0 .. DIGITS-2`` lie
in ``[-2**31, 2**31)``, the top digit in ``[-TOP_LIMIT, TOP_LIMIT]``.  Every
integer has exactly one such form, so equal sums give equal states, bit for bit,
whatever the order, grouping or split of the rows.  States merge by adding the
tensors (any order: integer addition; this is what ``all_reduce(SUM)`` does) and
normalising once.  :func:`round_state` gives the correctly rounded value in
fp32, bf16 or fp16.

This module is the torch form (any device).  ``backends/native/csrc/native_dw.c``
(``tgn_exact_dw_f32``, and ``tgn_exact_dw_rows_f32`` forming ``x / rms`` itself)
adds products on the CPU by another route to the same integers (exact
Demmel-Nguyen folds of each block of rows), and ``tgn_exact_round_f32`` rounds
with :func:`round_state`'s operations; the tests compare states and roundings.
"""

from __future__ import annotations

import torch

from ..constants import EXACT_BASE_EXPONENT as BASE_EXPONENT
from ..constants import EXACT_DIGIT_BITS as DIGIT_BITS
from ..constants import EXACT_DIGITS as DIGITS
from ..constants import EXACT_TOP_LIMIT as TOP_LIMIT
from ..errors import ExactSumError, ExactSumOverflowError

__all__ = [
    "BASE_EXPONENT",
    "DIGITS",
    "DIGIT_BITS",
    "NAN_ROW",
    "NEG_INF_ROW",
    "POS_INF_ROW",
    "ROWS_PER_ADD",
    "STATE_ROWS",
    "TOP_LIMIT",
    "add_products_",
    "check_state",
    "empty_state",
    "normalize_",
    "round_state",
]

NAN_ROW, POS_INF_ROW, NEG_INF_ROW = DIGITS, DIGITS + 1, DIGITS + 2
STATE_ROWS = DIGITS + 3
#: Rows added between normalisations: each adds less than ``2**33`` to a digit,
#: far below the ``2**62`` headroom of the int64 digits.
ROWS_PER_ADD = 1 << 24

_RADIX = 1 << DIGIT_BITS
_HALF = 1 << (DIGIT_BITS - 1)
_LOW = _RADIX - 1
_ACCEPTED = (torch.float32, torch.bfloat16, torch.float16)
_ROUND_COLUMNS = 1024  # 19 x 1024 digits: below torch's CPU parallel grain (32768)


def empty_state(numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The state of ``numel`` empty sums (all zero)."""
    return torch.zeros(STATE_ROWS, numel, dtype=torch.int64, device=device)


def check_state(state: torch.Tensor, numel: int | None = None) -> None:
    """Raise :class:`ExactSumError` unless ``state`` has the state's shape and dtype."""
    if state.dtype != torch.int64 or state.dim() != 2 or state.shape[0] != STATE_ROWS or (
        numel is not None and state.shape[1] != numel
    ):
        want = f"({STATE_ROWS}, {'n' if numel is None else numel})"
        raise ExactSumError(f"an exact state is an int64 tensor of shape {want}; got "
                            f"{state.dtype}{list(state.shape)}")


def as_rows(t: torch.Tensor, numel: int, name: str, *, widen: bool = True) -> torch.Tensor:
    """``t`` as a ``(rows, numel)`` fp32 tensor (fp16/bf16 widen exactly; kept in their
    dtype with ``widen=False``, for a kernel that widens them itself)."""
    if t.dtype not in _ACCEPTED:
        raise ExactSumError(f"{name} must be float32, bfloat16 or float16 (products of two such "
                            f"values are exact in float64); got {t.dtype}")
    if numel == 0 or t.numel() % numel:
        raise ExactSumError(f"{name} of shape {list(t.shape)} is not whole rows of {numel} elements")
    rows = t.reshape(-1, numel)
    return rows.to(torch.float32) if widen else rows


def normalize_(state: torch.Tensor) -> torch.Tensor:
    """Carry the digits of ``state`` into balanced form, in place; returns ``state``.

    Raises :class:`ExactSumOverflowError` when a top digit passes ``TOP_LIMIT``.
    """
    digits = state[:DIGITS]
    for k in range(DIGITS - 1):
        carry = (digits[k] + _HALF) >> DIGIT_BITS  # floor division: balanced remainder
        digits[k] -= carry << DIGIT_BITS
        digits[k + 1] += carry
    over = int((digits[DIGITS - 1].abs() > TOP_LIMIT).sum())
    if over:
        raise ExactSumOverflowError(over, f"|sum| must stay below 2**{40 + 256}")
    return state


def _add_digit_products(digits: torch.Tensor, p: torch.Tensor) -> None:
    """Add finite fp64 values ``p`` (rows, n), multiples of ``2**-298``, into ``digits``."""
    mantissa, exponent = torch.frexp(p)  # p = mantissa * 2**exponent, |mantissa| in [0.5, 1)
    m = torch.ldexp(mantissa, torch.tensor(53.0, dtype=torch.float64, device=p.device)).to(torch.int64)
    shift = exponent.to(torch.int64) - (53 + BASE_EXPONENT)
    # The smallest products sit below 2**(BASE + 53): their low mantissa bits are
    # zero (p is a multiple of 2**-298), so the right shift drops only zeros.
    m = torch.where(shift < 0, m >> (-shift).clamp(min=0), m)
    shift = shift.clamp(min=0)
    k, o = shift >> 5, shift & (DIGIT_BITS - 1)
    # m * 2**o = hi * 2**32 + lo with 0 <= lo < 2**63 and |hi| < 2**52 (a product, not a
    # left shift, for the negative hi).
    lo, hi = (m & _LOW) << o, (m >> DIGIT_BITS) * (torch.ones_like(o) << o)
    digits.scatter_add_(0, k, lo & _LOW)
    digits.scatter_add_(0, k + 1, (lo >> DIGIT_BITS) + (hi & _LOW))
    digits.scatter_add_(0, k + 2, hi >> DIGIT_BITS)


def add_products_(state: torch.Tensor, dy: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``state += sum over rows of dy * x_hat``, exactly, in place; returns ``state``.

    ``dy`` and ``x_hat`` are fp32, bf16 or fp16, of the same shape, whole rows of
    ``n = state.shape[1]`` elements.  Each product is formed in fp64 (exact: 48
    significant bits, exponent in ``[-298, 256]``) and its integer number of
    units is added digit by digit; a NaN or infinite product is counted instead.
    """
    numel = state.shape[1]
    check_state(state)
    if dy.shape != x_hat.shape:
        raise ExactSumError(f"dy {list(dy.shape)} and x_hat {list(x_hat.shape)} must have the same shape")
    a, b = as_rows(dy, numel, "dy"), as_rows(x_hat, numel, "x_hat")
    digits = state[:DIGITS]
    step = max(1, min(ROWS_PER_ADD, (1 << 22) // max(numel, 1)))  # bounds the temporaries too
    for start in range(0, a.shape[0], step):
        p = a[start:start + step].double() * b[start:start + step].double()
        finite = torch.isfinite(p)
        if not bool(finite.all()):
            state[NAN_ROW] += p.isnan().sum(0)
            state[POS_INF_ROW] += (p == float("inf")).sum(0)
            state[NEG_INF_ROW] += (p == float("-inf")).sum(0)
            p = torch.where(finite, p, torch.zeros_like(p))
        _add_digit_products(digits, p)
        if start + step < a.shape[0]:
            normalize_(state)
    return normalize_(state)


# --- rounding ---------------------------------------------------------------------


def _two_sum_error(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The exact error ``(a + b) - s`` of ``s = fl(a + b)`` (Knuth's TwoSum)."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0**exponent`` for int64 exponents in fp64's normal range, built from its bits."""
    return ((exponent + 1023) << 52).view(torch.float64)


def _magnitude_digits(digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(negative, mag)``: the sign of balanced ``digits`` and the standard
    (``[0, 2**32)``, top unbounded) digits of their absolute value."""
    index = torch.arange(DIGITS, device=digits.device).unsqueeze(1)
    top = torch.where(digits != 0, index, -1).amax(0)
    negative = digits.gather(0, top.clamp(min=0).unsqueeze(0))[0] < 0
    mag = torch.where(negative, -digits, digits)
    for k in range(DIGITS - 1):
        carry = mag[k] >> DIGIT_BITS
        mag[k] -= carry << DIGIT_BITS
        mag[k + 1] += carry
    return negative, mag


def _round_to_odd_f64(mag: torch.Tensor) -> torch.Tensor:
    """Each column's value (standard digits ``mag``) rounded to 53 bits *to odd*.

    Round-to-odd keeps enough of the exact value (its inexactness lives in the
    last bit) that one later round-to-nearest-even to at most 51 bits is the
    correct rounding of the exact value (Boldo and Melquiond).  The top three
    digits hold at least 65 significant bits; every lower bit is a sticky bit.
    """
    device = mag.device
    index = torch.arange(DIGITS, device=device).unsqueeze(1)
    nonzero = mag != 0
    top = torch.where(nonzero, index, -1).amax(0)
    zero = top < 0
    top = top.clamp(min=2)  # a small value reads zero digits below index 0: none exist, so pad

    def digit(offset: int) -> torch.Tensor:
        return mag.gather(0, (top - offset).unsqueeze(0))[0].double()

    a, b, c = digit(0) * 2.0**64, digit(1) * 2.0**32, digit(2)
    below = torch.cumsum(nonzero.to(torch.int64), 0)  # nonzero digits at or below k
    sticky = (top >= 3) & (below.gather(0, (top - 3).clamp(min=0).unsqueeze(0))[0] > 0)
    s1 = a + b
    t = _two_sum_error(a, b, s1) + c  # exact: an integer below 2**53 units
    s = s1 + t
    error = _two_sum_error(s1, t, s)
    up = (error > 0) | ((error == 0) & sticky)
    inexact = (error != 0) | sticky
    other = torch.nextafter(s, torch.where(up, torch.full_like(s, float("inf")), torch.zeros_like(s)))
    odd = (s.view(torch.int64) & 1) == 1
    rounded = torch.where(inexact & ~odd, other, s)
    value = rounded * _pow2(DIGIT_BITS * (top - 2) + BASE_EXPONENT)  # exact: a power of two
    return torch.where(zero, torch.zeros_like(value), value)


def _round_to_odd_f32(v: torch.Tensor) -> torch.Tensor:
    """fp64 ``v`` rounded to fp32 *to odd* (overflow gives the odd ``FLT_MAX``)."""
    f = v.to(torch.float32)
    back = f.double()
    toward_zero = torch.where(back.abs() > v.abs(), torch.nextafter(f, torch.zeros_like(f)), f)
    odd = (toward_zero.view(torch.int32) | 1).view(torch.float32)
    return torch.where(back == v, f, odd)


def round_state(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The correctly rounded value of each column sum in ``dtype`` (fp32, bf16, fp16).

    Round to nearest, ties to even, with subnormal results and overflow to ±inf
    as IEEE rounding gives them.  A column with a NaN product, or with both +inf
    and -inf products, is NaN; else one with +inf (-inf) products is +inf (-inf),
    as a float sum would be.  An exact zero is +0.0.  ``state`` must be normalised.
    """
    if dtype not in _ACCEPTED:
        raise ExactSumError(f"an exact sum rounds to float32, bfloat16 or float16; not {dtype}")
    if state.device.type == "cpu" and state.shape[1] > _ROUND_COLUMNS:
        # Column blocks small enough that each op stays on one thread: torch would
        # parallelise these short ops, and waking its pool costs more than they do.
        return torch.cat([round_state(state[:, c:c + _ROUND_COLUMNS], dtype)
                          for c in range(0, state.shape[1], _ROUND_COLUMNS)])
    negative, mag = _magnitude_digits(state[:DIGITS])
    v = _round_to_odd_f64(mag)
    v = torch.where(negative, -v, v)
    out = v.to(torch.float32) if dtype == torch.float32 else _round_to_odd_f32(v).to(dtype)
    nan = (state[NAN_ROW] > 0) | ((state[POS_INF_ROW] > 0) & (state[NEG_INF_ROW] > 0))
    out = torch.where(state[POS_INF_ROW] > 0, torch.full_like(out, float("inf")), out)
    out = torch.where(state[NEG_INF_ROW] > 0, torch.full_like(out, float("-inf")), out)
    return torch.where(nan, torch.full_like(out, float("nan")), out)
