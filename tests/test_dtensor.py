"""DTensor inputs to the faces and modules (docs/distributed.md, "DTensor").

Real gloo groups over loopback with ``init_device_mesh("cpu", ...)``: at world sizes 1
to 4 every rank runs :mod:`tests._dtensor_workers`' checks and reports the cases whose
bits differ from the one process on the full tensors: ``normalize_sync`` on
``Shard(0)``, ``Shard(1)`` (sequence), ``Shard(-1)`` (hidden) and ``Replicate()``, fp32
and bf16, float and exact accumulation, a DTensor or a plain weight, forward and
``dx``; ``dW`` where the placement promises it; the exact weight gradient of
``tgn.RMSNorm(weight_grad="exact")`` on every placement; LayerNorm with rows sharded;
``SequenceParallel``; Liger-Kernel's DTensor cases; the ``torch.library`` ops handed
DTensors directly (their sharding rules); and the negative controls (the
float ``dW`` that a row-sharded batch reduces across ranks, and a planted one-ulp
change).  FSDP2 trains a small model in its own spawn.
"""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.distributed import run_local
from taskgraph_norm.distributed.dtensor_grad import chunk_sizes
from taskgraph_norm.ops import routing

from . import _dtensor_workers as workers


@pytest.mark.parametrize("world", [1, 2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_dtensor_bits_equal_single_process(world: int) -> None:
    results = run_local(workers.check_all, world, timeout=300, threads=2 if world <= 2 else 1)
    for rank, result in enumerate(results):
        assert result["failed"] == [], f"rank {rank}: {result['failed']}"
        assert result["errors"] == ["WeightShapeError", "TypeError", "TypeError"]
        found = result["found"]
        assert found.pop("planted ulp"), "the bit comparison missed a planted one-ulp change"
        if world > 1:
            # Negative control: the float dW a row-sharded batch reduces across ranks is not
            # the one-process dW (why weight_grad="exact" exists); the comparison sees it.
            assert any(found.values()), found
        else:
            assert not found


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_fsdp2_trains_with_tgn_norms(world: int) -> None:
    results = run_local(workers.check_fsdp2, world, 3, timeout=300)
    for rank, result in enumerate(results):
        assert result["failed"] == [], f"rank {rank}: {result['failed']}"
        losses = result["losses"]
        assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in losses), losses
        assert losses[-1][0] < losses[0][0]  # it trains


def test_the_faces_load_on_the_first_dtensor() -> None:
    assert sorted(routing.DTENSOR_LOADER[0]()) == ["layer_module", "layer_norm", "normalize", "rms_module"]
    assert routing.dtensor_face("normalize", torch.ones(2), None) is None  # plain tensors: not ours


@pytest.mark.parametrize("size, parts", [(97, 4), (8, 3), (2, 4), (0, 2), (256, 4)])
def test_chunk_sizes_are_torch_chunks(size: int, parts: int) -> None:
    pieces = [len(c) for c in torch.arange(size).chunk(parts)] if size else []
    assert chunk_sizes(size, parts) == tuple(pieces + [0] * (parts - len(pieces)))
