"""One route for every face: the problems of the issue "one route", each reproduced here.

Every face checks its arguments the same way whatever path a call takes (grad or not,
cached or cold), work handed to other threads runs under the caller's grad and
inference mode, the raw ops check their tensors, and the backend is one object the
pipeline picks per (device, dtype), per context.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import ops, pipeline
from taskgraph_norm.backends.registry import NoBackendError
from taskgraph_norm.errors import ConfigError, InputRankError, OverlapError, WeightShapeError

from .helpers import assert_bits_equal


@pytest.fixture
def all_threads() -> Any:
    """At least two torch threads, so rows split across them (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


# -- 1. rows split across threads run under the caller's grad and inference mode -----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_training_step_splits_rows_across_threads(all_threads: None, dtype: torch.dtype) -> None:
    norm = tgn.RMSNorm(1024).to(dtype)
    x = torch.randn(2000, 1024, dtype=dtype, requires_grad=True)
    y = norm(x)
    y.float().square().mean().backward()
    assert x.grad is not None and norm.weight.grad is not None
    assert torch.isfinite(x.grad.float()).all()
    with torch.no_grad():
        assert_bits_equal(y.detach(), norm(x.detach()))


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_inference_and_no_grad_split_rows_across_threads(all_threads: None, mode: str, dtype: torch.dtype) -> None:
    norm = tgn.RMSNorm(1000).to(dtype)  # the weight requires grad, as in any module in eval
    x = torch.randn(2000, 1000, dtype=dtype)
    want = tgn.normalize_sync(x, norm.weight.detach())
    with getattr(torch, mode)():
        y = norm(x)
        t = tgn.normalize_sync(x.t().contiguous().t(), norm.weight)  # a strided input: tiles
    assert not y.requires_grad and y.grad_fn is None
    assert_bits_equal(y, want)
    assert_bits_equal(t, want)


def test_topology_cat_and_native_leaves_train_on_threads(all_threads: None) -> None:
    for options in (dict(topology="cat"), dict(leaf="native")):
        x = torch.randn(2000, 1024, requires_grad=True)
        y = tgn.normalize_sync(x, **options)  # type: ignore[arg-type]
        y.sum().backward()
        assert x.grad is not None


# -- 2. the async face takes the same route as the sync one --------------------------


@pytest.mark.parametrize("rows", [64, 4096], ids=["inline", "offloaded"])
def test_await_normalize_under_grad_uses_the_ops(rows: int) -> None:
    w = 1 + 0.1 * torch.randn(512)
    x = torch.randn(rows, 512, requires_grad=True)
    dy = torch.randn(rows, 512)

    async def run() -> torch.Tensor:
        return await tgn.normalize(x, w)

    y = anyio.run(run)
    assert "EagerRMSNorm" in type(y.grad_fn).__name__
    (dx_async,) = torch.autograd.grad(y, x, dy)
    (dx_sync,) = torch.autograd.grad(tgn.normalize_sync(x, w), x, dy)
    assert_bits_equal(dx_async, dx_sync)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_await_normalize_records_nothing_under_no_grad(mode: str) -> None:
    x, w = torch.randn(4096, 256), torch.randn(256, requires_grad=True)

    async def run() -> torch.Tensor:
        with getattr(torch, mode)():
            return await tgn.normalize(x, w)  # large: computed on a worker thread

    y = anyio.run(run)
    assert not y.requires_grad and y.grad_fn is None
    assert_bits_equal(y, tgn.normalize_sync(x, w.detach()))


# -- 6. the raw ops check their tensors ----------------------------------------------


def test_the_raw_op_refuses_a_short_weight_and_a_0d_input() -> None:
    raw = torch.ops.taskgraph_norm.rms_norm
    config = (1e-6, 64, "tree", "pairwise", "float", "torch", 0.0)
    with pytest.raises(WeightShapeError):
        raw(torch.randn(2, 8), torch.ones(3), *config)  # read 5 floats past the weight before
    with pytest.raises(InputRankError):
        raw(torch.tensor(2.0), None, *config)
    res = torch.ops.taskgraph_norm.rms_norm_residual
    with pytest.raises(ConfigError, match="residual"):
        res(torch.randn(2, 8), torch.randn(8), None, *config)  # broadcast before
    with pytest.raises(ConfigError, match="residual"):
        res(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64), None, *config)


