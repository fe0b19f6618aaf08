"""LayerNorm's autograd through the pipeline's backward (issue 23): derivatives against an
independent plain-torch fp64 formula, ``gradcheck`` and ``gradgradcheck``, ``dx``'s batch
invariance, ``dW``/``db`` over fixed row blocks, and the compiled backward's bits."""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.constants import BACKWARD_ROW_BLOCK
from taskgraph_norm.prover.witness import bits

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _inputs(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) * 2 + 1).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)
    b = torch.randn(hidden, generator=g).to(dtype)
    dy = torch.randn(rows, hidden, generator=g).to(dtype)
    return x, w, b, dy


def _fp64_grads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor,
                eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """Plain fp64 torch, written out (not F.layer_norm): an independent oracle."""
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + eps) * wd + bd
    return torch.autograd.grad(y, (xd, wd, bd), dy.double())


def _ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor,
          **options: object) -> tuple[torch.Tensor, ...]:
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = tgn.layer_norm_sync(xs, ws, bs, **options)  # type: ignore[arg-type]
    return torch.autograd.grad(y, (xs, ws, bs), dy)


@pytest.mark.parametrize("options", [{}, {"accumulate": "exact"}, {"topology": "race", "chunk_size": 16},
                                     {"topology": "standard"}, {"topology": "linear", "leaf": "native"}],
                         ids=["tree", "exact", "race", "standard", "linear-native"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float64, 1e-10), (torch.bfloat16, 1e-1)])
def test_first_derivatives_match_the_fp64_formula(options: dict[str, object], dtype: torch.dtype,
                                                  tol: float) -> None:
    x, w, b, dy = _inputs(70, 300, dtype)
    ours = _ours(x, w, b, dy, **options)
    want = _fp64_grads(x, w, b, dy)
    for got, ref in zip(ours, want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_gradcheck_and_second_order() -> None:
    x, w, b, _ = _inputs(4, 24, torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = tgn.layer_norm_sync(x, w, b, chunk_size=8)
        return y

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    no_affine = inputs[0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tgn.layer_norm_sync(t, chunk_size=8), (no_affine,))


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dx_is_batch_invariant(accumulate: str, dtype: torch.dtype) -> None:
    x, w, b, dy = _inputs(300, 1024, dtype)
    dx_batch = _ours(x, w, b, dy, accumulate=accumulate)[0]
    for i in (0, 150, 299):
        dx_one = _ours(x[i:i + 1], w, b, dy[i:i + 1], accumulate=accumulate)[0]
        assert torch.equal(bits(dx_one[0]), bits(dx_batch[i]))


def _halve(s: torch.Tensor) -> torch.Tensor:
    s = s.clone()
    n = s.shape[0]
    while n > 1:
        h = (n + 1) // 2
        s[: n - h] = s[: n - h] + s[h:n]
        n = h
    return s[0]


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """Sum over rows in blocks of BACKWARD_ROW_BLOCK (pairwise halving in a block), the
    blocks merged by adjacent pairs level by level: written out again here."""
    parts = [_halve(t[i:i + BACKWARD_ROW_BLOCK]) for i in range(0, t.shape[0], BACKWARD_ROW_BLOCK)]
    while len(parts) > 1:
        nxt = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]


def test_dw_and_db_sum_over_fixed_row_blocks() -> None:
    rows = 3 * BACKWARD_ROW_BLOCK + 5
    x, w, b, dy = _inputs(rows, 96, torch.float32, seed=2)
    _, dw, db = _ours(x, w, b, dy, chunk_size=32)
    xa = x.float()
    total = xa.clone()
    # the tree over 3 chunks of 32 with pairwise leaves: recompute mean and den as the plan does
    leaves = [_halve(total[:, a:a + 32].t()) for a in (0, 32, 64)]
    s = (leaves[0] + leaves[1]) + leaves[2]
    m = (s / torch.full_like(s, 96)).unsqueeze(1)
    d = xa - m
    sq = d * d
    leaves = [_halve(sq[:, a:a + 32].t()) for a in (0, 32, 64)]
    v = ((leaves[0] + leaves[1]) + leaves[2]).unsqueeze(1)
    den = torch.sqrt((v / torch.full_like(v, 96) + 1e-5).double()).float()
    assert torch.equal(bits(db), bits(_blocks(dy.float())))
    assert torch.equal(bits(dw), bits(_blocks(dy.float() * (d / den))))
    # the same batch gives the same bits again
    again = _ours(x, w, b, dy, chunk_size=32)
    assert torch.equal(bits(again[1]), bits(dw)) and torch.equal(bits(again[2]), bits(db))


def test_compiled_backward_is_the_eager_backward() -> None:
    x, w, b, dy = _inputs(40, 512, torch.float32)
    m = tgn.LayerNorm(512)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    grads = []
    for fn in (m, compiled):
        m.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        fn(xs).backward(dy)
        assert xs.grad is not None and m.weight.grad is not None and m.bias.grad is not None
        grads.append((xs.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    for eager, comp in zip(*grads):
        assert torch.equal(bits(eager), bits(comp))


def test_grad_of_residual_and_mixed_dtype_parameters() -> None:
    x, w, b, dy = _inputs(8, 64, torch.bfloat16)
    r = _inputs(8, 64, torch.bfloat16, seed=9)[0]
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    wf, bf = w.float().requires_grad_(), b.float().requires_grad_()  # fp32 parameters, bf16 input
    y, h = tgn.layer_norm_sync(xs, wf, bf, residual=rs)
    assert y.dtype == torch.bfloat16 and torch.equal(h, x + r)
    y.backward(dy)
    assert xs.grad is not None and rs.grad is not None and wf.grad is not None and bf.grad is not None
    assert torch.equal(xs.grad, rs.grad) and wf.grad.dtype == torch.float32 and bf.grad.dtype == torch.float32
