"""Gated, grouped RMSNorm (docs/design.md section 15): bits, invariance, gradients, faces.

Every invariance claim is checked bit for bit (an int view), each with a negative
control that must find a difference: a row alone against the same row in a batch,
a group against the same group with the other groups changed, and the gate's
``silu`` at every position of a loop against torch's ``F.silu``, which differs.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import taskgraph_norm as tgn
from taskgraph_norm.errors import ConfigError, GateShapeError
from taskgraph_norm.kernels.gate import silu

from .helpers import bits_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ORDERS = (False, True)  # norm_before_gate
MODES = ("torch", "llama", "gemma")


def data(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 2, hidden)[torch.randperm(hidden, generator=g)]
    x = (torch.randn(rows, hidden, generator=g) * scale).to(dtype)
    gate = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    return x, gate, w


def plain(x: torch.Tensor, gate: torch.Tensor | None, w: torch.Tensor | None, eps: float, group: int,
          before: bool, mode: str = "torch", offset: float = 0.0) -> torch.Tensor:
    """An independent formula in plain torch (torch's reduction order and silu)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = None if gate is None else F.silu(gate.to(acc))
    h = x.to(acc) * s if s is not None and not before else x.to(acc)
    shape = x.shape
    hg = h.reshape(*shape[:-1], shape[-1] // group, group)
    n = (hg / torch.sqrt(hg.pow(2).mean(-1, keepdim=True) + eps)).reshape(shape)
    if mode == "llama":
        n = n.to(x.dtype)
        wide = torch.promote_types(w.dtype, x.dtype) if w is not None else x.dtype
        m = n.to(wide) * (w.to(wide) + offset) if w is not None else n
        return (m * s).to(x.dtype) if s is not None and before else m
    m = n * (w.to(acc) + offset) if w is not None else n
    m = m * s if s is not None and before else m
    return m.to(x.dtype)


def ours(x: torch.Tensor, gate: torch.Tensor | None, w: torch.Tensor | None, group: int | None, before: bool,
         **options: Any) -> torch.Tensor:
    y: torch.Tensor = tgn.normalize_sync(x, w, 1e-6, gate=gate, group_size=group, norm_before_gate=before,
                                         chunk_size=16, **options)
    return y


# --- values ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("before", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_a_plain_torch_formula_within_rounding(dtype: torch.dtype, before: bool, mode: str) -> None:
    x, gate, w = data(37, 256, dtype)
    offset = 1.0 if mode == "gemma" else 0.0
    y = ours(x, gate, w, 64, before, casting_mode=mode, offset=offset)
    ref = plain(x.double(), gate.double(), w.double(), 1e-6, 64, before, "torch", offset)
    assert y.dtype == plain(x, gate, w, 1e-6, 64, before, mode, offset).dtype
    tol = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=2 * tol, atol=2 * tol * ref.abs().max().item())
    # and against the plain formula in the same dtypes: only a last-bit rounding differs
    diff = (y != plain(x, gate, w, 1e-6, 64, before, mode, offset)).float().mean().item()
    assert diff <= (0.6 if dtype == torch.float32 else 0.02)


def test_without_a_gate_and_groups_it_is_rmsnorm() -> None:
    for mode in MODES:
        x, _, w = data(9, 128, torch.bfloat16)
        y = tgn.normalize_sync(x, w, 1e-6, casting_mode=mode, group_size=128)
        assert bits_equal(y, tgn.normalize_sync(x, w, 1e-6, casting_mode=mode))


def test_an_offset_without_a_weight_has_no_effect() -> None:
    x, gate, _ = data(5, 64, torch.float32)
    for before in ORDERS:
        assert bits_equal(ours(x, gate, None, 16, before, offset=1.0), ours(x, gate, None, 16, before))
    assert bits_equal(tgn.normalize_sync(x, None, offset=1.0), tgn.normalize_sync(x))
    norm = tgn.RMSNorm(64, elementwise_affine=False, offset=1.0)
    assert bits_equal(norm(x), tgn.normalize_sync(x))


def test_the_gate_order_matters() -> None:
    x, gate, w = data(16, 128, torch.bfloat16)
    differ = (ours(x, gate, w, None, False) != ours(x, gate, w, None, True)).float().mean().item()
    assert differ > 0.3


# --- bits the same on every backend -----------------------------------------------


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    with tgn.backends.use(name):
        yield


@pytest.mark.parametrize("name", ["native", "torch_ops"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_backend_gives_the_torch_ops_bits(name: str, dtype: torch.dtype) -> None:
    x, gate, w = data(300, 512, dtype)
    for before in ORDERS:
        for mode in MODES:
            with backend("torch_ops"):
                oracle = ours(x, gate, w, 128, before, casting_mode=mode)
            with backend(name):
                assert bits_equal(ours(x, gate, w, 128, before, casting_mode=mode), oracle)
            assert bits_equal(ours(x, gate, w, 128, before, casting_mode=mode, executor="reference"), oracle)


@pytest.mark.usefixtures("interpreted")
def test_triton_gives_the_torch_ops_bits() -> None:
    x, gate, w = data(6, 64, torch.float32)
    for before in ORDERS:
        with backend("torch_ops"):
            oracle = ours(x, gate, w, 32, before, casting_mode="llama")
        assert bits_equal(ours(x, gate, w, 32, before, casting_mode="llama", executor="triton"), oracle)


# --- invariance, with negative controls -------------------------------------------


def test_silu_is_position_invariant_and_torch_silu_is_not() -> None:
    g = torch.randn(1 << 14, generator=torch.Generator().manual_seed(3)) * 4
    whole = silu(g, torch.float32)
    alone = torch.cat([silu(g[i:i + 3], torch.float32) for i in range(0, 3000, 3)])
    assert bits_equal(whole[:3000], alone)
    torch_alone = torch.cat([F.silu(g[i:i + 3]) for i in range(0, 3000, 3)])
    assert not bits_equal(F.silu(g)[:3000], torch_alone)  # the control: torch's vector/scalar paths differ
    ref = (g.double() * torch.sigmoid(g.double())).float()
    assert bits_equal(whole, ref)  # and it is the fp64 value rounded once


@pytest.mark.parametrize("before", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_are_batch_invariant(dtype: torch.dtype, before: bool) -> None:
    x, gate, w = data(3001, 256, dtype)  # a few thousand rows: split among threads
    batch = ours(x, gate, w, 64, before, casting_mode="llama")
    for i in (0, 1, 1500, 2999, 3000):
        assert bits_equal(ours(x[i:i + 1], gate[i:i + 1], w, 64, before, casting_mode="llama"), batch[i:i + 1])
    assert bits_equal(ours(x[7:20], gate[7:20], w, 64, before, casting_mode="llama"), batch[7:20])


def test_the_batch_check_finds_a_batch_dependent_norm() -> None:
    x, gate, w = data(64, 256, torch.float32)

    def dependent(xs: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        chunk = 64 if xs.shape[0] == 1 else 4  # chunking that follows the row count
        return tgn.normalize_sync(xs, w, 1e-6, gate=gs, group_size=64, chunk_size=chunk, topology="linear")

    batch = dependent(x, gate)
    assert any(not bits_equal(dependent(x[i:i + 1], gate[i:i + 1]), batch[i:i + 1]) for i in range(64))


@pytest.mark.parametrize("before", ORDERS)
def test_a_group_depends_on_its_own_values_only(before: bool) -> None:
    x, gate, w = data(50, 512, torch.bfloat16)
    y = ours(x, gate, w, 128, before)
    x2, gate2 = x.clone(), gate.clone()
    x2[:, 128:] = x2[:, 128:] * 3 + 1
    gate2[:, 256:] = -gate2[:, 256:]
    y2 = ours(x2, gate2, w, 128, before)
    assert bits_equal(y[:, :128], y2[:, :128])
    # the control: without groups the first 128 values change with the others
    assert not bits_equal(ours(x, gate, w, None, before)[:, :128], ours(x2, gate2, w, None, before)[:, :128])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("before", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_modes_give_the_same_bits(dtype: torch.dtype, before: bool, group: int | None, mode: str) -> None:
    # no grad: the C gate (and, norm first in llama mode, FINALIZE's weight); under grad:
    # the differentiable pieces
    x, gate, w = data(40, 128, dtype)
    x[3, 5] = float("nan")
    norm = tgn.GatedRMSNorm(128, 1e-6, group_size=group, norm_before_gate=before, casting_mode=mode, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        base = norm(x, gate)
    assert bits_equal(norm(x.clone().requires_grad_(), gate), base)
    assert bits_equal(norm(x, gate.clone().requires_grad_()), base)
    with torch.inference_mode():
        assert bits_equal(norm(x.detach(), gate), base)


# --- gradients --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("before", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dx_dgate_dw_match_autograd_of_the_plain_formula(dtype: torch.dtype, before: bool, mode: str) -> None:
    x, gate, w = data(33, 128, dtype)
    offset = 1.0 if mode == "gemma" else 0.0
    dy = torch.randn(33, 128, generator=torch.Generator().manual_seed(9)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, gate, w)]
    ours(*leaves[:2], leaves[2], 32, before, casting_mode=mode, offset=offset).backward(dy)
    refs = [t.double().requires_grad_() for t in (x, gate, w)]
    plain(refs[0], refs[1], refs[2], 1e-6, 32, before, "torch", offset).backward(dy.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, ref in zip(leaves, refs):
        assert got.grad is not None and ref.grad is not None and got.grad.dtype == dtype
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=tol, atol=tol * scale)


def test_gradients_are_the_same_bits_on_every_backend_and_compiled() -> None:
    x, gate, w = data(70, 256, torch.bfloat16)
    dy = torch.randn(70, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def grads(run: Any) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, gate, w)]
        run(*leaves).backward(dy)
        return [t.grad for t in leaves]  # type: ignore[misc]

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return tgn.normalize_sync(a, c, 1e-6, gate=b, group_size=64, casting_mode="llama")

    with backend("torch_ops"):
        oracle = grads(fn)
    for got in (grads(fn), grads(torch.compile(fn, fullgraph=True, backend="aot_eager"))):
        assert all(bits_equal(a, b) for a, b in zip(got, oracle))


def _grad_after(splits: list[int], weight_grad: str) -> torch.Tensor:
    """``weight.grad`` of a gated module after backward calls over ``splits`` rows each."""
    x, gate, w = data(96, 128, torch.float32)
    dy = torch.randn(96, 128, generator=torch.Generator().manual_seed(4))
    norm = tgn.GatedRMSNorm(128, 1e-6, group_size=32, casting_mode="llama", weight_grad=weight_grad)
    with torch.no_grad():
        norm.weight.copy_(w)
    start = 0
    for n in splits:
        norm(x[start:start + n], gate[start:start + n]).backward(dy[start:start + n])
        start += n
    assert norm.weight.grad is not None
    return norm.weight.grad


def test_exact_weight_grad_is_invariant_to_micro_batching() -> None:
    one = _grad_after([96], "exact")
    assert bits_equal(_grad_after([40, 56], "exact"), one)
    assert bits_equal(_grad_after([1] * 8 + [88], "exact"), one)
    # the control: the float weight gradient's order follows the split
    assert not bits_equal(_grad_after([1] * 8 + [88], "float"), _grad_after([96], "float"))


# --- faces: module, ops, compile, export ---------------------------------------------


def test_module_compiles_as_one_graph_and_exports() -> None:
    with warnings.catch_warnings():  # inductor's first import warns (torch.utils.mkldnn's jit)
        warnings.simplefilter("ignore", DeprecationWarning)
        importlib.import_module("torch._inductor.compile_fx")
    x, gate, w = data(8, 128, torch.bfloat16)
    norm = tgn.GatedRMSNorm(128, group_size=32, norm_before_gate=True, casting_mode="llama", dtype=torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(norm)(x, gate)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    with torch.no_grad():
        eager = norm(x, gate)
        assert bits_equal(torch.compile(norm, fullgraph=True)(x, gate), eager)
        exported = torch.export.export(norm, (x, gate))
        assert "taskgraph_norm.gated_rms_norm" in str(exported.graph)
        assert bits_equal(exported.module()(x, gate), eager)
    torch._dynamo.reset()


def test_the_op_is_callable_directly() -> None:
    x, gate, w = data(4, 64, torch.float32)
    y = torch.ops.taskgraph_norm.gated_rms_norm(x, gate, w, 1e-6, 16, False, 16, "tree", "pairwise", "float",
                                                "torch", 0.0)
    assert bits_equal(y, ours(x, gate, w, 16, False))


def test_async_face_matches_sync() -> None:
    import anyio

    x, gate, w = data(4, 64, torch.float32)

    async def main() -> torch.Tensor:
        y: torch.Tensor = await tgn.normalize(x, w, 1e-6, gate=gate, group_size=16, chunk_size=16)
        return y

    assert bits_equal(anyio.run(main), ours(x, gate, w, 16, False))


def test_out_is_written() -> None:
    x, gate, w = data(4, 64, torch.float32)
    out = torch.empty_like(x)
    assert tgn.normalize_sync(x, w, 1e-6, gate=gate, group_size=16, chunk_size=16, out=out) is out
    assert bits_equal(out, ours(x, gate, w, 16, False))


def test_bad_input_is_refused_with_torch_error_types() -> None:
    x, gate, w = data(4, 64, torch.float32)
    with pytest.raises(GateShapeError) as info:
        tgn.normalize_sync(x, w, gate=gate[:, :32])
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ConfigError):
        tgn.normalize_sync(x, w, gate=gate, group_size=48)
    with pytest.raises(ConfigError):
        tgn.normalize_sync(x, w, gate=gate, residual=x)
    with pytest.raises(ConfigError):
        tgn.GatedRMSNorm(64, group_size=0)
    with pytest.raises(ConfigError):
        tgn.GatedRMSNorm(64, casting_mode="nope")
    with pytest.raises(TypeError):
        tgn.normalize_sync(x, w, gate=[1.0])  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_c_gate_gives_the_torch_form_bits(dtype: torch.dtype) -> None:
    from taskgraph_norm.backends.native import gate as native_gate
    from taskgraph_norm.kernels.gate import silu_sigmoid

    g = (torch.randn(1 << 15, generator=torch.Generator().manual_seed(6)) * torch.logspace(-3, 2.5, 1 << 15))
    g[:8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e4, -1e4, -100.0])
    g = g.to(dtype)
    if not native_gate.runs(g):
        pytest.skip("native kernels not built")
    s, sig = native_gate.silu_sigmoid(g, True)
    ts, tsig = silu_sigmoid(g, torch.float32, True)
    assert tsig is not None and sig is not None
    assert bits_equal(s, ts) and bits_equal(sig, tsig)


def test_an_fp64_weight_after_the_norm_runs_both_paths_alike() -> None:
    # llama mode multiplies by an fp64 weight in fp64: the C gate does not take that product
    x, gate, _ = data(6, 64, torch.bfloat16)
    w = torch.rand(64, dtype=torch.float64) + 0.5
    for group in (None, 16):
        with torch.no_grad():
            base = ours(x, gate, w, group, True, casting_mode="llama")
        assert base.dtype == torch.bfloat16
        assert bits_equal(ours(x.clone().requires_grad_(), gate, w, group, True, casting_mode="llama"), base)


@pytest.mark.parametrize("before", ORDERS)
def test_opcheck(before: bool) -> None:
    x, gate, w = (t.requires_grad_() for t in data(3, 32, torch.float32))
    config = (16, "tree", "pairwise", "float", "llama", 0.0)
    torch.library.opcheck(tgn.ops.gated_rms_norm_op, (x, gate, w, 1e-6, 16, before, *config))
    # The backward op's kernel differentiates the eager construction with torch.func.vjp:
    # its registration is checked; run inside a dispatch mode (opcheck's schema, fake and
    # aot checks call it there) the vjp's wrapped tensors do not reach the kernels.
    dy = torch.randn(3, 32)
    torch.library.opcheck(tgn.ops.gated_rms_norm_backward_op,
                          (dy, x.detach(), gate.detach(), w.detach(), 1e-6, 16, before, *config, [True, True, True]),
                          test_utils=("test_autograd_registration",))
