from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from .helpers import assert_bits_equal

from .conftest import gen


@pytest.mark.parametrize("shape", [8, (8,), [4, 6], torch.Size([2, 3, 4])])
@pytest.mark.parametrize("affine", [True, False])
def test_same_outputs_and_state_dict_as_torch(shape, affine: bool) -> None:
    ours = tgn.RMSNorm(shape, eps=1e-5, elementwise_affine=affine, chunk_size=4)
    theirs = torch.nn.RMSNorm(shape, eps=1e-5, elementwise_affine=affine)
    assert ours.normalized_shape == theirs.normalized_shape
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    if affine:
        theirs.weight.data = torch.randn(theirs.weight.shape, generator=gen(1))
        ours.load_state_dict(theirs.state_dict())
        assert torch.equal(ours.weight, theirs.weight)
    x = torch.randn((5, *theirs.normalized_shape), generator=gen(2))
    torch.testing.assert_close(ours(x), theirs(x))


def test_multi_dim_shape_reduces_over_all_trailing_dims() -> None:
    ours = tgn.RMSNorm((4, 6), chunk_size=5, topology="linear")
    x = torch.randn(3, 4, 6, generator=gen(3))
    flat = tgn.normalize_sync(x.reshape(3, 24), ours.weight.reshape(24), chunk_size=5, topology="linear")
    assert_bits_equal(ours(x), flat.reshape(3, 4, 6))


def test_options_reach_the_graph_and_bad_ones_fail_at_construction() -> None:
    norm = tgn.RMSNorm(64, topology="cat", chunk_size=16, leaf="native")
    x = torch.randn(3, 64, generator=gen(4))
    assert_bits_equal(norm(x), tgn.normalize_sync(x, norm.weight, topology="cat", chunk_size=16, leaf="native"))
    assert "topology='cat'" in repr(norm)
    with pytest.raises(ValueError, match="topology='ring'"):
        tgn.RMSNorm(64, topology="ring")
    with pytest.raises(ValueError, match="chunk_size=0"):
        tgn.RMSNorm(64, chunk_size=0)


def test_dtype_device_and_training() -> None:
    norm = tgn.RMSNorm(32, dtype=torch.bfloat16)
    assert norm.weight.dtype == torch.bfloat16
    x = torch.randn(4, 32, generator=gen(5)).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16
    opt = torch.optim.SGD(norm.parameters(), lr=0.1)
    norm(x).float().square().sum().backward()
    assert norm.weight.grad is not None
    opt.step()


def test_wrong_input_shape_raises_like_torch() -> None:
    ours, theirs = tgn.RMSNorm((4, 6)), torch.nn.RMSNorm((4, 6))
    x = torch.randn(3, 6, 4)
    with pytest.raises(RuntimeError) as want:
        theirs(x)
    with pytest.raises(RuntimeError) as got:
        ours(x)
    assert str(got.value) == str(want.value)


def test_drop_in_replacement_inside_a_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), tgn.RMSNorm(64), torch.nn.Linear(64, 4))
    ref = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.RMSNorm(64), torch.nn.Linear(64, 4))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(8, 16, generator=gen(6))
    torch.testing.assert_close(model(x), ref(x))
