"""``weight_grad="exact"`` is still an autograd gradient (DESIGN section 11).

``autograd.grad`` with respect to the weight and ``torch.func.grad`` return this
call's ``dW``, correctly rounded (checked against ``truth``: the ``Fraction`` sum
of the products, rounded independently); ``backward(inputs=[x])`` leaves
``weight.grad`` alone; hooks on the weight see this call's ``dW`` and what they
return is what is accumulated, exactly; only the accumulation into ``.grad``
across backward calls is exact, and it stays the same bits for every
micro-batching, with ``autograd.grad`` calls and shared weights in between (the
float mode over the same micro-batchings is the negative control).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.ops.exact_grad import ExactSum
from taskgraph_norm.kernels import exact_sum as es

from .helpers import assert_bits_equal, bits_equal
from .test_derivatives import ref
from .test_exact_grad import truth

# torch.func.jvp's first call scripts decompositions with the deprecated torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

ROWS, HIDDEN = 24, 32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def data(dtype: torch.dtype = torch.float32, rows: int = ROWS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of very different scales and a ``dy`` spanning binades: float sums show their order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, HIDDEN, generator=g) * torch.exp(2 * torch.randn(rows, 1, generator=g))
    spread = 1.0 if dtype == torch.float16 else 3.0
    dy = torch.randn(rows, HIDDEN, generator=g) * torch.exp(spread * torch.randn(rows, HIDDEN, generator=g))
    return x.to(dtype), dy.to(dtype)


def exact_norm(dtype: torch.dtype = torch.float32, mode: str = "exact", **options: object) -> tgn.RMSNorm:
    norm = tgn.RMSNorm(HIDDEN, weight_grad=mode, dtype=dtype, chunk_size=8, **options)  # type: ignore[arg-type]
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, HIDDEN))
    return norm


def dw_truth(x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The correctly rounded exact sum of ``dy * x_hat`` (``x_hat = normalize(x, None)`` through the norm's graph)."""
    return truth(dy.float(), tgn.normalize_sync(x, None, chunk_size=8).float(), dtype)


