"""Data-parallel exact weight gradients over real gloo process groups (world sizes 1-4).

Every world size and split of the rows between ranks and micro-batches must give
``weight.grad`` bits equal to one process summing every row; the float
all-reduce of per-rank float gradients (what DDP does) is the negative control
that must differ.  The DDP composition (norm weight kept out of DDP's buckets,
reduced exactly after the last backward) is run too.
"""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.distributed import run_local
from taskgraph_norm.ops.exact_grad import ExactGrad

from . import _exact_grad_workers as workers
from .helpers import assert_bits_equal, bits_equal

ROWS, COLS = 48, 40
CASES = [(dtype, layout) for dtype in ("float32", "bfloat16", "float16")
         for layout in ("even", "strided", "skewed")]


def single_process(dtype_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact grad, float grad) of one process over every row, one micro-batch."""
    dtype = workers.DTYPES[dtype_name]
    dy, x_hat = workers.make_rows(1, ROWS, COLS)
    w = torch.nn.Parameter(torch.ones(COLS, dtype=dtype))
    carrier = ExactGrad()
    carrier.accumulate(w, dy, x_hat)
    grad = carrier.finish(w)
    assert grad is not None
    return grad, (dy * x_hat).sum(0).to(dtype)


def test_without_a_process_group_it_fails_clearly() -> None:
    with pytest.raises(tgn.ShardMismatchError, match="init_process_group"):
        tgn.distributed.all_reduce_exact_grads([torch.nn.Parameter(torch.ones(3))])


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_world_size_and_split_gives_the_single_process_bits(world: int) -> None:
    results = run_local(workers.run_all, world, CASES, ROWS, COLS, timeout=300)
    # tgn.RMSNorm(weight_grad="exact") itself: every rank's weight.grad after
    # all_reduce_exact_grads is the single process's bits, for every split.
    single = workers.module_grads(0, 1, ROWS, COLS, "even")
    for rank, result in enumerate(results):
        for n, layout in enumerate(("even", "strided", "skewed")):
            assert_bits_equal(result["module"][n], single, f"module, world {world} rank {rank} {layout}")
    float_differs = []
    for n, (dtype_name, layout) in enumerate(CASES):
        expected, float_single = single_process(dtype_name)
        for rank, result in enumerate(results):
            assert_bits_equal(result["exact"][n], expected, f"world {world} rank {rank} {dtype_name} {layout}")
        float_differs.append(not bits_equal(results[0]["float"][n], float_single))
    if world >= 2:
        # Negative control: DDP's float all-reduce of per-rank float grads moves with the split.
        assert any(float_differs), "the float all-reduce gave the single-process bits in every case"
        reference = workers.single_process_ddp_reference(ROWS, COLS)
        for rank, result in enumerate(results):
            assert result["ddp"]["ignored"] == [".norm_weight", "norm_weight"]
            assert_bits_equal(result["ddp"]["norm"], reference["norm"], f"DDP world {world} rank {rank}")
            # Negative control: DDP told only the named_parameters() name still reduces the
            # weight in float, and all_reduce_exact_grads says so instead of a wrong answer.
            assert "ExactSumError" in result["ddp_naive"]["error"] and "exclude_from_ddp" in result["ddp_naive"]["error"]
        # DDP's own float gradients are outside the guarantee (averaged, and in float).
        assert torch.allclose(results[0]["ddp"]["scale"] * world, reference["scale"], rtol=1e-4, atol=1e-4)
