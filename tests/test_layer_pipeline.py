"""LayerNorm through the one route (issue 23): the cached pipeline, the torch-ops backend's
bits against the reference interpreter for every configuration, the backend choice
(native C says it has no LayerNorm kernel for exact plans yet), bad input as
``F.layer_norm`` defines it, the module's state_dict and autocast."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import taskgraph_norm as tgn
from taskgraph_norm.backends import base as backends_base
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.backends.registry import BACKENDS, NoBackendError, choose
from taskgraph_norm.errors import ConfigError
from taskgraph_norm.kernels.reference import run_reference
from taskgraph_norm.pipeline import layer_pipeline
from taskgraph_norm.prover.witness import bits
from taskgraph_norm.topologies import build_layer_graph

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOPOLOGIES = ("linear", "tree", "race", "cat", "standard")


def _inputs(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) * 3 + 7).to(dtype)
    return x, torch.randn(hidden, generator=g).to(dtype), torch.randn(hidden, generator=g).to(dtype)


CONFIGS = [c for c in itertools.product(TOPOLOGIES, ("pairwise", "native"), ("float", "exact"),
                                        ((100, 64), (100, 16), (64, 64), (300, 7), (1024, 64)))
           if not (c[0] == "standard" and c[2] == "exact")]


@pytest.mark.parametrize("topology,leaf,accumulate,shape", CONFIGS)
def test_pipeline_is_the_reference_bit_for_bit(topology: str, leaf: str, accumulate: str,
                                               shape: tuple[int, int]) -> None:
    hidden, chunk = shape
    graph = build_layer_graph(hidden, chunk_size=chunk, topology=topology, leaf=leaf, accumulate=accumulate)
    pipe = layer_pipeline(hidden, chunk, topology, leaf, accumulate)
    assert pipe is layer_pipeline(hidden, chunk, topology, leaf, accumulate)  # cached
    for dtype in DTYPES:
        x, w, b = _inputs(37, hidden, dtype, seed=hidden + chunk)
        for weight, bias in ((w, b), (None, None), (w, None)):
            want = run_reference(graph, x, weight, 1e-5, bias=bias)
            assert torch.equal(bits(pipe(x, weight, bias)), bits(want)), (dtype, weight is None, bias is None)


def test_the_torch_ops_backend_runs_the_plan() -> None:
    pipe = layer_pipeline(256, 64, "tree", "pairwise", "float")
    assert pipe.executor == "compiled" and pipe.plan is not None and pipe.plan.norm == "layer"
    # the C kernel where it is built (tests/test_native_layer.py), else torch ops
    assert pipe.backend(torch.device("cpu"), torch.float32).name == ("native" if native.available() else "torch_ops")
    with backends_base.use("torch_ops"):
        assert pipe.backend(torch.device("cpu"), torch.float32).name == "torch_ops"
    # a race over three or more float chunks is not certified: the reference runs it
    assert layer_pipeline(256, 16, "race", "pairwise", "float").executor == "reference"


def test_triton_says_which_layernorm_plans_it_does_not_run() -> None:
    # (native C runs float and exact plans: test_native_layer.py, test_native_layer_exact.py;
    # Triton runs float and exact plans, test_triton_layer.py, but no cat merge: torch.sum's order)
    plan = layer_pipeline(256, 64, "cat", "pairwise", "float").plan
    assert plan is not None
    reasons = BACKENDS["triton"].not_supported_reasons(plan, torch.device("cpu"), torch.float32)
    assert any("'cat' merge" in r for r in reasons), reasons
    with pytest.raises(NoBackendError, match="'cat' merge"):
        choose(plan, torch.device("cpu"), torch.float32, ("triton",))


def test_no_backend_lists_reasons_when_torch_ops_is_excluded() -> None:
    x, w, b = _inputs(4, 128, torch.float32)
    with backends_base.use("native"):  # native runs exact plans too (torch ops' bits)
        y = tgn.layer_norm_sync(x, w, b, accumulate="exact")
    with backends_base.use("torch_ops"):
        assert torch.equal(bits(y), bits(tgn.layer_norm_sync(x, w, b, accumulate="exact")))
    with pytest.raises(NoBackendError, match="triton"):
        tgn.layer_norm_sync(x, w, b, executor="triton")


def test_executors_agree() -> None:
    x, w, b = _inputs(9, 200, torch.float32)
    want = tgn.layer_norm_sync(x, w, b, executor="reference")
    assert torch.equal(bits(tgn.layer_norm_sync(x, w, b, executor="compiled")), bits(want))
    assert torch.equal(bits(tgn.layer_norm_sync(x, w, b)), bits(want))
    assert torch.equal(bits(tgn.layer_norm_sync(x, w, b, executor="concurrent")), bits(want))
    with pytest.raises(ConfigError):
        tgn.layer_norm_sync(x, w, b, executor="nope")


def test_non_finite_rows_match_the_reference() -> None:
    for accumulate in ("float", "exact"):
        x, w, b = _inputs(6, 100, torch.float32)
        x[1, 3], x[2, 50], x[3, 0], x[4, 7] = float("inf"), float("nan"), -float("inf"), 3e38
        x[5] = 0.0
        graph = build_layer_graph(100, chunk_size=16, accumulate=accumulate)
        got = tgn.layer_norm_sync(x, w, b, chunk_size=16, accumulate=accumulate)
        assert torch.equal(bits(got), bits(run_reference(graph, x, w, 1e-5, bias=b)))


def test_residual_out_and_strided_inputs() -> None:
    x, w, b = _inputs(8, 96, torch.bfloat16)
    r = _inputs(8, 96, torch.bfloat16, seed=5)[0]
    y, h = tgn.layer_norm_sync(x, w, b, residual=r)
    assert torch.equal(h, x + r)
    assert torch.equal(bits(y), bits(tgn.layer_norm_sync(x + r, w, b)))
    out, h_out = torch.empty_like(x), torch.empty_like(x)
    y2, h2 = tgn.layer_norm_sync(x, w, b, residual=r, out=out, residual_out=h_out)
    assert y2 is out and h2 is h_out and torch.equal(bits(out), bits(y)) and torch.equal(h_out, h)
    xt = _inputs(96, 8, torch.float32)[0].t()  # strided rows
    assert torch.equal(bits(tgn.layer_norm_sync(xt, w.float())), bits(tgn.layer_norm_sync(xt.contiguous(), w.float())))
    assert tgn.layer_norm_sync(torch.empty(3, 0)).shape == (3, 0)
    assert tgn.layer_norm_sync(torch.empty(0, 8)).shape == (0, 8)


def _raises_like_torch(call: object, torch_call: object) -> None:
    with pytest.raises(Exception) as ours:
        call()  # type: ignore[operator]
    with pytest.raises(Exception) as theirs:
        torch_call()  # type: ignore[operator]
    assert isinstance(ours.value, type(theirs.value)), (ours.value, theirs.value)


def test_bad_input_raises_what_f_layer_norm_raises() -> None:
    x = torch.randn(3, 8)
    ones = torch.ones(8)
    cases = [
        (x, torch.ones(7), None),  # weight shape
        (x, ones, torch.ones(7)),  # bias shape
        (x, ones.double(), None),  # fp64 weight for fp32 x
        (x, ones.bfloat16(), None),  # narrower weight
        (x.bfloat16(), ones.bfloat16(), ones),  # mixed parameters
        (x.int(), None, None),  # integer input
        (torch.tensor(1.0), None, None),  # 0-d
        (x, torch.ones(8, device="meta"), None),  # device
    ]
    for xi, wi, bi in cases:
        hidden = 8
        _raises_like_torch(lambda: tgn.layer_norm_sync(xi, wi, bi),
                           lambda: F.layer_norm(xi, (hidden,), wi, bi))
    # fp32 parameters for a narrow input are fine (torch's mixed dtype): the input's dtype back
    assert tgn.layer_norm_sync(x.bfloat16(), ones, ones).dtype == torch.bfloat16
    with pytest.raises(RuntimeError):
        tgn.LayerNorm(7)(x)
    with pytest.raises(ConfigError):
        tgn.layer_norm_sync(x, chunk_size=0)
    with pytest.raises(ConfigError):
        tgn.layer_norm_sync(x, eps="small")  # type: ignore[arg-type]


def test_state_dict_round_trip_with_torch() -> None:
    for bias in (True, False):
        theirs = torch.nn.LayerNorm(64, bias=bias)
        with torch.no_grad():
            theirs.weight.normal_()
            if theirs.bias is not None:
                theirs.bias.normal_()
        ours = tgn.LayerNorm(64, bias=bias, chunk_size=16)
        ours.load_state_dict(theirs.state_dict())
        back = torch.nn.LayerNorm(64, bias=bias)
        back.load_state_dict(ours.state_dict())
        x = torch.randn(10, 64)
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(back(x), theirs(x))
    none = tgn.LayerNorm(32, elementwise_affine=False)
    assert none.weight is None and none.bias is None and not list(none.parameters())
    assert set(tgn.LayerNorm(32).state_dict()) == set(torch.nn.LayerNorm(32).state_dict())


def test_multi_dim_normalized_shape_flattens() -> None:
    theirs = torch.nn.LayerNorm((4, 8))
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = tgn.LayerNorm((4, 8), chunk_size=8)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 8)
    y = ours(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, theirs(x))
    flat = tgn.layer_norm_sync(x.reshape(3, 32), theirs.weight.detach().reshape(32),
                               theirs.bias.detach().reshape(32), chunk_size=8)
    assert torch.equal(bits(y.reshape(3, 32)), bits(flat))
    with pytest.raises(RuntimeError):
        ours(torch.randn(3, 8, 4))


def test_module_options() -> None:
    assert tgn.LayerNorm(16, weight_grad="exact").weight_grad == "exact"  # (tests/test_layer_exact_grad.py)
    with pytest.raises(ConfigError):
        tgn.LayerNorm(16, weight_grad="nope")
    with pytest.raises(ConfigError):
        tgn.LayerNorm(16, topology="nope")
    m = tgn.LayerNorm(16, eps=1e-3, dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.eps == 1e-3
    assert torch.equal(m.bias, torch.zeros(16, dtype=torch.float64))


def test_autocast_on_cpu_behaves_as_torch() -> None:
    x = torch.randn(4, 32)
    for dtype in (torch.bfloat16, torch.float16):
        theirs, ours = torch.nn.LayerNorm(32), tgn.LayerNorm(32)
        with torch.autocast("cpu", dtype=dtype):
            for xi in (x, x.to(dtype)):
                assert ours(xi).dtype == theirs(xi).dtype


def test_closeness_to_f_layer_norm() -> None:
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-14)):
        x, w, b = _inputs(64, 1000, dtype)
        for accumulate in ("float", "exact"):
            got = tgn.layer_norm_sync(x, w, b, accumulate=accumulate)
            torch.testing.assert_close(got, F.layer_norm(x, (1000,), w, b), rtol=tol, atol=tol * 10)
