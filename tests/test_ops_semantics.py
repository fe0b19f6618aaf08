"""The ops with the model-facing options: casting modes, offset and the residual,
under autograd and tracing (the forward bits are the no-grad bits; gradients pass
gradcheck; the native and torch-ops backwards agree)."""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import ops
from taskgraph_norm.backends.native import loader as native

from .helpers import assert_bits_equal

MODES = [("torch", 0.0), ("gemma", 1.0), ("llama", 0.0), ("llama", 0.5)]


@pytest.mark.parametrize(("casting_mode", "offset"), MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_enabled_forward_gives_the_no_grad_bits(casting_mode: str, offset: float, dtype: torch.dtype) -> None:
    norm = tgn.RMSNorm(96, eps=1e-6, chunk_size=32, casting_mode=casting_mode, offset=offset)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        expected = norm(x)
    y = norm(x.clone().requires_grad_())
    assert y.requires_grad
    assert_bits_equal(y.detach(), expected)
    y.float().square().sum().backward()


@pytest.mark.parametrize(("casting_mode", "offset"), MODES)
def test_gradcheck_with_casting_modes_and_offset(casting_mode: str, offset: float) -> None:
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(a, b, 1e-5, chunk_size=8, casting_mode=casting_mode, offset=offset)

    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.skipif(not native.available(), reason="needs the native kernels")
def test_native_and_torch_backward_agree_with_an_offset() -> None:
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(2))
    w = torch.randn(128, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(70, 128, generator=torch.Generator().manual_seed(4))

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        ops.rms_norm(a, b, 1e-6, casting_mode="gemma", offset=1.0).backward(dy)
        assert a.grad is not None and b.grad is not None
        return a.grad, b.grad

    dx, dw = grads()
    with native.disabled():
        dx_t, dw_t = grads()
    assert_bits_equal(dx, dx_t)
    assert_bits_equal(dw, dw_t)
    # Negative control: without the offset the input gradient differs.
    a = x.clone().requires_grad_()
    ops.rms_norm(a, w, 1e-6).backward(dy)
    assert a.grad is not None and not torch.equal(a.grad, dx)


def test_residual_under_grad_returns_h_and_trains() -> None:
    norm = tgn.RMSNorm(64, chunk_size=16, casting_mode="llama")
    x = torch.randn(4, 64, requires_grad=True)
    r = torch.randn(4, 64, requires_grad=True)
    y, h = norm(x, residual=r)
    with torch.no_grad():
        y0, h0 = norm(x, residual=r)
    assert_bits_equal(h.detach(), (x + r).detach())
    assert_bits_equal(y.detach(), y0)
    (y.square().sum() + h.sum()).backward()
    assert x.grad is not None and r.grad is not None
    assert_bits_equal(x.grad, r.grad)  # h = x + r: both get the same gradient


def test_compiled_llama_bf16_gives_the_eager_bits() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), tgn.RMSNorm(32, chunk_size=8, casting_mode="llama"))
    x = torch.randn(6, 32)
    with torch.no_grad():
        model[0].to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        eager = model(xb)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(xb)
    assert got.dtype == eager.dtype == torch.float32  # an fp32 weight: LlamaRMSNorm's dtype
    assert_bits_equal(got, eager)
