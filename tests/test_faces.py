"""The face matrix: every way into the library gives the same bits (docs/design.md, "The pipeline" and "The backends").

Faces: ``normalize_sync``; ``await normalize`` inline (an input under
``OFFLOAD_NUMEL`` elements) and offloaded to a worker thread (a larger one);
``tgn.RMSNorm``; ``taskgraph_norm.ops.rms_norm`` and the raw
``torch.ops.taskgraph_norm.rms_norm`` op; ``torch.compile(module, fullgraph=True)``;
``torch.export.export(module, ...).module()``.  Modes: grad (``x`` requires grad: the
result must too, and ``dx``, ``dW`` and ``dresidual`` must be the bits
``normalize_sync`` gives), ``no_grad`` and ``inference_mode`` (the result must not
require grad, although the weight is always a parameter that does).

The reference is ``normalize_sync`` on a contiguous input, on one thread, under
``no_grad`` (for the gradients: on one thread, under grad); every other face, mode,
layout and thread count is compared with it bit for bit.  An offset without a weight
is accepted and has no effect (Liger-Kernel's contract): its reference is offset 0.

CI runs a covering set (:data:`CI_GROUPS`): every pair of values of two options (so
every value, and every pair of face and mode), every certified graph, each face in each
mode with every thread count, shape and dtype, and each shape in each mode with every
dtype, layout and thread count (where rows split across threads).  The full product
runs behind the slow marker with ``TGN_FULL=1``, a face, dtype and shape per test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import Any

import anyio
import pytest
import torch

import taskgraph_norm as tgn
import taskgraph_norm.ops
from taskgraph_norm.api import OFFLOAD_NUMEL

from .conftest import FULL
from .helpers import assert_bits_equal, bits_equal

# torch 2.13's inductor touches torch.jit.script_method on its first compile (its warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

from ._face_cases import (ACCUMULATES, ALL_THREADS, CASTING_MODES, CERTIFIED, CI_CASES, DIMS, DTYPES, EPS, FACES,
                          LEAVES, MODES, SHAPES, Case, allowed)


# --- inputs --------------------------------------------------------------------------


def inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Seeded ``x`` (rows at different magnitudes, a zero row), the weight (the
    effective weight ``offset + w`` near 1) and the residual, contiguous."""
    rows, hidden = SHAPES[case.shape]
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(rows * 7919 + hidden)
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    x *= torch.tensor([2.0 ** (i % 9 - 4) for i in range(rows)], dtype=torch.float64)[:, None]
    x[1] = 0.0
    w = torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.25 + 1.0 - case.offset
    r = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    return x.to(dtype), (w.to(dtype) if case.weight else None), (r.to(dtype) if case.residual else None)


