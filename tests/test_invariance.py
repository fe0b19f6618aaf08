"""Batch invariance and run-to-run determinism, checked bit for bit, with negative controls."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors import run_reference
from .helpers import bits, bits_equal

from .conftest import gen

BATCHES = (1, 2, 3, 17, 255, 256, 257, 1024)
HIDDEN = (1, 7, 128, 1000, 4096)
CERTIFIED = ("linear", "tree", "cat")


def probe_rows(hidden: int, dtype: torch.dtype = torch.float32, count: int = 3) -> torch.Tensor:
    """Rows with a wide exponent spread, so a change of summation order shows in the output."""
    spread = torch.logspace(-3, 3, hidden)
    return torch.stack(
        [torch.randn(hidden, generator=gen(s)) * spread[torch.randperm(hidden, generator=gen(s))] for s in range(count)]
    ).to(dtype)


def batch_violations(
    fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, batches=BATCHES, seed: int = 0
) -> list[int]:
    """Batch sizes at which some probe row, placed at a random position of a random
    batch, does not come out with the same bits as when it is normalised alone."""
    alone = [fn(r[None])[0] for r in rows]
    rng = random.Random(seed)
    bad = []
    for b in batches:
        batch = torch.randn(b, rows.shape[-1], generator=gen(b)).to(rows.dtype)
        positions = rng.sample(range(b), k=min(b, len(rows)))
        for p, r in zip(positions, rows):
            batch[p] = r
        out = fn(batch)
        if not all(bits_equal(out[p], a) for p, a in zip(positions, alone)):
            bad.append(b)
    return bad


def chunk_sizes_for(hidden: int) -> list[int]:
    sizes = [64, 100]  # 64 divides 128 and 4096; 100 divides 1000; neither divides 7
    if hidden <= 1000:
        sizes.append(3)
    if hidden in (7, 1000):
        sizes.append(hidden // 7 if hidden > 7 else 7)  # a chunk size that divides D
    return sizes


CASES = [(t, d, c) for t in CERTIFIED for d in HIDDEN for c in chunk_sizes_for(d)]


@pytest.mark.parametrize(("topology", "hidden", "chunk"), CASES)
def test_row_alone_equals_row_in_any_batch(topology: str, hidden: int, chunk: int) -> None:
    rows = probe_rows(hidden)
    weight = torch.randn(hidden, generator=gen(7))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return tgn.normalize_sync(x, weight, topology=topology, chunk_size=chunk)

    assert batch_violations(fn, rows) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("leaf", ["pairwise", "native"])
def test_batch_invariance_other_dtypes_and_leaves(dtype: torch.dtype, leaf: str) -> None:
    rows = probe_rows(1000, dtype)
    for topology in CERTIFIED:
        def fn(x: torch.Tensor, topology: str = topology) -> torch.Tensor:
            return tgn.normalize_sync(x, topology=topology, chunk_size=64, leaf=leaf)

        assert batch_violations(fn, rows, batches=(1, 3, 257)) == [], topology


def test_negative_control_batch_dependent_chunking_is_caught() -> None:
    """A chunking chosen from the batch size (what Inductor-style configs do) must fail
    the very same check; otherwise the check could not fail at all."""
    rows = probe_rows(4096)

    def batch_dependent(x: torch.Tensor) -> torch.Tensor:
        chunk = 64 if x.shape[0] < 256 else 96
        return tgn.normalize_sync(x, topology="tree", chunk_size=chunk)

    bad = batch_violations(batch_dependent, rows)
    assert bad, "the batch-invariance check failed to see a batch-dependent reduction order"
    assert set(bad) <= {b for b in BATCHES if b >= 256}


@pytest.mark.parametrize("topology", CERTIFIED + ("standard",))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twenty_runs_give_identical_bits(topology: str, dtype: torch.dtype) -> None:
    x = (torch.randn(64, 4096, generator=gen(2)) * torch.logspace(-3, 3, 4096)).to(dtype)
    first = tgn.normalize_sync(x, topology=topology)
    for _ in range(19):
        assert bits_equal(tgn.normalize_sync(x, topology=topology), first)


def test_negative_control_race_arrival_orders_differ() -> None:
    """Twenty runs of the race graph with the arrival orders a thread pool may produce
    must not all agree: the determinism check above can see a nondeterministic merge."""
    g = tgn.build_graph(4096, chunk_size=64, topology="race")
    x = torch.randn(64, 4096, generator=gen(2)) * torch.logspace(-3, 3, 4096)
    rng = random.Random(0)
    outs = []
    for _ in range(20):
        order = list(range(64))
        rng.shuffle(order)
        outs.append(run_reference(g, x, None, 1e-6, arrival={"accumulate": order}))
    distinct = {bits(o).numpy().tobytes() for o in outs}
    assert len(distinct) > 1


def test_race_in_index_order_matches_linear() -> None:
    x = torch.randn(16, 1000, generator=gen(5))
    race = tgn.normalize_sync(x, topology="race", chunk_size=64)
    linear = tgn.normalize_sync(x, topology="linear", chunk_size=64)
    assert bits_equal(race, linear)


def test_topologies_are_distinguishable() -> None:
    # The bitwise checks compare topologies that really differ in bits, not one code path.
    x = torch.randn(256, 4096, generator=gen(9)) * torch.logspace(-3, 3, 4096)
    outs = {t: tgn.normalize_sync(x, topology=t) for t in ("linear", "tree", "cat", "standard")}
    assert not bits_equal(outs["linear"], outs["tree"])
    assert not bits_equal(outs["tree"], outs["standard"])
