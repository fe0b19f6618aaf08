"""RMSNorm's C face (backends/native/face.py's ``rms_face``, csrc/native_face.c): a short
``normalize_sync`` or ``tgn.RMSNorm`` call with no gradient to record, no tracer, no
residual and no ``out`` is checked and run in one C call, with the direct call's
configuration (backends/native/direct.py).

Its bits are the torch-ops backend's (fp32/bf16/fp16 ``x``; weights of ``x``'s dtype,
fp32 or none; the three casting modes and an offset; float and exact plans); it is
really taken (a spy sees a result); and what it must leave to the Python path comes back
``None`` with nothing done: a dtype pair whose output is not ``x``'s dtype, a gradient to
record, a dispatch mode, forward AD, ``vmap``, strides, fp64, a misshapen weight, an
offset with no weight, an int ``eps``, no rows, ``SPLIT_NUMEL`` elements, a context
without native C, a NaN row.  Under ``torch.compile(fullgraph=True)`` dynamo traces the
stand-in."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
import torch
from torch.autograd import forward_ad

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import face as native_face
from taskgraph_norm.backends.native import loader as native_loader
from taskgraph_norm.constants import SPLIT_NUMEL
from taskgraph_norm.pipeline import cache as pipeline_cache
from taskgraph_norm.testing import bits_equal

from ._trust_helpers import native_status, spy_c_face, warm_face_call
from .test_layer_face import _Passthrough

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIONS = (64, "tree", "pairwise", "float", "auto", "torch", 0.0)


@pytest.fixture
def face(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records each C face call: True when it gave the result, False when it declined."""
    for _ in range(2):  # (a warm call installs the C face)
        tgn.normalize_sync(torch.ones(1, 8))
    return spy_c_face(monkeypatch, "rms_face")


