"""Record the golden bits: SHA-256 hashes of the outputs of a fixed, seeded set of calls.

Run from the repository root, as ``python -m tests.golden.record`` or
``python tests/golden/record.py``; it rewrites ``tests/golden/bits.json``, which
``tests/test_golden.py`` checks.  Re-record only on purpose, and say in
CHANGELOG.md why the bits changed.

The calls run under ``torch.set_num_threads(1)``: the bits must not depend on the
thread count (the test recomputes them with every thread), and one thread takes
the simplest path through the kernels.  A hash covers the dtype, the shape and
the raw bytes of the integer view of the values (little-endian), and nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the checkout's package, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

import taskgraph_norm as tgn
from taskgraph_norm.distributed.exact_grads import exact_grads  # the process-wide accumulator of weight_grad="exact"

__all__ = ["BITS_FILE", "CASES", "Case", "compute", "digest", "load", "record"]

BITS_FILE = Path(__file__).with_name("bits.json")
FORMAT = 1

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
#: Magnitudes of the hard rows: large (whose squares stay finite when summed over 4096
#: in the accumulation dtype) and small (fp16's is subnormal).
_LARGE = {"fp32": 2.0**50, "bf16": 2.0**50, "fp16": 2.0**12, "fp64": 2.0**400}
_SMALL = {"fp32": 2.0**-60, "bf16": 2.0**-60, "fp16": 2.0**-20, "fp64": 2.0**-400}


def digest(t: torch.Tensor) -> str:
    """SHA-256 of ``t``'s dtype, shape and raw bits (the little-endian integer view)."""
    ints = t.detach().contiguous().view(_INT_VIEW[t.element_size()]).numpy()
    raw = np.ascontiguousarray(ints, dtype=ints.dtype.newbyteorder("<")).tobytes()
    head = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode()
    return hashlib.sha256(head + b"\0" + raw).hexdigest()


# --- inputs --------------------------------------------------------------------------


