"""Gated, grouped RMSNorm's derivatives in every mode, against an independent plain-torch formula.

:func:`ref` is the gated norm written out in fp64 torch ops (docs/model.md's
construction: ``norm_before_gate=False`` gates first, ``h = x * silu(gate)``, then
``h / sqrt(mean(h**2 over the group) + eps) * (w + offset)``; ``True`` normalises first
and multiplies by ``silu(gate)`` last); its own autograd and ``torch.func`` on fp64
copies of the inputs are the oracle for forward-mode AD (``torch.autograd.forward_ad``),
``torch.func.jvp``, ``jacfwd``, ``jacrev``, ``hessian``, ``grad``, the double backward
and per-sample gradients of ``tgn.normalize_sync``/``tgn.normalize`` with a gate or
groups, ``taskgraph_norm.ops.gated_rms_norm`` and ``tgn.GatedRMSNorm`` (float and exact
accumulation, with and without gate, groups and weight).  The primal is the plain
call's bits, ``vmap`` over ``x`` and the gate the plain call's bits; the raw op, which
has no forward rule, refuses a tangent and names these faces.
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
from .test_derivatives import assert_close, check_func_transforms, check_raw_op_refuses, f64
from .test_layer_derivatives import check_tangent, tangent_of

# torch.func.jvp's first call imports torch._decomp.decompositions_for_jvp, which scripts
# its decompositions with the deprecated torch.jit.script (torch's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

EPS = 1e-6
HIDDEN = 8
#: (gate, group_size, norm_before_gate): gate first and last, whole rows and groups of 4,
#: and groups with no gate
SHAPES = [(True, None, False), (True, 4, False), (True, None, True), (True, 4, True), (False, 4, False)]
HALF = (torch.bfloat16, torch.float16)


def ref(x: torch.Tensor, gate: torch.Tensor | None, w: torch.Tensor | None, group: int | None, before: bool,
        offset: float = 0.0) -> torch.Tensor:
    """The gated norm in fp64 math: ``silu(g) = g * sigmoid(g)``; ``before``
    (``norm_before_gate``) ``False``: ``h = x * silu(g)``, ``y = h / rms(h) * (w + offset)``
    with ``rms`` over each group; ``True``: ``y = x / rms(x) * (w + offset) * silu(g)``."""
    xd = x.to(torch.float64)
    s = None if gate is None else gate.to(torch.float64) * torch.sigmoid(gate.to(torch.float64))
    h = xd * s if s is not None and not before else xd
    size = group or x.shape[-1]
    hg = h.reshape(*h.shape[:-1], x.shape[-1] // size, size)
    y = (hg / torch.sqrt((hg * hg).mean(dim=-1, keepdim=True) + EPS)).reshape(h.shape)
    if w is not None:
        y = y * (w.to(torch.float64) + offset)
    return y * s if s is not None and before else y


def inputs(dtype: torch.dtype, seed: int = 0, rows: int = 3) -> tuple[torch.Tensor, ...]:
    """``(x, gate, w, t_x, t_gate, t_w)``: rows of different scales, a gate over silu's
    bend, a weight away from 1, tangents."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, rows, dtype=torch.float64).unsqueeze(1)
    x = torch.randn(rows, HIDDEN, generator=g, dtype=torch.float64) * scale
    gate = 2 * torch.randn(rows, HIDDEN, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(HIDDEN, generator=g, dtype=torch.float64)
    t_x, t_g = torch.randn(2, rows, HIDDEN, generator=g, dtype=torch.float64)
    t_w = torch.randn(HIDDEN, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, gate, w, t_x, t_g, t_w))


