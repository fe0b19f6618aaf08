"""LayerNorm's Triton backward (``dx``, ``dW``, ``db``) in Triton's interpreter on CPU:
the torch-ops backend's bits for float and exact plans, through the backend protocol
and through autograd, with negative controls; its PTX.  ``TRITON_INTERPRET`` is set
per test, as in tests/test_triton.py."""

from __future__ import annotations

from typing import Any

import numpy
import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import backends, kernels
from taskgraph_norm.backends.registry import BACKENDS
from taskgraph_norm.backends.torch_ops import layer as torch_layer
from taskgraph_norm.backends.triton import exact_dw
from taskgraph_norm.backends.triton import layer_backward as triton_lb
from taskgraph_norm.backends.triton import layout
from taskgraph_norm.errors import ExecutionError
from taskgraph_norm.pipeline.layer import layer_pipeline

from .helpers import assert_bits_equal, bits_equal
from .test_triton import DTYPES
from .test_triton_layer import hard_rows, inputs

#: (hidden, chunk, topology, accumulate): natural layouts, tables (a ragged last chunk,
#: odd chunks), one chunk, a left fold, a partial last column tile (4097), exact plans.
CASES = [(100, 32, "tree", "float"), (300, 64, "linear", "float"), (7, 64, "tree", "float"),
         (130, 16, "tree", "float"), (96, 10, "linear", "float"), (4097, 64, "tree", "float"),
         (100, 7, "linear", "exact"), (256, 64, "race", "exact"), (4099, 64, "tree", "exact")]
#: Rows: a full row block of ``ROW_BLOCK`` and a shorter last one.
ROWS = kernels.ROW_BLOCK + 5

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def plan_of(hidden: int, chunk: int, topology: str, accumulate: str = "float") -> Any:
    plan = layer_pipeline(hidden, chunk, topology, "pairwise", accumulate).plan
    assert plan is not None
    return plan


