"""Derivatives of every order and mode, against an independent plain-torch formula.

:func:`ref` is RMSNorm written out in fp64 torch ops (DESIGN section 10's casting
modes, the offset added to the weight); its own autograd, on fp64 copies of the
inputs, is the oracle for the first and second order reverse derivatives, the
``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``jacfwd``,
``hessian``) and forward-mode AD (``torch.autograd.forward_ad``) of
``taskgraph_norm.ops.rms_norm``, ``tgn.RMSNorm`` and ``tgn.normalize_sync``.  The
raw ``torch.library`` ops, which have no forward rule, must refuse a tangent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwad
from torch.utils._pytree import tree_leaves

import taskgraph_norm as tgn
from taskgraph_norm import ops
from taskgraph_norm.ops import library

from .helpers import assert_bits_equal

# torch.func.jvp's first call imports torch._decomp.decompositions_for_jvp, which scripts
# its decompositions with the deprecated torch.jit.script (torch's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

EPS = 1e-6
HIDDEN = 16
MODES = ("torch", "llama", "gemma")
#: (weighted, offset): an offset is added to the weight, so it needs one
WEIGHTS = [(True, 0.0), (True, 0.5), (True, 1.0), (False, 0.0)]
CASES = [(mode, weighted, offset) for mode in MODES for weighted, offset in WEIGHTS]
#: (rtol, atol) of a result in this dtype against the fp64 oracle
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.bfloat16: (3e-2, 3e-2)}


def ref(x: torch.Tensor, w: torch.Tensor | None, eps: float, casting_mode: str = "torch",
        offset: float = 0.0) -> torch.Tensor:
    """RMSNorm in fp64 math: ``y = x / sqrt(mean(x**2) + eps) * (w + offset)``, rounded as
    ``casting_mode`` says (``"llama"``: ``x_hat`` rounded to ``x``'s dtype before the
    weight, the product in the promoted dtype; otherwise one rounding to ``x``'s dtype).
    On fp64 inputs every rounding is the identity, so its autograd is the exact
    derivative's fp64 value."""
    xd = x.to(torch.float64)
    x_hat = xd / torch.sqrt(torch.mean(xd * xd, dim=-1, keepdim=True) + eps)
    if casting_mode == "llama":
        x_hat = x_hat.to(x.dtype).to(torch.float64)
        out = x.dtype if w is None else torch.promote_types(x.dtype, w.dtype)
    else:
        out = x.dtype
    y = x_hat if w is None else x_hat * (w.to(torch.float64) + offset)
    return y.to(out)


def inputs(dtype: torch.dtype, weighted: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                        torch.Tensor, torch.Tensor]:
    """``(x, w, t_x, t_w)``: rows of different scales, a weight away from 1, tangents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, HIDDEN, generator=g, dtype=torch.float64) * torch.tensor([[0.5], [1.0], [3.0]],
                                                                                  dtype=torch.float64)
    w = torch.randn(HIDDEN, generator=g, dtype=torch.float64) if weighted else None
    t_x, t_w = torch.randn(3, HIDDEN, generator=g, dtype=torch.float64), torch.randn(HIDDEN, generator=g,
                                                                                       dtype=torch.float64)
    return x.to(dtype), None if w is None else w.to(dtype), t_x.to(dtype), t_w.to(dtype)


def f64(t: Any) -> Any:
    return None if t is None else t.detach().to(torch.float64)


def assert_close(got: Any, want: Any, dtype: torch.dtype, what: str = "") -> None:
    rtol, atol = TOL[dtype]
    for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
        a, b = a.detach(), b.detach()
        assert a.dtype == dtype or dtype == torch.bfloat16, what
        scale = float(b.abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a.to(torch.float64), b, rtol=rtol, atol=atol * max(scale, 1.0), msg=what)


def norm_fn(casting_mode: str, offset: float) -> Callable[..., torch.Tensor]:
    return lambda a, b: ops.rms_norm(a, b, EPS, chunk_size=4, casting_mode=casting_mode, offset=offset)


def ref_fn(casting_mode: str, offset: float) -> Callable[..., torch.Tensor]:
    return lambda a, b: ref(a, b, EPS, casting_mode, offset)


# --- reverse mode: first and second order ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("casting_mode", "weighted", "offset"), CASES)
def test_first_and_second_order(casting_mode: str, weighted: bool, offset: float, dtype: torch.dtype) -> None:
    x0, w0, u, v = inputs(dtype, weighted)
    dy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = []
    for create_graph in (False, True):
        x = x0.clone().requires_grad_()
        w = None if w0 is None else w0.clone().requires_grad_()
        y = norm_fn(casting_mode, offset)(x, w)
        wrt = [x] if w is None else [x, w]
        grads = torch.autograd.grad(y, wrt, dy.to(y.dtype), create_graph=create_graph)
        got.append(grads)
        if create_graph:  # second order: the gradient of <dx, u> + <dW, v>
            inner = (grads[0] * u).sum() + (0 if w is None else (grads[1] * v).sum())
            got.append(torch.autograd.grad(inner, wrt))
    xr = f64(x0).requires_grad_()
    wr = None if w0 is None else f64(w0).requires_grad_()
    wrt_r = [xr] if wr is None else [xr, wr]
    first = torch.autograd.grad(ref(xr, wr, EPS, casting_mode, offset), wrt_r, f64(dy), create_graph=True)
    inner_r = (first[0] * f64(u)).sum() + (0 if wr is None else (first[1] * f64(v)).sum())
    second = torch.autograd.grad(inner_r, wrt_r)
    assert_close(got[0], first, dtype, "first order")
    assert_close(got[1], first, dtype, "first order, create_graph=True")
    assert_close(got[2], second, dtype, "second order")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("casting_mode", "weighted", "offset"), CASES)
def test_func_grad_vmap_and_jacrev(casting_mode: str, weighted: bool, offset: float, dtype: torch.dtype) -> None:
    x, w, dy, _ = inputs(dtype, weighted, seed=2)
    f, r = norm_fn(casting_mode, offset), ref_fn(casting_mode, offset)
    argnums = (0,) if w is None else (0, 1)

    def loss(fn: Callable[..., torch.Tensor], dy: torch.Tensor) -> Callable[..., torch.Tensor]:
        return lambda a, b: (fn(a, b) * dy.to(a.dtype)).sum()

    grads = torch.func.grad(loss(f, dy), argnums=argnums)(x, w)
    assert_close(grads, torch.func.grad(loss(r, f64(dy)), argnums=argnums)(f64(x), f64(w)), dtype, "func.grad")
    # grad of grad: the second derivative along dy
    gg = torch.func.grad(lambda a: (torch.func.grad(loss(f, dy))(a, w) * dy).sum())(x)
    gg_ref = torch.func.grad(lambda a: (torch.func.grad(loss(r, f64(dy)))(a, f64(w)) * f64(dy)).sum())(f64(x))
    assert_close(gg, gg_ref, dtype, "func.grad of func.grad")
    # vmap: rows are independent, so the eager bits; and the formula's values
    batched = torch.func.vmap(f, in_dims=(0, None))(x.unsqueeze(1), w)[:, 0]
    with torch.no_grad():
        assert_bits_equal(batched, f(x, w))
    assert_close(batched, r(f64(x), f64(w)), dtype, "vmap")
    jac = torch.func.jacrev(f, argnums=argnums)(x, w)
    assert_close(jac, torch.func.jacrev(r, argnums=argnums)(f64(x), f64(w)), dtype, "jacrev")


# --- forward mode ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("casting_mode", "weighted", "offset"), CASES)
def test_func_jvp_jacfwd_and_hessian(casting_mode: str, weighted: bool, offset: float, dtype: torch.dtype) -> None:
    x, w, t_x, t_w = inputs(dtype, weighted, seed=3)
    f, r = norm_fn(casting_mode, offset), ref_fn(casting_mode, offset)
    primals, tangents = ((x,), (t_x,)) if w is None else ((x, w), (t_x, t_w))
    as64 = tuple(f64(p) for p in primals), tuple(f64(t) for t in tangents)
    y, tan = torch.func.jvp(lambda *p: f(p[0], w if len(p) == 1 else p[1]), primals, tangents)
    y_ref, tan_ref = torch.func.jvp(lambda *p: r(p[0], f64(w) if len(p) == 1 else p[1]), *as64)
    with torch.no_grad():
        assert_bits_equal(y, f(x, w))  # the primal is the kernel's own bits
    assert_close(tan, tan_ref, dtype, "jvp")
    argnums = (0,) if w is None else (0, 1)
    assert_close(torch.func.jacfwd(f, argnums=argnums)(x, w),
                 torch.func.jacrev(r, argnums=argnums)(f64(x), f64(w)), dtype, "jacfwd")
    dy = t_x.flip(0)

    def loss(fn: Callable[..., torch.Tensor], dy: torch.Tensor) -> Callable[..., torch.Tensor]:
        return lambda a, b: (fn(a, b) * dy).sum()

    assert_close(torch.func.hessian(loss(f, dy), argnums=argnums)(x, w),
                 torch.func.hessian(loss(r, f64(dy)), argnums=argnums)(f64(x), f64(w)), dtype, "hessian")


def _faces(dtype: torch.dtype, w: torch.Tensor, casting_mode: str, offset: float) -> dict[str, Callable[..., Any]]:
    """Each public face as ``fn(x, weight)``; the module's weight is copied in."""
    module = tgn.RMSNorm(HIDDEN, EPS, dtype=dtype, chunk_size=4, casting_mode=casting_mode, offset=offset)
    with torch.no_grad():
        module.weight.copy_(w)
    options: dict[str, Any] = dict(chunk_size=4, casting_mode=casting_mode, offset=offset)
    return {
        "ops.rms_norm": lambda a, b: ops.rms_norm(a, b, EPS, **options),
        "normalize_sync": lambda a, b: tgn.normalize_sync(a, b, EPS, **options),
        "RMSNorm": lambda a, b: torch.func.functional_call(module, {"weight": b}, (a,)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("casting_mode", "offset"), [("torch", 0.0), ("llama", 0.5), ("gemma", 1.0)])
def test_forward_ad_through_every_face(casting_mode: str, offset: float, dtype: torch.dtype) -> None:
    x, w, t_x, t_w = inputs(dtype, True, seed=4)
    assert w is not None
    r = ref_fn(casting_mode, offset)
    for name, fn in _faces(dtype, w, casting_mode, offset).items():
        with torch.no_grad():
            plain = fn(x, w)
        for tangents in ((t_x, None), (None, t_w), (t_x, t_w)):
            with fwad.dual_level():
                duals = [p if t is None else fwad.make_dual(p, t) for p, t in zip((x, w), tangents)]
                y, tan = fwad.unpack_dual(fn(*duals))
            assert tan is not None, f"{name}: no tangent"
            assert tan.dtype == y.dtype
            assert_bits_equal(y, plain)
            _, want = torch.func.jvp(r, (f64(x), f64(w)), tuple(f64(torch.zeros_like(p) if t is None else t)
                                                                for p, t in zip((x, w), tangents)))
            assert_close(tan, want, dtype, f"{name}, tangents {[t is not None for t in tangents]}")


@pytest.mark.parametrize(("casting_mode", "weighted", "offset"), CASES)
def test_a_tangent_is_differentiable_in_x(casting_mode: str, weighted: bool, offset: float,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Reverse over forward: ``jacrev(jacfwd(f))`` and autograd through a tangent of inputs
    that require grad.  The tangent's ``rms`` is recomputed from ``x``: the forward's, a
    constant, would miss its derivative (the control: that tangent's derivative differs)."""
    x, w, t_x, _ = inputs(torch.float64, weighted, seed=11)
    f, r = norm_fn(casting_mode, offset), ref_fn(casting_mode, offset)
    u = t_x.flip(1)

    def through(fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        xr = x.clone().requires_grad_()
        with fwad.dual_level():
            tan = fwad.unpack_dual(fn(fwad.make_dual(xr, t_x), w)).tangent
        return torch.autograd.grad((tan * u).sum(), xr)[0]

    want = through(r)
    assert_close(through(f), want, torch.float64, "autograd through the tangent")
    jac = torch.func.jacrev(lambda a: torch.func.jvp(lambda b: f(b, w), (a,), (t_x,))[1])(x)
    assert_close(jac, torch.func.jacrev(lambda a: torch.func.jvp(lambda b: r(b, w), (a,), (t_x,))[1])(x),
                 torch.float64, "jacrev(jvp)")

    def frozen_rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float, t_x: torch.Tensor, *_: Any
                   ) -> torch.Tensor:  # the control: the old tangent, the forward's rms a constant
        rms = torch.sqrt(torch.mean(x.detach() ** 2, dim=-1, keepdim=True) + eps)
        d_hat = (t_x - x / rms * torch.mean(x / rms * t_x, dim=-1, keepdim=True)) / rms
        return d_hat if weight is None else d_hat * (weight + offset)

    monkeypatch.setattr(library, "norm_tangent", frozen_rms)
    with pytest.raises(AssertionError):
        assert_close(through(f), want, torch.float64, "control")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_under_jvp_jacfwd_and_hessian(dtype: torch.dtype) -> None:
    x, w, t_x, _ = inputs(dtype, True, seed=5)
    assert w is not None
    module = _faces(dtype, w, "gemma", 1.0)["RMSNorm"]
    norm = lambda a: module(a, w)  # noqa: E731
    oracle = lambda a: ref(a, f64(w), EPS, "gemma", 1.0)  # noqa: E731
    assert_close(torch.func.jvp(norm, (x,), (t_x,))[1], torch.func.jvp(oracle, (f64(x),), (f64(t_x),))[1],
                 dtype, "jvp")
    assert_close(torch.func.jacfwd(norm)(x), torch.func.jacrev(oracle)(f64(x)), dtype, "jacfwd")
    dy = t_x.flip(1)
    assert_close(torch.func.hessian(lambda a: (norm(a) * dy).sum())(x),
                 torch.func.hessian(lambda a: (oracle(a) * f64(dy)).sum())(f64(x)), dtype, "hessian")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_faces_carry_tangents_and_func_grads(dtype: torch.dtype) -> None:
    x, w, t_x, t_w = inputs(dtype, True, seed=6)
    assert w is not None
    res, t_r = t_w.expand(3, HIDDEN).clone(), t_x.flip(0)
    module = tgn.RMSNorm(HIDDEN, EPS, dtype=dtype, chunk_size=4, casting_mode="gemma", offset=1.0)
    with torch.no_grad():
        module.weight.copy_(w)
    options: dict[str, Any] = dict(chunk_size=4, casting_mode="gemma", offset=1.0)
    faces = {
        "ops.rms_norm_residual": lambda a, b, c: ops.rms_norm_residual(a, b, c, EPS, **options),
        "normalize_sync": lambda a, b, c: tgn.normalize_sync(a, c, EPS, residual=b, **options),
        "RMSNorm": lambda a, b, c: torch.func.functional_call(module, {"weight": c}, (a,), {"residual": b}),
    }

    def oracle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = a + b
        return ref(h, c, EPS, "gemma", 1.0), h

    primals, tangents = (x, res, w), (t_x, t_r, t_w)
    want = torch.func.jvp(oracle, tuple(map(f64, primals)), tuple(map(f64, tangents)))[1]
    dy = t_x.flip(1)
    grad_want = torch.func.grad(lambda *p: (oracle(*p)[0] * f64(dy)).sum(), argnums=(0, 1, 2))(*map(f64, primals))
    for name, fn in faces.items():
        check_residual_face(name, fn, primals, tangents, (want, grad_want, dy),
                            lambda got, want, what: assert_close(got, want, dtype, what))


def check_residual_face(name: str, fn: Callable[..., Any], primals: tuple[torch.Tensor, ...],
                        tangents: tuple[torch.Tensor, ...], oracle: tuple[Any, Any, torch.Tensor],
                        close: Callable[[Any, Any, str], None]) -> None:
    """A residual face ``fn(*primals) -> (y, h)`` under forward AD, ``func.jvp`` and
    ``func.grad``: the primals are the plain call's bits, the derivatives ``close`` to the
    oracle's ``(tangents of (y, h), grads of <y, dy> over every primal, dy)``."""
    want, grad_want, dy = oracle
    with torch.no_grad():
        y0, h0 = fn(*primals)
    with fwad.dual_level():
        y, h = fn(*(fwad.make_dual(p, t) for p, t in zip(primals, tangents)))
        (yp, ty), (hp, th) = fwad.unpack_dual(y), fwad.unpack_dual(h)
    assert ty is not None and th is not None, name
    assert_bits_equal(yp, y0)
    assert_bits_equal(hp, h0)
    close((ty, th), want, f"{name}: forward_ad")
    close(torch.func.jvp(fn, primals, tangents)[1], want, f"{name}: func.jvp")
    argnums = tuple(range(len(primals)))
    close(torch.func.grad(lambda *p: (fn(*p)[0] * dy).sum(), argnums=argnums)(*primals), grad_want,
          f"{name}: func.grad")


def check_func_transforms(name: str, f: Callable[..., torch.Tensor], r: Callable[..., torch.Tensor],
                          primals: tuple[torch.Tensor, ...], tangents: tuple[tuple[torch.Tensor, ...], ...],
                          argnums: tuple[int, ...], dy: torch.Tensor, dtype: torch.dtype) -> None:
    """``func.jvp`` of ``f`` along ``tangents[0]`` (its primal the plain call's bits) against
    ``r``'s along ``tangents[1]`` (zero where ``f`` ignores an input); ``jacfwd``,
    ``jacrev``, ``grad`` of ``<f, dy>``, its ``hessian`` and ``jacrev(jacfwd(...))`` (the
    tangent rules' own derivatives) over ``argnums`` against the same transforms of ``r``."""
    with torch.no_grad():
        plain = f(*primals)
    y, tan = torch.func.jvp(f, primals, tangents[0])
    assert_bits_equal(y, plain)
    assert_close(tan, torch.func.jvp(r, primals, tangents[1])[1], dtype, f"{name}: jvp")

    def loss(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda *p: (fn(*p) * dy).sum()

    func = torch.func
    want_j = func.jacrev(r, argnums=argnums)(*primals)
    assert_close(func.jacfwd(f, argnums=argnums)(*primals), want_j, dtype, f"{name}: jacfwd")
    assert_close(func.jacrev(f, argnums=argnums)(*primals), want_j, dtype, f"{name}: jacrev")
    assert_close(func.grad(loss(f), argnums=argnums)(*primals), func.grad(loss(r), argnums=argnums)(*primals),
                 dtype, f"{name}: grad")
    want_h = func.hessian(loss(r), argnums=argnums)(*primals)
    assert_close(func.hessian(loss(f), argnums=argnums)(*primals), want_h, dtype, f"{name}: hessian")
    assert_close(func.jacrev(func.jacfwd(loss(f), argnums=argnums), argnums=argnums)(*primals), want_h, dtype,
                 f"{name}: jacrev(jacfwd)")


# --- what cannot carry a tangent says so --------------------------------------------------


def test_raw_ops_refuse_tangents_and_name_the_faces() -> None:
    x, w, t_x, _ = inputs(torch.float32, True, seed=7)
    config = (EPS, 64, "tree", "pairwise", "float", "torch", 0.0)
    raw = {
        "rms_norm": lambda a: torch.ops.taskgraph_norm.rms_norm(a, w, *config)[0],
        "rms_norm_residual": lambda a: torch.ops.taskgraph_norm.rms_norm_residual(a, a, w, *config)[0],
    }
    for name, op in raw.items():
        check_raw_op_refuses(op, x, t_x, (f"{name} has no forward-mode AD.*ops.rms_norm",
                                          "forward-mode AD.*tgn.RMSNorm", "grad transforms.*normalize_sync"))


def check_raw_op_refuses(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, t_x: torch.Tensor,
                         matches: tuple[str, str, str]) -> None:
    """``op`` refuses a dual input, ``func.jvp`` and ``func.grad`` with errors matching
    ``matches`` (each naming the faces that carry them), and is unchanged otherwise."""
    with fwad.dual_level(), pytest.raises(NotImplementedError, match=matches[0]):
        op(fwad.make_dual(x, t_x))
    with pytest.raises(NotImplementedError, match=matches[1]):
        torch.func.jvp(op, (x,), (t_x,))
    with pytest.raises(NotImplementedError, match=matches[2]):
        torch.func.grad(lambda a: op(a).sum())(x)
    # outside a transform, and without a tangent inside one, the op is unchanged
    y = op(x)
    with fwad.dual_level():
        assert_bits_equal(op(x), y)
    xr = x.clone().requires_grad_()
    op(xr).sum().backward()
    assert xr.grad is not None


def test_routing_sends_a_tangent_to_the_function() -> None:
    x, w, t_x, _ = inputs(torch.float32, True)
    assert ops.route(x, w) == ops.DIRECT
    with fwad.dual_level():
        assert ops.route(x, w) == ops.DIRECT  # an open level alone changes nothing
        assert ops.route(fwad.make_dual(x, t_x), w) == ops.EAGER
        assert ops.route(x, fwad.make_dual(w, t_x[0])) == ops.EAGER
        assert ops.needs_op(fwad.make_dual(x, t_x), None)