def faces(dtype: torch.dtype, gated: bool, group: int | None, before: bool, accumulate: str = "float",
          weighted: bool = True, casting_mode: str = "torch", offset: float = 0.0
          ) -> dict[str, Callable[..., Any]]:
    """Each public face as ``fn(x, gate, w)`` (``gate``/``w`` ignored where the call has none)."""
    options: dict[str, Any] = dict(group_size=group, norm_before_gate=before, chunk_size=4, accumulate=accumulate,
                                   casting_mode=casting_mode, offset=offset)

    def pick(gt: Any, w: Any) -> tuple[Any, Any]:
        return (gt if gated else None), (w if weighted else None)

    def sync(a: torch.Tensor, gt: Any, w: Any) -> Any:
        g_, w_ = pick(gt, w)
        return tgn.normalize_sync(a, w_, EPS, gate=g_, **options)

    def run_async(a: torch.Tensor, gt: Any, w: Any) -> Any:
        g_, w_ = pick(gt, w)
        return asyncio.run(tgn.normalize(a, w_, EPS, gate=g_, **options))

    def op(a: torch.Tensor, gt: Any, w: Any) -> Any:
        g_, w_ = pick(gt, w)
        return ops.gated_rms_norm(a, g_, w_, EPS, **options)

    out = {"normalize_sync": sync, "normalize": run_async, "ops.gated_rms_norm": op}
    modes = ("float", "exact") if dtype != torch.float64 and weighted else ("float",)
    for mode in modes:
        m = tgn.GatedRMSNorm(HIDDEN, EPS, elementwise_affine=weighted, weight_grad=mode if weighted else "float",
                             dtype=dtype, **options)
        if weighted:
            out[f"GatedRMSNorm({mode})"] = (lambda a, gt, w, m=m: torch.func.functional_call(
                m, {"weight": w}, (a, gt if gated else None)))
        else:
            out["GatedRMSNorm(no affine)"] = lambda a, gt, w, m=m: m(a, gt if gated else None)
    return out


def oracle(gated: bool, group: int | None, before: bool, weighted: bool = True,
           offset: float = 0.0) -> Callable[..., torch.Tensor]:
    return lambda a, gt, w: ref(a, gt if gated else None, w if weighted else None, group, before, offset)


def tangent_combos(gated: bool, t_x: torch.Tensor, t_g: torch.Tensor, t_w: torch.Tensor) -> list[tuple[Any, ...]]:
    combos: list[tuple[Any, ...]] = [(t_x, None, None), (None, None, t_w), (t_x, None, t_w)]
    if gated:
        combos += [(None, t_g, None), (t_x, t_g, t_w)]
    return combos