def laid_out(t: torch.Tensor | None, layout: str) -> torch.Tensor | None:
    """``t``'s values in ``layout``: ``transposed`` is column-major (strides ``(1, rows)``)."""
    if t is None or layout == "contiguous":
        return None if t is None else t.clone()
    return t.t().contiguous().t()


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def grad_mode(mode: str) -> Iterator[None]:
    if mode == "no_grad":
        with torch.no_grad():
            yield
    elif mode == "inference_mode":
        with torch.inference_mode():
            yield
    else:
        with torch.enable_grad():
            yield


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _dynamo_limits() -> Iterator[None]:
    """Room for the compiled face's many guards (one compiled module per configuration,
    recompiled per dtype, shape and grad mode); hitting the limit fails rather than
    silently falling back to eager."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1 << 12, accumulated_recompile_limit=1 << 16,
                                    fail_on_recompile_limit_hit=True):
        yield
    _compiled.clear()
    _exported.clear()
    torch._dynamo.reset()


# --- the faces -----------------------------------------------------------------------

Outputs = tuple[torch.Tensor, ...]  # (y,) or (y, h)


def _module(case: Case, w: torch.Tensor | None) -> tgn.RMSNorm:
    norm = tgn.RMSNorm(SHAPES[case.shape][1], EPS, elementwise_affine=w is not None, dtype=DTYPES[case.dtype],
                       **case.options())
    if w is not None:
        with torch.no_grad():
            norm.weight.copy_(w)
    return norm


def _key(case: Case) -> tuple[Any, ...]:
    return (case.dtype, case.shape, case.weight, tuple(case.options().items()))


_compiled: dict[tuple[Any, ...], tuple[tgn.RMSNorm, Callable[..., Any]]] = {}
_exported: dict[tuple[Any, ...], tuple[tgn.RMSNorm, Callable[..., Any]]] = {}


def _compiled_module(case: Case, w: torch.Tensor | None) -> tuple[tgn.RMSNorm, Callable[..., Any]]:
    found = _compiled.get(_key(case))
    if found is None:
        norm = _module(case, w)
        found = _compiled[_key(case)] = norm, torch.compile(norm, fullgraph=True)
    return found


def _exported_module(case: Case, x: torch.Tensor, w: torch.Tensor | None,
                     r: torch.Tensor | None) -> tuple[tgn.RMSNorm, Callable[..., Any]]:
    key = (*_key(case), case.residual)
    found = _exported.get(key)
    if found is None:
        norm = _module(case, w)
        example = (x.detach().contiguous(),) + (() if r is None else (r.detach().contiguous(),))
        program = torch.export.export(norm, example)
        found = _exported[key] = norm, program.module()
    return found


def _as_outputs(result: Any) -> Outputs:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def prepare_face(case: Case, x: torch.Tensor, w: torch.Tensor | None,
                 r: torch.Tensor | None) -> tuple[Callable[[], Outputs], torch.Tensor | None]:
    """``case.face`` as a call on ``x`` (and ``r``), to be made in the caller's grad mode
    and threads; and the weight parameter it uses (for ``dW``).  Parameters and modules
    are made here, outside the mode, as a model makes them."""
    options = case.options()
    face = case.face
    param = None if w is None else torch.nn.Parameter(w.clone())
    if face == "sync":
        return lambda: _as_outputs(tgn.normalize_sync(x, param, EPS, residual=r, **options)), param
    if face in ("async_inline", "async_offloaded"):
        assert (x.numel() < OFFLOAD_NUMEL) == (face == "async_inline")

        async def main() -> Any:
            return await tgn.normalize(x, param, EPS, residual=r, **options)

        return lambda: _as_outputs(anyio.run(main)), param
    if face == "op":
        if r is None:
            return lambda: (taskgraph_norm.ops.rms_norm(x, param, EPS, **options),), param
        return lambda: taskgraph_norm.ops.rms_norm_residual(x, r, param, EPS, **options), param
    if face == "raw_op":
        config = (case.chunk_size, case.topology, case.leaf, case.accumulate, case.casting_mode, case.offset)
        if r is None:
            return lambda: (torch.ops.taskgraph_norm.rms_norm(x, param, EPS, *config)[0],), param
        return lambda: tuple(torch.ops.taskgraph_norm.rms_norm_residual(x, r, param, EPS, *config)[:2]), param
    if face == "module":
        norm = _module(case, w)
        fn: Callable[..., Any] = norm
    elif face == "compiled":
        norm, fn = _compiled_module(case, w)
    elif face == "exported":
        norm, fn = _exported_module(case, x, w, r)
    else:
        raise AssertionError(f"unknown face {face!r}")
    if norm.weight is not None:
        norm.weight.grad = None  # (a cached module's weight: the last test's gradient)
    args = (x,) if r is None else (x, r)
    return lambda: _as_outputs(fn(*args)), norm.weight


# --- reference and comparison --------------------------------------------------------


def reference(case: Case, x: torch.Tensor, w: torch.Tensor | None, r: torch.Tensor | None) -> Outputs:
    """``normalize_sync`` on the contiguous input, one thread, no grad (an offset without
    a weight has no effect: offset 0)."""
    options = case.options(offset=case.offset if w is not None else 0.0)
    with num_threads(1), torch.no_grad():
        return _as_outputs(tgn.normalize_sync(x, w, EPS, residual=r, **options))


def cotangents(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(11)
    return tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs)


def reference_grads(case: Case, x: torch.Tensor, w: torch.Tensor | None,
                    r: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """``dx``, ``dresidual`` and ``dW`` through ``normalize_sync`` on the contiguous
    input, on one thread."""
    options = case.options(offset=case.offset if w is not None else 0.0)
    xg = x.clone().requires_grad_()
    rg = None if r is None else r.clone().requires_grad_()
    param = None if w is None else torch.nn.Parameter(w.clone())
    with num_threads(1), torch.enable_grad():
        outputs = _as_outputs(tgn.normalize_sync(xg, param, EPS, residual=rg, **options))
        torch.autograd.backward(outputs, cotangents(outputs))
    return {"dx": xg.grad, "dresidual": None if rg is None else rg.grad, "dW": None if param is None else param.grad}


def check_same(name: str, got: Outputs, want: Outputs) -> None:
    """Bit-equality of every output (``y``, and ``h`` with a residual)."""
    assert len(got) == len(want), f"{name}: {len(got)} outputs, expected {len(want)}"
    for label, a, b in zip(("y", "h"), got, want):
        assert_bits_equal(a.detach(), b, f"{name}: {label}")


def reference_key(case: Case) -> tuple[Any, ...]:
    """What the reference bits depend on (not the face, mode, layout or threads)."""
    return (case.dtype, case.shape, case.weight, case.residual, tuple(case.options(
        offset=case.offset if case.weight else 0.0).items()))


def run_case(case: Case, memo: dict[tuple[Any, ...], Any] | None = None) -> None:
    """Call ``case``'s face in its mode, layout and thread count, and compare it with the
    reference; under grad, the gradients too.  ``memo`` keeps the inputs and reference
    bits for the next case of the same configuration."""
    assert allowed({f.name: getattr(case, f.name) for f in fields(Case)})
    memo = {} if memo is None else memo
    key = reference_key(case)
    if key not in memo:
        x0, w, r0 = inputs(case)
        memo[key] = (x0, w, r0), reference(case, x0, w, r0)
    (x0, w, r0), want = memo[key]
    x, r = laid_out(x0, case.layout), laid_out(r0, case.layout)
    assert x is not None
    if case.mode == "grad":
        x.requires_grad_()
        if r is not None:
            r.requires_grad_()
    call, param = prepare_face(case, x, w, r)
    threads = 1 if case.threads == "one" else ALL_THREADS
    with num_threads(threads), grad_mode(case.mode):
        got = call()
    check_same(case.id, got, want)
    for label, out in zip(("y", "h"), got):
        if case.mode == "grad":
            assert out.requires_grad, f"{case.id}: {label} does not require grad under grad mode"
        else:
            assert not out.requires_grad, f"{case.id}: {label} requires grad under {case.mode}"
    if case.mode != "grad":
        return
    if (key, "grads") not in memo:
        memo[key, "grads"] = reference_grads(case, x0, w, r0)
    want_grads = memo[key, "grads"]
    with num_threads(threads):
        torch.autograd.backward(got, cotangents(got))
    got_grads = {"dx": x.grad, "dresidual": None if r is None else r.grad, "dW": None if param is None else param.grad}
    for label, g in got_grads.items():
        ref = want_grads[label]
        assert (g is None) == (ref is None), f"{case.id}: {label} is {g!r}, expected {ref!r}"
        if g is not None and ref is not None:
            assert_bits_equal(g, ref, f"{case.id}: {label}")


# --- the tests -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CI_CASES, ids=lambda c: c.id)
def test_face_gives_the_reference_bits(case: Case) -> None:
    run_case(case)


def test_the_covering_set_covers() -> None:
    """Every value of every option, and every pair of face and mode, is in the CI set."""
    seen = {d: {getattr(c, d) for c in CI_CASES} for d in DIMS}
    for d, values in DIMS.items():
        assert seen[d] == set(values), f"{d}: {set(values) - seen[d]} never appears"
    assert {(c.face, c.mode) for c in CI_CASES} == set(itertools.product(FACES, MODES))
    graphs = {(c.topology, c.leaf, c.accumulate) for c in CI_CASES}
    assert graphs == set(CERTIFIED)



def test_the_matrix_has_every_certified_graph() -> None:
    """The matrix's graphs are exactly those the prover certifies (several chunks;
    ``standard`` is torch's own kernel: not certified)."""
    certified = {(t, leaf, a) for t in tgn.TOPOLOGIES for leaf in LEAVES for a in ACCUMULATES
                 if (t != "standard" or a == "float")
                 and tgn.prove(tgn.build_graph(1024, chunk_size=64, topology=t, leaf=leaf, accumulate=a)).certified}
    assert certified == set(CERTIFIED)


