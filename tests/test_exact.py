"""accumulate="exact": the same bits for every topology, chunking, batch and arrival order."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskgraph_norm as tgn
from taskgraph_norm.executors import reference_sum_of_squares, run_reference
from .helpers import assert_bits_equal, bits, correctly_rounded_sumsq

from .conftest import FULL, gen

TOPOLOGIES = ("linear", "tree", "race", "cat")


def spread_input(rows: int, hidden: int, binades: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Gaussian rows scaled by 2**k, k uniform in [-binades, binades]: a wide exponent spread."""
    g = gen(seed)
    k = torch.randint(-binades, binades + 1, (rows, hidden), generator=g).double()
    return (torch.randn(rows, hidden, generator=g, dtype=torch.float64) * torch.exp2(k)).to(dtype)


def race_arrivals(graph: tgn.Graph, rng: random.Random) -> dict[str, list[int]]:
    arrival = {}
    for node in graph:
        if node.op is tgn.Op.ACCUMULATE:
            order = list(range(len(node.inputs)))
            rng.shuffle(order)
            arrival[node.id] = order
    return arrival


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_every_topology_chunking_leaf_and_arrival_gives_one_answer(dtype: torch.dtype) -> None:
    hidden = 1000
    binades = {torch.float32: 60, torch.float64: 60, torch.bfloat16: 60, torch.float16: 6}[dtype]
    x = spread_input(24, hidden, binades, dtype)
    w = torch.randn(hidden, generator=gen(1)).to(dtype)
    eps = 1e-6
    want = run_reference(tgn.build_graph(hidden, chunk_size=hidden, topology="linear", accumulate="exact"), x, w, eps)
    rng = random.Random(0)
    tried = 0
    for topology in TOPOLOGIES:
        for chunk in (1, 3, 64, 100, hidden):
            for leaf in ("pairwise", "native"):
                g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology, leaf=leaf, accumulate="exact")
                for _ in range(3 if topology == "race" else 1):
                    got = run_reference(g, x, w, eps, arrival=race_arrivals(g, rng))
                    assert_bits_equal(got, want, f"{topology} chunk={chunk} leaf={leaf}")
                    tried += 1
    assert tried == 4 * 5 * 2 + 2 * 5 * 2  # race runs three arrival orders


def test_negative_control_float_race_differs_under_the_same_arrivals() -> None:
    x = spread_input(24, 1000, 60)
    float_g = tgn.build_graph(1000, chunk_size=64, topology="race")
    exact_g = tgn.build_graph(1000, chunk_size=64, topology="race", accumulate="exact")
    rng = random.Random(0)
    arrivals = [race_arrivals(float_g, rng) for _ in range(10)]
    floats = {bits(run_reference(float_g, x, None, 1e-6, arrival=a)).numpy().tobytes() for a in arrivals}
    exacts = {bits(run_reference(exact_g, x, None, 1e-6, arrival=a)).numpy().tobytes() for a in arrivals}
    assert len(floats) > 1, "the float race should differ between arrival orders"
    assert len(exacts) == 1


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_exact_is_batch_invariant(topology: str) -> None:
    x = spread_input(300, 512, 40)
    full = tgn.normalize_sync(x, topology=topology, accumulate="exact", chunk_size=100)
    for b in (1, 2, 17, 255):
        assert_bits_equal(tgn.normalize_sync(x[:b], topology=topology, accumulate="exact", chunk_size=100), full[:b])
    assert_bits_equal(tgn.normalize_sync(x[77:78], topology=topology, accumulate="exact"), full[77:78])


@pytest.mark.parametrize("binades", [0, 20, 60])
def test_exact_sum_of_squares_is_correctly_rounded(binades: int) -> None:
    x = spread_input(200, 1000, binades, seed=binades)
    want = correctly_rounded_sumsq(x)
    for topology in TOPOLOGIES:
        got = reference_sum_of_squares(tgn.build_graph(1000, chunk_size=64, topology=topology, accumulate="exact"), x)
        assert_bits_equal(got, want, topology)


def test_negative_control_float_sum_is_not_always_correctly_rounded() -> None:
    x = spread_input(200, 1000, 60)
    got = reference_sum_of_squares(tgn.build_graph(1000, chunk_size=64, topology="tree"), x)
    assert not torch.equal(got, correctly_rounded_sumsq(x))


