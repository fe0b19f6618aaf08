"""The direct path for bf16 and fp16 rows (native_narrow.c): widened into fp32 scratch
in C, the fp32 row kernels, rounded back.  Its bits must be the general path's (the
torch ops, which the reference and the golden hashes pin) for every casting mode,
offset, weight dtype, residual, plan and thread split; it must really be taken where
it can give those bits, and leave to the general path what it cannot (NaN results,
fp64); and the portable build must give the host build's bits."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import direct
from taskgraph_norm.pipeline import for_config

from ._trust_helpers import build_probe, build_runs, native_status
from .helpers import bits_equal, spy_direct_calls

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

HALF = (torch.bfloat16, torch.float16)


def _rows(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of many scales: subnormal, tiny and huge values of the dtype among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-10, 10, (rows, 1), generator=g).double())
    x = x.to(dtype)
    fi = torch.finfo(dtype)
    if rows > 4:
        x[0] = 0.0
        x[1, ::2] = -0.0
        x[2, ::3] = fi.smallest_normal * 2.0**-3  # subnormal
        x[3] = fi.max / 4
        x[4, :1] = fi.max
    return x


def _weight(hidden: int, dtype: torch.dtype | None, scale: float = 1.0) -> torch.Tensor | None:
    if dtype is None:
        return None
    g = torch.Generator().manual_seed(hidden)
    return (scale * (1 + 0.1 * torch.randn(hidden, generator=g))).to(dtype)


def _general(x: torch.Tensor, w: torch.Tensor | None, **options: Any) -> Any:
    with tgn.backends.use("torch_ops"):
        return tgn.normalize_sync(x, w, **options)


def _nothing() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, tuple):
        return all(bits_equal(a, b) for a, b in zip(got, want))
    return bits_equal(got, want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [(5, 100), (7, 80), (3000, 1024), (8192, 64)], ids=str)
def test_the_direct_path_gives_the_general_paths_bits(
    monkeypatch: pytest.MonkeyPatch, threads: int, dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    """Every casting mode, offset, weight dtype and residual, float and exact plans;
    (3000, 1024) splits across the threads; 80 wide is an odd number of vectors (the
    quotient's loop takes two at a time) and 100 leaves a scalar tail.  Taken wherever
    C can give the bits."""
    taken = spy_direct_calls(monkeypatch)
    rows, hidden = shape
    x, r = _rows(rows, hidden, dtype, hidden), _rows(rows, hidden, dtype, hidden + 1).flip(0)
    modes = itertools.product((None, torch.bfloat16, torch.float16, torch.float32), ("torch", "llama", "gemma"),
                              (0.0, 1.0, 0.1), ("float", "exact"), (False, True))
    for w_dtype, mode, offset, accumulate, residual in modes:
        if w_dtype is None and offset:
            continue
        if rows > 1000 and (offset == 0.1 or mode == "gemma"):
            continue  # (the small shapes cover them; keep the big ones quick)
        w = _weight(hidden, w_dtype)
        options: dict[str, Any] = dict(casting_mode=mode, offset=offset, accumulate=accumulate)
        if residual:
            options["residual"] = r
        before = len(taken)
        got = tgn.normalize_sync(x, w, **options)
        assert _same(got, _general(x, w, **options)), (w_dtype, mode, offset, accumulate, residual)
        assert any(taken[before:]), (w_dtype, mode, offset, accumulate, residual)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_out_and_every_plan(dtype: torch.dtype) -> None:
    """``out=`` (of the output dtype: fp32 for llama with an fp32 weight), linear and
    tree merges, chunk sizes with tails, subnormal and overflowing results."""
    x = _rows(300, 136, dtype, 3)
    for topology, chunk, accumulate in itertools.product(("tree", "linear"), (64, 10, 7, 256), ("float", "exact")):
        for w_dtype, scale, mode in ((dtype, 1e-6, "torch"), (dtype, 3e4, "torch"), (torch.float32, 1.0, "llama"),
                                     (torch.bfloat16, 1.0, "llama"), (dtype, 1e-6, "llama"), (dtype, 3e4, "llama"),
                                     (torch.float16, 1.0, "llama")):
            w = _weight(136, w_dtype, scale)
            options: dict[str, Any] = dict(topology=topology, chunk_size=chunk, accumulate=accumulate,
                                           casting_mode=mode)
            want = _general(x, w, **options)
            out = torch.full_like(want, 7.0)
            assert tgn.normalize_sync(x, w, out=out, **options) is out
            assert bits_equal(out, want), (topology, chunk, accumulate, w_dtype, scale, mode)
            assert bits_equal(tgn.normalize_sync(x, w, **options), want)
    # negative control: another chunk size is another sum order, which the rms the
    # direct call keeps shows (a narrow y hides most one-ulp differences of the rms)
    kept = []
    for chunk in (64, 10):
        call = for_config(136, chunk, "tree", "pairwise", "float", "auto", "torch", 0.0).direct()
        assert call is not None
        kept.append(torch.empty(300, 1))
        assert call(x, None, 1e-6, None, None, None, kept[-1]) is not None
    assert not bits_equal(kept[0], kept[1])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rows_with_a_nan_or_inf_go_to_the_general_path(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    taken = spy_direct_calls(monkeypatch)
    for value in (float("nan"), float("inf")):
        x = _rows(40, 64, dtype, 5)
        x[7, 3] = value
        w = _weight(64, dtype)
        y = tgn.normalize_sync(x, w)
        assert taken[-1] is False
        assert bits_equal(y[:7], _general(x[:7], w)) and bits_equal(y[8:], _general(x[8:], w))
        assert bool(y[7].isnan().any())
    x = _rows(40, 64, dtype, 5)
    r = x.clone()
    r[9, 1] = torch.finfo(dtype).max  # h = x + r overflows to inf in x's dtype
    x[9, 1] = torch.finfo(dtype).max
    want = _general(x, _weight(64, dtype), residual=r)
    assert _same(tgn.normalize_sync(x, _weight(64, dtype), residual=r), want)
    assert taken[-1] is False and bool(want[1][9, 1].isinf())


def test_llama_rounds_fp16_rows_as_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama on fp16 rows in C: the quotient rounded to fp16, with an fp16 weight the
    product too.  With rms exactly 2 (eps 0), every fp16 subnormal's quotient is a tie
    or exact, and the weights' products round on ties, underflow and overflow."""
    taken = spy_direct_calls(monkeypatch)
    subnormals = torch.arange(1, 1024, dtype=torch.int16).view(torch.float16)
    values = torch.cat([subnormals, -subnormals])
    d = 64
    x = torch.zeros(-(-values.numel() // (d - 1)), d, dtype=torch.float16)
    x.view(-1)[: values.numel()] = values  # then each row's first element makes its rms 2
    x = torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.float16), x[:, : d - 1]], 1)
    x[:, 0] = 16.0  # 16^2 / 64 = 4: the other squares are far below its last bit
    assert bool((x[:, 1:].float().square().sum(1) < 2.0**-12).all())
    x = torch.cat([x, _rows(9, d, torch.float16, 4)[1:]])  # and normal values (no zero row: eps is 0)
    r = -0.25 * x.flip(1)
    for w in (torch.full((d,), 0.75, dtype=torch.float16), torch.linspace(-3e4, 3e4, d).half(),
              torch.linspace(1e-7, 1e-3, d).half(), torch.linspace(0.5, 1.5, d), torch.linspace(-2, 2, d).bfloat16()):
        for options in (dict(eps=0.0), dict(eps=1e-6, offset=0.5), dict(eps=0.0, residual=r)):
            got = tgn.normalize_sync(x, w, casting_mode="llama", **options)  # type: ignore[arg-type]
            assert taken[-1] is True
            want = tgn.normalize_sync(x, w, casting_mode="llama", executor="reference",
                                      **options)  # type: ignore[arg-type]
            assert _same(got, want), (w.dtype, options)
            assert _same(got, _general(x, w, casting_mode="llama", **options)), (w.dtype, options)
    # negative control: the fp32 quotient (no rounding to fp16) gives other bits
    w32 = torch.linspace(0.5, 1.5, d)
    plain = tgn.normalize_sync(x, w32, eps=0.0)  # torch mode: fp16 out of the fp32 product
    got = tgn.normalize_sync(x, w32, eps=0.0, casting_mode="llama")
    sub = x[:-8].float() / 2  # rms 2: the quotient is exact in fp32
    assert got.dtype == torch.float32 and not bits_equal(got[:-8], sub * w32)
    assert bits_equal(got[:-8], sub.half().float() * w32) and plain.dtype == torch.float16


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rows_with_zeros_and_tiny_values(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The quotient skips its per-vector range check on rows with no tiny value (every
    fp16 row; native_quotient.h's tgn_q_vec_ranged): -0 keeps its sign there; a bf16 row
    with a value below 2^-50 keeps the check (its scratch step tells)."""
    taken = spy_direct_calls(monkeypatch)
    edge = torch.tensor([0x2680, 0x267F, 0x0001, 0x2681], dtype=torch.int16).view(torch.bfloat16).to(dtype)
    for hidden in (48, 1024, 5000):
        x = _rows(6, hidden, dtype, hidden)[5:].repeat(6, 1)
        x[:, ::7] = -0.0
        x[:, 1::7] = 0.0
        for i, value in enumerate(edge.tolist()):
            x[i + 1, 3::11] = value  # one kind of small value per row; row 0 has none
        w = _weight(hidden, dtype)
        for rows in (x, x[:1], x[1:2], x[2:3]):
            for options in (dict(), dict(casting_mode="llama"), dict(accumulate="exact", offset=1.0)):
                got = tgn.normalize_sync(rows, w, **options)  # type: ignore[arg-type]
                assert taken[-1] is True
                assert _same(got, _general(rows, w, **options)), (hidden, options)
        assert bool((tgn.normalize_sync(x[:1], w).view(torch.int16) == -0x8000).any())  # -0 kept


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_weights_whose_products_are_nan_or_subnormal(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """FINALIZE skips its NaN check, and a bf16 y its look for subnormals (vcvtneps2bf16
    flushes them), where every lane of the weight is finite and 0 or at least 2^-30
    (native_narrow.c's weight_clean); a weight with a smaller, infinite or NaN lane keeps
    them (an infinite lane times a zero is a NaN, which the C call must see and decline).
    Negative control: the bf16 outputs of the 2^-130 weight hold subnormals, which a
    flushing rounding would have made zeros."""
    taken = spy_direct_calls(monkeypatch)
    x = _rows(6, 1024, dtype, 7)[5:].repeat(4, 1)  # no tiny values: the unchecked quotient
    x[:, ::5] = 0.0
    x[1:, 1::5] = -0.0
    for value in (2.0**-30, 2.0**-31, 2.0**-126, 2.0**-130, 0.0, -0.0, float("inf"), float("-inf"), float("nan")):
        w = _weight(1024, dtype)
        assert w is not None
        w[3::7] = value
        for options in (dict(), dict(accumulate="exact"), dict(offset=0.5)):
            got = tgn.normalize_sync(x, w, **options)  # type: ignore[arg-type]
            assert taken[-1] is (abs(value) < float("inf")), (value, options)  # a NaN product: declined
            assert _same(got, _general(x, w, **options)), (value, options)
            if value == 2.0**-130 and dtype == torch.bfloat16 and not options:
                bits = got.view(torch.int16)
                assert bool((((bits & 0x7F80) == 0) & ((bits & 0x7FFF) != 0)).any())


def test_the_cheap_quotient_of_bf16_rows_keeps_the_bits(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """A clean bf16 row's FINALIZE multiplies by RN(1 / rms) instead of dividing, and
    does a pair of vectors again with the exact quotient where a lane lands within
    NARROW_GUARD bit patterns of a bf16 rounding boundary (native_narrow.h).  Its bits
    must be the division's.  Negative control: on these rows the cheap product alone,
    rounded to bf16, differs from the division's in some elements, so the guard is
    what keeps them (a guard of 1 pattern fails this test)."""
    taken = spy_direct_calls(monkeypatch)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2048, 1024, generator=g).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(1024, generator=g)).to(torch.bfloat16)
    differ = 0
    for weight, n in ((w, 1024), (None, 1024), (w[:1000], 1000)):  # 1000: an odd vector and a tail
        rows = x[:, :n].contiguous()
        call = for_config(n, 64, "tree", "pairwise", "float", "auto", "torch", 0.0).direct()
        assert call is not None
        rms = torch.empty(rows.shape[0], 1)
        y = call(rows, weight, 1e-6, None, None, None, rms)
        assert y is not None
        wf = torch.ones(n) if weight is None else weight.float()
        exact = ((rows.float() / rms) * wf).to(torch.bfloat16)
        cheap = ((rows.float() * (1 / rms)) * wf).to(torch.bfloat16)
        assert bits_equal(y, exact), n
        differ += int((cheap.view(torch.int16) != exact.view(torch.int16)).sum())
        got = tgn.normalize_sync(rows, weight, eps=1e-6)
        assert taken[-1] is True
        assert bits_equal(got, _general(rows, weight, eps=1e-6)), n
    assert differ >= 10, differ  # negative control


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rows_without_the_scratch_keep_the_bits(monkeypatch: pytest.MonkeyPatch, threads: int,
                                                dtype: torch.dtype) -> None:
    """The plans whose rows skip the fp32 scratch (native_narrow.c's direct_row: chunks of
    64, 128 or 256 in whole groups of 8, the tree's merges, a clean weight): the general
    path's bits and rms, with rows the scratch path must take back (zero, tiny, huge,
    infinite and NaN rows: _rows' first five, a NaN and tiny rows below) among them; the
    linear merges, QK-norm's short rows, chunk 100, chunk 32 and 1000-wide rows keep the
    scratch."""
    taken = spy_direct_calls(monkeypatch)
    cases = ((1024, 64, "tree"), (2048, 128, "tree"), (4096, 256, "tree"), (4096, 64, "tree"), (1024, 64, "linear"),
             (64, 64, "tree"), (128, 64, "tree"), (256, 64, "linear"), (512, 128, "tree"), (1000, 64, "tree"),
             (1024, 100, "tree"), (96, 32, "tree"))
    for hidden, chunk, topology in cases:
        x = _rows(41, hidden, dtype, hidden)
        x[7, 3] = float("nan")
        x[20:24] = x[20:24] * 2.0**-60  # tiny values (bf16)
        for weight in (_weight(hidden, dtype), None):
            options: dict[str, Any] = dict(chunk_size=chunk, topology=topology)
            got = tgn.normalize_sync(x, weight, **options)  # (declined: the NaN row)
            assert _same(got, _general(x, weight, **options)), (hidden, chunk)
            for rows in (x[:7], x[8:]):
                got = tgn.normalize_sync(rows, weight, **options)
                assert taken[-1] is True
                assert _same(got, _general(rows, weight, **options)), (hidden, chunk, topology)
        # the rms a training forward keeps (its gradients read it) is the general path's
        norm = tgn.RMSNorm(hidden, chunk_size=chunk).to(dtype)
        rows = x[8:].clone().requires_grad_(True)
        dy = torch.randn(rows.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        results = []
        for backend in ("native", "torch_ops"):
            with tgn.backends.use(backend) if backend == "torch_ops" else _nothing():
                y = norm(rows)
                y.backward(dy)
            assert rows.grad is not None and norm.weight.grad is not None
            results.append((y.detach(), rows.grad, norm.weight.grad))
            rows.grad = norm.weight.grad = None
        for a, b in zip(*results):
            assert bits_equal(a, b), (hidden, chunk)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_short_rows_keep_the_general_paths_rms(monkeypatch: pytest.MonkeyPatch, threads: int,
                                                dtype: torch.dtype) -> None:
    """Rows of fewer than 8 full chunks (QK-norm's): their chunk sums made for a step of
    rows at once and each row's merges after (native_narrow.c's short_totals), then every
    row's rms and reciprocal pair 16 rows a vector (divisors).  The op's fp32 rms shows
    what y's rounding to bf16/fp16 would hide: it must be the general path's for 1 to 7
    chunks, linear and tree merges, a residual, a chunk length without vector sums (100) and rows
    the scratch path finishes otherwise (zero, subnormal, huge, NaN); and the merges'
    order must show in it (the negative control)."""
    taken = spy_direct_calls(monkeypatch)
    op = torch.ops.taskgraph_norm
    cases = ((64, 64), (128, 64), (192, 64), (256, 64), (320, 64), (448, 64), (96, 32), (24, 8), (200, 100))
    rms_of: dict[tuple[int, str], torch.Tensor] = {}
    for hidden, chunk in cases:
        x, r = _rows(300, hidden, dtype, hidden), _rows(300, hidden, dtype, hidden + 1).flip(0)
        w = _weight(hidden, dtype)
        for topology in ("linear", "tree"):  # (the topologies whose rows have a C plan)
            config = (1e-6, chunk, topology, "pairwise", "float", "torch", 0.0)
            for rows in (x[5:], x[5:6], x):  # many steps; one row; with the rows of _rows' specials
                got = op.rms_norm(rows, w, *config)
                with tgn.backends.use("torch_ops"):
                    want = op.rms_norm(rows, w, *config)
                assert _same(got, want), (hidden, chunk, topology, rows.shape)
            tgn.normalize_sync(x[5:], w, chunk_size=chunk, topology=topology)
            assert taken[-1] is True
            got = op.rms_norm_residual(x[5:], r[5:], w, *config)
            with tgn.backends.use("torch_ops"):
                want = op.rms_norm_residual(x[5:], r[5:], w, *config)
            assert _same(got, want), (hidden, chunk, topology, "residual")
            rms_of[hidden, topology] = op.rms_norm(x[5:], w, *config)[1]
    # merges in another order give other rms bits: the comparison above sees the order
    assert not bits_equal(rms_of[256, "linear"], rms_of[256, "tree"])
    assert not bits_equal(rms_of[448, "linear"], rms_of[448, "tree"])


def test_a_training_forward_keeps_the_rms_of_the_general_path(threads: int) -> None:
    """The grad-enabled forward asks the direct call for each row's rms too."""
    for dtype, accumulate in itertools.product(HALF, ("float", "exact")):
        norm = tgn.RMSNorm(1000, accumulate=accumulate).to(dtype)
        x = _rows(300, 1000, dtype, 9)[5:].requires_grad_(True)
        dy = torch.randn(x.shape, dtype=dtype)
        y = norm(x)
        y.backward(dy)
        got = (y.detach(), x.grad, norm.weight.grad)
        x.grad = norm.weight.grad = None
        with tgn.backends.use("torch_ops"):
            y2 = norm(x)
            y2.backward(dy)
        for a, b in zip(got, (y2.detach(), x.grad, norm.weight.grad)):
            assert a is not None and b is not None and bits_equal(a, b), (dtype, accumulate)


def test_every_blocking_of_the_rows_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    x, r = _rows(203, 1024, torch.bfloat16, 1), _rows(203, 1024, torch.bfloat16, 2)
    w = _weight(1024, torch.bfloat16)
    want = _general(x, w, residual=r)
    monkeypatch.setattr(direct, "SPLIT_NUMEL", 1)
    for grain_rows in (1, 7, 64, 204):
        monkeypatch.setattr(direct, "TEAM_GRAIN", grain_rows * 1024)
        tgn.clear_caches()
        assert _same(tgn.normalize_sync(x, w, residual=r), want), grain_rows


PROBE = build_probe("test_native_narrow", """
    import hashlib, torch, taskgraph_norm as tgn
    from taskgraph_norm.backends.native import loader as native
    from taskgraph_norm.testing import bits
    print(native.library_path().name if native.available() else None)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(300, 777, generator=g, dtype=torch.float64)
    rows = rows * torch.exp2(torch.randint(-20, 6, (300, 777), generator=g))  # finite in fp16 too
    for dtype in (torch.bfloat16, torch.float16):
        x = rows.to(dtype)
        w = (1 + 0.1 * torch.randn(777, generator=g)).to(dtype)
        for acc, mode, chunk in ((a, m, c) for a in ("float", "exact") for m in ("torch", "llama")
                                 for c in (64, 10)):
            y, h = tgn.normalize_sync(x, w * 1e-4, accumulate=acc, casting_mode=mode, chunk_size=chunk,
                                      offset=0.5, residual=x.flip(0))
            print(dtype, acc, mode, chunk, *(hashlib.sha256(bits(t).numpy().tobytes()).hexdigest()[:16]
                                              for t in (y, h)))
""")


def test_the_portable_build_gives_the_host_builds_bits() -> None:
    """TGN_NATIVE=portable (plain C conversions) against the default (AVX-512 where
    built) and the torch ops."""
    portable, default, off = build_runs(PROBE)
    for proc in (portable, default, off):
        assert proc.returncode == 0, proc.stderr
    p, d, o = (proc.stdout.splitlines() for proc in (portable, default, off))
    assert p[0].startswith("_native_portable") and o[0] == "None"
    assert p[1:] == d[1:] == o[1:] and len(p) == 17
    assert len({line.split()[-2] for line in p[1:]}) >= 4  # negative control: the digests see dtype and mode