def make_x(dtype: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Seeded normal rows at magnitudes from 2**-3 to 2**3, with the last rows hard:
    a zero row, a large row and a small row (as many as fit, leaving two ordinary rows)."""
    rows, hidden = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    x *= torch.tensor([2.0 ** (i % 7 - 3) for i in range(rows)], dtype=torch.float64)[:, None]
    hard = [torch.zeros(hidden, dtype=torch.float64), x[0].sign() * _LARGE[dtype], x[1] * _SMALL[dtype]]
    for i, row in enumerate(hard[: max(0, min(3, rows - 2))]):
        x[rows - 1 - i] = row
    return x.to(DTYPES[dtype])


def make_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 1.0,
              shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


# --- cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One recorded call: ``kind`` is ``forward`` (``normalize_sync``), ``backward``
    (``tgn.RMSNorm`` under autograd) or ``exact`` (``weight_grad="exact"``, two
    micro-batches)."""

    kind: str
    dtype: str
    shape: tuple[int, int]
    topology: str = "tree"
    leaf: str = "pairwise"
    accumulate: str = "float"
    chunk_size: int = 64
    casting_mode: str = "torch"
    offset: float = 0.0
    weight: str | None = "same"  # the weight's dtype: "same" as x, a name in DTYPES, or None
    residual: bool = False
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        w = "noweight" if self.weight is None else ("w" if self.weight == "same" else f"w-{self.weight}")
        parts = [self.kind, self.dtype, "x".join(map(str, self.shape)),
                 f"{self.topology}-{self.leaf}-{self.accumulate}", f"c{self.chunk_size}",
                 self.casting_mode, f"off{self.offset:g}", w]
        if self.residual:
            parts.append("residual")
        if self.seed:
            parts.append(f"s{self.seed}")
        return "/".join(parts)

    def config(self) -> dict[str, Any]:
        return dict(topology=self.topology, leaf=self.leaf, accumulate=self.accumulate,
                    chunk_size=self.chunk_size, casting_mode=self.casting_mode, offset=self.offset)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = make_x(self.dtype, self.shape, self.seed)
        w = None
        if self.weight is not None:
            wdtype = x.dtype if self.weight == "same" else DTYPES[self.weight]
            # Gemma stores w around 0 (1 + w is used); the others around 1
            w = make_like(self.shape[1:], wdtype, self.seed + 1, 0.25 if self.offset else 0.5,
                          0.0 if self.offset else 1.0)
        r = make_like(self.shape, x.dtype, self.seed + 2) if self.residual else None
        return x, w, r


GRAPHS = [(t, leaf, a) for t in ("tree", "linear", "cat") for leaf in ("pairwise", "native")
          for a in ("float", "exact")] + [("race", "pairwise", "exact"), ("race", "native", "exact")]
SMALL_SHAPES = ((3, 64), (5, 100))
SPLIT_SHAPES = ((300, 4096), (2000, 1024))


def _forward_cases() -> Iterator[Case]:
    # every certified graph in every dtype; the other options cycle with coprime periods
    chunks, modes = itertools.cycle((16, 64, 100)), itertools.cycle(("torch", "llama", "gemma"))
    shapes = itertools.cycle(SMALL_SHAPES + SPLIT_SHAPES + ((3, 64),))
    extras = itertools.cycle(((0.0, "same", False), (0.5, "same", True), (0.0, None, False),
                              (1.0, "same", False), (0.0, "same", True), (0.0, None, True),
                              (1.0, "same", True)))
    for dtype in DTYPES:
        for topology, leaf, accumulate in GRAPHS:
            offset, weight, residual = next(extras)
            yield Case("forward", dtype, next(shapes), topology, leaf, accumulate, next(chunks), next(modes),
                       offset, weight, residual)
    # every casting mode with every offset, with and without a weight (small and split)
    for dtype, shape in itertools.product(DTYPES, ((5, 100), (300, 4096))):
        for mode in ("torch", "llama", "gemma"):
            for offset in (0.0, 0.5, 1.0):
                yield Case("forward", dtype, shape, casting_mode=mode, offset=offset, seed=1)
            yield Case("forward", dtype, shape, casting_mode=mode, weight=None, seed=1)
            yield Case("forward", dtype, shape, casting_mode=mode, residual=True, seed=1)
    # a half-precision x with an fp32 weight (Hugging Face keeps some norms' weights in fp32)
    for dtype, mode in itertools.product(("bf16", "fp16"), ("torch", "llama", "gemma")):
        yield Case("forward", dtype, (5, 100), casting_mode=mode, weight="fp32", seed=2)


def _backward_cases() -> Iterator[Case]:
    for dtype, shape in itertools.product(("fp32", "bf16"), ((5, 100), (300, 4096))):
        yield Case("backward", dtype, shape)
        yield Case("backward", dtype, shape, "linear", "native", "exact", 100, "llama", seed=3)
        yield Case("backward", dtype, shape, "cat", "pairwise", "float", 16, "gemma", 1.0, seed=4)
        yield Case("backward", dtype, shape, "race", "pairwise", "exact", 64, residual=True, seed=5)
    yield Case("backward", "fp32", (2000, 1024), "tree", "native", "float", 16, seed=6)


def _exact_cases() -> Iterator[Case]:
    for dtype, shape in itertools.product(("fp32", "bf16"), ((6, 100), (300, 4096))):
        yield Case("exact", dtype, shape)
    yield Case("exact", "fp32", (300, 4096), "linear", "pairwise", "exact", 100, "gemma", 1.0, seed=7)


_ALL = [*_forward_cases(), *_backward_cases(), *_exact_cases()]
CASES: dict[str, Case] = {c.name: c for c in _ALL}
if len(CASES) != len(_ALL):
    raise ValueError("two golden cases share a name: give one of them another seed")


# --- computing -----------------------------------------------------------------------


def _forward(case: Case) -> dict[str, torch.Tensor]:
    x, w, r = case.inputs()
    with torch.no_grad():
        if r is None:
            return {"y": tgn.normalize_sync(x, w, **case.config())}
        y, h = tgn.normalize_sync(x, w, residual=r, **case.config())
    return {"y": y, "h": h}


def _module(case: Case, w: torch.Tensor | None, **options: Any) -> tgn.RMSNorm:
    norm = tgn.RMSNorm(case.shape[1], elementwise_affine=w is not None, dtype=None if w is None else w.dtype,
                       **case.config(), **options)
    if w is not None:
        with torch.no_grad():
            norm.weight.copy_(w)
    return norm


def _backward(case: Case) -> dict[str, torch.Tensor]:
    x, w, r = case.inputs()
    norm = _module(case, w)
    x.requires_grad_()
    dy = make_like(case.shape, x.dtype, case.seed + 3)
    if r is None:
        y = norm(x)
        y.backward(dy)
        out = {"y": y}
    else:
        r.requires_grad_()
        y, h = norm(x, r)
        dh = make_like(case.shape, x.dtype, case.seed + 4)
        torch.autograd.backward((y, h), (dy, dh))
        out = {"y": y, "h": h, "dresidual": r.grad}
    return {**out, "dx": x.grad, "dW": norm.weight.grad}


def _exact(case: Case) -> dict[str, torch.Tensor]:
    x, w, _ = case.inputs()
    norm = _module(case, w, weight_grad="exact")
    dy = make_like(case.shape, x.dtype, case.seed + 3)
    half = case.shape[0] // 2
    ys = []
    for part in (slice(0, half), slice(half, None)):  # two micro-batches into one weight.grad
        xs = x[part].clone().requires_grad_()
        y = norm(xs)
        y.backward(dy[part])
        ys.append(y.detach())
    return {"y": torch.cat(ys), "grad": norm.weight.grad, "state": exact_grads.state(norm.weight).state}


_COMPUTE: dict[str, Callable[[Case], dict[str, torch.Tensor]]] = {
    "forward": _forward, "backward": _backward, "exact": _exact,
}


def compute(case: Case) -> dict[str, str]:
    """The hashes of ``case``'s outputs, by output name."""
    return {k: digest(v) for k, v in _COMPUTE[case.kind](case).items()}


def load() -> dict[str, dict[str, str]]:
    """The recorded hashes, by case name."""
    data = json.loads(BITS_FILE.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{BITS_FILE} has format {data.get('format')!r}, expected {FORMAT}: re-record it")
    cases: dict[str, dict[str, str]] = data["cases"]
    return cases


def record(path: Path = BITS_FILE) -> int:
    """Compute every case on one thread and write ``path``; returns the number of cases."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = {name: compute(case) for name, case in CASES.items()}
    finally:
        torch.set_num_threads(threads)
    data = {"format": FORMAT, "recorded_with": {"torch": torch.__version__, "taskgraph_norm": tgn.__version__},
            "cases": cases}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return len(cases)


if __name__ == "__main__":
    print(f"recorded {record()} cases in {BITS_FILE}")
