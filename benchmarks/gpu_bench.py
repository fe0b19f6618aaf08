"""The triton executor on a CUDA device, forward and backward: bits against the CPU, then time.

    python benchmarks/gpu_bench.py [--rounds 15] [--inner 20] [--shapes 4096x4096,32768x4096]
                                   [--train-shapes 4096x4096]

First a bits check: on the first rows of every shape, the triton forward on the
device must equal the CPU's compiled executor (the reference's bits) for the float
tree, the float left fold and the exact plan, and with the model-facing settings:
``casting_mode="llama"`` and ``"gemma"`` (offset 1) with the fused residual add
(``y`` and ``h`` both compared).  Then interleaved medians (every round runs every
method once, ``--inner`` calls between two synchronisations): the triton float
tree and exact plans against ``F.rms_norm`` eager and under ``torch.compile``, and
the fused residual add (llama) against ``x + r`` then ``F.rms_norm``, as achieved
bandwidth (x read once, y written once; with a residual also r read and h written)
and as a fraction of a measured device copy of the same bytes.  Ratios are within
one run.

The backward (``ops.backward``: Triton kernels on CUDA tensors): ``dx`` and ``dW`` on
the device against the CPU's (the C kernel or torch ops) for the float tree, the
left fold, the exact plan and llama with offset 1, with a NaN row (finished on the
CPU).  Then forward+backward timings (``--train-shapes``, bf16): ``torch.nn.RMSNorm``
eager and under ``torch.compile``, Liger-Kernel's ``LigerRMSNorm`` when
``liger_kernel`` imports, this library's op under autograd (``tgn.ops.rms_norm``:
its forward is torch ops today, its backward the Triton kernels), and the Triton
kernels alone (``run_triton`` then ``run_backward``), as achieved bandwidth (x read
twice, y written, dy read, dx written) and against torch's eager pair.

The exact weight gradient (``weight_grad="exact"``: the Triton kernel of
``backends/triton/exact_dw.py``): its state on the device, from ``x_hat`` and fused
from ``x`` and ``rms``, against the CPU's, and ``tgn.RMSNorm``'s ``weight.grad`` on
both; then, per shape in bf16 and fp32, the backward op with ``weight_grad="float"``
against the exact backward's work (``dx``, the exact accumulate, the rounding) and
the pieces alone.
Without a CUDA device it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import taskgraph_norm as tgn
from taskgraph_norm.lowering import Plan
from taskgraph_norm.testing import count_bit_differences
from taskgraph_norm.tools.bench import interleaved_medians

EPS = 1e-6
DEVICE = "cuda"  # the backward's functions take it from here (a CPU dry run sets "cpu")
PLANS: dict[str, tuple[str, str, int, dict[str, Any]]] = {  # name: (topology, accumulate, chunk, settings)
    "triton tree": ("tree", "float", 64, {}),
    "triton linear": ("linear", "float", 256, {}),
    "triton exact": ("race", "exact", 64, {}),
    "triton tree llama+res": ("tree", "float", 64, {"casting_mode": "llama", "residual": True}),
    "triton exact gemma+res": ("race", "exact", 64, {"casting_mode": "gemma", "offset": 1.0, "residual": True}),
}
TIMED = ("triton tree", "triton exact", "triton tree llama+res")


def _graph(hidden: int, name: str) -> tuple[tgn.Graph, Plan]:
    topology, accumulate, chunk, settings = PLANS[name]
    g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology, accumulate=accumulate, **settings)
    plan = tgn.Pipeline(g, "compiled").plan
    assert plan is not None
    return g, plan


def check_bits(rows: int, hidden: int, dtype: torch.dtype) -> bool:
    """The device forward against the CPU's compiled executor, on ``rows`` rows (``y``,
    and ``h`` of the residual plans)."""
    from taskgraph_norm.backends.triton import run_triton

    gen = torch.Generator().manual_seed(rows + hidden)
    x = (torch.randn(rows, hidden, generator=gen) * torch.logspace(-3, 3, hidden)).to(dtype)
    r = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = 1 + 0.1 * torch.randn(hidden, generator=gen)
    ok = True
    for name in PLANS:
        g, plan = _graph(hidden, name)
        if plan.residual:
            h_dev = torch.empty_like(x, device="cuda")
            y_dev = run_triton(g, x.cuda(), w.cuda(), EPS, plan=plan, residual=r.cuda(), residual_out=h_dev)
            y_cpu, h_cpu = tgn.execute_sync(g, x, w, EPS, executor="compiled", residual=r)
            diff = count_bit_differences(y_dev.cpu(), y_cpu) + count_bit_differences(h_dev.cpu(), h_cpu)
        else:
            y_dev = run_triton(g, x.cuda(), w.cuda(), EPS, plan=plan)
            diff = count_bit_differences(y_dev.cpu(), tgn.execute_sync(g, x, w, EPS, executor="compiled"))
        ok &= diff == 0
        print(f"bits {name:24s} {str(dtype):15s} ({rows}, {hidden}): {diff} of {x.numel()} differ")
    return ok


BACKWARD = {  # name: (topology, accumulate, chunk, casting_mode, offset)
    "tree": ("tree", "float", 64, "torch", 0.0), "linear": ("linear", "float", 256, "torch", 0.0),
    "exact": ("race", "exact", 64, "torch", 0.0), "tree llama+1": ("tree", "float", 64, "llama", 1.0),
}


def check_backward_bits(rows: int, hidden: int, dtype: torch.dtype) -> bool:
    """``(dx, dW)`` of the backward op on the device against the CPU's, a NaN row included."""
    from taskgraph_norm import kernels
    from taskgraph_norm.ops.backward import backward

    gen = torch.Generator().manual_seed(rows * 7 + hidden)
    x = (torch.randn(rows, hidden, generator=gen) * torch.logspace(-3, 3, hidden)).to(dtype)
    x[rows // 2, 1] = float("nan")
    dy = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    xa = x.float()
    rms = kernels.finalize_rms((xa * xa).sum(-1, keepdim=True), hidden, EPS, torch.float32)
    ok = True
    for name, (topology, accumulate, chunk, mode, offset) in BACKWARD.items():
        config = (chunk, topology, "pairwise", accumulate, mode, offset, "float", [True, True])
        cpu = backward(dy, x, w, rms, *config)
        dev = backward(dy.to(DEVICE), x.to(DEVICE), w.to(DEVICE), rms.to(DEVICE), *config)
        diff = [count_bit_differences(d.cpu(), c) for d, c in zip(dev, cpu)]
        ok &= diff == [0, 0]
        print(f"bits backward {name:15s} {str(dtype):15s} ({rows}, {hidden}): dx {diff[0]} of {x.numel()}, "
              f"dW {diff[1]} of {hidden} differ")
    return ok


def _exact_dw_operands(rows: int, hidden: int, dtype: torch.dtype, seed: int,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, dy, rms)`` on the CPU: x over six decades, a NaN row."""
    from taskgraph_norm import kernels

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * torch.logspace(-3, 3, hidden)).to(dtype)
    x[rows // 2, 1] = float("nan")
    dy = torch.randn(rows, hidden, generator=gen).to(dtype)
    xa = x.float()
    rms = kernels.finalize_rms((xa * xa).sum(-1, keepdim=True), hidden, EPS, torch.float32)
    return x, dy, rms


def check_exact_dw_bits(rows: int, hidden: int, dtype: torch.dtype) -> bool:
    """The exact weight gradient's state on the device (the Triton kernel, from
    ``x_hat`` and fused from ``x`` and ``rms``) against the CPU's (C or torch ops), and
    ``weight.grad`` of ``tgn.RMSNorm(weight_grad="exact")`` on the device against the CPU."""
    from taskgraph_norm.ops.exact_grad import ExactSum
    from taskgraph_norm.ops.exact_weight import _x_hat

    x, dy, rms = _exact_dw_operands(rows, hidden, dtype, rows * 11 + hidden)
    want = ExactSum(hidden).add_products(dy, _x_hat(x, rms)).state
    got = [ExactSum(hidden, DEVICE).add_products(dy.to(DEVICE), _x_hat(x, rms).to(DEVICE)).state.cpu(),
           ExactSum(hidden, DEVICE).add_normalized(dy.to(DEVICE), x.to(DEVICE), rms.to(DEVICE)).state.cpu()]
    grads = []
    for device in ("cpu", DEVICE):
        norm = tgn.RMSNorm(hidden, eps=EPS, weight_grad="exact", dtype=dtype, device=device)
        norm(x[:64].to(device)).backward(dy[:64].to(device))
        assert norm.weight.grad is not None
        grads.append(norm.weight.grad.cpu())
    diff = [int((g != want).any(0).sum()) for g in got] + [count_bit_differences(grads[1], grads[0])]
    print(f"bits exact dW {str(dtype):15s} ({rows}, {hidden}): state from x_hat {diff[0]}, from x/rms {diff[1]} "
          f"of {hidden} columns differ; RMSNorm weight.grad {diff[2]} of {hidden}")
    return diff == [0, 0, 0]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], inner: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            fn()
        _sync()
    return run


def bench_exact_dw(rows: int, hidden: int, dtype: torch.dtype, rounds: int, inner: int) -> dict[str, float]:
    """The exact weight gradient against the float one, interleaved medians (seconds per
    ``inner`` calls; printed as a table): the backward op with ``weight_grad="float"``
    (dx and dW: the Triton kernels) against what ``weight_grad="exact"``'s backward runs
    (dx by the same op, then the exact accumulate from x and rms and the rounding
    to the weight's dtype), and the pieces."""
    from taskgraph_norm.ops.exact_grad import ExactSum
    from taskgraph_norm.ops.backward import backward

    x, dy, rms = (t.to(DEVICE) for t in _exact_dw_operands(rows, hidden, dtype, 5))
    x[rows // 2, 1] = 1.0  # timings without the CPU's finish of a NaN row
    w = torch.ones(hidden, device=DEVICE, dtype=dtype)
    config = (64, "tree", "pairwise", "float", "torch", 0.0, "float")

    def exact_dw() -> torch.Tensor:
        return ExactSum(hidden, DEVICE).add_normalized(dy, x, rms).result(dtype)

    methods: dict[str, Callable[[], object]] = {
        "float backward (dx, dW)": lambda: backward(dy, x, w, rms, *config, [True, True]),
        "exact backward (dx, exact dW)": lambda: (backward(dy, x, w, rms, *config, [True, False]), exact_dw()),
        "float dW alone": lambda: backward(dy, x, w, rms, *config, [False, True]),
        "exact dW alone (accumulate + round)": exact_dw,
        "exact accumulate (kernels)": lambda: ExactSum(hidden, DEVICE).add_normalized(dy, x, rms),
    }
    medians = interleaved_medians({k: _timed(fn, inner) for k, fn in methods.items()}, rounds)
    print(f"\nexact vs float weight gradient ({rows}, {hidden}) {dtype}: median of {rounds} rounds x {inner} calls")
    print("| method | us/call | vs float backward |\n|---|---:|---:|")
    for name, secs in medians.items():
        print(f"| {name} | {secs / inner * 1e6:.1f} | {secs / medians['float backward (dx, dW)']:.2f}x |")
    return medians


def bench(rows: int, hidden: int, dtype: torch.dtype, rounds: int, inner: int) -> None:
    from taskgraph_norm.backends.triton import run_triton

    x = torch.randn(rows, hidden, device="cuda").to(dtype)
    r = torch.randn(rows, hidden, device="cuda").to(dtype)
    w = torch.ones(hidden, device="cuda", dtype=dtype)
    y, h = torch.empty_like(x), torch.empty_like(x)
    compiled = torch.compile(F.rms_norm)
    methods: dict[str, Callable[[], object]] = {
        "copy": lambda: y.copy_(x),
        "F.rms_norm eager": lambda: F.rms_norm(x, (hidden,), w, EPS),
        "F.rms_norm compiled": lambda: compiled(x, (hidden,), w, EPS),
        "x + r, F.rms_norm eager": lambda: F.rms_norm(torch.add(x, r, out=h), (hidden,), w, EPS),
    }
    with_residual = {"x + r, F.rms_norm eager"}
    for name in TIMED:
        g, plan = _graph(hidden, name)
        res = dict(residual=r, residual_out=h) if plan.residual else {}
        methods[name] = functools.partial(run_triton, g, x, w, EPS, plan=plan, out=y, **res)
        if plan.residual:
            with_residual.add(name)
    medians = interleaved_medians({k: _timed(fn, inner) for k, fn in methods.items()}, rounds)
    tensor_bytes = x.numel() * x.element_size()
    copy_bw = 2 * tensor_bytes * inner / medians["copy"]
    print(f"\n({rows}, {hidden}) {dtype}: median of {rounds} rounds x {inner} calls")
    print("| method | us/call | GB/s | of copy | vs F.rms_norm eager |\n|---|---:|---:|---:|---:|")
    for name, secs in medians.items():
        residual = name in with_residual
        bw = (4 if residual else 2) * tensor_bytes * inner / secs  # x, y; and r, h
        baseline = medians["x + r, F.rms_norm eager" if residual else "F.rms_norm eager"]
        print(f"| {name} | {secs / inner * 1e6:.1f} | {bw / 1e9:.0f} | {bw / copy_bw:.2f} | "
              f"{baseline / secs:.2f}x |")
    print("(a residual row is against `x + r, F.rms_norm eager`)")


def bench_train(rows: int, hidden: int, dtype: torch.dtype, rounds: int, inner: int) -> None:
    """Forward+backward (``dx`` and ``dW``) per call, interleaved medians."""
    from taskgraph_norm import kernels, ops
    from taskgraph_norm.backends.triton import run_triton
    from taskgraph_norm.backends.triton.backward import run_backward

    x = torch.randn(rows, hidden, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    norm = torch.nn.RMSNorm(hidden, eps=EPS, device=DEVICE, dtype=dtype)
    compiled = torch.compile(norm)
    w = norm.weight

    def autograd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(x), (x, w), dy)

    methods: dict[str, Callable[[], object]] = {
        "torch.nn.RMSNorm eager": autograd(norm), "torch.nn.RMSNorm compiled": autograd(compiled),
        "tgn.ops.rms_norm (torch fwd, triton bwd)": autograd(lambda t: ops.rms_norm(t, w, EPS)),
    }
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm  # type: ignore[import-not-found, unused-ignore]

        liger = LigerRMSNorm(hidden, eps=EPS).to(device=DEVICE, dtype=dtype)
        methods["LigerRMSNorm"] = lambda: torch.autograd.grad(liger(x), (x, liger.weight), dy)
    except ImportError as exc:
        print(f"(Liger-Kernel not measured: {exc})")
    g, plan = _graph(hidden, "triton tree")
    x0, w0 = x.detach(), w.detach()
    rms = kernels.finalize_rms((x0.float() ** 2).sum(-1, keepdim=True), hidden, EPS, torch.float32)
    y = torch.empty_like(x0)

    def kernels_only() -> None:
        run_triton(g, x0, w0, EPS, plan=plan, out=y)
        run_backward(plan, dy, x0, w0, rms, True, True)

    methods["triton fwd + triton bwd (kernels)"] = kernels_only
    medians = interleaved_medians({k: _timed(fn, inner) for k, fn in methods.items()}, rounds)
    moved = 5 * x0.numel() * x0.element_size()  # x twice, y, dy, dx
    print(f"\nforward+backward ({rows}, {hidden}) {dtype}: median of {rounds} rounds x {inner} calls")
    print("| method | us/call | GB/s | vs torch.nn.RMSNorm eager |\n|---|---:|---:|---:|")
    for name, secs in medians.items():
        print(f"| {name} | {secs / inner * 1e6:.1f} | {moved * inner / secs / 1e9:.0f} | "
              f"{medians['torch.nn.RMSNorm eager'] / secs:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--shapes", default="4096x4096,32768x4096")
    parser.add_argument("--train-shapes", default="4096x4096")
    parser.add_argument("--check-rows", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: needs a CUDA device; none here, nothing measured", file=sys.stderr)
        return 2
    from taskgraph_norm.backends.triton import available

    if not available():
        print('gpu_bench: needs triton (pip install "taskgraph-norm[triton]")', file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    ok = all([check_bits(min(args.check_rows, r), h, dt)
              for r, h in shapes for dt in (torch.float32, torch.bfloat16)])
    ok &= all([check_backward_bits(min(args.check_rows, r), h, dt)
               for r, h in shapes for dt in (torch.float32, torch.bfloat16, torch.float16)])
    ok &= all([check_exact_dw_bits(min(args.check_rows, r), h, dt)
               for r, h in shapes for dt in (torch.float32, torch.bfloat16, torch.float16)])
    for (rows, hidden), dtype in [(s, dt) for s in shapes for dt in (torch.bfloat16, torch.float32)]:
        bench(rows, hidden, dtype, args.rounds, args.inner)
    for rows, hidden in [tuple(int(n) for n in s.split("x")) for s in args.train_shapes.split(",") if s]:
        bench_train(rows, hidden, torch.bfloat16, args.rounds, args.inner)
    for (rows, hidden), dtype in [(s, dt) for s in shapes for dt in (torch.bfloat16, torch.float32)]:
        bench_exact_dw(rows, hidden, dtype, args.rounds, args.inner)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
