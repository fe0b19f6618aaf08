"""tgn.RMSNorm under torch.compile (fullgraph), torch.export (with and without
no_grad), torch.jit.trace and CUDA graph capture: one opaque taskgraph_norm op, the
eager bits, and no tracer's tensor left in a cache after a failed trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import ops

from .helpers import assert_bits_equal


class Block(torch.nn.Module):
    """Two norms of different configurations around a linear layer (a decoder's shape)."""

    def __init__(self, hidden: int = 64, **opts: Any) -> None:
        super().__init__()
        self.norm1 = tgn.RMSNorm(hidden, chunk_size=8, **opts)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.norm2 = tgn.RMSNorm(hidden, topology="linear", chunk_size=16)
        with torch.no_grad():
            self.norm1.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.norm1(x)))


def eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y: torch.Tensor = model(x)
    return y


def op_targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "taskgraph_norm" in str(n.target)]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def test_compile_fullgraph_has_no_graph_breaks_and_eager_bits() -> None:
    model, x = Block(), torch.randn(5, 64)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    graphs: list[torch.fx.GraphModule] = []

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    assert_bits_equal(torch.compile(model, fullgraph=True, backend=counting)(x), eager(model, x))
    assert len(graphs) == 1
    assert_bits_equal(torch.compile(model, fullgraph=True, backend="aot_eager")(x), eager(model, x))


# torch 2.13's inductor touches torch.jit.script_method on its way (its warning, not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_training_step_matches_eager_bits() -> None:
    model, x = Block(), torch.randn(6, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    y = compiled(x)
    assert_bits_equal(y, eager(model, x))
    y.sum().backward()
    got = (x.grad, model.norm1.weight.grad)
    x2 = x.detach().clone().requires_grad_()
    model.zero_grad()
    model(x2).sum().backward()
    assert_bits_equal(got[0], x2.grad)
    assert_bits_equal(got[1], model.norm1.weight.grad)


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
def test_export_holds_the_op(no_grad: bool) -> None:
    model, x = Block(), torch.randn(3, 64)
    if no_grad:
        with torch.no_grad():
            exported = torch.export.export(model, (x,))
    else:
        exported = torch.export.export(model, (x,))
    assert op_targets(exported.graph_module) == ["taskgraph_norm.rms_norm.default"] * 2
    assert len(exported.graph.nodes) < 20  # the op, not its 2,000-op decomposition
    assert_bits_equal(exported.module()(x), eager(model, x))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:DeprecationWarning")
def test_jit_trace_gives_eager_bits() -> None:
    model, x = Block(), torch.randn(4, 64)
    traced = torch.jit.trace(model, (x,))
    assert_bits_equal(traced(x), eager(model, x))


@pytest.mark.parametrize("opts", [dict(), dict(leaf="native"), dict(accumulate="exact")],
                         ids=["tree", "native-leaf", "exact"])
def test_failed_export_leaves_eager_bits_intact(opts: dict[str, str]) -> None:
    """Traces that die after the norm ran on fake tensors (export, then compile): later
    eager calls (larger inputs, so caches grow) still give the reference interpreter's bits."""

    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = tgn.RMSNorm(64, chunk_size=8, **opts)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(x)
            return y if bool(y.sum() > 0) else -y  # data-dependent: export fails here

    model = DataDependent()
    with torch.no_grad(), pytest.raises(Exception, match="(?i)data.dependent|guard"):
        torch.export.export(model, (torch.randn(300, 64),))
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):  # a data-dependent branch
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(400, 64))
    x = torch.randn(500, 64)
    reference = tgn.execute_sync(tgn.build_graph(64, chunk_size=8, **opts), x, model.norm.weight.detach(),
                                 executor="reference")
    assert_bits_equal(eager(model.norm, x), reference)
    assert_bits_equal(model.norm(x), reference)  # through the op, with grad


def test_a_fake_tensor_is_refused_by_the_pipeline() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(4, 64))
    with pytest.raises(tgn.ExecutionError, match="real tensors"):
        tgn.execute_sync(tgn.build_graph(64), fake)


def test_routing_takes_the_direct_path_only_when_nothing_needs_the_op() -> None:
    x, w = torch.randn(2, 8), torch.ones(8, requires_grad=True)
    assert ops.needs_op(x, w)
    with torch.no_grad():
        assert not ops.needs_op(x, w)
    assert not ops.needs_op(x, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_replays_eager_bits() -> None:
    model = Block().cuda()
    x = torch.randn(8, 64, device="cuda")
    want = eager(model, x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            model(x)  # warm the pipeline's caches outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(x)
    graph.replay()
    torch.cuda.synchronize()
    assert_bits_equal(out, want)


def test_torch_func_transforms() -> None:
    """vmap gives the eager bits (rows are independent); func.grad runs the backward with
    grad mode on (as create_graph does), so it gets the differentiable composite: close,
    not the native kernel's bits."""
    norm = tgn.RMSNorm(64, chunk_size=8)
    x = torch.randn(3, 64)
    assert_bits_equal(torch.vmap(norm)(x.unsqueeze(1))[:, 0], eager(norm, x))
    grad = torch.func.grad(lambda a: norm(a).square().sum())(x)
    xg = x.clone().requires_grad_()
    norm(xg).square().sum().backward()
    torch.testing.assert_close(grad, xg.grad)
    with pytest.raises(NotImplementedError, match="batched weight"):
        torch.vmap(lambda w: ops.rms_norm(x, w))(torch.ones(2, 64))
    exact = tgn.RMSNorm(64, chunk_size=8, weight_grad="exact")  # the exact weight's Function says the same
    with pytest.raises(NotImplementedError, match="batched weight"):
        torch.vmap(lambda w: torch.func.functional_call(exact, {"weight": w}, (x,)))(torch.ones(2, 64))
