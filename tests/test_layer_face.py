"""LayerNorm's C face (backends/native/face.py, csrc/native_face.c): a short call with no
gradient to record, no tracer and no ``out`` is checked and run in one C call.

Its bits are the torch-ops backend's (fp32/bf16/fp16, fp32 parameters of a half input,
weight and bias present or not, float and exact plans); it is really taken (a spy on the
C function sees a result, and the Python warm entry is not called); and everything it
must not take comes back ``None`` with nothing done, so the Python path runs with its
errors: a gradient to record, a dispatch mode, forward AD, a ``torch.func`` transform,
strides, fp64, a mismatched or misshapen weight, NaN rows, a context without native C,
``SPLIT_NUMEL`` elements or more.  Under ``torch.compile(fullgraph=True)`` dynamo traces
the stand-in (no graph break)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import face as native_face
from taskgraph_norm.backends.native import loader as native_loader
from taskgraph_norm.constants import SPLIT_NUMEL
from taskgraph_norm.pipeline import layer as pipeline_layer
from taskgraph_norm.testing import bits_equal

from ._trust_helpers import native_status, spy_c_face, warm_face_call
from .test_layer_warm import _data, _torch_ops

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIONS = (64, "tree", "pairwise", "float", "auto")


@pytest.fixture
def face(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records each C face call: True when it gave the result, False when it declined."""
    for _ in range(2):  # (a warm call installs the C face)
        tgn.layer_norm_sync(torch.ones(1, 8))
    return spy_c_face(monkeypatch, "layer_face")


