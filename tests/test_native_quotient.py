"""The fp32 quotient x / rms of the native FINALIZE is IEEE division, bit for bit.

The native kernel's y against torch's division given the kernel's own rms: rows of
many scales, quotients that land exactly on subnormal rounding midpoints (where a
fp64 route described in docs/performance.md, "FINALIZE's quotient", needs the
divider: x = 147 2^-149, rms = 98), zero and infinite rms, a weight, an offset, llama.
A kernel that multiplied by a reciprocal, or took the fp64 route without that
fallback, fails these."""

from __future__ import annotations

import math

import pytest
import torch

from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.backends.native.loader import FloatRecipe
from taskgraph_norm.constants import ROUND_QUOTIENT, TOTAL_AS_RMS
from taskgraph_norm.pipeline import for_config
from .helpers import assert_bits_equal

TINY = 2.0**-126


# --- the kernel -------------------------------------------------------------------


def kernel(x: torch.Tensor, chunk: int, w: torch.Tensor | None, flags: int = 0,
           offset: float = 0.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float_rows_f32 (tgn_float_rows_f32) with FINALIZE: y and the rms of each row."""
    rows, hidden = x.shape
    plan = for_config(hidden, chunk, "tree", "pairwise", "float", "auto", "torch", 0.0).plan
    rec = FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv), plan.root)
    y, rms = torch.empty_like(x), torch.empty(rows)
    wp = None if w is None else w.data_ptr()
    native.module().float_rows_f32(x.data_ptr(), rows, hidden, hidden, rec.chunk_size, rec.adds.data_ptr(),
                                   rec.n_adds, rec.root, rms.data_ptr(), y.data_ptr(), hidden, wp, eps,
                                   flags | TOTAL_AS_RMS, offset, None, hidden, None, hidden)
    return y, rms


def rows_of(hidden: int = 4096) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, hidden, generator=g)
    x *= torch.exp2(torch.randint(-60, 60, (12, 1), generator=g).float())
    x[1] *= torch.exp2(torch.randint(-100, 100, (hidden,), generator=g).float())
    # rms 98 exactly (eps 0, hidden 4096): ties K 49 2^-149 on subnormal midpoints
    if hidden == 4096:
        x[2] = 0.0
        x[2, 0] = 6272.0
        k = torch.arange(1, 2 * (hidden - 1), 2, dtype=torch.float64)[: hidden - 1]
        x[2, 1:] = (k * 49.0 * 2.0**-149).float()
    x[3, 5] = math.inf   # rms inf
    x[4] = 0.0           # rms 0 (eps 0): 0 / 0
    x[5, ::3] = 0.0
    x[6] = 3.0e38        # squares overflow: rms inf
    x[7, :] = 2.0**-149  # squares underflow: rms 0, x / 0 = inf
    return x


@pytest.mark.parametrize("hidden, chunk", [(4096, 64), (4096, 48), (4101, 64), (13, 4), (1000, 256)])
def test_kernel_y_equals_the_division(hidden: int, chunk: int) -> None:
    if not native.available():
        pytest.skip("no native kernels")
    x = rows_of(hidden)
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    r = None
    for weight, offset in ((None, 0.0), (w, 0.0), (w, 0.5)):
        y, rms = kernel(x, chunk, weight, offset=offset)
        q = x / rms[:, None]
        want = q if weight is None else q * (weight + offset if offset else weight)
        assert_bits_equal(y, want)
        r = rms if r is None else r
    assert r is not None and bool((x[2] / r[2]).abs().lt(TINY).any()) == (hidden == 4096)


def test_kernel_llama_quotient_equals_the_division() -> None:
    if not native.available():
        pytest.skip("no native kernels")
    x = rows_of(4096)[:3].bfloat16().float()
    x[2] = rows_of(4096)[2]  # the ties (not bf16 values, but the quotient is what is checked)
    w = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    y, rms = kernel(x, 64, w, flags=ROUND_QUOTIENT)
    want = (x / rms[:, None]).bfloat16().float() * w
    assert_bits_equal(y, want)
