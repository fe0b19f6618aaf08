"""LayerNorm's derivatives in every mode, against an independent plain-torch formula.

:func:`ref` is LayerNorm written out in fp64 torch ops (``mean``, ``var``,
``(x - mean) / sqrt(var + eps) * w + b``); its own autograd and ``torch.func`` on fp64
copies of the inputs are the oracle for forward-mode AD (``torch.autograd.forward_ad``),
``torch.func.jvp``, ``jacfwd``, ``jacrev``, ``hessian``, ``grad`` and the double
backward of ``tgn.layer_norm_sync``, ``tgn.layer_norm`` and ``tgn.LayerNorm`` (float and
exact accumulation; ``weight_grad`` float and exact; with and without weight and bias;
the fused residual form).  The primal is the plain call's bits; ``vmap`` over ``x`` is
the plain call's bits.  The raw op, which has no forward rule, refuses a tangent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwad

import taskgraph_norm as tgn
from taskgraph_norm import ops

from .helpers import assert_bits_equal
from .test_derivatives import (TOL, assert_close, check_func_transforms, check_raw_op_refuses,
                               check_residual_face, f64)

# torch.func.jvp's first call imports torch._decomp.decompositions_for_jvp, which scripts
# its decompositions with the deprecated torch.jit.script (torch's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

EPS = 1e-5
HIDDEN = 12
#: (weight, bias) present
AFFINE = [(True, True), (True, False), (False, False)]
HALF = (torch.bfloat16, torch.float16)


def ref(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float = EPS) -> torch.Tensor:
    """LayerNorm in fp64 math, two passes: ``(x - mean) / sqrt(var + eps) * w + b``."""
    xd = x.to(torch.float64)
    mean = xd.mean(dim=-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.to(torch.float64)
    if b is not None:
        y = y + b.to(torch.float64)
    return y


def inputs(dtype: torch.dtype, seed: int = 0, rows: int = 3) -> tuple[torch.Tensor, ...]:
    """``(x, w, b, t_x, t_w, t_b)``: rows of different scales and offsets, tangents."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, rows, dtype=torch.float64).unsqueeze(1)
    x = torch.randn(rows, HIDDEN, generator=g, dtype=torch.float64) * scale + 2 * scale
    w, b = 1 + torch.randn(2, HIDDEN, generator=g, dtype=torch.float64)
    t_x = torch.randn(rows, HIDDEN, generator=g, dtype=torch.float64)
    t_w, t_b = torch.randn(2, HIDDEN, generator=g, dtype=torch.float64)
    param = torch.float32 if dtype in HALF else dtype  # F.layer_norm's parameter dtypes
    return x.to(dtype), w.to(param), b.to(param), t_x.to(dtype), t_w.to(param), t_b.to(param)


def module(dtype: torch.dtype, weight_grad: str = "float", accumulate: str = "float", bias: bool = True,
           shape: tuple[int, ...] = (HIDDEN,)) -> tgn.LayerNorm:
    return tgn.LayerNorm(shape, EPS, bias=bias, dtype=torch.float32 if dtype in HALF else dtype,
                         chunk_size=4, accumulate=accumulate, weight_grad=weight_grad)


def faces(dtype: torch.dtype, accumulate: str = "float", weighted: bool = True, biased: bool = True,
          ) -> dict[str, Callable[..., Any]]:
    """Each public face as ``fn(x, w, b)`` (``w``/``b`` ignored where the call has none)."""
    options: dict[str, Any] = dict(chunk_size=4, accumulate=accumulate)

    def sync(a: torch.Tensor, w: Any, b: Any) -> Any:
        return tgn.layer_norm_sync(a, w if weighted else None, b if biased else None, EPS, **options)

    def run_async(a: torch.Tensor, w: Any, b: Any) -> Any:
        return asyncio.run(tgn.layer_norm(a, w if weighted else None, b if biased else None, EPS, **options))

    out = {"layer_norm_sync": sync, "layer_norm": run_async}
    if weighted:
        for mode in ("float", "exact") if dtype != torch.float64 else ("float",):
            m = module(dtype, mode, accumulate, bias=biased)
            params = (lambda w, b: {"weight": w, "bias": b}) if biased else (lambda w, b: {"weight": w})
            out[f"LayerNorm({mode})"] = (lambda a, w, b, m=m, params=params:
                                         torch.func.functional_call(m, params(w, b), (a,)))
    else:
        m = tgn.LayerNorm(HIDDEN, EPS, elementwise_affine=False, chunk_size=4, accumulate=accumulate)
        out["LayerNorm(no affine)"] = lambda a, w, b, m=m: m(a)
    return out


