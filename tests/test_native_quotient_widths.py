"""native_quotient.h at every vector width: the fma quotient is IEEE division, bit for bit.

The header is built here on its own, three times (the divider alone, 8 lanes with
AVX2+FMA, 16 lanes with AVX-512), whichever of them this CPU runs, and each build's
``(x / rms) * w`` is compared with torch's division over hard quotients:

* every significand of the dividend, for the divisors whose reciprocals round worst
  (1 / b within a hair of a rounding midpoint, where q0 = RN(a RN(1/b)) strays
  furthest), for b near 1 and near 2, and at both ends of the divisor range;
* the edges of the dividend range (2^-60, 2^60 and their neighbours), zeros of both
  signs, subnormals, infinities, NaN, the largest floats; divisors just outside the
  range, zero, infinite;
* a weight, and a weight plus an offset.

Mutants of the header (no correction, one range bound widened to every float) must
differ from the division on the same data: the data is hard enough to catch them.
"""

from __future__ import annotations

import ctypes
import subprocess
from functools import cache
from pathlib import Path

import pytest
import torch

from taskgraph_norm.backends.native import cpu_features

from ._trust_helpers import CC
from .helpers import assert_bits_equal, bits_equal

HEADER_DIR = Path(__file__).resolve().parents[1] / "taskgraph_norm" / "backends" / "native" / "csrc"
HARNESS = """
#include <stdint.h>
#include <string.h>
#include "native_quotient.h"
void q_row(const float *x, float *y, const float *w, float off, int64_t n, float rms)
{ tgn_quotient_row_f32(x, y, w, off, n, rms); }
void q_row_ranged(const float *x, float *y, const float *w, float off, int64_t n, float rms)
{ tgn_quotient_row_f32_ranged(x, y, w, off, n, rms); }
int q_all_ranged(const float *x, int64_t n) { return tgn_quotient_all_ranged(x, n); }
int q_lanes(void) { return TGN_QUOTIENT_LANES; }
void q_pairs(const float *b, int64_t n, float *pairs) { tgn_q_pairs(b, n, pairs); }
void q_setup_pair(float b, float *pair)
{
#if TGN_QUOTIENT_LANES > 1
    tgn_q_div_t d = tgn_q_setup(b);
    float r[TGN_QUOTIENT_LANES], rl[TGN_QUOTIENT_LANES];
    memcpy(r, &d.r, sizeof r);
    memcpy(rl, &d.rl, sizeof rl);
    pair[0] = r[TGN_QUOTIENT_LANES - 1];
    pair[1] = rl[TGN_QUOTIENT_LANES - 1];
#else
    tgn_q_pair1(b, pair, pair + 1);
#endif
}
"""
#: name: (compiler flags, CPU features needed, lanes)
WIDTHS = {
    "divider": ([], (), 1),
    "avx2": (["-mavx2", "-mfma"], ("avx2", "fma"), 8),
    "avx512": (["-mavx512f", "-mfma"], ("avx512f", "fma"), 16),
}

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler to build the harness")


@cache
def _build(tmp: Path, name: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    src = tmp / f"{name}.c"
    src.write_text(HARNESS)
    lib = tmp / f"lib{name}.so"
    assert CC is not None
    subprocess.run([CC, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", f"-I{HEADER_DIR}",
                    *flags, "-o", str(lib), str(src)], check=True, capture_output=True)
    dll = ctypes.CDLL(str(lib))
    dll.q_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64,
                          ctypes.c_float]
    dll.q_row.restype = None
    dll.q_row_ranged.argtypes = dll.q_row.argtypes
    dll.q_row_ranged.restype = None
    dll.q_all_ranged.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    dll.q_all_ranged.restype = ctypes.c_int
    dll.q_lanes.restype = ctypes.c_int
    dll.q_pairs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    dll.q_pairs.restype = None
    dll.q_setup_pair.argtypes = [ctypes.c_float, ctypes.c_void_p]
    dll.q_setup_pair.restype = None
    return dll


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quotient")


def _width(build_dir: Path, name: str, mutant: tuple[str, ...] = ()) -> ctypes.CDLL:
    flags, needs, lanes = WIDTHS[name]
    have = cpu_features.features() or frozenset()
    if not set(needs) <= have:
        pytest.skip(f"this CPU lacks {', '.join(sorted(set(needs) - have))}")
    lib = _build(build_dir, name + "".join(m.replace("-D", "_").replace("=", "_") for m in mutant),
                 (*flags, *mutant))
    assert lib.q_lanes() == lanes
    return lib


