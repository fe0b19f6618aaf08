"""The face matrix's cases: the options, a :class:`Case` per call, and the covering set.

:func:`covering` picks, greedily, a small set of cases in which every combination of
each group of :data:`CI_GROUPS` appears (every pair of option values, every certified
graph, each face in each mode with every thread count, shape and dtype...): what CI
runs of tests/test_faces.py; the full product runs behind the slow marker.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from taskgraph_norm.api import OFFLOAD_NUMEL

EPS = 1e-6
ALL_THREADS = torch.get_num_threads()

FACES = ("sync", "async_inline", "async_offloaded", "module", "op", "raw_op", "compiled", "exported")
MODES = ("grad", "no_grad", "inference_mode")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = ("contiguous", "transposed")
#: small (inline on the async face) and two that split rows across threads (offloaded)
SHAPES = {"small": (5, 100), "wide": (300, 4096), "tall": (2000, 1024)}
THREADS = ("one", "all")
TOPOLOGIES = ("tree", "linear", "cat", "race")
LEAVES = ("pairwise", "native")
ACCUMULATES = ("float", "exact")
CASTING_MODES = ("torch", "llama", "gemma")
OFFSETS = (0.0, 0.5, 1.0)
CHUNKS = (16, 64, 100)

assert math.prod(SHAPES["small"]) < OFFLOAD_NUMEL <= min(math.prod(SHAPES["wide"]), math.prod(SHAPES["tall"]))


@dataclass(frozen=True)
class Case:
    """One call: a face, a grad mode, an input (dtype, layout, shape), a thread count
    and a configuration (graph, casting mode, weight, offset, residual, chunk size)."""

    face: str
    mode: str
    dtype: str
    layout: str
    shape: str
    threads: str
    topology: str
    leaf: str
    accumulate: str
    casting_mode: str
    weight: bool
    offset: float
    residual: bool
    chunk_size: int = 64

    @property
    def id(self) -> str:
        return "-".join([
            self.face, self.mode, self.dtype, self.layout, self.shape, f"{self.threads}thread",
            self.topology, self.leaf, self.accumulate, f"c{self.chunk_size}", self.casting_mode,
            f"off{self.offset:g}", "w" if self.weight else "now", "res" if self.residual else "nores",
        ])

    def options(self, offset: float | None = None) -> dict[str, Any]:
        return dict(topology=self.topology, chunk_size=self.chunk_size, leaf=self.leaf, accumulate=self.accumulate,
                    casting_mode=self.casting_mode, offset=self.offset if offset is None else offset)


#: Each option's values, in Case's field order (chunk_size last: not in the full product).
DIMS: dict[str, Sequence[Any]] = {
    "face": FACES, "mode": MODES, "dtype": tuple(DTYPES), "layout": LAYOUTS, "shape": tuple(SHAPES),
    "threads": THREADS, "topology": TOPOLOGIES, "leaf": LEAVES, "accumulate": ACCUMULATES,
    "casting_mode": CASTING_MODES, "weight": (True, False), "offset": OFFSETS, "residual": (False, True),
    "chunk_size": CHUNKS,
}
assert list(DIMS) == [f.name for f in fields(Case)]


def allowed(partial: Mapping[str, Any]) -> bool:
    """Whether a (partial) assignment of options is a case: the async faces' shape says
    inline or offloaded, and a race merges in arrival order, so only exact sums certify it."""
    face, shape = partial.get("face"), partial.get("shape")
    if face == "async_inline" and shape not in (None, "small"):
        return False
    if face == "async_offloaded" and shape == "small":
        return False
    return not (partial.get("topology") == "race" and partial.get("accumulate") == "float")


#: (topology, leaf, accumulate) of every certified graph with several chunks.
CERTIFIED = [(t, leaf, a) for t in TOPOLOGIES for leaf in LEAVES for a in ACCUMULATES
             if allowed({"topology": t, "accumulate": a})]


# --- the covering set -------------------------------------------------------------------


def unfavoured(partial: Mapping[str, Any]) -> int:
    """1 for an offset without a weight: such a case is only taken where it covers
    something new, so that the rest of the set tests more than that one contract."""
    return int(partial.get("weight") is False and partial.get("offset", 0.0) != 0.0)


def balance_key(dim: str, partial: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the covering spreads evenly: each option's values; the offsets among the
    cases with a weight (where an offset does something)."""
    if dim == "offset":
        return dim, partial[dim], partial.get("weight")
    return dim, partial[dim]


def covering(dims: Mapping[str, Sequence[Any]], groups: Sequence[tuple[str, ...]]) -> list[dict[str, Any]]:
    """Assignments (greedy, deterministic) such that, for each group of options, every
    combination of their values that some allowed case has appears in at least one."""
    needed = {(g, vals) for g in groups for vals in itertools.product(*(dims[d] for d in g))
              if allowed(dict(zip(g, vals)))}
    by_dim = {d: [g for g in groups if d in g] for d in dims}
    uses: Counter[tuple[Any, ...]] = Counter()
    order = {g: i for i, g in enumerate(groups)}
    rows: list[dict[str, Any]] = []
    while needed:
        group, vals = min(needed, key=lambda t: (order[t[0]], [dims[d].index(v) for d, v in zip(*t)]))
        row = dict(zip(group, vals))
        for d in dims:
            if d in row:
                continue

            def score(v: Any) -> tuple[int, int, int]:
                trial = {**row, d: v}
                gain = sum((g, tuple(trial[k] for k in g)) in needed
                           for g in by_dim[d] if all(k in trial for k in g))
                return gain, -unfavoured(trial), -uses[balance_key(d, trial)]

            row[d] = max((v for v in dims[d] if allowed({**row, d: v})), key=score)
        uses.update(balance_key(d, row) for d in row)
        needed -= {(g, tuple(row[k] for k in g)) for g in groups}
        rows.append(row)
    return rows


CI_GROUPS: list[tuple[str, ...]] = [
    *itertools.combinations(DIMS, 2),       # every pair of options: face x mode among them
    ("topology", "leaf", "accumulate"),     # every certified graph
    ("dtype", "shape", "mode"),             # where rows split across threads
    ("layout", "shape", "mode"),
    ("threads", "shape", "mode"),
    ("face", "mode", "threads"),
    ("face", "mode", "shape"),
    ("face", "mode", "dtype"),
]
CI_CASES = [Case(**row) for row in covering(DIMS, CI_GROUPS)]