def exact_value_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """The correctly rounded exact sum of float tensors."""
    total = ExactSum(values[0].numel())
    for v in values:
        total.add_values(v.reshape(1, -1))
    return total.result(values[0].dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_grad_returns_this_calls_correctly_rounded_dw(dtype: torch.dtype) -> None:
    x, dy = data(dtype)
    norm = exact_norm(dtype)
    norm(x[:5].clone().requires_grad_()).backward(dy[:5])  # a grad to leave alone
    before = norm.weight.grad.clone()  # type: ignore[union-attr]
    for rows in (slice(0, ROWS), slice(3, 11)):
        (dw,) = torch.autograd.grad(norm(x[rows].clone().requires_grad_()), [norm.weight], dy[rows])
        assert_bits_equal(dw, dw_truth(x[rows], dy[rows], dtype))  # this call's, not the carried sum
        assert_bits_equal(norm.weight.grad, before)  # type: ignore[arg-type]


def test_multi_dim_weight_and_both_inputs() -> None:
    x, dy = data()
    norm = tgn.RMSNorm((4, 8), weight_grad="exact", chunk_size=8)
    xi = x.view(ROWS, 4, 8).clone().requires_grad_()
    dx, dw = torch.autograd.grad(norm(xi), [xi, norm.weight], dy.view(ROWS, 4, 8))
    assert dw.shape == (4, 8)
    assert_bits_equal(dw.flatten(), dw_truth(x, dy, torch.float32))
    float_norm = tgn.RMSNorm((4, 8), chunk_size=8)
    (dx_float,) = torch.autograd.grad(float_norm(xi), [xi], dy.view(ROWS, 4, 8))
    assert_bits_equal(dx, dx_float)  # dx is the float backward's


def test_backward_with_inputs_x_leaves_weight_grad_alone_and_nothing_leaks() -> None:
    x, dy = data()
    norm = exact_norm()
    xi = x[:10].clone().requires_grad_()
    norm(xi).backward(dy[:10], inputs=[xi])
    assert norm.weight.grad is None and xi.grad is not None
    norm(x[:10].clone().requires_grad_()).backward(dy[:10])
    grad = norm.weight.grad
    assert grad is not None
    first = grad.clone()
    for call in ("inputs", "autograd.grad x", "autograd.grad w", "retain, inputs then all"):
        xi = x[10:].clone().requires_grad_()
        y = norm(xi)
        if call == "inputs":
            y.backward(dy[10:], inputs=[xi])
        elif call == "autograd.grad x":
            torch.autograd.grad(y, [xi], dy[10:])
        elif call == "autograd.grad w":
            torch.autograd.grad(y, [norm.weight], dy[10:])
        else:
            y.backward(dy[10:], inputs=[xi], retain_graph=True)
            y.backward(dy[10:])  # the same graph again, now accumulating: counted once
            break
        assert norm.weight.grad is grad, call
        assert_bits_equal(norm.weight.grad, first, call)
    # Whatever was formed and not accumulated above is gone: the rows once each.
    assert_bits_equal(norm.weight.grad, dw_truth(x, dy, torch.float32))


@pytest.mark.parametrize("registered", ["before the first forward", "after the first backward"])
def test_hooks_see_this_calls_dw_and_their_result_is_accumulated_exactly(registered: str) -> None:
    x, dy = data()
    norm = exact_norm()
    seen: list[torch.Tensor] = []

    def double(g: torch.Tensor) -> torch.Tensor:
        seen.append(g.clone())
        return g * 2

    parts = [slice(0, 7), slice(7, 20), slice(20, ROWS)]
    first_hooked = 0 if registered == "before the first forward" else 1
    for n, rows in enumerate(parts):
        if n == first_hooked:
            norm.weight.register_hook(double)
        norm(x[rows].clone().requires_grad_()).backward(dy[rows])
    dws = [dw_truth(x[rows], dy[rows], torch.float32) for rows in parts]
    for got, want in zip(seen, dws[first_hooked:], strict=True):
        assert_bits_equal(got, want)  # the hook saw this call's dW
    # what the hooks returned, summed exactly (after the unhooked rows' exact products)
    want_sum = ExactSum(HIDDEN)
    if first_hooked:
        want_sum.add_products(dy[parts[0]], tgn.normalize_sync(x[parts[0]], None, chunk_size=8))
    for dw in dws[first_hooked:]:
        want_sum.add_values((2 * dw).reshape(1, -1))
    assert_bits_equal(norm.weight.grad, want_sum.result())  # type: ignore[arg-type]
    # control: summing the rounded per-call dW instead of their exact states differs
    assert not bits_equal(exact_value_sum(dws), dw_truth(x, dy, torch.float32))


def test_a_hook_registered_after_the_last_forward_is_accumulated_as_autograd_does() -> None:
    x, dy = data()
    norm = exact_norm()
    norm(x[:12].clone().requires_grad_()).backward(dy[:12])
    prev = norm.weight.grad.clone()  # type: ignore[union-attr]
    y = norm(x[12:].clone().requires_grad_())
    handle = norm.weight.register_hook(lambda g: g * 2)  # runs after the exact hook saw dW
    y.backward(dy[12:])
    handle.remove()
    assert_bits_equal(norm.weight.grad, prev + 2 * dw_truth(x[12:], dy[12:], torch.float32))  # type: ignore[arg-type]
    # ... and the next backward starts exactly from that value
    after = norm.weight.grad.clone()  # type: ignore[union-attr]
    norm(x[:3].clone().requires_grad_()).backward(dy[:3])
    want = ExactSum(HIDDEN).add_values(after.reshape(1, -1))
    want.add_products(dy[:3], tgn.normalize_sync(x[:3], None, chunk_size=8))
    assert_bits_equal(norm.weight.grad, want.result())  # type: ignore[arg-type]


def test_func_grad_through_functional_call_returns_dw() -> None:
    x, dy = data()
    norm = exact_norm()
    w = norm.weight.detach().clone()

    def loss(weight: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(norm, {"weight": weight}, (x,)) * dy).sum()

    assert_bits_equal(torch.func.grad(loss)(w), dw_truth(x, dy, torch.float32))
    assert norm.weight.grad is None
    # vmap over the weight's gradient cannot form one exact sum per sample: it says so
    with pytest.raises(NotImplementedError, match="weight_grad='float'"):
        torch.func.jacrev(lambda weight: torch.func.functional_call(norm, {"weight": weight}, (x[:2],)))(w)
    # a transform over x alone never forms dW: jacrev works, with the float mode's values
    jac = torch.func.jacrev(norm)(x[:2])
    torch.testing.assert_close(jac, torch.func.jacrev(exact_norm(mode="float"))(x[:2]))


def test_create_graph_gives_the_exact_dw_and_true_second_derivatives() -> None:
    x, dy = data(torch.float32, rows=6)
    norm = exact_norm(casting_mode="gemma", offset=1.0)
    xi = x.clone().requires_grad_()
    dx, dw = torch.autograd.grad(norm(xi), [xi, norm.weight], dy, create_graph=True)
    assert_bits_equal(dw.detach(), dw_truth(x, dy, torch.float32))
    u = torch.linspace(-1, 1, HIDDEN)
    (second,) = torch.autograd.grad((dx * dy).sum() + (dw * u).sum(), [xi])
    xr, wr = x.double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    dxr, dwr = torch.autograd.grad(ref(xr, wr, norm_eps(), "gemma", 1.0), [xr, wr], dy.double(), create_graph=True)
    (want,) = torch.autograd.grad((dxr * dy.double()).sum() + (dwr * u.double()).sum(), [xr])
    torch.testing.assert_close(second.double(), want, rtol=1e-4, atol=1e-4)


def norm_eps() -> float:
    return torch.finfo(torch.float32).eps


def test_forward_ad_through_the_exact_module() -> None:
    x, dy = data(torch.float32, rows=6)
    norm = exact_norm(casting_mode="llama", offset=0.5)
    with torch.no_grad():
        plain = norm(x)
    tangent = torch.linspace(-2, 2, HIDDEN).expand(6, HIDDEN)
    y, tan = torch.func.jvp(norm, (x,), (tangent,))
    assert_bits_equal(y, plain)
    want = torch.func.jvp(lambda a: ref(a, norm.weight.detach().double(), norm_eps(), "llama", 0.5),
                          (x.double(),), (tangent.double(),))[1]
    torch.testing.assert_close(tan.double(), want, rtol=2e-4, atol=2e-4)


# --- the exact accumulation across backward calls ----------------------------------------


def _accumulated(mode: str, parts: int, seed: int, schedule: str) -> torch.Tensor:
    """``weight.grad`` after every row once, in ``parts`` micro-batches in a shuffled
    order; ``schedule`` mixes in autograd.grad calls and shared weights."""
    x, dy = data(rows=96, seed=7)
    norm = exact_norm(mode=mode)
    order = list(range(96))
    random.Random(seed).shuffle(order)
    chunks = [order[k::parts] for k in range(parts)]
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    for n, rows in enumerate(chunks):
        if schedule == "autograd.grad between" and n % 2:
            torch.autograd.grad(norm(x[rows].clone().requires_grad_()), [norm.weight], dy[rows])
        if schedule == "shared weight" and len(chunks) > 1:  # several forwards, one backward
            pending.append((norm(x[rows].clone().requires_grad_()), dy[rows]))
            if len(pending) == 3 or n == len(chunks) - 1:
                sum((y * d).sum() for y, d in pending).backward()  # type: ignore[union-attr]
                pending = []
            continue
        norm(x[rows].clone().requires_grad_()).backward(dy[rows])
    assert norm.weight.grad is not None
    return norm.weight.grad.clone()


@pytest.mark.parametrize("schedule", ["plain", "autograd.grad between", "shared weight"])
def test_micro_batchings_give_the_same_bits(schedule: str) -> None:
    one = _accumulated("exact", 1, 0, "plain")
    x, dy = data(rows=96, seed=7)
    assert_bits_equal(one, dw_truth(x, dy, torch.float32))
    for parts in (2, 5, 8):
        for seed in (1, 2):
            assert_bits_equal(_accumulated("exact", parts, seed, schedule), one, f"{parts} micro-batches")
    # Negative control: the float mode over the same micro-batchings moves.
    floats = [_accumulated("float", parts, 1, schedule) for parts in (1, 2, 5, 8)]
    assert any(not bits_equal(f, floats[0]) for f in floats[1:])


def test_a_weight_used_elsewhere_too_keeps_the_other_gradient() -> None:
    x, dy = data()
    norm = exact_norm()
    c = torch.linspace(-3, 3, HIDDEN)
    uses: list[Callable[[], torch.Tensor]] = [
        lambda: (norm(x.clone().requires_grad_()) * dy).sum() + (norm.weight * c).sum(),
        lambda: (norm.weight * c).sum() + (norm(x.clone().requires_grad_()) * dy).sum(),
    ]
    for use in uses:
        norm.weight.grad = None
        use().backward()
        # the float sum autograd formed: this call's exact dW plus c, nothing dropped
        assert_bits_equal(norm.weight.grad, dw_truth(x, dy, torch.float32) + c)  # type: ignore[arg-type]


def test_merge_gives_the_normal_form_of_the_sum() -> None:
    """``ExactSum.merge`` carries over the digits in use only: the same normal form as
    ``normalize_`` over all of them, including carries through digits at the edges of
    the balanced range and into the digit above the highest one in use."""
    top = es.DIGITS - 1
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        states = []
        for _ in range(2):
            state = es.empty_state(16)
            lo = int(torch.randint(0, top, (1,), generator=g))
            hi = int(torch.randint(lo + 1, top + 2, (1,), generator=g))
            state[lo:min(hi, top)] = torch.randint(-2**31, 2**31, (min(hi, top) - lo, 16), generator=g)
            if hi > top:
                state[top] = torch.randint(-2**20, 2**20, (16,), generator=g)
            edge = (torch.rand(top, 16, generator=g) < 0.3) & (state[:top] != 0)
            state[:top][edge] = 2**31 - 1 if seed % 2 else -2**31
            states.append(es.normalize_(state))
        want = es.normalize_(states[0] + states[1])
        assert torch.equal(ExactSum.from_state(states[0]).merge(ExactSum.from_state(states[1])).state, want)