# --- forward-mode AD through every face -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize(("gated", "group", "before"), SHAPES)
def test_forward_ad_through_every_face(gated: bool, group: int | None, before: bool, accumulate: str,
                                       dtype: torch.dtype) -> None:
    x, gate, w, t_x, t_g, t_w = inputs(dtype, seed=1)
    for name, fn in faces(dtype, gated, group, before, accumulate).items():
        for tangents in tangent_combos(gated, t_x, t_g, t_w):
            what = f"{name}, tangents {[t is not None for t in tangents]}"
            check_tangent(fn, oracle(gated, group, before), (x, gate, w), tangents, dtype, what)
            with torch.no_grad():  # forward AD does not depend on grad mode
                check_tangent(fn, oracle(gated, group, before), (x, gate, w), tangents, dtype, what + ", no_grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("casting_mode", "offset"), [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("before", [False, True])
def test_forward_ad_in_the_model_casting_modes_and_many_rows(before: bool, casting_mode: str, offset: float,
                                                             dtype: torch.dtype) -> None:
    """The Hugging Face cast orders, and 3000 rows (split across threads by the plain call)."""
    x, gate, w, t_x, t_g, t_w = inputs(dtype, seed=2, rows=3000)
    fn = faces(dtype, True, 4, before, casting_mode=casting_mode, offset=offset)["normalize_sync"]
    check_tangent(fn, oracle(True, 4, before, offset=offset), (x, gate, w), (t_x, t_g, t_w), dtype, casting_mode)
    with torch.inference_mode():
        plain = fn(x, gate, w)
    assert_bits_equal(tangent_of(fn, (x, gate, w), (t_x, t_g, t_w))[0], plain)


def test_a_dropped_or_wrong_tangent_is_found() -> None:
    """The negative control: the check above fails on a face that drops the tangent (the
    native one pass on the primal), one that drops the gate's, a zero and a wrong one;
    the raw op refuses a tangent."""
    x, gate, w, t_x, t_g, _ = inputs(torch.float64, seed=3)
    want = oracle(True, None, False)

    def dropped(a: torch.Tensor, gt: Any, w: Any) -> Any:
        return tgn.normalize_sync(a.detach(), w, EPS, gate=gt.detach())

    def gate_dropped(a: torch.Tensor, gt: Any, w: Any) -> Any:
        return tgn.normalize_sync(a, w, EPS, gate=gt.detach())

    def zero(a: torch.Tensor, gt: Any, w: Any) -> Any:
        return tgn.normalize_sync(a.detach(), w, EPS, gate=gt.detach()) + 0 * a

    def wrong(a: torch.Tensor, gt: Any, w: Any) -> Any:
        return tgn.normalize_sync(a, w, EPS, gate=gt * 1.001)

    with pytest.raises(AssertionError, match="the tangent was dropped"):
        check_tangent(dropped, want, (x, gate, w), (t_x, t_g, None), torch.float64, "dropped")
    with pytest.raises(AssertionError, match="the tangent was dropped"):
        check_tangent(gate_dropped, want, (x, gate, w), (None, t_g, None), torch.float64, "gate dropped")
    with pytest.raises(AssertionError):  # the gate's part missing from a tangent that is there
        check_tangent(gate_dropped, want, (x, gate, w), (t_x, t_g, None), torch.float64, "gate dropped")
    with pytest.raises(AssertionError, match="a zero tangent"):
        check_tangent(zero, want, (x, gate, w), (t_x, None, None), torch.float64, "zero")
    with pytest.raises(AssertionError):
        check_tangent(wrong, want, (x, gate, w), (None, t_g, None), torch.float64, "wrong")
    # the oracle tells the two orders apart (a face with the wrong order fails)
    with pytest.raises(AssertionError):
        check_tangent(faces(torch.float64, True, None, True)["normalize_sync"], want, (x, gate, w),
                      (t_x, t_g, None), torch.float64, "other order")


# --- torch.func: jvp, jacfwd, jacrev, hessian, grad ------------------------------------------


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize(("gated", "group", "before"), SHAPES)
def test_func_transforms_match_the_formula(gated: bool, group: int | None, before: bool, weighted: bool,
                                           accumulate: str) -> None:
    dtype = torch.float64
    x, gate, w, t_x, t_g, t_w = inputs(dtype, seed=4)
    r = oracle(gated, group, before, weighted)
    argnums = tuple(i for i, used in enumerate((True, gated, weighted)) if used)
    for name, f in faces(dtype, gated, group, before, accumulate, weighted).items():
        if name == "normalize":
            continue  # (asyncio.run under a functorch transform: the sync face's path, checked above)
        check_func_transforms(name, f, r, (x, gate, w), ((t_x, t_g, t_w), (t_x, t_g if gated else 0 * t_g,
                              t_w if weighted else 0 * t_w)), argnums, t_x.flip(0), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("gated", "group", "before"), SHAPES)
def test_double_backward_and_backward_of_a_tangent(gated: bool, group: int | None, before: bool,
                                                   dtype: torch.dtype) -> None:
    """Reverse mode's second order (``create_graph=True``, on real tensors: in fp32 the C
    gate must not stand in for a sigmoid the second order differentiates), and a tangent
    differentiated by reverse mode: forward AD on inputs that require grad."""
    primals, tangents = inputs(dtype, seed=5)[:3], inputs(dtype, seed=5)[3:]
    got = []
    for fn, cast in ((faces(dtype, gated, group, before)["normalize_sync"], torch.clone),
                     (oracle(gated, group, before), f64)):
        x, gt, w = (cast(p).requires_grad_() for p in primals)
        t_x, t_g, t_w = map(cast, tangents)
        u = t_x.flip(1)
        wrt = [x, gt, w] if gated else [x, w]
        first = torch.autograd.grad(fn(x, gt, w), wrt, t_x, create_graph=True)
        second = torch.autograd.grad(sum((g * u).sum() for g in first[:-1]) + (first[-1] * t_w).sum(), wrt)
        with fwad.dual_level():
            y = fn(fwad.make_dual(x, t_x), fwad.make_dual(gt, t_g), fwad.make_dual(w, t_w))
            tan = fwad.unpack_dual(y).tangent
        through_tangent = torch.autograd.grad((tan * u).sum(), wrt)
        got.append((first, second, through_tangent))
    for a, want in zip(got[0], got[1], strict=True):
        assert_close(a, want, dtype)


# --- vmap over x and the gate ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("rows", [3, 4096])
@pytest.mark.parametrize(("gated", "group", "before"), SHAPES)
def test_vmap_over_x_and_the_gate_gives_the_plain_bits(gated: bool, group: int | None, before: bool, rows: int,
                                                       accumulate: str, dtype: torch.dtype) -> None:
    x, gate, w, *_ = inputs(dtype, seed=6, rows=rows)
    for name, fn in faces(dtype, gated, group, before, accumulate).items():
        if name == "normalize":
            continue
        with torch.no_grad():
            plain = fn(x, gate, w)
        for d, xb, gb in ((0, x.unsqueeze(1), gate.unsqueeze(1)), (1, x.unsqueeze(0), gate.unsqueeze(0)),
                          (0, x.view(-1, 1, 1, HIDDEN), gate.view(-1, 1, 1, HIDDEN))):
            got = torch.func.vmap(fn, in_dims=(d, d, None))(xb, gb, w)  # noqa: B023
            assert_bits_equal(got.reshape(plain.shape), plain)
        # x batched, the gate not (each sample's gate the same); the gate batched, x not
        got = torch.func.vmap(fn, in_dims=(0, None, None))(x.view(-1, 1, HIDDEN), gate[:1], w)
        with torch.no_grad():
            assert_bits_equal(got.reshape(plain.shape), fn(x, gate[:1].expand_as(x).contiguous(), w))
        if gated:
            got = torch.func.vmap(fn, in_dims=(None, 0, None))(x[:1], gate.view(-1, 1, HIDDEN), w)
            with torch.no_grad():
                assert_bits_equal(got.reshape(plain.shape), fn(x[:1].expand_as(gate).contiguous(), gate, w))
        # vmap of vmap, and over the rows themselves (per-row 1-D calls)
        nested = torch.func.vmap(torch.func.vmap(fn, in_dims=(0, 0, None)), in_dims=(0, 0, None))
        assert_bits_equal(nested(x.view(1, rows, HIDDEN), gate.view(1, rows, HIDDEN), w)[0], plain)
        assert_bits_equal(torch.func.vmap(fn, in_dims=(0, 0, None))(x, gate, w), plain)
        with torch.inference_mode():
            assert_bits_equal(torch.func.vmap(fn, in_dims=(0, 0, None))(x.unsqueeze(1), gate.unsqueeze(1),
                                                                         w)[:, 0], plain)
        with pytest.raises(NotImplementedError, match="batches x and the gate only"):
            torch.func.vmap(fn, in_dims=(0, 0, 0))(x[:2].unsqueeze(1), gate[:2].unsqueeze(1),  # noqa: B023
                                                   torch.stack([w, w]))


@pytest.mark.parametrize(("gated", "group", "before"), SHAPES)
def test_vmap_of_a_gradient_over_x_and_the_gate(gated: bool, group: int | None, before: bool) -> None:
    """Per-sample gradients (vmap of grad): each sample's gradients, the formula's."""
    x, gate, w, t_x, *_ = inputs(torch.float64, seed=7)
    r = oracle(gated, group, before)
    argnums = (0, 1, 2) if gated else (0, 2)
    for name, fn in faces(torch.float64, gated, group, before).items():
        if name == "normalize":
            continue
        per = torch.func.vmap(torch.func.grad(lambda a, gt, w, d: (fn(a, gt, w) * d).sum(),  # noqa: B023
                                              argnums=argnums), in_dims=(0, 0, None, 0))(x, gate, w, t_x)
        want = torch.func.vmap(torch.func.grad(lambda a, gt, w, d: (r(a, gt, w) * d).sum(), argnums=argnums),
                               in_dims=(0, 0, None, 0))(x, gate, w, t_x)
        assert_close(per, want, torch.float64, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("casting_mode", ["torch", "llama"])
@pytest.mark.parametrize("before", [False, True])
def test_vmap_keeps_the_nan_bits(before: bool, casting_mode: str, dtype: torch.dtype) -> None:
    """NaN rows and elements under ``vmap``: the plain call's bits (the NaN fix-ups run
    without a data-dependent branch there); the control: a NaN in the input makes some."""
    x, gate, w, *_ = inputs(dtype, seed=10, rows=64)
    x[3, 2] = gate[7, 1] = float("nan")
    x[10] = float("nan")
    fn = faces(dtype, True, 4, before, casting_mode=casting_mode, offset=0.5)["normalize_sync"]
    with torch.no_grad():
        plain = fn(x, gate, w)
    assert bool(plain.isnan().any())
    assert_bits_equal(torch.func.vmap(fn, in_dims=(0, 0, None))(x.unsqueeze(1), gate.unsqueeze(1), w)[:, 0], plain)


# --- the module: weight_grad="exact" ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("before", [False, True])
def test_exact_weight_grad_under_the_transforms(before: bool, dtype: torch.dtype) -> None:
    """``weight_grad="exact"``: the float mode's tangents and ``vmap`` bits; a transform
    over ``x`` and the gate alone gives the float mode's values."""
    x, gate, w, t_x, t_g, t_w = inputs(dtype, seed=8, rows=6)
    exact = tgn.GatedRMSNorm(HIDDEN, EPS, group_size=4, norm_before_gate=before, weight_grad="exact", dtype=dtype)
    floating = tgn.GatedRMSNorm(HIDDEN, EPS, group_size=4, norm_before_gate=before, dtype=dtype)
    for m in (exact, floating):
        with torch.no_grad():
            m.weight.copy_(w)
    y, tan = torch.func.jvp(exact, (x, gate), (t_x, t_g))
    with torch.no_grad():
        assert_bits_equal(y, exact(x, gate))
    want = torch.func.jvp(lambda a, gt: ref(a, gt, f64(w), 4, before), (f64(x), f64(gate)), (f64(t_x), f64(t_g)))
    assert_close(tan, want[1], dtype, "jvp")
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(exact, argnums=(0, 1))(x[:2], gate[:2]),
                                   transform(floating, argnums=(0, 1))(x[:2], gate[:2]))
    dy = t_x.flip(0)
    torch.testing.assert_close(torch.func.hessian(lambda a: (exact(a, gate) * dy).sum())(x),
                               torch.func.hessian(lambda a: (floating(a, gate) * dy).sum())(x))
    with torch.no_grad():
        assert_bits_equal(torch.func.vmap(exact)(x.unsqueeze(1), gate.unsqueeze(1))[:, 0], exact(x, gate))
    # func.grad over the weight (a functional_call's weight is no parameter with a .grad
    # to accumulate into): the float mode's dW, bit for bit; .grad untouched
    def loss(m: tgn.GatedRMSNorm) -> Callable[..., torch.Tensor]:
        return lambda w: (torch.func.functional_call(m, {"weight": w}, (x, gate)) * dy).sum()

    got = torch.func.grad(loss(exact))(w)
    assert_bits_equal(got, torch.autograd.grad(floating(x, gate), floating.weight, dy)[0])
    assert exact.weight.grad is None


# --- what cannot carry a tangent says so --------------------------------------------------


def test_raw_op_refuses_tangents_and_grad_transforms_and_names_the_gated_faces() -> None:
    x, gate, w, t_x, *_ = inputs(torch.float32, seed=9)

    def op(a: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.taskgraph_norm.gated_rms_norm(a, gate, w, EPS, 4, False, 64, "tree",
                                                                  "pairwise", "float", "torch", 0.0)
        return y

    check_raw_op_refuses(op, x, t_x, ("gated_rms_norm has no forward-mode AD.*tgn.GatedRMSNorm",
                                      "forward-mode AD.*normalize_sync / tgn.normalize with gate=",
                                      "grad transforms.*ops.gated_rms_norm"))
    with fwad.dual_level():
        assert ops.route(fwad.make_dual(x, t_x), w) == ops.EAGER