def oracle(weighted: bool, biased: bool) -> Callable[..., torch.Tensor]:
    return lambda a, w, b: ref(a, w if weighted else None, b if biased else None)


def tangent_of(fn: Callable[..., Any], primals: tuple[torch.Tensor, ...], tangents: tuple[Any, ...]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(primal, tangent)`` of ``fn`` with dual numbers (a ``None`` tangent: a plain input)."""
    with fwad.dual_level():
        duals = [p if t is None else fwad.make_dual(p, t) for p, t in zip(primals, tangents)]
        y, tan = fwad.unpack_dual(fn(*duals))
    return y, tan


def check_tangent(fn: Callable[..., Any], want_fn: Callable[..., Any], primals: tuple[torch.Tensor, ...],
                  tangents: tuple[Any, ...], dtype: torch.dtype, what: str) -> None:
    """The primal is the plain call's bits; the tangent is there, nonzero, and the oracle's."""
    with torch.no_grad():
        plain = fn(*primals)
    y, tan = tangent_of(fn, primals, tangents)
    assert_bits_equal(y, plain)
    assert tan is not None, f"{what}: the tangent was dropped"
    assert tan.dtype == y.dtype and tan.shape == y.shape, what
    assert bool(tan.abs().sum() > 0), f"{what}: a zero tangent"
    zeros = tuple(torch.zeros_like(f64(p)) for p in primals)
    _, want = torch.func.jvp(want_fn, tuple(map(f64, primals)),
                             tuple(z if t is None else f64(t) for z, t in zip(zeros, tangents)))
    assert_close(tan, want, dtype if dtype in TOL else torch.bfloat16, what)  # (fp16: bf16's looser bound)


# --- forward-mode AD through every face -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize(("weighted", "biased"), AFFINE)
def test_forward_ad_through_every_face(weighted: bool, biased: bool, accumulate: str, dtype: torch.dtype) -> None:
    x, w, b, t_x, t_w, t_b = inputs(dtype, seed=1, rows=3 if weighted else 3000)  # (3000: rows split in threads)
    primals = (x, w, b)
    combos = [(t_x, None, None)]
    if weighted:
        combos += [(None, t_w, None), (t_x, t_w, None)]
    if biased:
        combos += [(None, None, t_b), (t_x, t_w, t_b)]
    for name, fn in faces(dtype, accumulate, weighted, biased).items():
        for tangents in combos:
            what = f"{name}, tangents {[t is not None for t in tangents]}"
            check_tangent(fn, oracle(weighted, biased), primals, tangents, dtype, what)
            with torch.no_grad():  # forward AD does not depend on grad mode
                check_tangent(fn, oracle(weighted, biased), primals, tangents, dtype, what + ", no_grad")


def test_a_dropped_tangent_is_found() -> None:
    """The negative control: the check above fails on a face that drops the tangent (the
    old behaviour: the op ran the kernel below forward AD) and on the raw op itself."""
    x, w, b, t_x, _, _ = inputs(torch.float64, seed=2)

    def dropped(a: torch.Tensor, w: Any, b: Any) -> Any:
        return tgn.layer_norm_sync(a.detach(), w, b, EPS)  # the kernel on the primal: no tangent

    def zero(a: torch.Tensor, w: Any, b: Any) -> Any:
        return tgn.layer_norm_sync(a.detach(), w, b, EPS) + 0 * a

    with pytest.raises(AssertionError, match="the tangent was dropped"):
        check_tangent(dropped, oracle(True, True), (x, w, b), (t_x, None, None), torch.float64, "dropped")
    with pytest.raises(AssertionError, match="a zero tangent"):
        check_tangent(zero, oracle(True, True), (x, w, b), (t_x, None, None), torch.float64, "zero")
    with pytest.raises(AssertionError):  # a tangent that is there but wrong: the oracle's comparison
        check_tangent(lambda a, w, b: tgn.layer_norm_sync(a * 1.001, w, b, EPS), oracle(True, True), (x, w, b),
                      (t_x, None, None), torch.float64, "scaled")
    with fwad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD.*tgn.layer_norm_sync"):
        torch.ops.taskgraph_norm.layer_norm(fwad.make_dual(x, t_x), w, b, EPS, 4, "tree", "pairwise", "float")


# --- torch.func: jvp, jacfwd, jacrev, hessian, grad ------------------------------------------


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize(("weighted", "biased"), AFFINE)
def test_func_transforms_match_the_formula(weighted: bool, biased: bool, accumulate: str) -> None:
    dtype = torch.float64
    x, w, b, t_x, t_w, t_b = inputs(dtype, seed=3)
    r = oracle(weighted, biased)
    argnums = (0, 1, 2) if biased else (0, 1) if weighted else (0,)
    dy = t_x.flip(0)

    def loss(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda a, w, b: (fn(a, w, b) * dy).sum()

    for name, f in faces(dtype, accumulate, weighted, biased).items():
        if name == "layer_norm":
            continue  # (asyncio.run under a functorch transform: the sync face's path, checked above)
        # (jacrev(jacfwd): the tangent's own derivative, its statistics recomputed from x)
        check_func_transforms(name, f, r, (x, w, b), ((t_x, t_w, t_b), (t_x, t_w if weighted else 0 * t_w,
                              t_b if biased else 0 * t_b)), argnums, dy, dtype)
        gg = torch.func.grad(lambda a: (torch.func.grad(loss(f))(a, w, b) * dy).sum())(x)  # noqa: B023
        assert_close(gg, torch.func.grad(lambda a: (torch.func.grad(loss(r))(a, w, b) * dy).sum())(x), dtype,
                     f"{name}: grad of grad")


@pytest.mark.parametrize(("weighted", "biased"), AFFINE)
def test_double_backward_and_backward_of_a_tangent(weighted: bool, biased: bool) -> None:
    """Reverse mode's second order (``create_graph=True``), and a tangent differentiated by
    reverse mode: forward AD on inputs that require grad."""
    x0, w0, b0, t_x, t_w, t_b = inputs(torch.float64, seed=4)
    u = t_x.flip(1)
    got = []
    for fn in (faces(torch.float64, "float", weighted, biased)["layer_norm_sync"], oracle(weighted, biased)):
        x, w, b = (p.clone().requires_grad_() for p in (x0, w0, b0))
        wrt = [x] + ([w] if weighted else []) + ([b] if biased else [])
        first = torch.autograd.grad(fn(x, w, b), wrt, t_x, create_graph=True)
        second = torch.autograd.grad(sum((g * u).sum() for g in first[:1]) + (first[-1] * t_b).sum(), wrt,
                                     allow_unused=True)
        with fwad.dual_level():
            y = fn(fwad.make_dual(x, t_x), fwad.make_dual(w, t_w), fwad.make_dual(b, t_b))
            tan = fwad.unpack_dual(y).tangent
        through_tangent = torch.autograd.grad((tan * u).sum(), wrt, allow_unused=True)
        got.append((first, second, through_tangent))
    for a, want in zip(got[0], got[1], strict=True):
        assert_close([t for t in a if t is not None], [t for t in want if t is not None], torch.float64)


# --- vmap over x -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("rows", [3, 4096])
def test_vmap_over_x_gives_the_plain_bits(rows: int, accumulate: str, dtype: torch.dtype) -> None:
    x, w, b, *_ = inputs(dtype, seed=5, rows=rows)
    for name, fn in faces(dtype, accumulate).items():
        if name == "layer_norm":
            continue
        with torch.no_grad():
            plain = fn(x, w, b)
        for in_dims, batched in ((0, x.unsqueeze(1)), (1, x.unsqueeze(0)), (0, x.view(-1, 1, 1, HIDDEN))):
            got = torch.func.vmap(fn, in_dims=(in_dims, None, None))(batched, w, b)  # noqa: B023
            assert_bits_equal(got.reshape(plain.shape), plain)
        # vmap of vmap, and over the rows themselves (per-row 1-D calls)
        nested = torch.func.vmap(torch.func.vmap(fn, in_dims=(0, None, None)), in_dims=(0, None, None))
        assert_bits_equal(nested(x.view(1, rows, HIDDEN), w, b)[0], plain)
        assert_bits_equal(torch.func.vmap(fn, in_dims=(0, None, None))(x, w, b), plain)
        with torch.inference_mode():
            assert_bits_equal(torch.func.vmap(fn, in_dims=(0, None, None))(x.unsqueeze(1), w, b)[:, 0], plain)
        with pytest.raises(NotImplementedError, match="batches x only"):
            torch.func.vmap(fn, in_dims=(0, 0, None))(x[:2].unsqueeze(1), torch.stack([w, w]), b)  # noqa: B023


def test_vmap_of_a_gradient_over_x() -> None:
    """Per-sample gradients (vmap of grad): each sample's gradient, the formula's."""
    x, w, b, t_x, *_ = inputs(torch.float64, seed=6)
    for name, fn in faces(torch.float64).items():
        if name == "layer_norm":
            continue
        per = torch.func.vmap(torch.func.grad(lambda a, d: (fn(a, w, b) * d).sum()))(x, t_x)  # noqa: B023
        want = torch.func.vmap(torch.func.grad(lambda a, d: (ref(a, w, b) * d).sum()))(x, t_x)
        assert_close(per, want, torch.float64, name)


# --- the fused residual form ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_faces_carry_tangents_and_func_grads(dtype: torch.dtype) -> None:
    x, w, b, t_x, t_w, t_b = inputs(dtype, seed=7)
    res, t_r = x.flip(0).clone(), t_x.flip(1)
    m = module(dtype)
    residual_faces: dict[str, Callable[..., Any]] = {
        "layer_norm_sync": lambda a, r, w, b: tgn.layer_norm_sync(a, w, b, EPS, residual=r, chunk_size=4),
        "LayerNorm": lambda a, r, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (a,),
                                                                 {"residual": r}),
    }

    def want_fn(a: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = a + r
        return ref(h, w, b), h

    primals, tangents = (x, res, w, b), (t_x, t_r, t_w, t_b)
    want = torch.func.jvp(want_fn, tuple(map(f64, primals)), tuple(map(f64, tangents)))[1]
    dy = t_x.flip(0)
    grad_want = torch.func.grad(lambda *p: (want_fn(*p)[0] * f64(dy)).sum(), argnums=(0, 1, 2, 3))(
        *map(f64, primals))
    for name, fn in residual_faces.items():
        check_residual_face(name, fn, primals, tangents, (want, grad_want, dy),
                            lambda got, want, what: assert_close(got, want, dtype, what))
        with torch.no_grad():
            y0, h0 = fn(*primals)
        vy, vh = torch.func.vmap(fn, in_dims=(0, 0, None, None))(x.unsqueeze(1), res.unsqueeze(1), w, b)
        assert_bits_equal(vy[:, 0], y0)
        assert_bits_equal(vh[:, 0], h0)


# --- the module: several trailing dims, weight_grad="exact" -----------------------------------


def test_module_of_several_dims_under_jvp_jacfwd_hessian_and_vmap() -> None:
    x, _, _, t_x, *_ = inputs(torch.float64, seed=8)
    m = module(torch.float64, shape=(3, 4))
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, HIDDEN).view(3, 4))
        m.bias.copy_(torch.linspace(-1, 1, HIDDEN).view(3, 4))
    w, b = m.weight.detach().reshape(-1), m.bias.detach().reshape(-1)
    xs, ts = x.view(3, 3, 4), t_x.view(3, 3, 4)

    def want(a: torch.Tensor) -> torch.Tensor:
        return ref(a.reshape(3, HIDDEN), w, b).view(3, 3, 4)

    y, tan = torch.func.jvp(m, (xs,), (ts,))
    with torch.no_grad():
        assert_bits_equal(y, m(xs))
    assert_close(tan, torch.func.jvp(want, (xs,), (ts,))[1], torch.float64, "jvp")
    assert_close(torch.func.jacfwd(m)(xs), torch.func.jacrev(want)(xs), torch.float64, "jacfwd")
    assert_close(torch.func.hessian(lambda a: (m(a) * ts).sum())(xs),
                 torch.func.hessian(lambda a: (want(a) * ts).sum())(xs), torch.float64, "hessian")
    with torch.no_grad():
        assert_bits_equal(torch.func.vmap(m)(xs.unsqueeze(1))[:, 0], m(xs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_weight_grad_under_the_transforms(dtype: torch.dtype) -> None:
    """``weight_grad="exact"`` does what RMSNorm's does: the float mode's tangent and
    ``vmap`` over ``x``; ``func.grad`` with respect to the parameters returns this call's
    exact sums (the bits eager autograd returns); ``vmap`` over their gradient says so."""
    x, w, b, t_x, t_w, t_b = inputs(dtype, seed=9, rows=6)
    exact, floating = module(dtype, "exact"), module(dtype, "float")
    for m in (exact, floating):
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
    dy = t_x.flip(0)

    def loss(m: tgn.LayerNorm) -> Callable[..., torch.Tensor]:
        return lambda w, b: (torch.func.functional_call(m, {"weight": w, "bias": b}, (x,)) * dy).sum()

    eager = torch.autograd.grad(exact(x), [exact.weight, exact.bias], dy)
    got = torch.func.grad(loss(exact), argnums=(0, 1))(w, b)
    assert_bits_equal(got[0], eager[0])
    assert_bits_equal(got[1], eager[1])
    assert exact.weight.grad is None and exact.bias.grad is None
    want = torch.func.grad(lambda w, b: (ref(f64(x), w, b) * f64(dy)).sum(), argnums=(0, 1))(f64(w), f64(b))
    assert_close(got, want, torch.float32, "func.grad's exact dW and db")
    y, tan = torch.func.jvp(exact, (x,), (t_x,))
    with torch.no_grad():
        assert_bits_equal(y, exact(x))
    assert_close(tan, torch.func.jvp(lambda a: ref(a, f64(w), f64(b)), (f64(x),), (f64(t_x),))[1], dtype, "jvp")
    with pytest.raises(NotImplementedError, match="weight_grad='float'"):
        torch.func.jacrev(lambda w: torch.func.functional_call(exact, {"weight": w}, (x,)))(w)
    # a transform over x alone never forms dW: the float mode's values
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(exact)(x[:2]), transform(floating)(x[:2]))
    torch.testing.assert_close(torch.func.hessian(lambda a: (exact(a) * dy).sum())(x),
                               torch.func.hessian(lambda a: (floating(a) * dy).sum())(x))
    with torch.no_grad():
        assert_bits_equal(torch.func.vmap(exact)(x.unsqueeze(1))[:, 0], exact(x))


# --- what cannot carry a tangent says so --------------------------------------------------


def test_raw_op_refuses_tangents_and_grad_transforms_and_names_the_faces() -> None:
    x, w, b, t_x, *_ = inputs(torch.float32, seed=10)

    def op(a: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.taskgraph_norm.layer_norm(a, w, b, EPS, 64, "tree", "pairwise", "float")[0]
        return y

    check_raw_op_refuses(op, x, t_x, ("layer_norm has no forward-mode AD.*tgn.layer_norm_sync",
                                      "forward-mode AD.*tgn.LayerNorm", "grad transforms.*tgn.layer_norm_sync"))
    assert ops.route(x, w) == ops.DIRECT
    with fwad.dual_level():
        assert ops.route(fwad.make_dual(x, t_x), w) == ops.EAGER