def _data(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * 3 + 0.5
    w = 1 + 0.5 * torch.randn(hidden, generator=g)
    return x.to(dtype), w.to(dtype)


def _torch_ops(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    with tgn.backends.use("torch_ops"):
        return tgn.normalize_sync(x, *args, **kwargs)


def _call(x: object, w: object = None, eps: object = None, options: tuple[Any, ...] = OPTIONS) -> Any:
    return native_face.rms_face(pipeline_cache.PIPELINES, x, w, eps, *options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_the_face_gives_the_torch_ops_bits(dtype: torch.dtype, accumulate: str, face: list[bool]) -> None:
    taken = 0
    for (rows, hidden), casting, offset in itertools.product(((1, 4096), (3, 100), (15, 33), (1, 1)),
                                                             ("torch", "llama", "gemma"), (0.0, 1.0)):
        x, w = _data(rows, hidden, dtype, seed=rows)
        for wt in (w, w.float(), None):
            if offset and wt is None:
                continue
            kwargs = dict(accumulate=accumulate, casting_mode=casting, offset=offset)
            y = warm_face_call(face, lambda: tgn.normalize_sync(x, wt, **kwargs))
            want = _torch_ops(x, wt, **kwargs)
            assert bits_equal(y, want), (rows, hidden, casting, offset, wt is None)
            assert face[0] == (want.dtype == x.dtype), (rows, hidden, casting, offset, wt is None)
            taken += face[0]
    assert taken >= 24


def test_the_module_takes_it(face: list[bool]) -> None:
    x, w = _data(6, 256, torch.bfloat16, seed=2)
    m = tgn.RMSNorm(256, dtype=torch.bfloat16)
    want = _torch_ops(x, w)
    with torch.no_grad():
        m.weight.copy_(w)
        y = warm_face_call(face, lambda: m(x))
    assert face == [True] and bits_equal(y, want)


def test_the_async_face_takes_it(face: list[bool]) -> None:
    x, w = _data(3, 512, torch.float16, seed=4)

    async def calls() -> list[torch.Tensor]:
        return [await tgn.normalize(x, w) for _ in range(3)]  # (the first ones find the plan)

    found = anyio.run(calls)
    assert face[-1] is True
    assert all(bits_equal(y, _torch_ops(x, w)) for y in found)


def test_a_different_plan_gives_different_bits(face: list[bool]) -> None:
    """The negative control: the face's results of two plans differ where the order matters."""
    x, w = _data(8, 4096, torch.float32, seed=5)
    found = []
    for topology in ("tree", "linear"):
        for _ in range(3):
            y = tgn.normalize_sync(x, w, topology=topology)
        found.append(y)
    assert face[-1] is True
    assert not bits_equal(found[0], found[1])


def test_what_the_face_declines(face: list[bool]) -> None:
    x, w = _data(2, 4096, torch.float32, seed=7)
    for _ in range(2):
        tgn.normalize_sync(x, w)
        tgn.normalize_sync(x)
    assert _call(x, w) is not None and _call(x) is not None  # the controls: the face's calls
    wg = w.clone().requires_grad_()
    assert _call(x, wg) is None  # a gradient to record
    with torch.no_grad():
        assert _call(x, wg) is not None
    with torch.inference_mode():
        assert _call(x, w) is not None
    with _Passthrough():
        assert _call(x, w) is None
    with forward_ad.dual_level():
        assert _call(x, w) is None
    assert torch.func.vmap(lambda r: _call(r, w) is None and r)(x).all()
    assert _call(x.t().contiguous().t(), w) is None  # strides
    assert _call(x.double(), w.double()) is None
    assert _call(x, w[:100]) is None  # the general path raises
    assert _call(x, w.reshape(64, 64)) is None
    assert _call(x, w, eps=1) is None
    assert _call(x, w, options=(64.0,) + OPTIONS[1:]) is None
    assert _call(torch.randn(1, 4097), None) is None  # no pipeline of that size yet
    assert _call(torch.empty(0, 4096), w) is None
    assert _call(torch.randn(SPLIT_NUMEL // 4096, 4096), w) is None
    with tgn.backends.use("torch_ops"):
        assert _call(x, w) is None
    with native_loader.disabled():
        assert _call(x, w) is None
    nan = x.clone()
    nan[1, 3] = float("nan")
    assert _call(nan, w) is None
    assert bits_equal(tgn.normalize_sync(nan, w), _torch_ops(nan, w))
    with pytest.raises(RuntimeError):
        tgn.normalize_sync(x, w[:100])
    # An offset plan with no weight: the general path says why it needs one.
    for _ in range(2):
        tgn.normalize_sync(x, w, offset=1.0)
    assert _call(x, None, options=OPTIONS[:-1] + (1.0,)) is None
    # bf16 x with an fp32 weight under llama's casting: fp32 output, the Python path.
    xb, llama = x.bfloat16(), OPTIONS[:-2] + ("llama", 0.0)
    for _ in range(2):
        y = tgn.normalize_sync(xb, w, casting_mode="llama")
    assert y.dtype == torch.float32 and _call(xb, w, options=llama) is None
    tgn.normalize_sync(xb, w.bfloat16(), casting_mode="llama")
    assert _call(xb, w.bfloat16(), options=llama) is not None  # (bf16 out: the face's)


def test_the_c_function_refuses_wrong_arguments() -> None:
    module = native_loader.module()
    with pytest.raises(TypeError, match="takes 11 arguments"):
        module.rms_face(*[None] * 12)
    x = torch.ones(1, 8)
    assert module.rms_face({}, x, None, None, *OPTIONS) is None  # no pipeline


def test_compiled_fullgraph_traces_the_stand_in(face: list[bool]) -> None:
    x, w = _data(4, 256, torch.float32, seed=9)
    for _ in range(2):
        tgn.normalize_sync(x, w)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: tgn.normalize_sync(t, w) * 2, fullgraph=True, backend="eager")
    assert bits_equal(compiled(x), tgn.normalize_sync(x, w) * 2)
