"""RMSNorm's C face (backends/native/face.py's ``rms_face``, csrc/native_face.c and
native_face_calls.c): a ``normalize_sync`` or ``tgn.RMSNorm`` call with no gradient to
record, no tracer and no residual is checked and run in one C call, with the direct
call's configuration (backends/native/direct.py), into a fresh output or ``out``; calls of
``SPLIT_NUMEL`` elements or more share their rows among the team's threads (not from the
async face, which runs them on a worker thread).

Its bits are the torch-ops backend's (fp32/bf16/fp16 ``x``; weights of ``x``'s dtype,
fp32 or none; the three casting modes and an offset; float and exact plans; 1 and 2
threads); it is really taken (a spy sees a result); and what it must leave to the Python
path comes back ``None`` with nothing done: a dtype pair whose output is not ``x``'s
dtype, a gradient to record, a dispatch mode, forward AD, ``vmap``, strides, fp64, a
misshapen weight, an offset with no weight, an int ``eps``, no rows, a large call from the
async face, an ``out`` the direct path does not write (another dtype, shape or layout, or
bytes shared with ``x`` or the weight), a context without native C, a NaN row.  Under
``torch.compile(fullgraph=True)`` dynamo traces the stand-in."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
import torch
from torch.autograd import forward_ad

import taskgraph_norm as tgn
from taskgraph_norm.backends.native import face as native_face
from taskgraph_norm.backends.native import team
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


def _call(x: object, w: object = None, eps: object = None, options: tuple[Any, ...] = OPTIONS, out: object = None,
          large: bool = True) -> Any:
    return native_face.rms_face(pipeline_cache.PIPELINES, x, w, eps, *options, out, large)


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
    assert _call(torch.randn(SPLIT_NUMEL // 4096, 4096), w, large=False) is None  # the async face's
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
    with pytest.raises(TypeError, match="takes 13 arguments"):
        module.rms_face(*[None] * 12)
    x = torch.ones(1, 8)
    assert module.rms_face({}, x, None, None, *OPTIONS, None, True) is None  # no pipeline


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_calls_share_their_rows(dtype: torch.dtype, threads: int, face: list[bool]) -> None:
    """(3000, 1024) and (8192, 64): the face takes them, on the team's threads (2: some rows
    run on a thread other than the caller's), fresh and into ``out``, with the bits of the
    torch ops; the async face leaves them to its worker thread, with the same bits."""
    for rows, hidden in ((3000, 1024), (8192, 64)):
        x, w = _data(rows, hidden, dtype, seed=rows)
        want = _torch_ops(x, w)
        shared = team.worker_rows()
        y = warm_face_call(face, lambda: tgn.normalize_sync(x, w))
        assert face == [True] and bits_equal(y, want)
        assert (team.worker_rows() > shared) == (threads > 1)
        out = torch.full_like(x, float("nan"))
        assert warm_face_call(face, lambda: tgn.normalize_sync(x, w, out=out)) is out
        assert face == [True] and bits_equal(out, want)
        assert _call(x, w, large=False) is None
        assert bits_equal(anyio.run(lambda: tgn.normalize(x, w)), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_written_and_returned(dtype: torch.dtype, face: list[bool]) -> None:
    """A short call with ``out``: the face writes it and returns it (the sync, async and
    module faces' caller returns ``out`` itself)."""
    x, w = _data(5, 4096, dtype, seed=11)
    out = torch.empty_like(x)
    assert warm_face_call(face, lambda: tgn.normalize_sync(x, w, out=out)) is out
    assert face == [True] and bits_equal(out, _torch_ops(x, w))
    out.zero_()
    assert _call(x, w, out=out, large=False) is out and bits_equal(out, _torch_ops(x, w))


def test_what_out_the_face_declines(face: list[bool]) -> None:
    """An ``out`` the direct path does not write comes back ``None`` with nothing written;
    the Python path then raises (another dtype or shape, bytes shared with ``x`` or the
    weight) or runs the call (strides, ``x`` itself: in place), as before."""
    rows = torch.zeros(5 * 4096)  # x is its first four rows; an out over rows 1-4 shares three
    x = rows[: 4 * 4096].view(4, 4096)
    x.copy_(_data(4, 4096, torch.float32, seed=13)[0])
    weights = torch.zeros(5 * 4096)  # the weight is its first row; an out from its middle shares half
    w = weights[:4096]
    w.copy_(_data(4, 4096, torch.float32, seed=13)[1])
    for _ in range(2):
        tgn.normalize_sync(x, w)
    declined = {
        "another dtype": torch.zeros(4, 4096, dtype=torch.bfloat16),
        "another shape": torch.zeros(2, 8192),
        "strides": torch.zeros(4096, 4).t(),
        "x itself": x,
        "bytes of x": rows[4096:].view(4, 4096),
        "the weight's bytes": weights[2048 : 2048 + 4 * 4096].view(4, 4096),
    }
    for why, out in declined.items():
        before = out.clone()
        assert _call(x, w, out=out) is None, why
        assert bits_equal(out, before), why
    assert _call(x, w, out=torch.zeros(2, 4, 4096)[1]) is not None  # the control: another tensor's rows
    want = _torch_ops(x, w)
    with pytest.raises(tgn.ConfigError, match="out"):
        tgn.normalize_sync(x, w, out=declined["another shape"])
    for shared in ("bytes of x", "the weight's bytes"):
        with pytest.raises(tgn.OverlapError):
            tgn.normalize_sync(x, w, out=declined[shared])
    assert bits_equal(tgn.normalize_sync(x, w, out=declined["strides"]), want)
    assert tgn.normalize_sync(x, w, out=x) is x and bits_equal(x, want)  # in place


def test_compiled_fullgraph_traces_the_stand_in(face: list[bool]) -> None:
    x, w = _data(4, 256, torch.float32, seed=9)
    for _ in range(2):
        tgn.normalize_sync(x, w)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: tgn.normalize_sync(t, w) * 2, fullgraph=True, backend="eager")
    assert bits_equal(compiled(x), tgn.normalize_sync(x, w) * 2)