def _run(lib: ctypes.CDLL, x: torch.Tensor, rms: float, w: torch.Tensor | None = None,
         off: float = 0.0, ranged: bool = False) -> torch.Tensor:
    y = torch.empty_like(x)
    row = lib.q_row_ranged if ranged else lib.q_row
    row(x.data_ptr(), y.data_ptr(), None if w is None else w.data_ptr(), off, x.numel(), rms)
    return y


def _division(x: torch.Tensor, rms: float, w: torch.Tensor | None = None, off: float = 0.0) -> torch.Tensor:
    q = x / torch.tensor(rms, dtype=torch.float32)
    if w is None:
        return q
    return q * (w + torch.tensor(off, dtype=torch.float32) if off else w)


def _f32(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


@cache
def worst_divisors(count: int = 3) -> tuple[float, ...]:
    """Divisors in [1, 2) whose reciprocal's rounding error is largest (closest to
    half an ulp), from every significand: where q0 = RN(a RN(1/b)) strays furthest."""
    b = (torch.arange(1 << 23, dtype=torch.int32) | 0x3F800000).view(torch.float32)
    exact = 1.0 / b.double()
    y = exact.float()
    ulp = (y.view(torch.int32) + 1).view(torch.float32).double() - y.double()
    err = ((exact - y.double()) / ulp).abs()
    near_one = torch.topk(err[: 1 << 20], count).indices
    near_two = (1 << 23) - (1 << 20) + torch.topk(err[-(1 << 20):], count).indices
    return tuple(float(b[i]) for i in torch.cat([near_one, near_two]))


def every_significand(sign_every: int = 3) -> torch.Tensor:
    """All 2^23 significands in [1, 2), some negated."""
    a = (torch.arange(1 << 23, dtype=torch.int32) | 0x3F800000).view(torch.float32).clone()
    a[::sign_every] *= -1
    return a


def edges() -> torch.Tensor:
    """The dividend range's edges and the values outside it, padded to vectors."""
    lo, hi = 0x26800000, 0x5D800000  # 2^-50, 2^60
    bits = [lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF,
            0x7F800000, 0x7FC00000, 0x3F800000, 0x00400000]
    vals = [_f32(b) for b in bits] + [0.0, -0.0, 1e-30, 3e-39, 1e30]
    x = torch.tensor(vals + [-v for v in vals], dtype=torch.float32)
    # each value alone among ordinary ones (one bad lane sends a whole vector to the divider)
    alone = torch.full((x.numel(), 16), 1.25)
    alone[:, 5] = x
    return torch.cat([x, alone.flatten(), torch.linspace(-3, 3, 37)])


def divisors() -> list[float]:
    base = list(worst_divisors()) + [1.0, 1.5, 98.0]
    scaled = [b * 2.0**e for b in base for e in (-40, -1, 0, 39)]
    outside = [_f32(0x2B800000 - 1), _f32(0x53800000 + 1), 2.0**-41, 2.0**41, 0.0, float("inf"), 1e-45]
    return scaled + outside


@pytest.mark.parametrize("name", list(WIDTHS))
def test_every_significand_for_the_hardest_divisors(build_dir: Path, name: str) -> None:
    lib = _width(build_dir, name)
    a = every_significand()
    for b in worst_divisors() + (1.0, 98.0 * 2.0**-40, 1.5 * 2.0**39):
        for scale in (1.0, 2.0**-49, 2.0**58):  # quotients near 1, and at the range's ends
            x = a * scale
            assert_bits_equal(_run(lib, x, b), _division(x, b))


@pytest.mark.parametrize("name", list(WIDTHS))
def test_edges_zeros_specials_weights_and_offsets(build_dir: Path, name: str) -> None:
    lib = _width(build_dir, name)
    x = edges()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(x.numel(), generator=g)
    for b in divisors():
        assert_bits_equal(_run(lib, x, b), _division(x, b))
        assert_bits_equal(_run(lib, x, b, w), _division(x, b, w))
        assert_bits_equal(_run(lib, x, b, w, 0.5), _division(x, b, w, 0.5))
    # every tail length past the last whole vector
    for n in range(1, 40):
        assert_bits_equal(_run(lib, x[:n].contiguous(), 3.0, w[:n].contiguous()),
                          _division(x[:n], 3.0, w[:n]))


@pytest.mark.parametrize("name", list(WIDTHS))
def test_the_unchecked_quotient_of_values_in_range(build_dir: Path, name: str) -> None:
    """tgn_q_vec_ranged, for rows known to hold only +-0 and 2^-50 <= |a| <= 2^60 (every
    fp16 row, for one): no range check, the same bits, -0 included.  Negative control:
    tiny dividends, outside its range, do differ from the division there."""
    lib = _width(build_dir, name)
    a = every_significand()
    for b in worst_divisors() + (1.0, 98.0 * 2.0**-40, 1.5 * 2.0**39):
        for scale in (1.0, 2.0**-49, 2.0**58):
            x = a * scale
            assert lib.q_all_ranged(x.data_ptr(), x.numel()) == 1
            assert_bits_equal(_run(lib, x, b, ranged=True), _division(x, b))
    mag = edges().view(torch.int32) & 0x7FFFFFFF
    x = edges()[(mag == 0) | ((mag >= 0x26800000) & (mag <= 0x5D800000))].contiguous()
    fp16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    fp16 = fp16[fp16.isfinite()].float()  # every finite fp16 value, -0 among them
    for data in (x, fp16):
        assert lib.q_all_ranged(data.data_ptr(), data.numel()) == 1 and bool((data == 0).any())
        w = torch.randn(data.numel(), generator=torch.Generator().manual_seed(5))
        for b in divisors():
            assert_bits_equal(_run(lib, data, b, ranged=True), _division(data, b))
            assert_bits_equal(_run(lib, data, b, w, 0.5, ranged=True), _division(data, b, w, 0.5))
    tiny = edges() * 2.0**-100
    assert lib.q_all_ranged(tiny.data_ptr(), tiny.numel()) == 0
    if name != "divider":
        assert not all(bits_equal(_run(lib, tiny, b, ranged=True), _division(tiny, b)) for b in divisors()[:24])


@pytest.mark.parametrize("name", list(WIDTHS))
def test_the_pairs_of_many_divisors_are_each_divisors_setup(build_dir: Path, name: str) -> None:
    """tgn_q_pairs (a step of short rows' reciprocal pairs, 16 a vector) against
    tgn_q_setup's pair of each divisor alone, bit for bit: the hardest divisors, the
    range's edges, zero, infinity, NaN, random ones, and every count past whole vectors.
    Negative control: the pairs of the neighbouring divisors differ."""
    lib = _width(build_dir, name)
    g = torch.Generator().manual_seed(11)
    b = torch.tensor(divisors() + [float("nan"), -1.0], dtype=torch.float32)
    b = torch.cat([b, torch.exp2(torch.rand(4000, generator=g) * 80 - 40).float()])
    want = torch.empty(2 * b.numel(), dtype=torch.float32)
    one = torch.empty(2, dtype=torch.float32)
    for k, v in enumerate(b.tolist()):
        lib.q_setup_pair(v, one.data_ptr())
        want[2 * k: 2 * k + 2] = one
    for n in (b.numel(), 1, 15, 16, 17, 33):
        got = torch.empty(2 * n, dtype=torch.float32)
        lib.q_pairs(b.data_ptr(), n, got.data_ptr())
        assert_bits_equal(got, want[: 2 * n])
    near = (b.view(torch.int32) + 1).view(torch.float32)
    got = torch.empty_like(want)
    lib.q_pairs(near.data_ptr(), near.numel(), got.data_ptr())
    assert not bits_equal(got, want)


@pytest.mark.parametrize("mutant", [("-DTGN_Q_CORRECTIONS=0",), ("-DTGN_Q_LO=1u",), ("-DTGN_Q_HI=0x7f7fffffu",),
                                    ("-DTGN_Q_RMS_LO=1u",)])
def test_mutants_of_the_header_are_caught(build_dir: Path, mutant: tuple[str, ...]) -> None:
    """No correction (q0 alone: faithful, not always correctly rounded); the dividend
    range open to subnormals, or to the largest floats; the divisor range open to
    subnormals: each differs from the division on this data."""
    have = cpu_features.features() or frozenset()
    name = "avx512" if {"avx512f", "fma"} <= have else "avx2"
    lib = _width(build_dir, name, mutant)
    a = every_significand()
    found = False
    for b in worst_divisors() + (98.0 * 2.0**-40,):
        for scale in (1.0, 2.0**-49, 2.0**58):
            x = a * scale
            found = found or not bits_equal(_run(lib, x, b), _division(x, b))
    # quotients on subnormal rounding midpoints: k 49 2^-149 / 98, k odd
    ties = (torch.arange(1, 4096, 2, dtype=torch.float64) * 49.0 * 2.0**-149).float()
    found = found or not bits_equal(_run(lib, ties, 98.0), _division(ties, 98.0))
    x = edges()
    tiny = edges() * 2.0**-100  # subnormal and tiny dividends
    huge = torch.full((64,), 3.0e38)
    for b in divisors():
        for data in (x, tiny, huge):
            found = found or not bits_equal(_run(lib, data, b), _division(data, b))
    assert found, f"the mutant {mutant} gave the division's bits on every hard quotient"
