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
change).  FSDP2 trains a small model in its own spawn.  :mod:`tests._dtensor_more_workers`
covers LayerNorm with the hidden dim sharded (the tensor-parallel LayerNorm) and the
gated, grouped RMSNorm on every placement (``PrepareModuleInput`` for a gated module, and
a 2-D mesh at world 4), with their own negative controls.
"""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.distributed import run_local
from taskgraph_norm.distributed.dtensor_grad import chunk_sizes
from taskgraph_norm.ops import routing

from . import _dtensor_more_workers as more_workers
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


@pytest.mark.parametrize("world", [1, 2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_dtensor_layer_norm_hidden_sharded_and_gated(world: int) -> None:
    """LayerNorm of a hidden-sharded DTensor (the tensor-parallel LayerNorm), and the
    gated, grouped RMSNorm of DTensors: the one-process bits where claimed."""
    results = run_local(more_workers.check_more, world, timeout=300, threads=1)
    for rank, result in enumerate(results):
        assert result["failed"] == [], f"rank {rank}: {result['failed']}"
        assert result["layer errors"] == ["NotImplementedError", "WeightShapeError"]
        # a plain gate, a gate on another placement, the hidden dim sharded without groups,
        # (world > 2) groups of 48 cut by a shard boundary, and out=
        cut = "NotImplementedError" if world > 2 else "no error"
        assert result["gated errors"] == ["TypeError", "ValueError", "NotImplementedError", cut, "TypeError"]
        found = result["found"]
        if world > 1:
            # Negative controls: float all-reduces of the shards' sums (a naive tensor-parallel
            # LayerNorm), a hidden shard normalised as one row instead of in its groups, and the
            # float dW a row-sharded batch reduces across ranks all differ from one process.
            assert found.pop("naive layer") and found.pop("a shard as one row"), found
            assert found and any(found.values()), found
        else:
            assert not found


def test_gated_norm_of_no_rows_keeps_its_gradients() -> None:
    """A rank whose shard holds no rows still takes part in the backward: the gated
    norm of an empty ``x`` is a function of ``x``, the gate and the weight."""
    norm = tgn.GatedRMSNorm(8, group_size=4, norm_before_gate=True)
    x, z = torch.empty(0, 8, requires_grad=True), torch.empty(0, 8, requires_grad=True)
    norm(x, z).sum().backward()
    assert x.grad is not None and z.grad is not None and x.grad.shape == (0, 8)
    assert norm.weight.grad is not None and torch.equal(norm.weight.grad, torch.zeros(8))


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_fsdp2_trains_with_tgn_norms(world: int) -> None:
    results = run_local(workers.check_fsdp2, world, 3, timeout=300)
    for rank, result in enumerate(results):
        assert result["failed"] == [], f"rank {rank}: {result['failed']}"
        losses = result["losses"]
        assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in losses), losses
        assert losses[-1][0] < losses[0][0]  # it trains


def test_the_faces_load_on_the_first_dtensor() -> None:
    assert sorted(routing.DTENSOR_LOADER[0]()) == ["gated", "layer_module", "layer_norm", "normalize", "rms_module"]
    assert routing.dtensor_face("normalize", torch.ones(2), None) is None  # plain tensors: not ours


@pytest.mark.parametrize("size, parts", [(97, 4), (8, 3), (2, 4), (0, 2), (256, 4)])
def test_chunk_sizes_are_torch_chunks(size: int, parts: int) -> None:
    pieces = [len(c) for c in torch.arange(size).chunk(parts)] if size else []
    assert chunk_sizes(size, parts) == tuple(pieces + [0] * (parts - len(pieces)))
