"""Peak extra memory of one warm call, each case in a fresh process (``roofline.py``'s memory part).

torch's CPU allocator keeps no statistics, and ``tracemalloc`` sees only Python's
own allocations, so a probe process measures resident memory (RSS):

1. it makes the input, weight, ``out`` and ``dy`` and touches them;
2. it makes the call twice (the first call builds and proves the pipeline, fills
   per-thread workspaces, loads code pages), drops the results and reads VmRSS:
   what the warm-up left resident is reported as *retained*;
3. it resets the high-water mark (``5`` into ``/proc/self/clear_refs``), makes the
   call once more, keeps its result, and reads VmHWM: *peak extra* is VmHWM minus
   the RSS of step 2, the most memory the warm call had in use beyond what was
   already resident, its own output included.

RSS counts only pages that are touched, and glibc keeps freed blocks in its heap,
where a later call reuses them without raising RSS.  So the probe runs with
``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=65536``: every block
of 64 KiB or more is its own ``mmap`` and goes back to the OS when freed, and RSS
follows what is live.  The controls bound the method: ``out.copy_(x)`` must read 0
and a fresh ``torch.empty_like(x).fill_(0)`` the output's own size.
Linux only (``/proc``); the figures are in multiples of the 4 KiB page.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

#: Label -> (setup statements, the call (an expression), statements that undo what a call
#: leaves, run after each warm-up call), run in the probe with x, w, out, dy, D, torch, F, tgn.
_NO_GRADS = "xg.grad = None; norm.weight.grad = None"
CASES: dict[str, tuple[str, ...]] = {
    "out.copy_(x) (control: 0)": ("", "out.copy_(x)"),
    "torch.empty_like(x).fill_(0) (control: the output)": ("", "torch.empty_like(x).fill_(0)"),
    "normalize_sync(x, w)": ("", "tgn.normalize_sync(x, w)"),
    "normalize_sync(x, w, accumulate='exact')": ("", "tgn.normalize_sync(x, w, accumulate='exact')"),
    "normalize_sync(x, w, out=out)": ("", "tgn.normalize_sync(x, w, out=out)"),
    "normalize_sync(x, w, accumulate='exact', out=out)": ("", "tgn.normalize_sync(x, w, accumulate='exact', out=out)"),
    "eager F.rms_norm(x, (D,), w)": ("", "F.rms_norm(x, (D,), w)"),
    "forward+backward tgn.RMSNorm(D)": (
        "norm = tgn.RMSNorm(D, dtype=x.dtype); xg = x.clone().requires_grad_()",
        "(norm(xg).backward(dy), xg.grad)[1]", _NO_GRADS,
    ),
    "forward+backward torch.nn.RMSNorm(D)": (
        "norm = torch.nn.RMSNorm(D, dtype=x.dtype); xg = x.clone().requires_grad_()",
        "(norm(xg).backward(dy), xg.grad)[1]", _NO_GRADS,
    ),
}

_PROBE = """
import json, sys, torch, torch.nn.functional as F
import taskgraph_norm as tgn
setup, call, reset = sys.argv[1:4]
rows, D, dtype = int(sys.argv[4]), int(sys.argv[5]), getattr(torch, sys.argv[6])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
x = torch.empty(rows, D, dtype=dtype).normal_(); w = torch.ones(D, dtype=dtype)
out = torch.empty_like(x).fill_(0); dy = torch.empty_like(x).normal_()
exec(setup)
before = status("VmRSS")
for _ in range(2):
    result = eval(call); del result
    exec(reset)
warm = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
result = eval(call)
peak = status("VmHWM")
print(json.dumps({"retained": warm - before, "peak_extra": peak - warm}))
"""

_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def probe(case: str, rows: int, hidden: int, dtype: str = "float32") -> dict[str, Any]:
    """One case of ``CASES`` in a fresh process: bytes retained by the warm-up and the
    warm call's peak extra bytes, beside the output's own size."""
    setup, call, *reset = CASES[case]
    done = subprocess.run([sys.executable, "-c", _PROBE, setup, call, "".join(reset), str(rows), str(hidden), dtype],
                          capture_output=True, text=True, env={**os.environ, **_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {case!r} failed:\n{done.stderr[-2000:]}")
    import torch

    figures = json.loads(done.stdout.strip().splitlines()[-1])
    output = rows * hidden * getattr(torch, dtype).itemsize
    return {"case": case, "rows": rows, "hidden": hidden, "dtype": dtype, "output_bytes": output, **figures}


def memory(rows: int, hidden: int, cases: Sequence[str] | None = None) -> list[dict[str, Any]]:
    results = []
    for case in cases or CASES:
        results.append(probe(case, rows, hidden))
        print(f"  memory {case} done", file=sys.stderr)
    return results


def memory_table(results: Sequence[dict[str, Any]]) -> str:
    if not results:
        return ""
    r0 = results[0]
    lines = [f"| ({r0['rows']}, {r0['hidden']}) {r0['dtype']}, one warm call | peak extra MiB | / output size "
             f"| retained by warm-up MiB |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['peak_extra'] / 2**20:.1f} | {r['peak_extra'] / r['output_bytes']:.2f}x "
                     f"| {r['retained'] / 2**20:.1f} |")
    return "\n".join(lines)
