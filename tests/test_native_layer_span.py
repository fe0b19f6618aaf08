"""LayerNorm's exact bf16 rows in C take their mean from an exact plain sum where the row's
exponent span allows (native_half.h's tgn_widen_bf16_span, native_layer_exact.c's
tgn_mean_span_f32): summed by fours in fp32 where the span R <= 14, plainly in fp64 while
n <= 2^(45 - R), no bound to prove.  Checked two ways:

* the function alone, built here (host flags, so the AVX-512 span loop where the CPU has
  it, and the portable build's scalar loop): on every row where it answers, the
  torch-ops backend's mean, bit for bit; where it must not answer (a tie, a subnormal, a
  span too wide for the length, Inf, NaN, zeros, values past 2^100) it leaves the row to
  the other ways, and it does answer the rows inside its range (so the path is tested);
* through the kernel (native_layer.layer_rows): y, mean and den are the torch-ops bits on
  the same rows, with a weight and bias, one thread and all.

Negative control: a mutant that sums by fours at R <= 16 (where four values' sum can need
25 bits) gives other means on near-cancelling rows of span 15 and 16.
"""

from __future__ import annotations

import ctypes
import subprocess
from fractions import Fraction
from functools import cache
from pathlib import Path

import pytest
import torch

from taskgraph_norm.backends.native import cpu_features
from taskgraph_norm.backends.native import layer as native_layer
from taskgraph_norm.backends.torch_ops.layer import run_layer
from taskgraph_norm.pipeline.layer import layer_pipeline
from taskgraph_norm.testing import bits_equal, count_bit_differences

from ._trust_helpers import CC, native_status

CSRC = Path(__file__).resolve().parents[1] / "taskgraph_norm" / "backends" / "native" / "csrc"
HARNESS = """
#include <stdint.h>
#include "native_half.h"
#include "tgn_native.h"
int h_mean(const uint16_t *b, int64_t n, float *xs, float *mean)
{ return tgn_mean_span_f32(xs, n, tgn_widen_bf16_span(b, n, xs), mean); }
"""
FOURS = "if (r <= 14) {"  # the line a mutant changes
NATIVE, WHY_NOT = native_status()
ALL = max(2, torch.get_num_threads())


@cache
def _build(tmp: Path, name: str, host: bool, mutant: bool) -> ctypes.CDLL:
    source = (CSRC / "native_layer_exact.c").read_text()
    assert source.count(FOURS) == 1
    exact = tmp / f"{name}_layer_exact.c"
    exact.write_text(source.replace(FOURS, "if (r <= 16) {") if mutant else source)
    harness = tmp / f"{name}_harness.c"
    harness.write_text(HARNESS)
    lib = tmp / f"lib{name}.so"
    assert CC is not None
    flags = ["-march=native"] if host else []
    subprocess.run([CC, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", f"-I{CSRC}", *flags,
                    "-o", str(lib), str(harness), str(exact), str(CSRC / "native_exact.c"), "-lm"],
                   check=True, capture_output=True)
    dll = ctypes.CDLL(str(lib))
    dll.h_mean.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    dll.h_mean.restype = ctypes.c_int
    return dll


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("span")


def _host_ok() -> bool:
    return cpu_features.features() is not None


