"""The exact kernels' shortcuts against the torch forms, bit for bit (int views).

* the forward's fp32 rows: one fold where the second is provably the identity (every
  ``x**2`` a multiple of ``ulp(sigma2)``), two folds below that limit;
* the exact dW's direct tiles (first scale from a bound of ``|dy * x_hat|``, products
  folded as they are formed; one fold and the exact remainder where every product is
  a multiple of the second fold's grid) and the tiles that fall back to the measured
  path (a narrow tile, a product needing a third fold, a bound that is NaN or too
  large);
* the eight-column rounding of the state (the host build on AVX-512).

The portable build runs the same C without FMA and (for the rounding) column by
column: a probe compares it, the default build and the torch ops.  Each comparison
has a negative control that must find a difference.
"""

from __future__ import annotations

import pytest
import torch

from taskgraph_norm import kernels
from taskgraph_norm.backends.native import grads as native_grads
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.kernels import exact_sum as es

from ._trust_helpers import build_probe, build_runs
from .helpers import assert_bits_equal, bits_equal, product_columns

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_unavailable()}")

D = 4096
#: With max|x| = 1 and D = 4096: sigma2 = 2**-27, ulp(sigma2) = 2**-79, so one fold is
#: exact down to min|x| with ulp(x)**2 >= 2**-79, i.e. min|x| >= 2**-16.
AT_LIMIT = 2.0**-16 * (1 + 2.0**-23)   # ulp 2**-39: one fold, exactly at the limit
BELOW = 2.0**-17 * (1 + 2.0**-23)      # ulp 2**-40: its r has a 2**-80 bit, a tie on 2**-79


