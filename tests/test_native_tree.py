"""The tree topology's merges as vectors (native_tree.c's tgn_adds_tree_f32).

Where a plan's chunk count is a power of two, ``topology="tree"`` lowers to pairwise
levels, ``slots[n + k] = slots[2k] + slots[2k + 1]`` and so on to the root; the direct
path checks that once per call (``tgn_adds_tree``) and then runs those additions eight
or sixteen at a time.  The check must accept exactly that layout, and the rows must
keep the reference interpreter's bits for every chunk count, dtype and thread split."""

from __future__ import annotations


import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import loader as native

from ._trust_helpers import native_status
from .helpers import assert_bits_equal, bits_equal, compile_graph, spy_direct_calls

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")


def _merges(hidden: int, chunk: int, topology: str) -> tuple[torch.Tensor, int, int, int]:
    plan = compile_graph(tgn.build_graph(hidden, chunk_size=chunk, topology=topology))
    adds = torch.tensor([t for level in plan.adds for t in level], dtype=torch.int64).reshape(-1)
    return adds, len(adds) // 3, plan.n_chunks, plan.root


def _is_tree(adds: torch.Tensor, n_adds: int, n_chunks: int, root: int) -> bool:
    return bool(native.module().adds_tree(adds.data_ptr() if adds.numel() else None, n_adds, n_chunks, root))


@pytest.mark.parametrize("n_chunks", [2, 4, 8, 16, 32, 64, 128, 256, 512])
def test_the_check_takes_the_tree_plans(n_chunks: int) -> None:
    assert _is_tree(*_merges(n_chunks * 8, 8, "tree"))


@pytest.mark.parametrize("n_chunks", [1, 3, 6, 48, 100])
def test_the_check_leaves_other_chunk_counts(n_chunks: int) -> None:
    """Not a power of two: the tree's levels have an odd slot, and the loop of triples runs."""
    assert not _is_tree(*_merges(n_chunks * 8, 8, "tree"))


def test_the_check_leaves_every_other_order() -> None:
    """The linear topology (the same count of merges, the same root), and the tree's
    triples with one operand swapped, one pairing changed or the levels reordered,
    are not taken: the vectors would give another order's bits."""
    assert not _is_tree(*_merges(512, 8, "linear"))
    adds, n_adds, n_chunks, root = _merges(512, 8, "tree")
    assert _is_tree(adds, n_adds, n_chunks, root)
    triples = adds.view(-1, 3)
    swapped = triples.clone()
    swapped[5, 1], swapped[5, 2] = triples[5, 2], triples[5, 1]
    paired = triples.clone()
    paired[0, 2], paired[1, 1] = triples[1, 1], triples[0, 2]  # (0 + 2) and (1 + 3)
    levels = torch.cat([triples[32:], triples[:32]])
    for other in (swapped, paired, levels):
        assert not _is_tree(other.reshape(-1), n_adds, n_chunks, root)
    assert not _is_tree(adds, n_adds, n_chunks, root - 1)
    assert not _is_tree(adds, n_adds - 1, n_chunks, root)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_chunks,chunk", [(2, 64), (4, 16), (8, 8), (16, 16), (32, 64), (64, 64), (128, 32),
                                            (256, 16), (512, 8), (6, 64), (48, 16)])
def test_the_rows_keep_the_references_bits(monkeypatch: pytest.MonkeyPatch, threads: int, dtype: torch.dtype,
                                           n_chunks: int, chunk: int) -> None:
    """Rows of many binades (so every addition's rounding shows), enough of them for the
    team to split (2 threads), through the direct path, against the reference interpreter."""
    taken = spy_direct_calls(monkeypatch)
    hidden = n_chunks * chunk
    rows = max(24, (1 << 17) // hidden)
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    x = (x * torch.exp2(torch.randint(-12, 12, (rows, hidden), generator=g).double())).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    got = tgn.normalize_sync(x, w, chunk_size=chunk)
    assert any(taken), "the direct path was not taken"
    assert_bits_equal(got, tgn.normalize_sync(x, w, chunk_size=chunk, executor="reference"))


def test_the_rows_negative_control() -> None:
    """The same rows through the tree and linear plans differ, so the equalities above
    pin the order of the additions."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = (x * torch.exp2(torch.randint(-12, 12, (64, 4096), generator=torch.Generator().manual_seed(2)))).float()
    tree, linear = (tgn.normalize_sync(x, chunk_size=64, topology=t) for t in ("tree", "linear"))
    assert not bits_equal(tree, linear)
