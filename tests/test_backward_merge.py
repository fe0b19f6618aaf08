"""The weight gradient's block merge, streamed (issue 22: no scratch that grows with
the rows): :func:`kernels.merge_blocks_streamed`, the model, and the native backward's
C merge (native_backward.c, native_team.c) give :func:`kernels.merge_blocks_`'s bits."""

from __future__ import annotations

import pytest
import torch

from taskgraph_norm import kernels

from ._trust_helpers import native_status
from .helpers import assert_bits_equal, bits_equal


def _blocks(n: int, hidden: int = 6) -> torch.Tensor:
    """Block sums of wide range, so that another order of the additions shows in the bits."""
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, hidden, generator=g) * torch.exp2(torch.randint(-12, 13, (n, hidden), generator=g).float())


@pytest.mark.parametrize("group", [1, 2, 4, 8, 32])
def test_the_streamed_merge_has_merge_blocks_bits_for_every_count(group: int) -> None:
    for n in range(1, 301):
        p = _blocks(n)
        assert_bits_equal(kernels.merge_blocks_streamed(p, group), kernels.merge_blocks_(p.clone()), f"n={n}")


def test_another_merge_order_differs() -> None:
    """Negative control: the data tell orders apart (a left-to-right sum, or the tree's
    cut nodes folded the other way round, acc + node from the largest down)."""
    def folded_from_the_top(p: torch.Tensor) -> torch.Tensor:
        n, parts, start = p.shape[0], [], 0
        for level in reversed(range(n.bit_length())):
            if n >> level & 1:
                parts.append(kernels.merge_blocks_(p[start:start + (1 << level)].clone()))
                start += 1 << level
        acc = parts[0]
        for part in parts[1:]:
            acc = acc + part
        return acc

    assert any(not bits_equal(_sequential(_blocks(n)), kernels.merge_blocks_(_blocks(n))) for n in range(3, 60))
    assert any(not bits_equal(folded_from_the_top(_blocks(n)), kernels.merge_blocks_(_blocks(n)))
               for n in range(3, 300))
    with pytest.raises(ValueError):
        kernels.merge_blocks_streamed(_blocks(4), 3)


def _sequential(p: torch.Tensor) -> torch.Tensor:
    acc = p[0].clone()
    for row in p[1:]:
        acc = acc + row
    return acc


@pytest.fixture
def native() -> None:
    if not native_status()[0]:
        pytest.skip("the native kernels are not available")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_native_weight_gradient_has_the_block_merge_bits(native: None, threads: int) -> None:
    """The C backward's dW (block sums streamed through native_team.c's parts, some
    pushed from a part's back by the thread that took them) against the torch form,
    for row counts around the block and part boundaries, any thread count and grain."""
    from taskgraph_norm import pipeline
    from taskgraph_norm.backends.native import grads, team

    hidden = 40
    pipe = pipeline.for_config(hidden, 16, "tree", "pairwise", "float", "auto")
    recipe = grads.recipe_of(pipe.plan)  # type: ignore[arg-type]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in [*range(1, 70, 3), 95, 96, 97, 127, 128, 129, 255, 256, 257, 32 * 45 + 5]:
            g = torch.Generator().manual_seed(rows)
            x, dy = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
            dy *= torch.exp2(torch.randint(-10, 11, (rows, 1), generator=g).float())
            rms = torch.rand(rows, 1, generator=g) + 0.5
            want = kernels.weight_grad_float(x, dy, rms, torch.float32)
            for grain in (32, 64, 96):
                dw = torch.empty(hidden)
                assert grads.backward_rows(x, dy, None, rms, recipe, None, dw, exact=False,
                                           threads=team.threads(), grain=grain) == 0
                assert_bits_equal(dw, want, f"rows={rows} grain={grain}")
    finally:
        torch.set_num_threads(before)
    # negative control: other rows give other bits
    assert not bits_equal(want, kernels.weight_grad_float(x.flip(0), dy, rms, torch.float32))


def test_the_native_weight_gradient_counts_non_finite_values(native: None) -> None:
    """A dW value that is not finite comes back in the count (the caller then runs torch ops)."""
    from taskgraph_norm import pipeline
    from taskgraph_norm.backends.native import grads

    rows, hidden = 70, 24
    pipe = pipeline.for_config(hidden, 16, "tree", "pairwise", "float", "auto")
    recipe = grads.recipe_of(pipe.plan)  # type: ignore[arg-type]
    x, dy, rms = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.ones(rows, 1)
    dw = torch.empty(hidden)
    assert grads.backward_rows(x, dy, None, rms, recipe, None, dw, exact=False) == 0
    dy[40, 3], dy[2, 5] = float("inf"), float("nan")
    assert grads.backward_rows(x, dy, None, rms, recipe, None, dw, exact=False) == 2
    with pytest.raises(ValueError):
        grads.backward_rows(x, dy, None, rms, recipe, None, torch.empty(hidden + 1), exact=False)


def test_a_large_dx_written_past_the_caches_has_the_torch_ops_bits(native: None) -> None:
    """A dx of TGN_STREAM_BYTES or more is written with non-temporal stores (native_team.c)."""
    from taskgraph_norm import constants, ops, pipeline
    from taskgraph_norm.backends.registry import BACKENDS

    from .helpers import backend_backward

    rows, hidden = constants.STREAM_BYTES // 4 // 4096, 4096
    g = torch.Generator().manual_seed(5)
    x, w, dy = torch.randn(rows, hidden, generator=g), torch.randn(hidden, generator=g), torch.randn(
        rows, hidden, generator=g)
    pipe = pipeline.for_config(hidden, 64, "tree", "pairwise", "float", "auto")
    _, rms = ops.rms_norm_op(x, w, 1e-6, 64, "tree", "pairwise", "float", "torch", 0.0)
    found = BACKENDS["native"].backward_rows(pipe.plan, dy, x, w, rms, True, True)
    assert found is not None and found[0] is not None
    want = backend_backward("torch_ops", pipe, dy, x, w, rms, True, True)
    assert_bits_equal(found[0], want[0])
    assert_bits_equal(found[1], want[1])
