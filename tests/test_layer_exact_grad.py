"""``tgn.LayerNorm(weight_grad="exact")``: ``dW`` and ``db`` the correctly rounded exact sums
of ``dy * x_hat`` and ``dy`` (checked against fractions), the same bits for any
micro-batching and order (the float grads, the negative control, differ), carried until
the gradient is cleared, ``autograd.grad`` giving this call's sums only, and the same bits
at every gloo world size 1-4 after ``all_reduce_exact_grads``."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.distributed import run_local
from taskgraph_norm.kernels.layer_backward import layer_x_hat
from taskgraph_norm.ops.layer import layer_norm_op
from taskgraph_norm.testing import bits, bits_equal

from . import _layer_exact_workers as workers

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS, COLS = 48, 40
SPLITS = ([range(0, 48)], [range(0, 10), range(30, 48), range(10, 30)], [range(k, k + 1) for k in range(47, -1, -1)])


def _norm(dtype: torch.dtype, weight_grad: str = "exact") -> tgn.LayerNorm:
    norm = tgn.LayerNorm(COLS, weight_grad=weight_grad, chunk_size=8, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, COLS))
        norm.bias.copy_(torch.linspace(-1, 1, COLS))
    return norm


def _train(norm: tgn.LayerNorm, x: torch.Tensor, dy: torch.Tensor, split: list[range]) -> tuple[torch.Tensor, ...]:
    norm.zero_grad(set_to_none=True)
    for part in split:
        idx = torch.tensor(list(part))
        norm(x[idx].clone().requires_grad_()).backward(dy[idx])
    assert norm.weight.grad is not None and norm.bias.grad is not None
    return norm.weight.grad.clone(), norm.bias.grad.clone()


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_micro_batching_and_order_gives_the_same_bits(dtype: torch.dtype) -> None:
    x, dy = workers.layer_rows(ROWS, COLS, dtype)
    exact = [_train(_norm(dtype), x, dy, split) for split in SPLITS]
    for got in exact[1:]:
        assert bits_equal(got[0], exact[0][0]) and bits_equal(got[1], exact[0][1])
    # negative control: the float grads move with the micro-batching
    floats = [_train(_norm(dtype, "float"), x, dy, split) for split in SPLITS]
    assert any(not bits_equal(f[0], floats[0][0]) for f in floats[1:])
    assert any(not bits_equal(f[1], floats[0][1]) for f in floats[1:])


def _round_exact(value: Fraction, dtype: torch.dtype) -> torch.Tensor:
    """``value`` correctly rounded to ``dtype`` (nearest, ties to even), by exact comparison
    with the candidate fp64 rounding gives and its two neighbours."""
    c = torch.tensor(float(value), dtype=torch.float64).to(dtype)
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    step = torch.tensor(1, dtype=int_type)
    near = [c, (bits(c) + step).view(dtype), (bits(c) - step).view(dtype)]
    finite = [t for t in near if torch.isfinite(t)]

    def key(t: torch.Tensor) -> tuple[Fraction, int]:
        return abs(Fraction(float(t)) - value), int(bits(t)) & 1

    return min(finite, key=key)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dw_and_db_are_the_correctly_rounded_sums(dtype: torch.dtype) -> None:
    x, dy = workers.layer_rows(12, 9, dtype)
    norm = tgn.LayerNorm(9, weight_grad="exact", chunk_size=4, dtype=dtype)
    norm(x.clone().requires_grad_()).backward(dy)
    _, mean, den = layer_norm_op(x, norm.weight.detach(), norm.bias.detach(), 1e-5, 4, "tree", "pairwise", "float")
    x_hat = layer_x_hat(x, mean, den).float()  # what the docs say is summed
    d = dy.float()
    for j in range(9):
        want_w = _round_exact(sum((Fraction(float(d[i, j])) * Fraction(float(x_hat[i, j])) for i in range(12)),
                                  Fraction(0)), dtype)
        want_b = _round_exact(sum((Fraction(float(d[i, j])) for i in range(12)), Fraction(0)), dtype)
        assert norm.weight.grad is not None and norm.bias.grad is not None
        assert bits_equal(norm.weight.grad[j], want_w), j
        assert bits_equal(norm.bias.grad[j], want_b), j


def test_autograd_grad_returns_this_calls_sums_and_the_grad_is_carried() -> None:
    x, dy = workers.layer_rows(ROWS, COLS, torch.float32)
    norm = _norm(torch.float32)
    first = _train(norm, x[:20], dy[:20], [range(0, 20)])
    xr = x[20:].clone().requires_grad_()
    gw, gb, gx = torch.autograd.grad(norm(xr), [norm.weight, norm.bias, xr], dy[20:])
    alone = _train(_norm(torch.float32), x[20:], dy[20:], [range(0, 28)])
    assert bits_equal(gw, alone[0]) and bits_equal(gb, alone[1])
    assert bits_equal(norm.weight.grad, first[0]) and bits_equal(norm.bias.grad, first[1])  # untouched
    # dx is the float backward's
    plain = _norm(torch.float32, "float")
    xp = x[20:].clone().requires_grad_()
    assert bits_equal(gx, torch.autograd.grad(plain(xp), [xp], dy[20:])[0])
    # the carry: a second backward adds exactly to the first (as one call over all rows)
    norm(x[20:].clone()).backward(dy[20:])
    whole = _train(_norm(torch.float32), x, dy, [range(0, ROWS)])
    assert bits_equal(norm.weight.grad, whole[0]) and bits_equal(norm.bias.grad, whole[1])


def test_double_backward_keeps_the_exact_values() -> None:
    x, dy = workers.layer_rows(16, COLS, torch.float32)
    norm = _norm(torch.float32)
    xr = x.clone().requires_grad_()
    gw, gb, gx = torch.autograd.grad(norm(xr), [norm.weight, norm.bias, xr], dy, create_graph=True)
    once = _norm(torch.float32)
    xo = x.clone().requires_grad_()
    want = torch.autograd.grad(once(xo), [once.weight, once.bias], dy)
    assert bits_equal(gw.detach(), want[0]) and bits_equal(gb.detach(), want[1])
    assert gx.requires_grad and gw.requires_grad
    (g2,) = torch.autograd.grad(gw.square().sum(), [xr])
    assert torch.isfinite(g2).all() and g2.abs().sum() > 0


def test_bad_configurations_fail_clearly() -> None:
    with pytest.raises(tgn.ConfigError, match="elementwise_affine"):
        tgn.LayerNorm(8, elementwise_affine=False, weight_grad="exact")
    with pytest.raises(tgn.ConfigError, match="weight_grad"):
        tgn.LayerNorm(8, weight_grad="approx")
    norm = tgn.LayerNorm(8, weight_grad="exact", dtype=torch.float64)
    with pytest.raises(tgn.ConfigError, match="fp32, bf16 or fp16"):
        norm(torch.ones(2, 8, dtype=torch.float64, requires_grad=True))
    assert "weight_grad='exact'" in repr(tgn.LayerNorm(8, weight_grad="exact"))


def test_no_bias_and_several_trailing_dims() -> None:
    x, dy = workers.layer_rows(24, 40, torch.float32)
    flat = tgn.LayerNorm(40, bias=False, weight_grad="exact")
    shaped = tgn.LayerNorm((5, 8), bias=False, weight_grad="exact")
    flat(x.clone().requires_grad_()).backward(dy)
    shaped(x.view(24, 5, 8).clone().requires_grad_()).backward(dy.view(24, 5, 8))
    assert flat.weight.grad is not None and shaped.weight.grad is not None
    assert bits_equal(shaped.weight.grad.reshape(40), flat.weight.grad)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_world_size_gives_the_single_process_bits(world: int) -> None:
    results = run_local(workers.run_all, world, ROWS, COLS, timeout=300)
    float_differs = []
    n = 0
    for dtype_name in workers.DTYPES:
        single = workers.layer_grads(0, 1, ROWS, COLS, "even", dtype_name)
        single_float = workers.layer_grads(0, 1, ROWS, COLS, "even", dtype_name, "float")
        for layout in workers.LAYOUTS:
            for rank, result in enumerate(results):
                for got, want in zip(result["exact"][n], single):
                    assert bits_equal(got, want), (world, rank, dtype_name, layout)
            float_differs.append(any(not bits_equal(a, b) for a, b in zip(results[0]["float"][n], single_float)))
            n += 1
    if world >= 2:  # negative control: the float all-reduce moves with the split
        assert any(float_differs)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_the_forward_is_the_float_modules_bits(mode: str) -> None:
    x, _ = workers.layer_rows(ROWS, COLS, torch.bfloat16)
    exact, plain = _norm(torch.bfloat16), _norm(torch.bfloat16, "float")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with ctx():
        assert bits_equal(exact(x), plain(x))


# torch 2.13's inductor touches torch.jit.script_method on its first compile (its warning, not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_without_fullgraph_keeps_the_bits() -> None:
    x, dy = workers.layer_rows(ROWS, COLS, torch.float32)
    eager = _norm(torch.float32)
    want = _train(eager, x, dy, [range(0, 20), range(20, ROWS)])
    norm = _norm(torch.float32)
    compiled = torch.compile(norm)
    for part in (range(0, 20), range(20, ROWS)):
        idx = torch.tensor(list(part))
        compiled(x[idx].clone().requires_grad_()).backward(dy[idx])
    assert norm.weight.grad is not None and norm.bias.grad is not None
    assert bits_equal(norm.weight.grad, want[0]) and bits_equal(norm.bias.grad, want[1])
    # fullgraph=True refuses the eager accumulator (a graph break), as for RMSNorm
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)graph break|disable|skip"):
        torch.compile(_norm(torch.float32), fullgraph=True)(x[:4].clone().requires_grad_())
