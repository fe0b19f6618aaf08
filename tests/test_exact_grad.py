"""The exact weight-gradient accumulator (kernels/exact_sum.py, ops/exact_grad.py, native_dw.c).

Truth is computed independently: every product as a Python ``Fraction`` (exact),
summed, and rounded to the target format by :func:`round_fraction` (ties to even,
subnormals, overflow), for every column.  The accumulator must give those bits for
any split of the rows into micro-batches, in any order; the float sum over the
same splits is the negative control that must differ.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from taskgraph_norm.errors import ExactSumError, ExactSumOverflowError
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.ops.exact_grad import ExactGrad, ExactSum
from taskgraph_norm.kernels import exact_sum as es

from .helpers import assert_bits_equal, bits_equal, product_columns

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: (precision bits, minimum normal exponent, maximum exponent) of each format.
FORMATS = {torch.float32: (24, -126, 127), torch.bfloat16: (8, -126, 127), torch.float16: (11, -14, 15)}
TINY = 2.0**-149  # the smallest fp32 subnormal: TINY * TINY = 2**-298, the unit of every product


def round_fraction(v: Fraction, dtype: torch.dtype) -> float:
    """``v`` correctly rounded to ``dtype`` (ties to even, subnormals, overflow to inf)."""
    if v == 0:
        return 0.0
    p, emin, emax = FORMATS[dtype]
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, emin) - p + 1)
    q, r = divmod(a, quantum)
    if r > quantum / 2 or (r == quantum / 2 and q % 2 == 1):
        q += 1
    out = q * quantum
    magnitude = math.inf if out >= Fraction(2) ** (emax + 1) else float(out)
    return math.copysign(magnitude, v)


def exact_column_sums(dy: torch.Tensor, x_hat: torch.Tensor) -> list[Fraction]:
    a, b = dy.reshape(-1, dy.shape[-1]).tolist(), x_hat.reshape(-1, dy.shape[-1]).tolist()
    return [sum((Fraction(r[j]) * Fraction(s[j]) for r, s in zip(a, b)), Fraction(0))
            for j in range(dy.shape[-1])]


def truth(dy: torch.Tensor, x_hat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    values = [round_fraction(v, dtype) for v in exact_column_sums(dy, x_hat)]
    return torch.tensor(values, dtype=torch.float64).to(dtype)  # exact: representable


def state_value(state: torch.Tensor) -> list[Fraction]:
    digits = state[:es.DIGITS].tolist()
    return [sum((Fraction(digits[k][j]) * Fraction(2) ** (32 * k + es.BASE_EXPONENT)
                 for k in range(es.DIGITS)), Fraction(0)) for j in range(state.shape[1])]


def wide_rows(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows whose products span many binades and cancel: rounding order shows."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-24, 24, (rows, cols), generator=g).float())
    x_hat = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-8, 8, (rows, cols), generator=g).float())
    return dy, x_hat


def edge_columns() -> tuple[torch.Tensor, torch.Tensor]:
    """Columns that test the rounding: ties, a sticky bit 2**-298 far below, subnormal
    and overflowing sums, exact cancellation, the largest products."""
    big = 1.9 * 2.0**127
    cols = [
        [(1.0, 1.0), (2.0**-24, 1.0)],                    # 1 + 2**-24: a tie, to even (1.0)
        [(1.0, 1.0), (2.0**-24, 1.0), (TINY, TINY)],      # ... plus 2**-298: rounds up
        [(1.0, 1.0), (2.0**-24, 1.0), (-TINY, TINY)],     # ... minus 2**-298: rounds down
        [(1.0, 1.0), (3 * 2.0**-25, 1.0)],                # above the tie
        [(2.0**-100, 2.0**-49), (2.0**-100, 2.0**-50)],   # subnormal fp32 sum
        [(TINY, TINY), (TINY, TINY)],                     # far below every format: +0 ... or not
        [(big, 2.0), (big, 2.0)],                         # past fp32 max: inf
        [(-big, 2.0), (-big, 1.0)],                       # -inf
        [(big, big), (-big, big), (3.0, 5.0)],            # 2**254 products cancel exactly: 15
        [(big, big), (big, big)],                         # the largest products: inf
        [(300.0, 200.0), (1.5, 1.0)],                     # 60001.5: 60000 in fp16
        [(256.0, 256.0), (-0.0, 1.0)],                    # 65536: inf in fp16
        [(1.0, -0.0), (-0.0, 1.0)],                       # zeros: +0.0
    ]
    return product_columns(cols)


# --- the state ------------------------------------------------------------------------


@pytest.mark.parametrize("use_native", [True, False])
def test_state_is_the_exact_integer_and_rounds_correctly(use_native: bool) -> None:
    if use_native and not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    for dy, x_hat in (wide_rows(150, 40, 1), edge_columns()):
        s = ExactSum(dy.shape[1])
        if use_native:
            s.add_products(dy, x_hat)
        else:
            with native.disabled():
                s.add_products(dy, x_hat)
        assert state_value(s.state) == exact_column_sums(dy, x_hat)
        digits = s.state[:es.DIGITS - 1]
        assert bool(((digits >= -2**31) & (digits < 2**31)).all())  # the balanced normal form
        for dtype in DTYPES:
            assert_bits_equal(s.result(dtype), truth(dy, x_hat, dtype), str(dtype))


def test_edge_columns_round_as_ieee_says() -> None:
    r = ExactSum(13).add_products(*edge_columns()).result(torch.float32).tolist()
    assert r[0] == 1.0 and r[1] == 1.0 + 2.0**-23 and r[2] == 1.0 and r[3] == 1.0 + 2.0**-23
    assert r[4] == 2.0**-148  # 1.5 * 2**-149: a subnormal tie, to the even 2**-148
    assert r[5] == 0.0 and r[6] == math.inf and r[7] == -math.inf and r[8] == 15.0 and r[9] == math.inf
    assert math.copysign(1.0, r[12]) == 1.0
    half = ExactSum(13).add_products(*edge_columns()).result(torch.float16).tolist()
    assert half[10] == 60000.0 and half[11] == math.inf


@pytest.mark.parametrize("shape", [(1, 1), (63, 31), (64, 32), (65, 33), (200, 97), (7, 300)])
def test_native_and_torch_give_the_same_state(shape: tuple[int, int]) -> None:
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    dy, x_hat = wide_rows(*shape, seed=shape[0])
    dy[0, 0], x_hat[-1, -1] = float("nan"), float("inf")
    strided = torch.cat([x_hat, x_hat], dim=1)[:, :shape[1]]  # a row stride that is not the width
    with native.disabled():
        expected = ExactSum(shape[1]).add_products(dy, strided).state
    assert torch.equal(ExactSum(shape[1]).add_products(dy, strided).state, expected)


def test_the_direct_folds_worst_cases_keep_the_exact_integer() -> None:
    """The C kernel's direct route folds a 64-row block of a 32-column tile once, its
    first fold's sum kept biased (native_dw_direct.c): columns whose 64 products all
    equal the tile's bound, of either sign (the largest sum the bias must hold), and
    columns of products that fall exactly halfway between two of the fold's grid points
    (ties, rounded to even, so the remainders are exactly half a unit) or just off them,
    beside rows that put the bound at 1.  The state must be the exact integer (a bias
    that let the sum's grid get finer than the first fold's unit fails here)."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    rows, cols = 64, 32  # one block, one full tile: the direct route
    dy, x_hat = torch.zeros(rows, cols), torch.ones(rows, cols)
    dy[:, 0:8] = 1.0  # every product the bound 1, summing to 64
    dy[:, 8:16] = -1.0
    # the tile's bound 1 gives s1 = 7, the biased grid 2**-44: odd multiples of 2**-45 are ties
    k = torch.arange(rows, dtype=torch.float32)
    dy[:, 16:24] = ((2 * k + 1) * 2.0**-45).unsqueeze(1) * torch.tensor([1, -1, 3, -3, 5, -5, 7, -7])
    # just off the ties, by 2**-50 (still one fold, whose test is the tile's smallest |dy|
    # ulp, 2**-68, times |x_hat|'s, 2**-23, against the second fold's unit 2**-92)
    dy[:, 24:32] = ((2 * k + 1) * 2.0**-45 + 2.0**-50).unsqueeze(1) * torch.tensor([1, -1] * 4)
    dy[0, 16:] = 1.0  # the bound in the tied columns too
    with native.disabled():
        expected = ExactSum(cols).add_products(dy, x_hat).state
    state = ExactSum(cols).add_products(dy, x_hat).state
    assert state_value(state) == exact_column_sums(dy, x_hat)
    assert torch.equal(state, expected)


