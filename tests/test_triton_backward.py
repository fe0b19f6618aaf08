"""The Triton backward: ``backward_torch``'s bits, in Triton's interpreter (CPU), in the
PTX the kernels compile to (CPU), and on a GPU (``-m gpu``).

As in tests/test_triton.py, the interpreter checks the order of every addition and
the rounding sequence; the PTX checks that the GPU adds no contraction or
approximation; ``TRITON_INTERPRET`` is set per test (monkeypatch).
"""

from __future__ import annotations

import pytest
import torch

from taskgraph_norm import backends, kernels, pipeline
from taskgraph_norm.errors import ExecutionError
from taskgraph_norm.backends.triton import backward as triton_backward
from taskgraph_norm.ops import backward as ops_backward
from .conftest import FULL, gen
from .helpers import assert_bits_equal, backend_backward, bits_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA = torch.cuda.is_available()
EPS = 1e-6
#: (hidden, chunk, topology, accumulate): a placed tree (7 does not divide 50), a natural
#: tree, a left fold, one chunk, the exact domain.
PLANS = [(50, 7, "tree", "float"), (64, 16, "tree", "float"), (50, 8, "linear", "float"),
         (50, 64, "tree", "float"), (50, 7, "race", "exact")]
PLAN_IDS = ["tree-placed", "tree-natural", "linear", "single", "exact"]


def pipe_of(hidden: int, chunk: int, topology: str, accumulate: str, mode: str = "torch",
            offset: float = 0.0) -> pipeline.Pipeline:
    return pipeline.for_config(hidden, chunk, topology, "pairwise", accumulate, "auto", mode, offset)


def operands(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0, dy_dtype: torch.dtype | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, dy, rms)``: x over six decades (any change of order shows in the bits)."""
    scale = torch.logspace(-3, 3, hidden)[torch.randperm(hidden, generator=gen(seed))]
    x = (torch.randn(rows, hidden, generator=gen(seed + 1)) * scale).to(dtype)
    dy = torch.randn(rows, hidden, generator=gen(seed + 2)).to(dy_dtype or dtype)
    xa = x.to(torch.float32)
    rms = kernels.finalize_rms((xa * xa).sum(-1, keepdim=True), hidden, EPS, torch.float32)
    return x, dy, rms


def weight_of(hidden: int, dtype: torch.dtype | None, seed: int = 3) -> torch.Tensor | None:
    return None if dtype is None else (1 + 0.5 * torch.randn(hidden, generator=gen(seed))).to(dtype)


def check(pipe: pipeline.Pipeline, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, rms: torch.Tensor,
          offset: float = 0.0, round_x_hat: bool = False, input_grad: bool = True,
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    got = backend_backward("triton", pipe, dy, x, w, rms, input_grad, True, offset, round_x_hat)
    want = backend_backward("torch_ops", pipe, dy, x, w, rms, input_grad, True, offset, round_x_hat)
    for name, a, b in zip(("dx", "dW"), got, want):
        assert (a is None) == (b is None), name
        if a is not None and b is not None:
            assert_bits_equal(a, b, f"{name} triton vs torch, {pipe.plan}")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
def test_dx_and_dw_match_backward_torch(interpreted: None, plan: tuple[int, int, str, str],
                                        dtype: torch.dtype) -> None:
    hidden, chunk, topology, accumulate = plan
    x, dy, rms = operands(9, hidden, dtype)
    check(pipe_of(*plan), dy, x, weight_of(hidden, dtype), rms)


@pytest.mark.parametrize("weight", [None, torch.float32], ids=["no-weight", "fp32-weight"])
@pytest.mark.parametrize("mode,offset", [("torch", 0.0), ("gemma", 1.0), ("llama", 0.3)])
def test_weights_offsets_and_llama(interpreted: None, weight: torch.dtype | None, mode: str, offset: float) -> None:
    hidden = 50
    pipe = pipe_of(hidden, 7, "tree", "float", mode, offset)
    x, dy, rms = operands(5, hidden, torch.bfloat16, dy_dtype=torch.float32 if mode == "llama" else None)
    llama = mode == "llama"
    dx, dw = check(pipe, dy, x, weight_of(hidden, weight), rms, offset, round_x_hat=llama)
    if weight is not None:  # negative control: the offset and the rounding of x_hat are seen
        other = backend_backward("torch_ops", pipe, dy, x, weight_of(hidden, weight), rms, True, True, 0.0 if offset else 1.0,
                               not llama)
        assert dx is not None and dw is not None and other[0] is not None and other[1] is not None
        assert not bits_equal(dx, other[0]) and not bits_equal(dw, other[1])


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_row_blocks(interpreted: None, rows: int, dtype: torch.dtype) -> None:
    x, dy, rms = operands(rows, 40, dtype, seed=rows)
    x[:, 0], dy[:, 0] = x[:, 0].abs(), -0.0  # column 0: every dy * x_hat is -0 (the padding's sign shows)
    w = weight_of(40, dtype)
    pipe = pipe_of(40, 8, "tree", "float")
    _, dw = check(pipe, dy, x, w, rms, input_grad=False)
    again = backend_backward("triton", pipe, dy, x, w, rms, False, True)[1]
    assert dw is not None and again is not None
    assert_bits_equal(again, dw, "dW twice")  # determinism
    if rows >= 31 and dtype == torch.float32:  # negative control: another order over rows differs
        assert not bits_equal(dw, (dy * (x / rms)).sum(0))


def adversarial(hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` and ``dy``: zeros with ``-0`` gradients (every product ``-0``: the
    padding's sign shows), signed zeros, Inf, NaN, overflowing products, a subnormal row."""
    big = torch.finfo(dtype).max
    x, dy = operands(8, hidden, torch.float32, seed=5)[:2]
    x[0], dy[0] = 0.0, -0.0
    x[1, ::2], dy[1, 1::2] = -0.0, -0.0
    x[2, 3], x[3, 4], dy[3, 5] = float("inf"), float("nan"), float("inf")
    x[4], dy[4] = big, big
    x[5] = torch.finfo(dtype).tiny / 8
    return x.to(dtype), dy.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plan", [PLANS[0], PLANS[2], PLANS[4]], ids=["tree", "linear", "exact"])
