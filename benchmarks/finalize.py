"""FINALIZE's quotient row, ``y = (x / rms) * w``: the divider against the fma quotient.

    python benchmarks/finalize.py [--rounds 15]

Builds ``backends/native/csrc/native_quotient.h`` on its own at each vector width this CPU runs
(the divider alone, as the portable build has it; 8 lanes with AVX2+FMA; 16 with
AVX-512), the way tests/test_native_quotient_widths.py does, and times one row of
4096 against each (interleaved rounds, medians, ns per row):

* a hot row: the same row again and again (x, w and y in L1/L2), as FINALIZE finds
  its row right after the row's sums;
* 64 rows in turn (1 MiB in, 1 MiB out): the row's data moves through L2.

Every build gives the same bits (the test checks that); only the time differs.
"""

from __future__ import annotations

import argparse
import ctypes
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from taskgraph_norm.backends.native import cpu_features  # noqa: E402
from taskgraph_norm.tools.bench import interleaved_medians  # noqa: E402

HEADER_DIR = Path(__file__).resolve().parents[1] / "taskgraph_norm" / "backends" / "native" / "csrc"
SOURCE = """
#include <stdint.h>
#include "native_quotient.h"
void rows(const float *x, float *y, const float *w, int64_t n_rows, int64_t d, int64_t reps, float rms)
{
    for (int64_t r = 0; r < reps; ++r)
        for (int64_t i = 0; i < n_rows; ++i)
            tgn_quotient_row_f32(x + i * d, y + i * d, w, 0.0f, d, rms);
}
"""
#: name: (compiler flags, CPU features needed)
WIDTHS = {"divider": ([], ()), "8 lanes (AVX2+FMA)": (["-mavx2", "-mfma"], ("avx2", "fma")),
          "16 lanes (AVX-512)": (["-mavx512f", "-mfma"], ("avx512f", "fma"))}


def build(tmp: Path, cc: str) -> dict[str, ctypes.CDLL]:
    have = cpu_features.features() or frozenset()
    src = tmp / "quotient.c"
    src.write_text(SOURCE)
    libs = {}
    for i, (name, (flags, needs)) in enumerate(WIDTHS.items()):
        if not set(needs) <= have:
            continue
        out = tmp / f"libq{i}.so"
        subprocess.run([*shlex.split(cc), "-O3", "-shared", "-fPIC", "-ffp-contract=off", f"-I{HEADER_DIR}",
                        *flags, "-o", str(out), str(src)], check=True)
        lib = ctypes.CDLL(str(out))
        lib.rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float]
        lib.rows.restype = None
        libs[name] = lib
    return libs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args(argv)
    cc = shutil.which("cc")
    if cc is None:
        sys.exit("needs a C compiler (cc)")
    d, reps = 4096, 2000
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, d, generator=g), 1 + 0.1 * torch.randn(d, generator=g)
    y = torch.empty_like(x)
    rms = float(x.pow(2).mean().sqrt())
    with tempfile.TemporaryDirectory() as tmp:
        libs = build(Path(tmp), cc)
        print(f"one 4096-row quotient y = (x / rms) * w, fp32, one thread, median of {args.rounds} "
              f"interleaved rounds, ns per row")
        for label, n_rows, n_reps in (("hot row (the same row)", 1, reps), ("64 rows in turn", 64, reps // 64)):
            methods = {name: (lambda lib=lib, n=n_rows, k=n_reps: lib.rows(
                x.data_ptr(), y.data_ptr(), w.data_ptr(), n, d, k, rms)) for name, lib in libs.items()}
            t = interleaved_medians(methods, args.rounds)
            per_row = {k: v / (n_rows * n_reps) * 1e9 for k, v in t.items()}
            base = per_row["divider"]
            cells = ", ".join(f"{k} {v:.0f} ns ({base / v:.2f}x faster)" if k != "divider" else f"{k} {v:.0f} ns"
                              for k, v in per_row.items())
            print(f"  {label}: {cells}")


if __name__ == "__main__":
    main()