def test_repeated_adds_carry_through_the_digits_as_the_torch_form_does() -> None:
    """Calls into one state: each normalises only the digits it wrote and the carries
    out of them; digit sums near 2**31 and wide tiles make those carries run."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    ours, theirs = ExactSum(96), ExactSum(96)
    for seed in range(6):
        dy, x_hat = wide_rows(70, 96, seed)
        dy[:, :32] = (2.0**16 - 1) * (1 - 2 * (seed % 2))  # whole digits: |sums| near 2**31, carries
        x_hat[:, :32] = 2.0**15 + seed
        ours.add_products(dy, x_hat)
        with native.disabled():
            theirs.add_products(dy, x_hat)
        assert torch.equal(ours.state, theirs.state), seed


def test_the_threaded_native_split_gives_the_same_state() -> None:
    dy, x_hat = wide_rows(600, 257, 5)  # above SPLIT_PRODUCTS: caller and helper share columns
    with native.disabled():
        expected = ExactSum(257).add_products(dy, x_hat).state
    assert torch.equal(ExactSum(257).add_products(dy, x_hat).state, expected)


def test_specials_behave_like_a_float_sum() -> None:
    nan, inf = float("nan"), float("inf")
    dy = torch.tensor([[nan, inf, -inf, inf, inf, 1.0], [1.0, 1.0, 1.0, -1.0, 0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 3.0], [1.0, 5.0, 5.0, inf, 1.0, 1.0]])
    for dtype in DTYPES:
        r = ExactSum(6).add_products(dy, x_hat).result(dtype).float().tolist()
        assert math.isnan(r[0]) and r[1] == inf and r[2] == -inf and math.isnan(r[3])
        assert r[4] == inf and r[5] == 5.0  # +inf and -inf products: NaN; inf and finite: inf


def test_merge_is_order_free_and_equals_one_pass() -> None:
    dy, x_hat = wide_rows(120, 33, 7)
    whole = ExactSum(33).add_products(dy, x_hat)
    parts = [ExactSum(33).add_products(dy[i::5], x_hat[i::5]) for i in range(5)]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        merged = ExactSum(33)
        for i in order:
            merged.merge(parts[i])
        assert torch.equal(merged.state, whole.state)
    summed = sum((p.state for p in parts), torch.zeros_like(whole.state))  # what all_reduce(SUM) does
    assert torch.equal(ExactSum.from_state(summed).state, whole.state)


def test_overflow_is_an_error_never_a_wrong_value() -> None:
    big = torch.full((1, 3), 1.99 * 2.0**127)
    for disabled in (False, True):
        s = ExactSum(3)
        s.state[es.DIGITS - 1] = es.TOP_LIMIT  # as if 2**40 of the largest products were in
        with pytest.raises(ExactSumOverflowError) as info:
            if disabled:
                with native.disabled():
                    s.add_products(big, big)
            else:
                s.add_products(big, big)
        assert isinstance(info.value, OverflowError) and info.value.columns == 3
    bad = es.empty_state(2)
    bad[es.DIGITS - 1, 0] = es.TOP_LIMIT + 1
    with pytest.raises(ExactSumOverflowError):
        ExactSum.from_state(bad)


def test_bad_inputs_are_clear_errors() -> None:
    s = ExactSum(4)
    with pytest.raises(ExactSumError, match="float32, bfloat16 or float16"):
        s.add_products(torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ExactSumError, match="same shape"):
        s.add_products(torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(ExactSumError, match="whole rows"):
        s.add_products(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ExactSumError, match="int64 tensor of shape"):
        ExactSum.from_state(torch.zeros(3, 4))
    with pytest.raises(ExactSumError):
        s.merge(ExactSum(5))
    with pytest.raises(ValueError, match="float64"):
        ExactGrad().accumulate(torch.nn.Parameter(torch.ones(4, dtype=torch.float64)),
                               torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(ExactSumError, match=r"\(\.\.\., 4\)"):
        ExactGrad().accumulate(torch.nn.Parameter(torch.ones(4)), torch.ones(2, 5), torch.ones(2, 5))


# --- carried across micro-batches -------------------------------------------------------


def splits(rows: int, parts: int, seed: int) -> list[torch.Tensor]:
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    return list(torch.tensor(order).chunk(parts))


@pytest.mark.parametrize("dtype", DTYPES)
def test_micro_batches_in_any_order_give_the_correctly_rounded_bits(dtype: torch.dtype) -> None:
    dy, x_hat = wide_rows(96, 48, 11)
    expected = truth(dy, x_hat, dtype)
    carrier = ExactGrad()
    float_grads = []
    for parts in (1, 2, 3, 4, 8, 96):
        for seed in (0, 1):
            w = torch.nn.Parameter(torch.ones(48, dtype=dtype))
            float_grad = torch.zeros(48, dtype=dtype)
            for rows in splits(96, parts, seed):
                carrier.accumulate(w, dy[rows], x_hat[rows])
                carrier.finish(w)
                float_grad += (dy[rows] * x_hat[rows]).sum(0).to(dtype)  # what autograd does
            assert w.grad is not None
            assert_bits_equal(w.grad, expected, f"{parts} micro-batches, order {seed}")
            float_grads.append(float_grad)
    # Negative control: the float sum over the same splits changes with them.
    assert any(not bits_equal(g, float_grads[0]) for g in float_grads)
    assert not all(bits_equal(g, expected) for g in float_grads)


def test_clearing_the_gradient_starts_a_new_sum() -> None:
    dy, x_hat = wide_rows(20, 8, 3)
    carrier = ExactGrad()
    w = torch.nn.Parameter(torch.ones(8))
    only_second = truth(dy[10:], x_hat[10:], torch.float32)
    for clear in ("none", "zero_", "assign_zeros"):
        carrier.accumulate(w, dy[:10], x_hat[:10])
        carrier.finish(w)
        if clear == "none":
            w.grad = None  # zero_grad() (set_to_none=True)
        elif clear == "zero_":
            assert w.grad is not None
            w.grad.zero_()  # zero_grad(set_to_none=False): the same tensor, a new version
        else:
            w.grad = torch.zeros(8)
        carrier.accumulate(w, dy[10:], x_hat[10:])
        carrier.finish(w)
        assert w.grad is not None
        assert_bits_equal(w.grad, only_second, clear)
        w.grad = None
    # A finish with nothing accumulated since the clear writes nothing.
    carrier.finish(w)
    assert w.grad is None


def test_a_changed_gradient_is_taken_exactly_as_it_is_now() -> None:
    dy, x_hat = wide_rows(30, 8, 4)
    carrier = ExactGrad()
    w = torch.nn.Parameter(torch.ones(8))
    carrier.accumulate(w, dy[:15], x_hat[:15])
    carrier.finish(w)
    assert w.grad is not None
    w.grad.mul_(0.5)  # e.g. clipping: the sum goes on from the clipped values
    clipped = w.grad.clone()
    carrier.accumulate(w, dy[15:], x_hat[15:])
    carrier.finish(w)
    seed = torch.cat([clipped.unsqueeze(0), dy[15:]]), torch.cat([torch.ones(1, 8), x_hat[15:]])
    assert_bits_equal(w.grad, truth(*seed, torch.float32))


def test_two_uses_in_one_backward_add_up() -> None:
    # A weight shared by two norm calls: two accumulates (with or without a finish
    # between them) equal one over all the rows.
    dy, x_hat = wide_rows(40, 8, 6)
    carrier = ExactGrad()
    for finish_between in (False, True):
        w = torch.nn.Parameter(torch.ones(2, 4))
        carrier.accumulate(w, dy[:25].view(25, 2, 4), x_hat[:25].view(25, 2, 4))
        if finish_between:
            carrier.finish(w)
        carrier.accumulate(w, dy[25:].view(15, 2, 4), x_hat[25:].view(15, 2, 4))
        grad = carrier.finish(w)
        assert grad is not None and grad.shape == (2, 4)
        assert_bits_equal(grad.flatten(), truth(dy, x_hat, torch.float32))


def test_state_and_set_state_round_trip() -> None:
    dy, x_hat = wide_rows(12, 8, 8)
    carrier = ExactGrad()
    w = torch.nn.Parameter(torch.ones(8))
    assert torch.equal(carrier.state(w).state, es.empty_state(8))
    carrier.accumulate(w, dy, x_hat)
    carrier.finish(w)
    total = carrier.state(w).merge(carrier.state(w))  # twice the rows
    carrier.set_state(w, total)
    doubled = torch.cat([dy, dy]), torch.cat([x_hat, x_hat])
    assert w.grad is not None
    assert_bits_equal(w.grad, truth(*doubled, torch.float32))


def test_rounding_in_column_blocks_matches_column_by_column() -> None:
    dy, x_hat = wide_rows(3, 2500, 9)  # past the 1024-column blocks of round_state
    s = ExactSum(2500).add_products(dy, x_hat)
    for dtype in DTYPES:
        pieces = torch.cat([es.round_state(s.state[:, c:c + 100], dtype) for c in range(0, 2500, 100)])
        assert_bits_equal(s.result(dtype), pieces)


def test_the_id_lookup_of_carries_and_hooks_never_answers_for_another_object() -> None:
    """IdLookup (the per-call lookup of a parameter's carry and hooks) answers only for
    the object it was given, alive, and only while the value lives; entries of keys
    gone are dropped past twice the owner's count."""
    import gc

    from taskgraph_norm.ops.exact_state import IdLookup

    class Value:
        pass

    lookup: IdLookup[Value] = IdLookup()
    key, value = torch.zeros(2), Value()
    lookup.put(key, value, 1)
    assert lookup.get(key) is value
    assert lookup.get(torch.zeros(2)) is None  # another tensor
    class Key:
        pass

    gone = Key()
    lookup.put(gone, value, 1)
    old_id = id(gone)
    del gone
    reused = next(k for k in (Key() for _ in range(1000)) if id(k) == old_id)  # CPython reuses the address
    assert lookup.get(reused) is None  # a new object at a reused id: no answer
    del key
    gc.collect()
    others = [torch.zeros(2) for _ in range(200)]
    assert all(lookup.get(t) is None for t in others)
    live = torch.zeros(2)
    lookup.put(live, value, 1)
    del value
    gc.collect()
    assert lookup.get(live) is None  # the value is gone: no answer
    keep = [Value() for _ in others]
    for key, v in zip(others, keep):
        lookup.put(key, v, 1)
    assert all(lookup.get(t) is v for t, v in zip(others, keep))
    del others, key
    gc.collect()
    lookup.put(live, keep[0], 1)  # the keys gone are pruned on this put
    assert len(lookup._entries) == 1 and lookup.get(live) is keep[0]
    lookup.pop(live)
    assert lookup.get(live) is None
