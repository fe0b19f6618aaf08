"""Shapes, layouts, special values and bad input, each against torch's behaviour."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import taskgraph_norm as tgn
from taskgraph_norm.errors import TaskGraphError
from .helpers import assert_bits_equal, bits_equal

from .conftest import gen


@pytest.mark.parametrize("shape", [(64,), (5, 64), (2, 3, 64), (2, 3, 4, 64)])
def test_any_leading_shape(shape) -> None:
    x = torch.randn(shape, generator=gen(0))
    y = tgn.normalize_sync(x, chunk_size=16)
    assert y.shape == x.shape
    flat = tgn.normalize_sync(x.reshape(-1, 64), chunk_size=16)
    assert_bits_equal(y.reshape(-1, 64), flat)


LAYOUTS = {
    "transposed": lambda: torch.randn(100, 12, generator=gen(1)).t(),
    "strided": lambda: torch.randn(12, 200, generator=gen(2))[:, ::2],
    "channels_last": lambda: torch.randn(2, 3, 5, 100, generator=gen(3)).to(memory_format=torch.channels_last),
    "expanded": lambda: torch.randn(1, 100, generator=gen(4)).expand(6, 100),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("topology", ["linear", "tree", "cat", "standard"])
@pytest.mark.parametrize("leaf", ["pairwise", "native"])
def test_non_contiguous_equals_contiguous_copy(layout: str, topology: str, leaf: str) -> None:
    x = LAYOUTS[layout]()
    assert not x.is_contiguous()
    w = torch.randn(x.shape[-1], generator=gen(5))
    y = tgn.normalize_sync(x, w, topology=topology, leaf=leaf, chunk_size=16)
    assert_bits_equal(y.contiguous(), tgn.normalize_sync(x.contiguous(), w, topology=topology, leaf=leaf, chunk_size=16))


def test_layout_check_sees_torchs_own_layout_dependence() -> None:
    """Negative control for the layout test: torch's kernel itself gives a transposed
    input other bits than its contiguous copy here, and the same check sees it.
    (Our ``standard`` topology therefore runs torch's kernel on a contiguous copy.)"""
    x = torch.randn(4096, 64, generator=gen(11)).t() * 3
    direct = F.rms_norm(x, (4096,))
    copy = F.rms_norm(x.contiguous(), (4096,))
    assert not bits_equal(direct.contiguous(), copy)


def test_channels_last_output_keeps_the_input_layout_like_torch() -> None:
    x = LAYOUTS["channels_last"]()
    y = tgn.normalize_sync(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == F.rms_norm(x, (100,)).is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64), (3, 0), (0,)])
def test_empty_input_returns_empty(shape) -> None:
    x = torch.randn(shape)
    y = tgn.normalize_sync(x)
    assert y.shape == F.rms_norm(x, (shape[-1],)).shape and y.dtype == x.dtype