# -- 7. checks do not depend on the path or the cache --------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
def test_bad_arguments_raise_on_every_path(grad: bool) -> None:
    def x() -> torch.Tensor:
        return torch.randn(2, 8, requires_grad=grad)

    with pytest.raises(ConfigError, match="out"):
        tgn.normalize_sync(x(), out=torch.empty(2, 8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="out"):
        tgn.normalize_sync(x(), out=torch.empty(2, 3, 8))
    with pytest.raises(ConfigError, match="executor"):
        tgn.normalize_sync(x(), executor="bogus")
    with pytest.raises(ConfigError, match="residual"):
        tgn.normalize_sync(x(), residual=torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="residual"):
        tgn.normalize_sync(x(), residual=torch.randn(2, 8), residual_out=torch.empty(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("chunk", [16.0, np.int64(16), True], ids=["float", "numpy", "bool"])
def test_acceptance_never_depends_on_the_cache(chunk: object) -> None:
    x = torch.randn(2, 32)
    with pytest.raises(ConfigError, match="chunk_size"):
        tgn.normalize_sync(x, chunk_size=chunk)  # type: ignore[arg-type]
    tgn.normalize_sync(x, chunk_size=16)
    tgn.normalize_sync(x, chunk_size=1)
    with pytest.raises(ConfigError, match="chunk_size"):
        tgn.normalize_sync(x, chunk_size=chunk)  # type: ignore[arg-type]  (cached 16 and 1 now)


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_out_that_partly_overlaps_an_input_raises(grad: bool, dtype: torch.dtype) -> None:
    buffer = torch.randn(10, 64, dtype=dtype)
    x, out = buffer[:8], buffer[2:]
    if grad:
        x = x.detach().requires_grad_()
        out = buffer[2:]
    with pytest.raises(OverlapError, match="single memory location"):
        tgn.normalize_sync(x, out=out)
    r = torch.randn(8, 64, dtype=dtype)
    with pytest.raises(OverlapError):
        tgn.normalize_sync(buffer[:8], residual=r, residual_out=buffer[1:9])
    # the same tensor is an in-place call, as for torch's out= ops
    same = torch.randn(8, 64, dtype=dtype)
    want = tgn.normalize_sync(same.clone())
    assert_bits_equal(tgn.normalize_sync(same, out=same), want)


def test_an_offset_without_a_weight_has_no_effect_on_every_face() -> None:
    x = torch.randn(3, 64)
    want = tgn.normalize_sync(x)
    assert_bits_equal(tgn.normalize_sync(x, offset=1.0, casting_mode="gemma"), want)
    assert_bits_equal(anyio.run(lambda: tgn.normalize(x, offset=0.5)), want)
    assert_bits_equal(tgn.RMSNorm(64, elementwise_affine=False, offset=1.0)(x), want)
    assert_bits_equal(ops.rms_norm(x, None, offset=1.0), want)
    xg = x.clone().requires_grad_()
    assert_bits_equal(tgn.normalize_sync(xg, offset=1.0).detach(), want)


# -- one backend per (device, dtype), chosen per context -----------------------------


def test_the_pipeline_picks_one_backend_per_device_and_dtype() -> None:
    pipe = pipeline.for_config(64, 16, "tree", "pairwise", "float", "auto")
    cpu = torch.device("cpu")
    native = pipe.backend(cpu, torch.float32)
    assert native.name == "native" and pipe.backend(cpu, torch.float32) is native
    with tgn.backends.use("torch_ops"):
        assert pipe.backend(cpu, torch.float32).name == "torch_ops"
    cat = pipeline.for_config(64, 16, "cat", "pairwise", "float", "auto")
    assert cat.backend(cpu, torch.float32).name == "torch_ops"  # torch.sum's order: no C kernel
    with tgn.backends.use("native"), pytest.raises(NoBackendError, match=r"native: no kernel for pairwise"):
        cat.backend(cpu, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        with tgn.backends.use("cuda"):
            pass


def test_the_choice_is_per_context_not_per_process() -> None:
    x = torch.randn(4, 64)
    seen: dict[str, tuple[str, ...]] = {}
    ready, done = threading.Event(), threading.Event()

    def other() -> None:
        ready.wait()
        seen["other"] = tgn.backends.allowed()
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with tgn.backends.use("torch_ops"):
        seen["inside"] = tgn.backends.allowed()
        y = tgn.normalize_sync(x)
        ready.set()
        done.wait()
    thread.join()
    assert seen["inside"] == ("torch_ops",) and "native" in seen["other"]
    assert_bits_equal(y, tgn.normalize_sync(x))  # the same bits on either backend


def test_every_backend_gives_the_same_forward_and_backward_bits() -> None:
    from taskgraph_norm.backends.registry import BACKENDS

    pipe = pipeline.for_config(300, 16, "tree", "pairwise", "float", "auto")
    assert pipe.plan is not None
    x, w, dy = torch.randn(70, 300), 1 + 0.1 * torch.randn(300), torch.randn(70, 300)
    results = {}
    for name in ("native", "torch_ops"):
        fwd = BACKENDS[name].forward(pipe.graph, pipe.plan, x, w, 1e-6, stats=True)
        assert fwd.rms is not None
        back = BACKENDS[name].backward(pipe.plan, dy, x, w, fwd.rms, input_grad=True, weight_grad=True)
        results[name] = (fwd.y, fwd.rms, *back)
    for a, b in zip(results["native"], results["torch_ops"]):
        assert a is not None and b is not None
        assert_bits_equal(a, b)