def one_case(**options: Any) -> Case:
    """A case with plain defaults (fp32, contiguous, no grad, the default graph) but ``options``."""
    defaults = dict(face="sync", mode="no_grad", dtype="fp32", layout="contiguous", shape="small", threads="all",
                    topology="tree", leaf="pairwise", accumulate="float", casting_mode="torch", weight=True,
                    offset=0.0, residual=False)
    return Case(**(defaults | options))


@pytest.mark.parametrize("face", FACES)
def test_an_offset_without_a_weight_has_no_effect(face: str) -> None:
    """Liger-Kernel's contract: ``offset`` is added to the weight; with no weight it is
    accepted and ignored (every casting mode)."""
    shape = "wide" if face == "async_offloaded" else "small"
    for mode in CASTING_MODES:
        case = one_case(face=face, shape=shape, casting_mode=mode, weight=False, offset=1.0)
        x, _, _ = inputs(case)
        call, _ = prepare_face(case, x, None, None)
        with torch.no_grad():
            got = call()
        check_same(case.id, got, reference(replace(case, offset=0.0), x, None, None))


# --- negative controls: the comparison can fail ----------------------------------------


def test_negative_control_race_arrival_orders_differ() -> None:
    """A race merge with float sums (not certified) gives other bits for another arrival
    order: the comparison the matrix uses is able to fail."""
    graph = tgn.build_graph(1024, chunk_size=64, topology="race", accumulate="float")
    assert not tgn.prove(graph).certified
    x, _, _ = inputs(one_case(shape="tall", weight=False))
    (accumulate,) = [n.id for n in graph if n.op.name == "ACCUMULATE"]
    order = list(range(1024 // 64))
    forward = tgn.execute_sync(graph, x, executor="reference", arrival={accumulate: order})
    backward = tgn.execute_sync(graph, x, executor="reference", arrival={accumulate: order[::-1]})
    assert not bits_equal(forward, backward)
    with pytest.raises(AssertionError, match="differ in their bits"):
        check_same("race arrival orders", (forward,), (backward,))


def test_negative_control_chunk_sizes_differ() -> None:
    """Two chunk sizes are two merge orders: the matrix's comparison tells them apart."""
    case = one_case(shape="tall")
    x, w, _ = inputs(case)
    call, _ = prepare_face(replace(case, chunk_size=16), x, w, None)
    with torch.no_grad():
        got = call()
    with pytest.raises(AssertionError, match="differ in their bits"):
        check_same(case.id, got, reference(case, x, w, None))


# --- the full product (TGN_FULL=1) -----------------------------------------------------

CONFIG_DIMS = ("topology", "leaf", "accumulate", "casting_mode", "weight", "offset", "residual")
PATH_DIMS = ("mode", "layout", "threads")
FULL_IDS = [(face, dtype, shape) for face in FACES for dtype in DTYPES for shape in SHAPES
            if allowed({"face": face, "shape": shape})]


def full_product(face: str, dtype: str, shape: str) -> Iterator[list[Case]]:
    """Every case of one face, dtype and shape, a configuration (graph, casting mode,
    weight, offset, residual) at a time: each in every mode, layout and thread count."""
    for config in itertools.product(*(DIMS[d] for d in CONFIG_DIMS)):
        fixed = dict(zip(CONFIG_DIMS, config)) | {"face": face, "dtype": dtype, "shape": shape}
        if allowed(fixed):
            yield [Case(**fixed, **dict(zip(PATH_DIMS, path)))
                   for path in itertools.product(*(DIMS[d] for d in PATH_DIMS))]


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="the full product (~500,000 calls, about a day on 2 cores): TGN_FULL=1")
@pytest.mark.parametrize(("face", "dtype", "shape"), FULL_IDS if FULL else FULL_IDS[:1])
def test_full_product(face: str, dtype: str, shape: str) -> None:
    """Every mode, layout, thread count, certified graph, casting mode and offset, with
    and without weight and residual, for one face, dtype and shape (``-k`` picks them);
    every failing case is listed."""
    import torch._dynamo

    failures = []
    for cases in full_product(face, dtype, shape):
        memo: dict[tuple[Any, ...], Any] = {}  # one configuration's inputs and reference bits
        for case in cases:
            try:
                run_case(case, memo)
            except Exception as e:  # noqa: BLE001 (every failing case is reported)
                failures.append(f"{case.id}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        if face in ("compiled", "exported"):  # this configuration's modules are not used again
            _compiled.clear()
            _exported.clear()
            torch._dynamo.reset()
    assert not failures, f"{len(failures)} cases failed:\n" + "\n".join(failures[:50])