EDGE_ROWS = {
    "zeros": [0.0] * 8,
    "signed zeros": [-0.0, 0.0] * 4,
    "one nonzero": [0.0] * 7 + [3.0],
    "subnormals": [1e-45, -2e-45, 1e-40, 0.0, 3e-39, 1e-44, 0.0, 1e-45],
    "tiny and huge": [2.0**-60, 2.0**60, -(2.0**-59), 1.0, 2.0**59, -(2.0**-60), 3.0, 2.0**30],
    "fp32 max": [3.4e38, -3.4e38, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    "inf": [1.0, float("inf"), 2.0, 3.0, 0.0, 0.0, 0.0, 0.0],
    "-inf and inf": [float("-inf"), float("inf"), 2.0, 3.0, 0.0, 0.0, 0.0, 0.0],
    "nan": [1.0, float("nan"), 2.0, 3.0, 0.0, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("eps", [None, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_edge_rows_match_torch(dtype: torch.dtype, eps) -> None:
    x = torch.tensor(list(EDGE_ROWS.values()), dtype=torch.float64).to(dtype)
    want = F.rms_norm(x, (8,), eps=eps)
    for topology in TOPOLOGIES:
        for chunk in (1, 3, 8):
            y = tgn.normalize_sync(x, eps=eps, topology=topology, chunk_size=chunk, accumulate="exact")
            assert torch.equal(y.isnan(), want.isnan()), (topology, chunk)
            ok = ~want.isnan()
            torch.testing.assert_close(y[ok], want[ok], msg=f"{topology} chunk={chunk}")


def test_fp32_edge_rows_equal_torch_where_torch_is_exact() -> None:
    # Inf/NaN/zero rows have exactly representable answers: compare bits with torch itself.
    x = torch.tensor([EDGE_ROWS[k] for k in ("zeros", "signed zeros", "inf", "-inf and inf", "nan")])
    y = tgn.normalize_sync(x, accumulate="exact", chunk_size=3, topology="race")
    assert_bits_equal(y, F.rms_norm(x, (8,)))


def test_hidden_size_one() -> None:
    x = torch.tensor([[3.0], [-2.0], [0.0], [1e-30]])
    for topology in TOPOLOGIES:
        y = tgn.normalize_sync(x, topology=topology, accumulate="exact")
        torch.testing.assert_close(y, F.rms_norm(x, (1,)))


@pytest.mark.slow
def test_very_large_hidden_size_has_no_overflow_or_silent_loss() -> None:
    hidden = 1 << 20
    # +-50 binades at most: at +-60, 2**20 squares of up to ~2**120 overflow fp32
    # on their own, and the correctly rounded sum is then inf (as it should be).
    x = spread_input(2, hidden, 50 if FULL else 30, seed=5)
    x[1, 0] = 1.5e19  # its square, 2.25e38, sits near the top of fp32's range
    want = correctly_rounded_sumsq(x)
    assert torch.isfinite(want).all()
    chunks = (4096, 65536) if FULL else (65536,)
    for chunk in chunks:
        for topology in ("tree", "race"):
            g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology, accumulate="exact")
            assert_bits_equal(reference_sum_of_squares(g, x), want, f"{topology} chunk={chunk}")
    y = tgn.normalize_sync(x, accumulate="exact", chunk_size=65536)
    assert torch.isfinite(y).all()


@settings(max_examples=150 if FULL else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 5),
    hidden=st.integers(1, 300),
    chunk_a=st.integers(1, 320),
    chunk_b=st.integers(1, 320),
    topo_a=st.sampled_from(TOPOLOGIES),
    topo_b=st.sampled_from(TOPOLOGIES),
    binades=st.integers(0, 60),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_two_configurations_agree(rows, hidden, chunk_a, chunk_b, topo_a, topo_b, binades, dtype, seed) -> None:
    if dtype == torch.float16:
        binades = min(binades, 6)  # keep squares inside fp16's range of the input itself
    x = spread_input(rows, hidden, binades, dtype, seed)
    a = tgn.normalize_sync(x, topology=topo_a, chunk_size=chunk_a, accumulate="exact")
    b = run_reference(
        tgn.build_graph(hidden, chunk_size=chunk_b, topology=topo_b, accumulate="exact"), x, None,
        torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps,
        arrival=race_arrivals(tgn.build_graph(hidden, chunk_size=chunk_b, topology=topo_b, accumulate="exact"), random.Random(seed)),
    )
    assert_bits_equal(a, b)


async def test_concurrent_executor_under_random_schedules_gives_the_same_bits() -> None:
    from taskgraph_norm.executors.concurrent.schedules import Random

    x = spread_input(16, 700, 60)
    want = tgn.normalize_sync(x, accumulate="exact")
    for topology in TOPOLOGIES:
        for chunk in (3, 64, 100, 700):
            g = tgn.build_graph(700, chunk_size=chunk, topology=topology, accumulate="exact")
            for seed in range(3):
                got = await tgn.execute(g, x, executor="concurrent", schedule=Random(seed=seed))
                assert_bits_equal(got, want, f"{topology} chunk={chunk} seed={seed}")
    # Negative control: the float race under the same kind of schedules does differ.
    g = tgn.build_graph(700, chunk_size=3, topology="race")
    outs = {bits(await tgn.execute(g, x, executor="concurrent", schedule=Random(seed=s))).numpy().tobytes() for s in range(6)}
    assert len(outs) > 1