SPECIAL = torch.tensor(
    [
        [1.0, float("nan"), 2.0, 3.0],
        [1.0, float("inf"), 2.0, 3.0],
        [float("-inf"), 1.0, 2.0, 3.0],
        [float("inf"), float("-inf"), 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [-0.0, 0.0, -0.0, 0.0],
        [1e30, 1e30, 1.0, 1.0],  # squares overflow fp32, as in torch
        [1e-30, 2e-30, 0.0, 1e-45],  # squares underflow
    ]
)


@pytest.mark.parametrize("topology", ["linear", "tree", "race", "cat"])
@pytest.mark.parametrize("eps", [None, 0.0])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_nan_inf_zero_rows_behave_like_torch(topology: str, eps, accumulate: str) -> None:
    y = tgn.normalize_sync(SPECIAL, eps=eps, topology=topology, chunk_size=2, accumulate=accumulate)
    want = F.rms_norm(SPECIAL, (4,), eps=eps)
    assert torch.equal(y.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(y[finite], want[finite])
    assert torch.equal(torch.signbit(y[finite]), torch.signbit(want[finite]))


# --- bad input -------------------------------------------------------------------

BAD = [
    ("0-d input", lambda: tgn.normalize_sync(torch.tensor(1.0)), ValueError,
     "Input tensor must have at least 1 dimensions, but got 0"),
    ("int input", lambda: tgn.normalize_sync(torch.ones(3, 4, dtype=torch.int32)), NotImplementedError,
     "\"rms_norm\" not implemented for 'Int'"),
    ("bool input", lambda: tgn.normalize_sync(torch.ones(3, 4, dtype=torch.bool)), NotImplementedError,
     "\"rms_norm\" not implemented for 'Bool'"),
    ("long input", lambda: tgn.normalize_sync(torch.ones(3, 4, dtype=torch.int64)), NotImplementedError,
     "not implemented for 'Long'"),
    ("complex input", lambda: tgn.normalize_sync(torch.ones(3, 4, dtype=torch.complex64)), NotImplementedError,
     "not implemented for 'ComplexFloat'"),
    ("weight shape", lambda: tgn.normalize_sync(torch.ones(3, 4), torch.ones(5)), RuntimeError,
     "Expected weight to be of same shape as normalized_shape, but got weight of shape [5] and normalized_shape = [4]"),
    ("weight 2-d", lambda: tgn.normalize_sync(torch.ones(3, 4), torch.ones(1, 4)), RuntimeError,
     "weight of shape [1, 4]"),
    ("weight device", lambda: tgn.normalize_sync(torch.ones(3, 4), torch.ones(4, device="meta")), RuntimeError,
     "Tensor on device meta is not on the expected device cpu!"),
    ("weight not a tensor", lambda: tgn.normalize_sync(torch.ones(3, 4), [1.0] * 4), TypeError,
     "weight must be a torch.Tensor"),
    ("x not a tensor", lambda: tgn.normalize_sync([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ("unknown topology", lambda: tgn.normalize_sync(torch.ones(3, 4), topology="ring"), ValueError,
     "topology='ring' is invalid: expected one of 'standard', 'linear', 'tree', 'race', 'cat'"),
    ("chunk_size 0", lambda: tgn.normalize_sync(torch.ones(3, 4), chunk_size=0), ValueError,
     "chunk_size=0 is invalid: expected an integer >= 1"),
    ("chunk_size 0 on empty", lambda: tgn.normalize_sync(torch.ones(3, 0), chunk_size=0), ValueError,
     "chunk_size=0 is invalid"),
    ("unknown leaf", lambda: tgn.normalize_sync(torch.ones(3, 4), leaf="kahan"), ValueError, "leaf='kahan'"),
    ("unknown executor", lambda: tgn.normalize_sync(torch.ones(3, 4), executor="gpu"), ValueError,
     "executor='gpu' is invalid"),
    ("eps string", lambda: tgn.normalize_sync(torch.ones(3, 4), eps="1e-6"), ValueError, "eps='1e-6' is invalid"),
    ("out shape", lambda: tgn.normalize_sync(torch.ones(3, 4), out=torch.empty(4, 3)), ValueError,
     "out=" ),
    ("out dtype", lambda: tgn.normalize_sync(torch.ones(3, 4), out=torch.empty(3, 4, dtype=torch.float64)),
     ValueError, "dtype torch.float32"),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(case: str, call, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)
    if not isinstance(info.value, TypeError):
        assert isinstance(info.value, TaskGraphError)


@pytest.mark.parametrize(
    ("x", "w"),
    [
        (torch.tensor(1.0), None),
        (torch.ones(3, 4, dtype=torch.int32), None),
        (torch.ones(3, 4), torch.ones(5)),
    ],
)
def test_error_types_are_the_ones_torch_raises(x, w) -> None:
    with pytest.raises(Exception) as theirs:
        F.rms_norm(x, (x.shape[-1] if x.dim() else 4,), w)
    with pytest.raises(type(theirs.value)) as ours:
        tgn.normalize_sync(x, w)
    assert str(ours.value) == str(theirs.value)


def test_execute_rejects_wrong_hidden_size() -> None:
    import anyio

    g = tgn.build_graph(8)
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[8\]"):
        anyio.run(tgn.execute, g, torch.ones(2, 4))


def test_execute_rejects_a_malformed_graph_before_running() -> None:
    import anyio

    g = tgn.build_graph(8, chunk_size=4, topology="linear")
    broken = g.replace_node(g["fold1"].replace(inputs=("fold1", "p1")))
    with pytest.raises(tgn.CycleError):
        anyio.run(tgn.execute, broken, torch.ones(2, 8))


def test_weight_of_other_float_dtype_is_accepted_like_torch() -> None:
    x = torch.randn(4, 32, generator=gen(6))
    w = torch.randn(32, generator=gen(7)).to(torch.bfloat16)
    y = tgn.normalize_sync(x, w)
    assert y.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Cannot dispatch to fused implementation"
        want = F.rms_norm(x, (32,), w)
    torch.testing.assert_close(y, want)


def test_gradients_flow_like_torch() -> None:
    x = torch.randn(4, 96, generator=gen(8), dtype=torch.float64, requires_grad=True)
    w = torch.randn(96, generator=gen(9), dtype=torch.float64, requires_grad=True)
    tgn.normalize_sync(x, w, chunk_size=10).square().sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    F.rms_norm(x, (96,), w).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    assert not math.isnan(float(gx.sum()))


def test_bit_helpers_tell_signed_zeros_and_nans_apart() -> None:
    assert not bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert bits_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