def ordinary_rows(rows: int, seed: int) -> torch.Tensor:
    """Rows with max|x| = 1 and every other |x| in [2**-15, 1): one fold suffices."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.rand(rows, D, generator=g) * (1 - 2.0**-15) + 2.0**-15
    sign = torch.randint(0, 2, (rows, D), generator=g) * 2 - 1
    x = (mag * sign).float()
    x[:, 7] = 1.0
    return x


def torch_pair(x: torch.Tensor) -> torch.Tensor:
    sigmas = kernels.exact_scale(kernels.rowmax_sq_whole(x), x.shape[-1])
    pair: torch.Tensor = kernels.sumsq_exact(x, 0, x.shape[-1], sigmas)
    return pair


def one_fold_s2(x: torch.Tensor) -> torch.Tensor:
    """S2 if the second fold were skipped: the sum of r = v - q1 (exact in any order)."""
    sigmas = kernels.exact_scale(kernels.rowmax_sq_whole(x), x.shape[-1])
    v = x.double().pow(2)
    s1 = sigmas[:, :1]
    q1 = (v + s1) - s1
    return (v - q1).sum(1)


def native_pair(x: torch.Tensor) -> torch.Tensor:
    pair = torch.empty(len(x), 2, dtype=torch.float64)
    assert native.exact_rows(x, pair) == 0
    return pair


def test_forward_one_and_two_fold_rows_give_the_torch_pair() -> None:
    x = ordinary_rows(6, 0)
    x[1, 100] = AT_LIMIT
    x[2, 100] = -BELOW
    x[3, 200:210] = BELOW * torch.arange(1, 11)
    x[4] = 0.0
    x[4, 5] = -3.0                               # one nonzero element
    x[5, 1:] = 2.0**-149                          # subnormals: two folds
    assert_bits_equal(native_pair(x), torch_pair(x))  # the rows' y: the probe below


def test_forward_negative_control_the_second_fold_matters_below_the_limit() -> None:
    """Skipping the second fold gives the same S2 down to the limit and another one
    below it: the rows above do take both paths."""
    x = ordinary_rows(3, 1)
    x[1, 100] = AT_LIMIT
    x[2, 100] = BELOW
    s2, skipped = torch_pair(x)[:, 1], one_fold_s2(x)
    assert bits_equal(skipped[:2], s2[:2])
    assert not bits_equal(skipped[2:], s2[2:])
    assert_bits_equal(native_pair(x)[:, 1], s2)


# -- the exact weight gradient -----------------------------------------------------------


def torch_state(dy: torch.Tensor, x: torch.Tensor, rms: torch.Tensor | None) -> torch.Tensor:
    x_hat = x if rms is None else torch.div(x, rms.reshape(-1, 1))
    return es.normalize_(es.add_products_(es.empty_state(dy.shape[1]), dy, x_hat))


def native_state(dy: torch.Tensor, x: torch.Tensor, rms: torch.Tensor | None) -> torch.Tensor:
    state = es.empty_state(dy.shape[1])
    assert native_grads.exact_dw(state, dy, x, rms=rms) == 0
    return state


def dw_case(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dy, x = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    rms = x.double().pow(2).mean(1).add(1e-6).sqrt().float()
    return dy, x, rms


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("cols", [32, 1024 + 64, 2 * 1024 + 40])  # a narrow last tile: the measured path
def test_direct_tiles_give_the_torch_state(rows: int, cols: int) -> None:
    dy, x, rms = dw_case(rows, cols, rows + cols)
    assert_bits_equal(native_state(dy, x, rms), torch_state(dy, x, rms))
    assert_bits_equal(native_state(dy, x, None), torch_state(dy, x, None))


def test_tiles_that_fall_back_give_the_torch_state() -> None:
    dy, x, rms = dw_case(130, 1024, 5)
    dy[5, 20] = dy[5, 20] * 2.0**-30          # too fine for one fold: two folds, direct
    dy[3, 40] = dy[3, 40] * 2.0**-60          # a third fold in column 40's first block
    dy[70, 100] = float("nan")                 # a NaN bound (second block, column 100)
    x[10, 300] = float("inf")                  # an infinite bound
    dy[:, 500] = 0.0                           # a zero column: bound 0
    x[100, 600:620] = 2.0**60                  # large products, still direct
    for r in (rms, rms.clone().index_fill_(0, torch.tensor([129]), 2.0**-120),  # a bound above 2**256
              rms.clone().index_fill_(0, torch.tensor([3]), 0.0),              # rms 0: x / 0
              rms.clone().index_fill_(0, torch.tensor([66]), float("nan"))):
        assert_bits_equal(native_state(dy, x, r), torch_state(dy, x, r))
    assert_bits_equal(native_state(dy, x, None), torch_state(dy, x, None))


@pytest.mark.parametrize("spread", [10, 30, 50, 90])
def test_tiles_whose_columns_differ_in_scale_give_the_torch_state(spread: int) -> None:
    """One first scale serves a tile's 32 columns (the bound of its largest): columns
    2**spread apart in one tile take one fold, two, or the measured path, to the same
    integers as the torch form's."""
    dy, x, rms = dw_case(96, 2048, spread)
    dy[:, 27::32] *= 2.0**spread                # one large column per tile
    x[:, 9::32] *= 2.0**-spread                 # and one small one
    dy[:50, 31::32] *= 2.0**(-spread // 2)      # rows of a column on another scale
    assert_bits_equal(native_state(dy, x, rms), torch_state(dy, x, rms))
    assert_bits_equal(native_state(dy, x, None), torch_state(dy, x, None))


def test_large_inputs_take_the_measured_path_to_the_same_state() -> None:
    """From 6 Mi products per call (native_dw.c's DW_DIRECT_MAX_PRODUCTS) the kernel
    forms every product into its panel buffer; the state is the one of the same rows
    in pieces below that size (direct tiles), merged."""
    dy, x, rms = dw_case(1600, 4096, 11)
    assert dy.numel() >= 6 << 20 > 400 * 4096
    merged = es.empty_state(4096)
    for start in range(0, 1600, 400):
        merged += native_state(dy[start:start + 400], x[start:start + 400], rms[start:start + 400])
    assert_bits_equal(native_state(dy, x, rms), es.normalize_(merged))


def test_dw_negative_control() -> None:
    """One product changed by one ulp of one factor changes the state."""
    dy, x, rms = dw_case(64, 1024, 9)
    other = dy.clone()
    other[17, 333] = torch.nextafter(other[17, 333], torch.tensor(float("inf")))
    assert not bits_equal(native_state(other, x, rms), torch_state(dy, x, rms))


# -- the rounding, eight columns at a time --------------------------------------------


def rounding_columns() -> torch.Tensor:
    """A normalised state of 8 * 15 + 5 columns: each edge column at several lanes, a
    group with a NaN or inf count, and groups of zeros."""
    one, tie, tiny = 1.0, 2.0**-24, 2.0**-149
    edge = [
        [(one, one), (tie, one)],                      # a tie: to even (down)
        [(one, one), (tie, one), (tiny, tiny)],        # just above the tie: up
        [(-one, one), (-tie, one), (tiny, tiny)],      # negative, just below the tie
        [(3.0, 1.0), (-tie, 1.0), (-tiny, tiny)],      # cancellation, sticky below
        [(2.0**127, 2.0**1), (2.0**127, 1.0)],         # past fp32's max: inf
        [(tiny, 2.0**-1), (tiny, 0.75)],               # below fp32's subnormals
        [(2.0**-70, 2.0**-70), (2.0**-80, 2.0**-75)],  # a subnormal fp32 result
        [(1e30, 1e8), (-1e30, 1e8), (3.0, 5.0)],       # digits cancelling to a small sum
        [(one, one), (2.0**-8, one), (2.0**-40, one)],   # fp32 lands on a bf16 tie: to odd
        [(one, one), (2.0**-11, one), (2.0**-40, one)],  # ... on an fp16 tie
    ]
    columns = []
    for shift in range(8):                             # each edge column at each lane
        columns += edge[shift:] + edge[:shift]
    columns += [[(1.0, 1.0)]] * 8 + [[(0.0, 0.0)]] * 8 + [[(float("nan"), 1.0)]] + edge[:7] + edge[:5]
    columns[-9] = [(float("inf"), 1.0), (1.0, 1.0)]    # an inf count inside a group
    dy, x_hat = product_columns(columns)
    return es.normalize_(es.add_products_(es.empty_state(len(columns)), dy, x_hat))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rounding_in_eights_gives_the_torch_bits(dtype: torch.dtype) -> None:
    state = rounding_columns()
    assert state.shape[1] % 8 == 5
    assert_bits_equal(native_grads.exact_round(state, dtype), es.round_state(state, dtype))
    dy, x, rms = dw_case(40, 3000, 3)
    big = torch_state(dy * 2.0**-100, x, rms) - torch_state(dy, x * 2.0**20, rms)  # signs, many digits
    big = es.normalize_(big)
    assert_bits_equal(native_grads.exact_round(big, dtype), es.round_state(big, dtype))


def test_rounding_negative_control() -> None:
    """The tie column rounds the other way with one unit 2**-298 more."""
    state = rounding_columns()
    more = state.clone()
    more[0, 0] += 1 << 22                              # + 2**-298 (units of 2**-320)
    es.normalize_(more)
    assert not bits_equal(native_grads.exact_round(more, torch.float32)[:1],
                          native_grads.exact_round(state, torch.float32)[:1])


SHORTCUT_PROBE = build_probe("test_exact_fast_paths", """
    import hashlib, torch
    from taskgraph_norm.backends.native import loader as native
    from taskgraph_norm.ops.exact_grad import ExactSum
    from taskgraph_norm.testing import bits
    import taskgraph_norm as tgn
    h = lambda t: hashlib.sha256(bits(t).numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes()).hexdigest()[:16]
    print(native.library_path().name if native.available() else None)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(9, 4096, generator=g) * (1 - 2.0**-15) + 2.0**-15
    x[:, 3] = -1.0
    x[1, 9] = 2.0**-16 * (1 + 2.0**-23); x[2, 9] = 2.0**-17 * (1 + 2.0**-23); x[3, 1:] = 2.0**-149
    print("fwd", h(tgn.normalize_sync(x, torch.linspace(0.5, 2, 4096), accumulate="exact")))
    dy, xx = torch.randn(130, 2088, generator=g), torch.randn(130, 2088, generator=g)
    dy[3, 40] *= 2.0**-60; dy[70, 100] = float("nan"); xx[10, 300] = float("inf")
    rms = xx.double().pow(2).mean(1).sqrt().float()
    for r in (rms, None):
        total = ExactSum(2088).add_normalized(dy, xx, r) if r is not None else ExactSum(2088).add_products(dy, xx)
        print("dw", h(total.state), *(h(total.result(d)) for d in (torch.float32, torch.bfloat16, torch.float16)))
""")


def test_the_portable_build_and_torch_ops_give_the_same_bits() -> None:
    procs = build_runs(SHORTCUT_PROBE)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    p, d, o = (proc.stdout.splitlines() for proc in procs)
    assert p[0].startswith("_native_portable") and o[0] == "None" and len(p) == 4
    assert p[1:] == d[1:] == o[1:]
    assert p[2] != p[3]  # negative control: the two dW lines differ (x / rms against x)
