"""LayerNorm's reference numerics (kernels/layer.py through kernels/reference.py):
the float formula bit for bit, exact mode's order-free bits and its correctly
rounded mean, batch invariance."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from taskgraph_norm.kernels import exact_scale, layer
from taskgraph_norm.kernels.reference import run_reference
from taskgraph_norm.prover.witness import bits
from taskgraph_norm.topologies import build_layer_graph

CHUNKED = ("linear", "tree", "race", "cat")
EPS = 1e-5


def _halve(s: torch.Tensor) -> torch.Tensor:
    """Pairwise halving written out again (the test's own copy of the order)."""
    s = s.clone()
    n = s.shape[-1]
    while n > 1:
        h = (n + 1) // 2
        s[..., : n - h] = s[..., : n - h] + s[..., h:n]
        n = h
    return s[..., :1]


def _float_tree_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """Two-pass LayerNorm in fp32 with the tree topology and pairwise leaves, written
    independently of the package (no fp64 anywhere but the correctly rounded sqrt)."""
    d_model = x.shape[-1]
    xs = x.float()

    def tree(parts: list[torch.Tensor]) -> torch.Tensor:
        while len(parts) > 1:
            nxt = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
            if len(parts) % 2:
                nxt.append(parts[-1])
            parts = nxt
        return parts[0]

    starts = range(0, d_model, chunk)
    total = tree([_halve(xs[..., a:a + chunk]) for a in starts])
    mean = total / torch.full_like(total, d_model)
    d = xs - mean
    var = tree([_halve(d[..., a:a + chunk] * d[..., a:a + chunk]) for a in starts])
    den = torch.sqrt((var / torch.full_like(var, d_model) + EPS).double()).float()
    return ((d / den) * w.float() + b.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden,chunk", [(256, 64), (200, 64), (96, 7)])
def test_float_reference_is_the_two_pass_formula(dtype: torch.dtype, hidden: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(33, hidden, generator=gen) * 3 + 10).to(dtype)
    w, b = torch.randn(hidden, generator=gen).to(dtype), torch.randn(hidden, generator=gen).to(dtype)
    got = run_reference(build_layer_graph(hidden, chunk_size=chunk, topology="tree"), x, w, EPS, bias=b)
    assert torch.equal(bits(got), bits(_float_tree_layer_norm(x, w, b, chunk)))
    want = F.layer_norm(x.float(), (hidden,), w.float(), b.float(), EPS)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("topology", [*CHUNKED, "standard"])
@pytest.mark.parametrize("leaf", ["pairwise", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_topology_is_close_to_torch(topology: str, leaf: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 300, generator=gen) * 5 - 2).to(dtype)
    w, b = torch.randn(300, generator=gen).to(dtype), torch.randn(300, generator=gen).to(dtype)
    want = F.layer_norm(x, (300,), w, b, EPS)
    for accumulate in ("float", "exact") if topology != "standard" else ("float",):
        g = build_layer_graph(300, chunk_size=64, topology=topology, leaf=leaf, accumulate=accumulate)
        torch.testing.assert_close(run_reference(g, x, w, EPS, bias=b), want)
    if topology == "standard":
        assert torch.equal(run_reference(g, x, w, EPS, bias=b), want)


def _hard_rows(hidden: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    offset = 1000 + torch.randn(rows // 3, hidden, generator=gen) * 1e-3            # large offset, small noise
    half = torch.randn(rows // 3, (hidden + 1) // 2, generator=gen)
    cancel = torch.cat([half, -half], -1)[:, :hidden].clone()                         # cancellation
    cancel[:, -1] += 2.0 ** -20
    spread = torch.ldexp(torch.rand(rows - 2 * (rows // 3), hidden, generator=gen) + 1,
                         torch.randint(-30, 30, (rows - 2 * (rows // 3), hidden), generator=gen))
    return torch.cat([offset, cancel, spread * torch.sign(torch.randn(spread.shape, generator=gen))])


@pytest.mark.parametrize("hidden,chunk", [(256, 64), (200, 64), (130, 17)])
def test_exact_bits_are_the_same_in_every_order(hidden: int, chunk: int) -> None:
    x = _hard_rows(hidden, 30, hidden)
    w, b = torch.randn(hidden), torch.randn(hidden)
    want = run_reference(build_layer_graph(hidden, accumulate="exact"), x, w, EPS, bias=b)
    rng = random.Random(0)
    for topology in CHUNKED:
        for leaf in ("pairwise", "native"):
            for c in (chunk, 1, hidden, hidden + 5):
                g = build_layer_graph(hidden, chunk_size=c, topology=topology, leaf=leaf, accumulate="exact")
                arrival = {}
                if topology == "race":
                    for node in ("mean.accumulate", "var.accumulate"):
                        if node in g:
                            order = list(range(len(g[node].inputs)))
                            rng.shuffle(order)
                            arrival[node] = order
                got = run_reference(g, x, w, EPS, bias=b, arrival=arrival)
                assert torch.equal(bits(got), bits(want)), (topology, leaf, c)


def test_a_float_race_differs_by_arrival_order() -> None:
    # Negative control: the same race in the float domain changes bits with the order.
    g = build_layer_graph(256, chunk_size=32, topology="race")
    x = _hard_rows(256, 60, 3)
    first = run_reference(g, x, None, EPS)
    orders = [tuple(range(8))[::-1], (3, 1, 4, 0, 5, 2, 7, 6)]
    assert any(not torch.equal(bits(first), bits(run_reference(g, x, None, EPS, arrival={node: o})))
               for o in orders for node in ("mean.accumulate", "var.accumulate"))


def _rounded(value: Fraction, dtype: torch.dtype) -> float:
    """``value`` correctly rounded to ``dtype`` (ties to even), through its neighbours."""
    c = torch.tensor(float(value), dtype=torch.float64).to(dtype)
    near = [torch.nextafter(c, torch.tensor(-float("inf"), dtype=dtype)), c,
            torch.nextafter(c, torch.tensor(float("inf"), dtype=dtype))]
    return float(min(near, key=lambda v: (abs(Fraction(float(v)) - value), int(bits(v.reshape(1))[0]) & 1)))


def _exact_mean(x: torch.Tensor) -> torch.Tensor:
    hidden = x.shape[-1]
    pair = layer.xsum_exact(x, 0, hidden, exact_scale(layer.rowmax_abs(x, 0, hidden), hidden))
    return layer.mean_exact(pair, hidden, torch.float64 if x.dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_exact_mean_is_correctly_rounded(dtype: torch.dtype) -> None:
    rows = [torch.tensor([1.0, 2.0**-24, 2.0**-70, 0.0]),     # the fp64 path double-rounds this one
            torch.tensor([1.0, 2.0**-24, 0.0, 0.0]),            # an exact tie: to even
            torch.tensor([3.0, 1.0, 2.0**-60]),
            torch.zeros(5), torch.tensor([-2.0, 2.0, 2.0**-50])]
    rows += list(_hard_rows(37, 30, 5)) + list(_hard_rows(1000, 6, 6))
    gen = torch.Generator().manual_seed(7)
    for hidden in (3, 6, 10, 77):  # near-midpoint quotients: integers plus a half of D and a crumb
        base = torch.randint(-(2**20), 2**20, (20, hidden), generator=gen).double()
        base[:, 0] += 0.5 * hidden
        base[:, 1] += 2.0**-30
        rows += list(base)
    for row in rows:
        x = row.reshape(1, -1).to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        want = _rounded(sum((Fraction(float(v)) for v in x[0].tolist()), Fraction(0)) / x.shape[-1], acc)
        assert float(_exact_mean(x)) == want, row
    # Outside the grids' reach (docs/exact.md): 2^-100 is below ulp(sigma2) = 2^-98 of
    # this row, so it is lost, still in the same way for every order.
    assert float(_exact_mean(torch.tensor([[-2.0, 2.0, 2.0**-100]]))) == 0.0
    # and the fp64 path would not be: the first row shows it
    x = rows[0].reshape(1, -1)
    pair = layer.xsum_exact(x, 0, 4, exact_scale(layer.rowmax_abs(x, 0, 4), 4))
    assert float(((pair[..., :1] + pair[..., 1:]) / 4).float()) != float(_exact_mean(x))


def test_the_exact_variance_is_within_its_bound() -> None:
    from taskgraph_norm.kernels.reference import ReferenceInterpreter

    x = _hard_rows(300, 30, 9)
    g = build_layer_graph(300, chunk_size=64, accumulate="exact")
    values = ReferenceInterpreter(g).run_values(x, None, EPS, keep=("mean", "var.tree3.0"))
    mean, var = values["mean"], layer.round_pair(values["var.tree3.0"], torch.float32)
    for r in range(x.shape[0]):
        xs = [Fraction(float(v)) for v in x[r].tolist()]
        mu = sum(xs, Fraction(0)) / len(xs)
        m_hat = Fraction(float(mean[r, 0]))
        assert float(mean[r, 0]) == _rounded(mu, torch.float32)
        devs = [Fraction(float(torch.tensor(float(v), dtype=torch.float32) - mean[r, 0])) for v in x[r].tolist()]
        summed = sum((d * d for d in devs), Fraction(0))  # what the graph sums, exactly
        truth = sum(((v - mu) ** 2 for v in xs), Fraction(0))
        # docs/exact.md: sum (x - m_hat)^2 = sum (x - mu)^2 + D (mu - m_hat)^2 exactly, and
        # each deviation d = (x - m_hat)(1 + delta), |delta| <= 2^-24, moves its square by
        # at most (x - m_hat)^2 (2^-23 + 2^-48).
        shifted = truth + len(xs) * (mu - m_hat) ** 2
        assert shifted == sum(((v - m_hat) ** 2 for v in xs), Fraction(0))
        assert abs(summed - shifted) <= shifted * (Fraction(2) ** -23 + Fraction(2) ** -48)
        # the pair is rounded once (up to the pre-rounding's loss, below 2^-60 of the sum here)
        assert abs(Fraction(float(var[r, 0])) - summed) <= summed * (Fraction(2) ** -24 + Fraction(2) ** -60)


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("topology", ["tree", "linear", "cat"])
def test_a_row_alone_and_in_a_batch_of_1000(accumulate: str, topology: str) -> None:
    g = build_layer_graph(384, chunk_size=64, topology=topology, accumulate=accumulate)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1000, 384, generator=gen) * 4 + 3
    w, b = torch.randn(384, generator=gen), torch.randn(384, generator=gen)
    batch = run_reference(g, x, w, EPS, bias=b)
    for r in (0, 1, 517, 999):
        alone = run_reference(g, x[r:r + 1].clone(), w, EPS, bias=b)
        assert torch.equal(bits(alone), bits(batch[r:r + 1]))


def test_special_rows_and_residual() -> None:
    g = build_layer_graph(64, chunk_size=16, accumulate="exact")
    x = torch.randn(4, 64)
    x[1] = 0.0
    x[2, 3] = float("inf")
    x[3, 5] = float("nan")
    y = run_reference(g, x, None, EPS)
    want = F.layer_norm(x, (64,), None, None, EPS)
    assert torch.equal(y[1], want[1]) and bool(y[2:].isnan().all()) == bool(want[2:].isnan().all())
    torch.testing.assert_close(y[0], want[0])
    res = build_layer_graph(64, chunk_size=16, residual=True)
    r = torch.randn(4, 64)
    h = torch.empty_like(x)
    out = run_reference(res, x[:1], None, EPS, residual=r[:1], residual_out=h[:1])
    assert torch.equal(out, run_reference(build_layer_graph(64, chunk_size=16), x[:1] + r[:1], None, EPS))