def _bf16(values: list[float] | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(values, dtype=torch.float64)
    y = x.to(torch.bfloat16)
    assert bool(((y.double() == x) | (x.isnan() & y.isnan())).all()), "a row value is not a bf16 value"
    return y


def _spanned(rows: int, n: int, span: int, top: int, seed: int, cancel: bool = False,
             ends: bool = False) -> torch.Tensor:
    """bf16 rows whose nonzero magnitudes lie in [2^(top - span), 2^(top + 1)), both ends
    present; half of them negative with ``cancel`` (small means: fine ulps); with ``ends``
    every exponent is top or top - span (sums of a few that need every bit)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(top - span, top + 1, (rows, n), generator=g)
    if ends:
        e = torch.where(torch.rand(rows, n, generator=g) < 0.5, top, top - span)
    m = torch.randint(128, 256, (rows, n), generator=g).double() / 128
    sign = torch.where(torch.rand(rows, n, generator=g) < (0.5 if cancel else 0.2), -1.0, 1.0)
    x = sign * m * torch.exp2(e.double())
    x[:, 0], x[:, 1] = 2.0 ** top, 2.0 ** (top - span)
    x[:, 2::17] = 0.0  # zeros do not count in the span
    return _bf16(x)


def _means(lib: ctypes.CDLL, x: torch.Tensor) -> list[float | None]:
    """Each row's mean from the function, None where it leaves the row to the others."""
    out: list[float | None] = []
    n = x.shape[-1]
    bits = x.contiguous().view(torch.int16)
    xs = torch.empty(n, dtype=torch.float32)
    mean = torch.empty(1, dtype=torch.float32)
    for row in bits:
        row = row.contiguous()
        ok = lib.h_mean(row.data_ptr(), n, xs.data_ptr(), mean.data_ptr())
        out.append(mean.item() if ok else None)
    return out


def _reference_means(x: torch.Tensor) -> torch.Tensor:
    plan = layer_pipeline(x.shape[-1], accumulate="exact").plan
    got = run_layer(plan, x, None, None, 1e-5, stats=True)
    assert got.mean is not None
    return got.mean.reshape(-1)


def _agrees(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[int, int]:
    """(rows answered, rows whose answer differs from the torch-ops mean's bits)."""
    want = _reference_means(x)
    answered = wrong = 0
    for got, ref in zip(_means(lib, x), want):
        if got is None:
            continue
        answered += 1
        wrong += not bits_equal(torch.tensor([got], dtype=torch.float32), ref.reshape(1))
    return answered, wrong


def _ties(x: torch.Tensor) -> int:
    """How many rows' exact mean lies on a midpoint between fp32 neighbours (span <= 45)."""
    count = 0
    for row in x.double():
        nonzero = row[row != 0]
        if not len(nonzero):
            continue
        k = 7 - int(torch.frexp(nonzero.abs()).exponent.min()) + 1  # every value times 2^k: an integer
        mean = Fraction(int((row * 2.0 ** k).long().sum()), len(row) << k if k >= 0 else len(row)) * (
            Fraction(1) if k >= 0 else Fraction(2) ** -k)
        near = torch.tensor(float(mean), dtype=torch.float32)
        for way in (float("inf"), -float("inf")):
            other = torch.nextafter(near, torch.tensor(way, dtype=torch.float32))
            count += mean == (Fraction(near.item()) + Fraction(other.item())) / 2
    return count


def _edge_rows() -> dict[str, tuple[torch.Tensor, bool]]:
    """name: (rows of 64, whether the function answers them)."""
    ones = [1.0] * 62
    tiny = 2.0 ** -13 + 2.0 ** -19  # span 13 beside ones: the fours' path
    return {
        # S = 63 + 2^-13 + 2^-19: mean 63/64 + 2^-19 + 2^-25, a midpoint: left to the others
        "tie": (_bf16([[*ones, 1.0, tiny]]), False),
        # just past the midpoint (2^-20 in S): rounds up, answered
        "near tie": (_bf16([[*ones, tiny, 2.0 ** -20]]), True),
        "span 14": (_bf16([[*ones, 1.5, 2.0 ** -14]]), True),
        "span 15": (_bf16([[*ones, 1.5, -(2.0 ** -15)]]), True),
        "smallest normal span": (_bf16([[2.0 ** -110] * 63 + [2.0 ** -119]]), True),
        "below it": (_bf16([[2.0 ** -110] * 63 + [2.0 ** -120]]), False),
        "subnormal": (_bf16([[*ones, 1.0, 2.0 ** -130]]), False),
        "top of the range": (_bf16([[2.0 ** 100] * 32 + [-(2.0 ** 99)] * 32]), True),
        "past it": (_bf16([[2.0 ** 101] * 32 + [-(2.0 ** 99)] * 32]), False),
        "huge": (_bf16([[1.5 * 2.0 ** 127, -(2.0 ** 127)] * 32]), False),
        "inf": (_bf16([[*ones, 1.0, float("inf")]]), False),
        "nan": (_bf16([[*ones, 1.0, float("nan")]]), False),
        "zeros": (_bf16([[0.0] * 32 + [-0.0] * 32]), False),
        "constant": (_bf16([[-3.0] * 64]), True),
        "span 39 (64 values)": (_bf16([[*ones, 2.0 ** 20, 2.0 ** -19]]), True),
        "span 40": (_bf16([[*ones, 2.0 ** 20, 2.0 ** -20]]), False),
    }


pytestmark = pytest.mark.skipif(CC is None or not NATIVE, reason=f"no C compiler, or native kernels: {WHY_NOT}")


@pytest.mark.parametrize("host", [True, False], ids=["host", "portable"])
def test_the_span_mean_is_the_torch_ops_mean_where_it_answers(build_dir: Path, host: bool) -> None:
    if host and not _host_ok():
        pytest.skip("no host build on this platform")
    lib = _build(build_dir, "host" if host else "portable", host, False)
    for name, (x, answers) in _edge_rows().items():
        answered, wrong = _agrees(lib, x)
        assert wrong == 0, name
        assert answered == (1 if answers else 0), name
    for span in (0, 7, 13, 14, 15, 16, 24, 33):
        for n, cancel in ((64, True), (100, False), (4096, True)):
            x = _spanned(40, n, span, top=3 - span // 3, seed=span * 7 + n, cancel=cancel)
            answered, wrong = _agrees(lib, x)
            assert wrong == 0, (span, n)
            assert answered == len(x) - _ties(x), (span, n, answered)  # every row but a tie
    # the length decides the widest span: 4096 values take 33, not 34; 2048 take 34
    assert _agrees(lib, _spanned(8, 4096, 34, 0, seed=1))[0] == 0
    assert _agrees(lib, _spanned(8, 2048, 34, 0, seed=1)) == (8, 0)


def test_a_mutant_that_sums_wider_spans_by_fours_is_caught(build_dir: Path) -> None:
    if not _host_ok():
        pytest.skip("no host build on this platform")
    lib = _build(build_dir, "fours16", True, True)
    wrong = 0
    for span in (15, 16):
        x = _spanned(50, 64, span, top=3, seed=span, cancel=True, ends=True)
        wrong += _agrees(lib, x)[1]
    assert wrong > 0, "the mutant gave the torch-ops means on every row: the rows are too easy"
    # and the real build on the same rows
    lib = _build(build_dir, "host", True, False)
    assert all(_agrees(lib, _spanned(50, 64, s, top=3, seed=s, cancel=True, ends=True))[1] == 0 for s in (15, 16))


@pytest.mark.parametrize("n", [64, 4096])
def test_the_kernel_gives_the_torch_ops_bits_on_spanned_rows(n: int) -> None:
    rows = [x for x, _ in _edge_rows().values()] if n == 64 else []
    rows += [_spanned(30, n, s, top=2, seed=s, cancel=s % 2 == 1) for s in (3, 13, 14, 15, 16, 30, 34)]
    g = torch.Generator().manual_seed(n)
    w = (1 + 0.25 * torch.randn(n, generator=g)).to(torch.bfloat16)
    b = (0.5 * torch.randn(n, generator=g)).to(torch.bfloat16)
    plan = layer_pipeline(n, accumulate="exact").plan
    kept = [bool(x.double().isfinite().all()) and float(x.double().abs().max()) < 1e30 for x in rows]
    x = torch.cat([x for x, k in zip(rows, kept) if k])
    for threads in (1, ALL):
        for wb in ((w, b), (None, None), (w.float(), b.float())):
            want = run_layer(plan, x, *wb, 1e-5, stats=True)
            got = native_layer.layer_rows(plan, x, *wb, 1e-5, stats=True, threads=threads)
            assert got is not None
            for a, c, name in zip(want, got, ("y", "mean", "den")):
                assert a is not None and c is not None and bits_equal(a, c), (name, count_bit_differences(a, c))
    for x, k in zip(rows, kept):  # an Inf, a NaN or a variance past fp32: the whole call left to torch ops
        if not k:
            assert native_layer.layer_rows(plan, x, w, b, 1e-5, stats=True) is None