def _call(x: object, w: object = None, b: object = None, eps: object = None,
          options: tuple[Any, ...] = OPTIONS) -> Any:
    """The C face itself, on the live pipeline cache."""
    return native_face.layer_face(pipeline_layer.LAYER_PIPELINES, x, w, b, eps, *options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_the_face_gives_the_torch_ops_bits(dtype: torch.dtype, accumulate: str, face: list[bool]) -> None:
    for rows, hidden, topology in ((1, 4096, "tree"), (3, 100, "linear"), (15, 33, "tree"), (1, 1, "tree")):
        x, w, b = _data(rows, hidden, dtype, seed=rows)
        for wt, bt in ((w, b), (w, None), (None, b), (None, None), (w.float(), b.float())):
            if dtype == torch.float32 and wt is not None and wt.dtype != dtype:
                continue
            kwargs = dict(accumulate=accumulate, topology=topology)
            y = warm_face_call(face, lambda: tgn.layer_norm_sync(x, wt, bt, **kwargs))
            assert face == [True], (rows, hidden, wt is None, bt is None)
            assert bits_equal(y, _torch_ops(x, wt, bt, **kwargs))
            assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
            assert y.data_ptr() not in (x.data_ptr(), 0)


def test_more_dims_and_the_module(face: list[bool]) -> None:
    x, w, b = _data(6, 256, torch.bfloat16, seed=2)
    x3 = x.reshape(2, 3, 256)
    want = _torch_ops(x3, w, b)
    m = tgn.LayerNorm(256, dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        y = warm_face_call(face, lambda: m(x3))
    assert face == [True] and bits_equal(y, want)
    y = tgn.layer_norm_sync(x3, w, b)
    assert face == [True, True] and bits_equal(y, want)


def test_the_async_face_takes_it(face: list[bool]) -> None:
    x, w, b = _data(3, 512, torch.bfloat16, seed=4)

    async def calls() -> list[torch.Tensor]:
        return [await tgn.layer_norm(x, w, b) for _ in range(3)]  # (the first ones find the plan)

    found = anyio.run(calls)
    assert face[-1] is True
    assert all(bits_equal(y, _torch_ops(x, w, b)) for y in found)


def test_the_python_warm_entry_is_not_called(face: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, b = _data(1, 4096, torch.float32)
    for _ in range(2):
        tgn.layer_norm_sync(x, w, b)
    pipe = pipeline_layer.cached_layer(4096, *OPTIONS)
    assert pipe is not None and pipe.face is not None
    python_entry: list[int] = []
    monkeypatch.setattr(pipe, "routed", lambda *a: python_entry.append(1))
    tgn.layer_norm_sync(x, w, b)
    assert face[-1] is True and not python_entry
    tgn.layer_norm_sync(x, w, b, out=torch.empty_like(x))  # out=: the Python warm entry
    assert python_entry == [1]


def test_a_different_plan_gives_different_bits(face: list[bool]) -> None:
    """The negative control: the face's results of two plans differ where the order matters."""
    x, w, b = _data(8, 4096, torch.float32, seed=5)
    found = []
    for topology in ("tree", "linear"):
        for _ in range(3):
            y = tgn.layer_norm_sync(x, w, b, topology=topology)
        found.append(y)
    assert face[-1] is True
    assert not bits_equal(found[0], found[1])


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def test_what_the_face_declines(face: list[bool]) -> None:
    x, w, b = _data(2, 4096, torch.float32, seed=7)
    for _ in range(2):
        tgn.layer_norm_sync(x, w, b)
    assert _call(x, w, b) is not None  # the control: this call is the face's
    wg = w.clone().requires_grad_()
    assert _call(x, wg, b) is None  # a gradient to record
    with torch.no_grad():
        assert _call(x, wg, b) is not None
    with torch.inference_mode():
        assert _call(x, w, b) is not None
    with _Passthrough():
        assert _call(x, w, b) is None
    with forward_ad.dual_level():
        assert _call(x, w, b) is None
    assert torch.func.vmap(lambda r: _call(r, w, b) is None and r)(x).all()
    assert _call(x.t().contiguous().t(), w, b) is None  # strides
    assert _call(torch.randn(4096, 2).t(), w, b) is None
    assert _call(x.double(), w.double(), b.double()) is None
    assert _call(x, w.bfloat16(), b) is None  # weight and bias of two dtypes
    assert _call(x.bfloat16(), w.bfloat16(), b) is None
    assert _call(x, w[:100], b) is None  # the general path raises
    assert _call(torch.ones(0, 4096).double(), w, b) is None  # (no rows, no dtype of the kernel's)
    assert _call(x, w.reshape(64, 64), b) is None
    assert _call(x, w, b, eps=1) is None  # (an int eps: the general path's checks)
    assert _call(x, w, b, options=(64.0, "tree", "pairwise", "float", "auto")) is None
    assert _call(x, w, b, options=([64], "tree", "pairwise", "float", "auto")) is None  # unhashable
    assert _call(torch.randn(1, 4097), None, None) is None  # no pipeline of that size yet
    assert _call(torch.empty(0, 4096), w, b) is None
    assert _call(torch.randn(SPLIT_NUMEL // 4096, 4096), w, b) is None
    with tgn.backends.use("torch_ops"):
        assert _call(x, w, b) is None
    with native_loader.disabled():
        assert _call(x, w, b) is None
    nan = x.clone()
    nan[1, 3] = float("nan")
    assert _call(nan, w, b) is None
    assert bits_equal(tgn.layer_norm_sync(nan, w, b), _torch_ops(nan, w, b))
    with pytest.raises(RuntimeError):
        tgn.layer_norm_sync(x, w[:100], b)


def test_the_c_functions_refuse_wrong_arguments() -> None:
    module = native_loader.module()
    with pytest.raises(TypeError, match="takes 10 arguments"):
        module.layer_face(*[None] * 11)
    with pytest.raises(ValueError, match="at least 1"):
        module.layer_face_config(0, 64, 0, 0, 0, 0, 1)
    with pytest.raises(TypeError, match="ContextVar"):
        module.face_setup(*[None] * 16, 1e-5)
    x = torch.ones(1, 8)
    assert module.layer_face({}, x, None, None, None, *OPTIONS) is None  # no pipeline
    assert module.layer_face([], x, None, None, None, *OPTIONS) is None  # not a dict


def test_compiled_fullgraph_traces_the_stand_in(face: list[bool]) -> None:
    x, w, b = _data(4, 256, torch.float32, seed=9)
    for _ in range(2):
        tgn.layer_norm_sync(x, w, b)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: tgn.layer_norm_sync(t, w, b) * 2, fullgraph=True, backend="eager")
    assert bits_equal(compiled(x), tgn.layer_norm_sync(x, w, b) * 2)
