"""``tgn.RMSNorm(weight_grad="exact")`` in training: the weight gradient is the same bits
for any micro-batching and order, and is the correctly rounded sum of dy * x_hat."""

from __future__ import annotations

import random

import pytest
import torch

import taskgraph_norm as tgn

from .helpers import assert_bits_equal, bits_equal
from .test_exact_grad import truth

ROWS, HIDDEN = 96, 256


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(ROWS, HIDDEN, generator=gen) * torch.exp(2 * torch.randn(ROWS, 1, generator=gen))).to(dtype)
    spread = 1.0 if dtype == torch.float16 else 3.0  # fp16 overflows past 65504
    dy = (torch.randn(ROWS, HIDDEN, generator=gen) * torch.exp(spread * torch.randn(ROWS, HIDDEN, generator=gen)))
    return x, dy.to(dtype)


def _weight_grad(mode: str, dtype: torch.dtype, parts: int, seed: int | None, **options: object) -> torch.Tensor:
    x, dy = _data(dtype)
    norm = tgn.RMSNorm(HIDDEN, weight_grad=mode, dtype=dtype, **options)  # type: ignore[arg-type]
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, HIDDEN))
    order = list(range(ROWS))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for k in range(parts):
        rows = order[k::parts]
        norm(x[rows].clone().requires_grad_()).backward(dy[rows])
    assert norm.weight.grad is not None
    return norm.weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_weight_grad_is_the_same_for_every_micro_batching(dtype: torch.dtype) -> None:
    one = _weight_grad("exact", dtype, 1, None)
    for parts in (2, 3, 4, 8, ROWS):
        for seed in (None, 5):
            assert_bits_equal(_weight_grad("exact", dtype, parts, seed), one, f"{parts} micro-batches")
    # ... and it is the correctly rounded sum of dy * x_hat, x_hat = normalize(x, None)
    x, dy = _data(dtype)
    x_hat = tgn.normalize_sync(x, None)
    assert_bits_equal(one, truth(dy.float(), x_hat.float(), dtype))


def test_float_weight_grad_changes_with_the_micro_batching() -> None:
    # Negative control, and why the exact mode exists: a fixed merge over row blocks
    # is deterministic for one batch, not across micro-batchings.
    one = _weight_grad("float", torch.float32, 1, None)
    assert_bits_equal(_weight_grad("float", torch.float32, 1, None), one)
    assert any(not bits_equal(_weight_grad("float", torch.float32, p, None), one) for p in (2, 3, 8))


@pytest.mark.parametrize("options", [{"topology": "linear"}, {"accumulate": "exact", "topology": "race"},
                                     {"casting_mode": "gemma", "offset": 1.0}])
def test_exact_weight_grad_with_other_configurations(options: dict[str, object]) -> None:
    one = _weight_grad("exact", torch.float32, 1, None, **options)
    assert_bits_equal(_weight_grad("exact", torch.float32, 8, 3, **options), one)


def test_exact_mode_keeps_the_forward_and_input_gradient_bits() -> None:
    x, dy = _data(torch.float32)
    grads = []
    for mode in ("float", "exact"):
        norm = tgn.RMSNorm(HIDDEN, weight_grad=mode)
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(dy)
        grads.append((y.detach(), xi.grad))
    assert_bits_equal(grads[0][0], grads[1][0])
    assert_bits_equal(grads[0][1], grads[1][1])


def test_zero_grad_starts_a_new_sum_and_steps_train() -> None:
    x, dy = _data(torch.float32)
    norm = tgn.RMSNorm(HIDDEN, weight_grad="exact")
    opt = torch.optim.SGD(norm.parameters(), lr=0.1)
    norm(x[:10].clone().requires_grad_()).backward(dy[:10])
    first = norm.weight.grad.clone()  # type: ignore[union-attr]
    opt.zero_grad()  # grad = None: the next backward starts afresh
    norm(x[:10].clone().requires_grad_()).backward(dy[:10])
    assert_bits_equal(norm.weight.grad, first)  # type: ignore[arg-type]
    before = norm.weight.detach().clone()
    opt.step()
    assert not torch.equal(norm.weight.detach(), before)


def test_bad_weight_grad_options_are_config_errors() -> None:
    with pytest.raises(tgn.ConfigError, match="weight_grad"):
        tgn.RMSNorm(8, weight_grad="kahan")
    with pytest.raises(tgn.ConfigError, match="weight_grad"):
        tgn.RMSNorm(8, weight_grad="exact", elementwise_affine=False)
    norm = tgn.RMSNorm(8, weight_grad="exact", dtype=torch.float64)
    with pytest.raises(tgn.ConfigError, match="fp32, bf16 or fp16"):
        norm(torch.randn(2, 8, dtype=torch.float64, requires_grad=True))


def test_exact_mode_with_a_residual() -> None:
    x, dy = _data(torch.float32)
    r = torch.randn(ROWS, HIDDEN)
    norm = tgn.RMSNorm(HIDDEN, weight_grad="exact")
    xi = x.clone().requires_grad_()
    y, h = norm(xi, residual=r)
    assert_bits_equal(h.detach(), x + r)
    with torch.no_grad():
        y0, _ = norm(x, residual=r)
    assert_bits_equal(y.detach(), y0)
    y.backward(dy)
    assert norm.weight.grad is not None and xi.grad is not None