def operands(plan: Any, rows: int, dtype: torch.dtype, seed: int = 0, eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """``(dy, x, w, b, mean, den)``: the forward's statistics of ``x`` by torch ops."""
    x, w, b = inputs(rows, plan.hidden_size, dtype, seed)
    dy = (inputs(rows, plan.hidden_size, torch.float32, seed + 11)[0] - 3.0).to(dtype)
    fwd = torch_layer.run_layer(plan, x, w, b, eps, stats=True)
    assert fwd.mean is not None and fwd.den is not None
    return dy, x, w, b, fwd.mean, fwd.den


def both(plan: Any, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, mean: torch.Tensor,
         den: torch.Tensor, **kw: Any) -> tuple[Grads, Grads]:
    """``(Triton's, the torch-ops backend's)`` ``(dx, dW, db)`` through the backend protocol."""
    args = dict(input_grad=True, weight_grad=True, bias_grad=True) | kw
    got = BACKENDS["triton"].layer_backward(plan, dy, x, w, mean, den, **args)
    want = BACKENDS["torch_ops"].layer_backward(plan, dy, x, w, mean, den, **args)
    return got, want


def assert_grads_equal(got: Grads, want: Grads, label: str) -> None:
    for name, a, b in zip(("dx", "dW", "db"), got, want):
        assert (a is None) == (b is None), f"{label} {name}"
        if a is not None and b is not None:
            assert_bits_equal(a, b, f"{label} {name}")


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Triton kernels launched (by name), so a test sees the kernels ran: no fallback."""
    ran: list[str] = []
    module = triton_lb._module

    def spy(interpret: bool) -> Any:
        real = module(interpret)

        class Recorder:
            def __getattr__(self, name: str) -> Any:
                ran.append(name)
                return getattr(real, name)

        return Recorder()

    monkeypatch.setattr(triton_lb, "_module", spy)
    return ran


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("hidden, chunk, topology, accumulate", CASES)
def test_backward_gives_the_torch_ops_bits(hidden: int, chunk: int, topology: str, accumulate: str,
                                           launches: list[str]) -> None:
    plan = plan_of(hidden, chunk, topology, accumulate)
    large = hidden > 1000
    dtypes = (torch.bfloat16,) if large else DTYPES
    for dtype in dtypes:
        rows = 5 if large else ROWS
        dy, x, w, b, mean, den = operands(plan, rows, dtype, seed=hidden)
        x[1] = -0.0  # a row of -0.0 (and its dy): the -0.0 padding must add nothing
        dy[1] = -0.0
        if accumulate == "exact" and not large:
            hard = hard_rows(hidden).to(dtype)
            x[-4:] = hard
            dy[-4:] = hard  # without a weight, g = dy: means on or next to an fp32 rounding boundary
        dy[2] = -0.0  # g = -0 (no weight): sum(g) is -0, and its sign shows in dx where x_hat > 0
        # a column of -0 dy where every x_hat > 0: dW and db are -0 there (the padding of the
        # last row block must add nothing)
        dy[:, -1] = -0.0
        x[:, -1] = 32768.0
        stats = torch_layer.run_layer(plan, x, w, b, 1e-5, stats=True)
        assert stats.mean is not None and stats.den is not None
        mean, den = stats.mean, stats.den
        assert ((x[:, -1].float() > mean[:, 0]) | ~mean[:, 0].isfinite()).all()
        for weight in (w, None) if not large else (w,):
            got, want = both(plan, dy, x, weight, mean, den)
            assert_grads_equal(got, want, f"{dtype} D={hidden} C={chunk} {topology} {accumulate} "
                                          f"w={weight is not None}")
    dx_kernels = [n for n in launches if n.startswith("layer_dx_")]
    expected = "exact" if accumulate == "exact" else "tree" if topology == "tree" else "linear"
    assert dx_kernels and all(n == f"layer_dx_{expected}_kernel" for n in dx_kernels)
    assert launches.count("layer_dwb_blocks_kernel") == len(dx_kernels)


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_parameter_dtypes_and_bias_alone(dtype: torch.dtype, launches: list[str]) -> None:
    plan = plan_of(100, 32, "tree")
    dy, x, w, _, mean, den = operands(plan, 9, dtype, seed=4)
    for kw in (dict(input_grad=True, weight_grad=False, bias_grad=False),
               dict(input_grad=False, weight_grad=True, bias_grad=False),
               dict(input_grad=False, weight_grad=False, bias_grad=True),
               dict(input_grad=True, weight_grad=True, bias_grad=True, weight_dtype=torch.float32,
                    bias_dtype=torch.float32)):
        got, want = both(plan, dy, x, w.float(), mean, den, **kw)  # an fp32 weight with narrower x
        assert_grads_equal(got, want, f"{dtype} {kw}")
    assert len(launches) == 5  # dx, dW, db, then dx and the blocks together
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            assert_grads_equal(*both(plan, dy, x, w, mean, den), f"{dtype} under {mode.__name__}")
    assert len(launches) == 11
    fp32 = both(plan, dy.float(), x, w, mean, den)  # an fp32 dy with narrower x
    assert_grads_equal(*fp32, f"{dtype} fp32 dy")


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_row_blocks(dtype: torch.dtype, launches: list[str]) -> None:
    # 2000 rows: 62 full row blocks and a 16-row tail, merged level by level with odd
    # counts carried up (dx is one program per row, covered above: here dW and db alone).
    plan = plan_of(48, 16, "tree")
    dy, x, w, _, mean, den = operands(plan, 2000, dtype, seed=5)
    f32 = torch.float32  # fp32 gradients: the sums' own bits, before a cast could hide their order
    got, want = both(plan, dy, x, w, mean, den, input_grad=False, weight_dtype=f32, bias_dtype=f32)
    assert_grads_equal(got, want, f"{dtype} 2000 rows")
    assert launches == ["layer_dwb_blocks_kernel"]
    assert got[1] is not None and got[2] is not None  # negative control: another row order
    assert not bits_equal(got[1], (dy.float() * ((x.float() - mean) / den)).sum(0))
    assert not bits_equal(got[2], dy.float().sum(0))


@pytest.mark.usefixtures("interpreted")
def test_the_check_finds_another_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # Negative controls on a chosen input: another topology gives other dx bits, and a
    # kernel that folds in another order than the plan's fails the comparison.
    plan = plan_of(256, 16, "tree")
    dy, x, w, b, mean, den = operands(plan, ROWS, torch.float32, seed=3)
    got, want = both(plan, dy, x, w, mean, den)
    assert_grads_equal(got, want, "tree")
    linear = plan_of(256, 16, "linear")
    other = BACKENDS["triton"].layer_backward(linear, dy, x, w, mean, den, input_grad=True,
                                                      weight_grad=False, bias_grad=False)[0]
    assert other is not None and got[0] is not None and not bits_equal(other, got[0])
    assert bits_equal(other, torch_layer.layer_backward(linear, dy, x, w, mean, den, input_grad=True,
                                                        weight_grad=False, bias_grad=False)[0])
    # the dW and db of another row order (one torch.sum over the rows) differ too
    assert got[1] is not None and got[2] is not None
    x_hat = (x - mean) / den
    assert not bits_equal(got[1], (dy * x_hat).sum(0)) and not bits_equal(got[2], dy.sum(0))
    spec = triton_lb.layer_dx_launch_spec
    linear_shape = layout.kernel_shape(linear)
    monkeypatch.setattr(triton_lb, "layer_dx_launch_spec", lambda shape, *a: spec(linear_shape, *a))
    mutant = BACKENDS["triton"].layer_backward(plan, dy, x, w, mean, den, input_grad=True,
                                                       weight_grad=False, bias_grad=False)[0]
    assert mutant is not None and not bits_equal(mutant, want[0])


@pytest.mark.usefixtures("interpreted")
def test_dx_is_batch_invariant(launches: list[str]) -> None:
    plan = plan_of(130, 16, "tree")
    dy, x, w, _, mean, den = operands(plan, ROWS, torch.bfloat16, seed=8)
    batch = triton_lb.run_layer_backward(plan, dy, x, w, mean, den, input_grad=True, weight_grad=False,
                                         bias_grad=False)[0]
    assert batch is not None
    for r in (0, 17, ROWS - 1):
        alone = triton_lb.run_layer_backward(plan, dy[r:r + 1], x[r:r + 1], w, mean[r:r + 1], den[r:r + 1],
                                             input_grad=True, weight_grad=False, bias_grad=False)[0]
        assert alone is not None and bits_equal(alone, batch[r:r + 1])
    assert len(launches) == 4


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_non_finite_rows_are_finished_by_torch_ops(accumulate: str) -> None:
    plan = plan_of(100, 32, "tree", accumulate)
    x, w, b = inputs(6, 100, torch.bfloat16, seed=5)
    x[0, 3] = float("inf")
    x[1, 50] = float("nan")
    x[2] = 0.0  # a zero row with eps = 0: den = 0
    stats = torch_layer.run_layer(plan, x, w, b, 0.0, stats=True)
    assert stats.mean is not None and stats.den is not None
    dy = inputs(6, 100, torch.bfloat16, seed=6)[0]
    dy[4, 9] = float("nan")  # a NaN dy in a finite row: in dx, dW and db
    with numpy.errstate(all="ignore"):  # (as run_layer_backward runs it)
        _, flags = triton_lb._input_grad(plan, x, dy, w, stats.mean, stats.den, True)
    assert flags.tolist() == [1, 1, 1, 0, 1, 0]
    got, want = both(plan, dy, x, w, stats.mean, stats.den)
    assert_grads_equal(got, want, f"non-finite {accumulate}")
    assert got[0] is not None and got[0][5].isfinite().all()


@pytest.mark.usefixtures("interpreted")
def test_autograd_runs_the_triton_backward(launches: list[str]) -> None:
    """The op's backward picks Triton's (on CPU tensors: when asked for by name) and the
    gradients are the default path's bits, ``weight_grad="exact"`` included."""
    x = inputs(ROWS, 96, torch.float16, seed=2)[0]
    dy = inputs(ROWS, 96, torch.float16, seed=12)[0]
    grads = []
    for use in (("triton", "torch_ops"), ("native", "torch_ops")):
        for weight_grad in ("float", "exact"):
            norm = tgn.LayerNorm(96, chunk_size=16, dtype=torch.float16, weight_grad=weight_grad)
            with torch.no_grad():
                norm.weight.copy_(inputs(1, 96, torch.float16, seed=3)[1])
            xg = x.clone().requires_grad_(True)
            with backends.use(*use):
                norm(xg).backward(dy)
            assert xg.grad is not None and norm.weight.grad is not None and norm.bias.grad is not None
            grads.append((xg.grad, norm.weight.grad, norm.bias.grad))
    ran = [n for n in launches if n.startswith("layer_dx_")]
    assert ran == ["layer_dx_tree_kernel"] * 2  # float and exact: Triton's dx
    assert launches.count("layer_dwb_blocks_kernel") == 1  # the float dW and db
    for triton_grads, default in zip(grads[:2], grads[2:]):
        assert_grads_equal(triton_grads, default, "autograd, Triton vs the default backends")


@pytest.mark.usefixtures("interpreted")
def test_exact_weight_grad_runs_the_triton_sums(monkeypatch: pytest.MonkeyPatch, launches: list[str]) -> None:
    """``weight_grad="exact"``: Triton's ``dx`` and the Triton exact accumulator's ``dW`` and
    ``db`` (``exact_dw``, on CPU tensors only with ``TRITON_ON_CPU``) give the bits of the
    default path."""
    calls: list[int] = []
    real = exact_dw.add_products_
    monkeypatch.setattr(exact_dw, "add_products_", lambda *a: calls.append(1) or real(*a))
    x = inputs(ROWS, 64, torch.bfloat16, seed=9)[0]
    dy = inputs(ROWS, 64, torch.bfloat16, seed=19)[0]
    grads = []
    for on_cpu, use in ((True, ("triton", "torch_ops")), (False, ("native", "torch_ops"))):
        monkeypatch.setattr(exact_dw, "TRITON_ON_CPU", on_cpu)
        norm = tgn.LayerNorm(64, chunk_size=16, dtype=torch.bfloat16, weight_grad="exact")
        xg = x.clone().requires_grad_(True)
        with backends.use(*use):
            norm(xg).backward(dy)
        assert xg.grad is not None and norm.weight.grad is not None and norm.bias.grad is not None
        grads.append((xg.grad, norm.weight.grad, norm.bias.grad))
    assert calls == [1, 1]  # dW's and db's exact sums, in the Triton run only
    assert launches == ["layer_dx_tree_kernel"]
    assert_grads_equal(grads[0], grads[1], "exact weight grad, Triton vs the default backends")


@pytest.mark.usefixtures("interpreted")
def test_calls_the_kernels_do_not_take_run_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_of(50, 7, "tree")
    dy, x, w, _, mean, den = operands(plan, 4, torch.float32)
    calls: list[int] = []
    real = triton_lb.run_layer_backward
    monkeypatch.setattr(triton_lb, "run_layer_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    d64 = (dy.double(), x.double(), w.double(), mean.double(), den.double())
    assert not triton_lb.supports_layer_backward(plan, *d64[:3], *d64[3:])
    got, want = both(plan, *d64)  # fp64: the torch-ops backend's backward, explicitly
    assert_grads_equal(got, want, "fp64")
    empty = both(plan, dy[:0], x[:0], w, mean[:0], den[:0])  # no rows
    assert_grads_equal(*empty, "no rows")
    assert calls == []
    with pytest.raises(ExecutionError, match="fp32/bf16/fp16"):
        real(plan, *d64[:3], *d64[3:], input_grad=True, weight_grad=False, bias_grad=False)
    both(plan, dy, x, w, mean, den)
    assert calls == [1]
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_lb.supports_layer_backward(plan, dy, x, w, mean, den)
    with pytest.raises(ExecutionError, match="TRITON_INTERPRET"):
        real(plan, dy, x, w, mean, den, input_grad=True, weight_grad=False, bias_grad=False)


@pytest.mark.parametrize("hidden, chunk, topology, accumulate, part", [
    (4096, 64, "tree", "float", "dx"), (100, 7, "linear", "float", "dx"), (1000, 64, "race", "exact", "dx"),
    (4096, 64, "tree", "float", "dwb")])
def test_ptx_rounds_like_the_reference(hidden: int, chunk: int, topology: str, accumulate: str, part: str) -> None:
    pytest.importorskip("triton")
    from taskgraph_norm.backends.triton.ptx import forbidden_instructions, layer_backward_ptx

    plan = plan_of(hidden, chunk, topology, accumulate)
    ptx = layer_backward_ptx(plan, torch.bfloat16, part=part)
    assert forbidden_instructions(ptx) == []
    for op in ("div.rn.f32", "sub.rn.f32", "mul.rn.f32") + (("div.rn.f64",) if accumulate == "exact" else
                                                            ("add.rn.f32",)):
        assert op in ptx, op
    if part == "dx":  # negative control: with contraction on, x_hat * mgx meets a subtraction as an fma
        fused = forbidden_instructions(layer_backward_ptx(plan, torch.bfloat16, part=part, fp_fusion=True))
        assert any(line.startswith("fma.") for line in fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hidden, chunk, topology, accumulate", [
    (4096, 64, "tree", "float"), (1000, 9, "tree", "float"), (4096, 256, "linear", "float"),
    (100, 7, "linear", "float"), (4096, 64, "race", "exact"), (1000, 9, "tree", "exact")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_bits_match_cpu_torch_ops(hidden: int, chunk: int, topology: str, accumulate: str,
                                      dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    plan = plan_of(hidden, chunk, topology, accumulate)
    dy, x, w, _, mean, den = operands(plan, 2 * kernels.ROW_BLOCK + 29, dtype, seed=1)
    dy[3, 5] = float("nan")  # a flagged row: NaN bits are the hardware's, in the same places
    want = torch_layer.layer_backward(plan, dy, x, w, mean, den, input_grad=True, weight_grad=True, bias_grad=True)
    cuda = [t.cuda() for t in (dy, x, w, mean, den)]
    got = BACKENDS["triton"].layer_backward(plan, *cuda, input_grad=True, weight_grad=True,
                                                     bias_grad=True)
    for name, a, b in zip(("dx", "dW", "db"), got, want):
        assert a is not None and b is not None
        nan = b.isnan()
        assert torch.equal(a.cpu().isnan(), nan), name
        assert_bits_equal(a.cpu()[~nan], b[~nan], f"CUDA triton vs CPU torch ops {name} {plan}")
    alone = triton_lb.run_layer_backward(plan, *(t[:1] for t in cuda[:2]), cuda[2], *(t[:1] for t in cuda[3:]),
                                         input_grad=True, weight_grad=False, bias_grad=False)[0]
    assert alone is not None and got[0] is not None
    assert_bits_equal(alone.cpu(), got[0].cpu()[:1], "batch invariance on the device")
