"""Rows with NaN and infinite values: every backend gives the reference's bits, NaN
payloads and signs included, wherever the row sits in the batch.

torch's CPU casts and bf16 arithmetic write a NaN one way in their vectorised loops
and another in the scalar loop of a tensor's last few elements (an fp16 NaN widened to
fp32 keeps its sign and payload in the vector loop and becomes 0x7FFFFFFF in the scalar
one; a bf16 sum or product that is NaN is 0xFFFF, or 0x7FC0).  So a row's NaN bits
would depend on where it sits in the tensor, and a path that hands such a row to the
reference alone (the native kernels do) would not get the bits the reference gives it
in the whole batch.  The kernels' widenings and bf16 operations give every element the
vector loop's bits (kernels.widen, kernels.bf16_nans)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import kernels

from .helpers import bits, bits_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}

#: NaN payloads by element size: a quiet NaN, a negative one, a signalling one with a payload.
NANS = {2: (0x7E00, 0xFE00, 0x7C01), 4: (0x7FC00000, 0xFFC00000, 0x7F800101),
        8: (0x7FF8000000000000, -0x8000000000000, 0x7FF0000000000101)}
BF16_NANS = (0x7FC0, 0xFFC0, 0x7F81)


def _value(bits_: int, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if size == 2 and bits_ >= 0x8000:
        bits_ -= 0x10000
    elif size == 4 and bits_ >= 1 << 31:
        bits_ -= 1 << 32
    return torch.tensor(bits_, dtype=_INT[size]).view(dtype)


def _bad_rows(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Finite rows with NaNs (signs, payloads) and infinities in some, the last row
    (whose end is the tensor's scalar tail) among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64).to(dtype)
    size = x.element_size()
    nans = [_value(b, dtype) for b in (BF16_NANS if dtype == torch.bfloat16 else NANS[size])]
    inf = float("inf")
    x[1, 3] = nans[0]
    x[2, -1] = nans[1]
    x[2, 5] = nans[2]
    x[3, -2] = -inf  # an inf total: inf / inf is NaN at that element
    x[4, 0], x[4, -1] = inf, -inf
    x[4, 7] = nans[1]
    x[-1, -1] = nans[1]
    x[-1, -3] = nans[2]
    x[-1, 0] = inf
    return x


def _weight(hidden: int, dtype: torch.dtype | None) -> torch.Tensor | None:
    if dtype is None:
        return None
    g = torch.Generator().manual_seed(hidden)
    return (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, tuple):
        return len(got) == len(want) and all(bits_equal(a, b) for a, b in zip(got, want))
    return bits_equal(got, want)


def _cases(dtype: torch.dtype) -> Any:
    weights = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for w_dtype, (mode, offset), accumulate, residual in itertools.product(
            weights, (("torch", 0.0), ("llama", 0.0), ("gemma", 1.0), ("llama", 1.0)), ("float", "exact"),
            (False, True)):
        if w_dtype is None and offset:
            continue
        if dtype == torch.float64 and w_dtype in (torch.bfloat16, torch.float16):
            continue  # (fp64 rows: the narrow weights add nothing here)
        yield w_dtype, mode, offset, accumulate, residual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 100), (6, 64), (5, 1029)], ids=str)
def test_nan_and_inf_rows_take_the_references_bits(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """The default path (native kernels where built) and the torch-ops backend against
    the reference, for every casting mode, weight dtype, residual and accumulation."""
    rows, hidden = shape
    x = _bad_rows(rows, hidden, dtype, hidden)
    r = _bad_rows(rows, hidden, dtype, hidden + 1).flip(1)
    for w_dtype, mode, offset, accumulate, residual in _cases(dtype):
        w = _weight(hidden, w_dtype)
        options: dict[str, Any] = dict(casting_mode=mode, offset=offset, accumulate=accumulate)
        if residual:
            options["residual"] = r
        want = tgn.normalize_sync(x, w, executor="reference", **options)
        case = (w_dtype, mode, offset, accumulate, residual)
        assert _same(tgn.normalize_sync(x, w, **options), want), case
        with tgn.backends.use("torch_ops"):
            assert _same(tgn.normalize_sync(x, w, **options), want), case
        # each row alone: its bits do not depend on where it sat
        for i in (1, rows - 1):
            alone = dict(options, residual=r[i:i + 1]) if residual else options
            one = tgn.normalize_sync(x[i:i + 1], w, executor="reference", **alone)
            assert _same(one, tuple(t[i:i + 1] for t in want) if residual else want[i:i + 1]), (case, i)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_a_training_forward_takes_the_references_bits(dtype: torch.dtype) -> None:
    """The forward that records gradients (the ops' own residual sum included)."""
    x = _bad_rows(7, 100, dtype, 1)
    r = _bad_rows(7, 100, dtype, 2).flip(1)
    for mode, w_dtype, accumulate in itertools.product(("torch", "llama"), (torch.float32, dtype), ("float", "exact")):
        w = _weight(100, w_dtype)
        options: dict[str, Any] = dict(casting_mode=mode, accumulate=accumulate)
        want = tgn.normalize_sync(x, w, executor="reference", residual=r, **options)
        xg = x.clone().requires_grad_(True)
        got = tgn.normalize_sync(xg, w, residual=r, **options)
        assert _same(tuple(t.detach() for t in got), want), (mode, w_dtype, accumulate)


def test_without_the_kernels_nan_rules_a_row_alone_gets_other_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: with torch's plain casts and bf16 sums (where its build writes
    NaNs by position, as 2.x's CPU loops do) the reference gives the last row other
    bits alone than in the batch, as the native path's redone rows once got."""
    tail = torch.full((100,), float("nan"), dtype=torch.float16).to(torch.float32)
    if bool((bits(tail) == bits(tail[:1])).all()):
        pytest.skip("this torch widens every fp16 NaN alike")
    monkeypatch.setattr(kernels, "widen", lambda t, dtype: t.to(dtype))
    monkeypatch.setattr(kernels, "bf16_nans", lambda t: t)
    x = _bad_rows(7, 100, torch.float16, 100)
    w = _weight(100, torch.float32)
    batch = tgn.normalize_sync(x, w, executor="reference", casting_mode="llama")
    alone = tgn.normalize_sync(x[1:2], w, executor="reference", casting_mode="llama")
    assert not bits_equal(alone, batch[1:2])
    xb, rb = _bad_rows(7, 100, torch.bfloat16, 1), _bad_rows(7, 100, torch.bfloat16, 2)
    h = tgn.normalize_sync(xb, None, executor="reference", residual=rb)[1]
    h1 = tgn.normalize_sync(xb[2:3], None, executor="reference", residual=rb[2:3])[1]
    assert not bits_equal(h1, h[2:3])  # its last NaN: the scalar loop alone


def test_the_comparison_sees_a_nan_payload() -> None:
    """Negative control: a NaN's payload or sign alone makes the bits differ (values
    compare NaN as unequal, or equal with equal_nan, whatever the payload)."""
    x = _bad_rows(7, 100, torch.float16, 100)
    w = _weight(100, torch.float32)
    want = tgn.normalize_sync(x, w, executor="reference", casting_mode="llama")
    assert want.dtype == torch.float32 and bool(want[-1].isnan().all())
    for other in (0x7FFFFFFF, 0xFFC00000 if bits(want)[-1, -1] != -0x400000 else 0x7FC00000):
        changed = want.clone()
        changed[-1, -1] = _value(other, torch.float32)
        assert not bits_equal(changed, want)
        assert torch.allclose(changed, want, equal_nan=True)


@pytest.mark.parametrize("n", [1, 5, 16, 100, 4101])
def test_kernels_widen_keeps_every_nans_sign_and_payload(n: int) -> None:
    """kernels.widen: an fp16 NaN becomes the fp32 NaN of the same sign and payload
    (the IEEE widening, F16C's) at every position; bf16_nans: every NaN 0xFFFF."""
    for b in NANS[2]:
        half = _value(b, torch.float16).expand(n).clone()
        want = ((b & 0x8000) << 16) | 0x7FC00000 | ((b & 0x3FF) << 13)
        got = bits(kernels.widen(half, torch.float32))
        assert bool((got == _value(want, torch.float32).view(torch.int32)).all()), hex(b)
        into = torch.empty(n)
        kernels.widen_into(into, half)
        assert bits_equal(into, kernels.widen(half, torch.float32))
    s = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")] * n, dtype=torch.bfloat16)
    y = kernels.bf16_nans(s + s.flip(0))
    assert bool((bits(y)[y.isnan()] == -1).all()) and bool(y.isnan().any())