def test_adversarial_rows(interpreted: None, plan: tuple[int, int, str, str], dtype: torch.dtype) -> None:
    hidden = plan[0]
    x, dy = adversarial(hidden, dtype)
    for eps in (EPS, 0.0):  # eps = 0: the zero row's rms is 0 (flagged)
        xa = x.to(torch.float32)
        rms = kernels.finalize_rms((xa * xa).sum(-1, keepdim=True), hidden, eps, torch.float32)
        w = weight_of(hidden, dtype)
        assert w is not None
        check(pipe_of(*plan), dy, x, w.abs(), rms)  # |w|: g of the zero row is -0 too


def test_negative_zero_padding_is_seen() -> None:
    """The adversarial zero row needs ``-0`` padding: ``+0`` padding (a carried ``-0``
    meeting ``+0``) changes ``s`` and then ``dx``'s signs, so the row above can fail."""
    v = torch.full((1, 7), -0.0)
    s_ref = kernels.pairwise_halving_(v.clone())  # 7 = 4 + 3: an element is carried
    padded = torch.cat([v, torch.zeros(1, 1)], dim=-1)  # a fold from width 8 with +0
    s_plus = kernels.pairwise_halving_(padded)
    assert not bits_equal(s_ref, s_plus)
    xa, g = torch.zeros(1, 7), torch.full((1, 7), -0.0)
    rms = torch.ones(1, 1)
    assert not bits_equal(kernels.input_grad(xa, g, rms, s_ref, torch.float32),
                          kernels.input_grad(xa, g, rms, s_plus, torch.float32))


@pytest.mark.parametrize("plan", [PLANS[0], PLANS[4]], ids=["tree", "exact"])
def test_dx_batch_invariance(interpreted: None, plan: tuple[int, int, str, str]) -> None:
    hidden = plan[0]
    x, dy, rms = operands(12, hidden, torch.float32, seed=11)
    w = weight_of(hidden, torch.float32)
    pipe = pipe_of(*plan)
    batch = backend_backward("triton", pipe, dy, x, w, rms, True, False)[0]
    assert batch is not None
    for i in (0, 7, 11):
        alone = backend_backward("triton", pipe, dy[i:i + 1], x[i:i + 1], w, rms[i:i + 1], True, False)[0]
        assert alone is not None
        assert_bits_equal(alone, batch[i:i + 1], f"row {i} alone vs in the batch")
    # Negative control: another merge order gives other bits on these rows.
    other = backend_backward("triton", pipe_of(hidden, 8, "linear", "float"), dy, x, w, rms, True, False)[0]
    assert other is not None and not bits_equal(other, batch)


def test_the_op_dispatches_to_triton_only_when_asked(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = triton_backward.run_backward

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_backward, "run_backward", spy)
    x, dy, rms = operands(4, 50, torch.float32)
    w = weight_of(50, torch.float32)
    config = (7, "tree", "pairwise", "float", "torch", 0.0, "float", [True, True])
    default = ops_backward.backward(dy, x, w, rms, *config)
    assert calls == []  # CPU tensors: the C kernel, even under TRITON_INTERPRET=1
    with backends.use("triton", "native", "torch_ops"):  # Triton on CPU tensors only when asked for by name
        asked = ops_backward.backward(dy, x, w, rms, *config)
    assert calls == [1]
    for a, b in zip(asked, default):
        assert_bits_equal(a, b, "triton vs the C kernel through the op")


