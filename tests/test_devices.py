"""The same bits on an accelerator as on the CPU.

The pairwise leaf, the ordered merges and FINALIZE use only elementwise IEEE
operations (add, multiply, correctly rounded division and sqrt), so a certified
graph with pairwise leaves gives the CPU's bits on CUDA too.  ``torch.sum`` leaves
and torch's own kernel make no such promise: ``benchmarks/device_bits.py`` reports them.
Run with ``pytest -m gpu``; every test skips cleanly without CUDA or MPS.
"""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from .helpers import assert_bits_equal

from .conftest import gen


def _accelerator() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return None


DEVICE = _accelerator()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA or MPS device")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def wide(rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(rows, hidden, generator=gen(0)) * torch.logspace(-3, 3, hidden)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("topology", ["linear", "tree"])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_device_gives_the_cpus_bits(topology: str, accumulate: str, dtype: torch.dtype) -> None:
    x = wide(513, 4096, dtype)
    w = torch.randn(4096, generator=gen(1)).to(dtype)
    cpu = tgn.normalize_sync(x, w, topology=topology, accumulate=accumulate, chunk_size=100)
    dev = tgn.normalize_sync(x.to(DEVICE), w.to(DEVICE), topology=topology, accumulate=accumulate, chunk_size=100)
    assert dev.device.type == DEVICE.type
    assert_bits_equal(dev.cpu(), cpu)


@pytest.mark.parametrize("topology", ["linear", "tree", "cat", "race"])
def test_exact_gives_the_cpus_bits_for_every_topology_and_native_leaf(topology: str) -> None:
    x = wide(64, 1000, torch.float32)
    cpu = tgn.normalize_sync(x, topology=topology, leaf="native", accumulate="exact")
    dev = tgn.normalize_sync(x.to(DEVICE), topology=topology, leaf="native", accumulate="exact")
    assert_bits_equal(dev.cpu(), cpu)


@pytest.mark.parametrize("topology", ["linear", "tree", "cat"])
def test_batch_invariance_on_the_device(topology: str) -> None:
    x = wide(1024, 4096, torch.float32).to(DEVICE)
    full = tgn.normalize_sync(x, topology=topology)
    for b in (1, 3, 257):
        assert_bits_equal(tgn.normalize_sync(x[:b], topology=topology).cpu(), full[:b].cpu())