def test_errors(interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pipe_of(50, 7, "tree", "float")
    assert pipe.plan is not None
    x, dy, rms = operands(2, 50, torch.float32)
    with pytest.raises(ExecutionError, match="float32, bfloat16"):
        triton_backward.run_backward(pipe.plan, dy.double(), x.double(), None, rms, True, False)
    with pytest.raises(ExecutionError, match=r"\(rows, 50\)"):
        triton_backward.run_backward(pipe.plan, dy[:, :49], x, None, rms, True, False)
    cat = pipeline.for_config(50, 7, "cat", "pairwise", "float", "auto", "torch", 0.0)
    assert cat.plan is not None
    assert not triton_backward.supports_backward(cat.plan, x, dy, None, rms, on_cpu=True)
    with pytest.raises(ExecutionError, match="cat"):
        triton_backward.run_backward(cat.plan, dy, x, None, rms, True, False)
    assert triton_backward.supports_backward(pipe.plan, x, dy, None, rms, on_cpu=True)
    assert not triton_backward.supports_backward(pipe.plan, x, dy, None, rms)  # CPU: not asked
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ExecutionError, match="TRITON_INTERPRET"):
        triton_backward.run_backward(pipe.plan, dy, x, None, rms, True, False)


@pytest.mark.parametrize("plan,dtype,part", [
    (PLANS[0], torch.bfloat16, "dx"), (PLANS[2], torch.float16, "dx"), (PLANS[4], torch.bfloat16, "dx"),
    (PLANS[0], torch.bfloat16, "dw"),
], ids=["tree-dx", "linear-dx", "exact-dx", "dw-llama"])
def test_ptx_rounds_like_the_reference(plan: tuple[int, int, str, str], dtype: torch.dtype, part: str) -> None:
    pytest.importorskip("triton")
    from taskgraph_norm.backends.triton.ptx import backward_ptx, forbidden_instructions

    p = pipe_of(*plan).plan
    assert p is not None
    ptx = backward_ptx(p, dtype, part=part, offset=1.0, round_x_hat=True)
    assert forbidden_instructions(ptx) == []
    for op in ["div.rn.f32", "mul.rn.f32", "add.rn.f32"] + (["sub.rn.f32"] if part == "dx" else []):
        assert op in ptx, op
    if plan[3] == "float" or part == "dw":  # the -0.0 padding survives compilation
        assert "-2147483648" in ptx or "0f80000000" in ptx
    if part == "dx" and plan[2] != "tree":  # negative control: contraction on fuses g/rms - xa*k
        fused = backward_ptx(p, dtype, part=part, offset=1.0, fp_fusion=True)
        assert any(line.startswith("fma.") for line in forbidden_instructions(fused))


def _full_cases() -> list[tuple[int, int, str, str, torch.dtype, str, float]]:
    plans = [(7, 3, "tree", "float"), (256, 64, "tree", "float"), (1000, 64, "tree", "float"),
             (256, 64, "linear", "float"), (7, 3, "tree", "exact"), (1000, 9, "race", "exact")]
    modes = [("torch", 0.0), ("gemma", 1.0), ("llama", 0.3)]
    cases = [(*p, dt, *m) for p in plans for dt in DTYPES for m in modes]
    return cases if FULL else cases[:2]


@pytest.mark.slow
@pytest.mark.parametrize("hidden,chunk,topology,accumulate,dtype,mode,offset", _full_cases())
def test_full_matrix(interpreted: None, hidden: int, chunk: int, topology: str, accumulate: str,
                     dtype: torch.dtype, mode: str, offset: float) -> None:
    pipe = pipe_of(hidden, chunk, topology, accumulate, mode, offset)
    x, dy, rms = operands(33, hidden, dtype, seed=hidden)
    for w_dtype in (None, dtype, torch.float32):
        check(pipe, dy, x, weight_of(hidden, w_dtype), rms, offset,
              round_x_hat=mode == "llama" and dtype != torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("hidden,chunk,topology,accumulate", [(4096, 64, "tree", "float"), (1000, 9, "linear", "float"),
                                                              (1000, 9, "race", "exact")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_cpu(hidden: int, chunk: int, topology: str, accumulate: str, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    config = (chunk, topology, "pairwise", accumulate, "llama", 1.0, "float", [True, True])
    x, dy, rms = operands(70, hidden, dtype, seed=hidden)
    x[3, 5] = float("nan")  # a flagged row, finished on the CPU
    w = weight_of(hidden, torch.float32)
    dy = dy.float()  # llama with an fp32 weight returns (and so receives) fp32
    cpu = ops_backward.backward(dy, x, w, rms, *config)
    assert w is not None
    dev = ops_backward.backward(dy.cuda(), x.cuda(), w.cuda(), rms.cuda(), *config)
    for a, b in zip(dev, cpu):
        assert_bits_equal(a.cpu(), b, f"CUDA vs CPU backward, {dtype}")
