"""Eager dispatch overhead of the registration styles, on a (1, 4096) fp32 call with grad.

    python benchmarks/op_dispatch.py [--rounds 21]

The same forward kernel (``taskgraph_norm.ops.forward.forward``: one native call
writing ``y`` and the row totals) registered four ways, timed interleaved (medians):

* ``custom_op``: ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``
  (Apex's style), in a scratch namespace;
* ``Library + register_autograd``: ``torch.library.Library("taskgraph_norm", "DEF")``,
  ``define``/``impl``, ``register_fake``, ``register_autograd`` (the op tracers see);
* ``Library op in autograd.Function``: vLLM's style, the op called from a Function;
* ``EagerRMSNorm``: the Function calling the kernel itself, no dispatcher (what eager
  autograd runs: ``taskgraph_norm.ops.call_checked``);

beside the ``no_grad`` direct call (``normalize_sync``) for scale.  Each row is
forward only; ``x`` requires grad.  The ratios are to the ``no_grad`` call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import interleaved_medians, repeated  # noqa: E402
from taskgraph_norm.ops import forward as _forward  # noqa: E402
from taskgraph_norm.ops.library import EagerRMSNorm, eager_apply, rms_norm_backward_op, rms_norm_op  # noqa: E402

D = 4096
CONFIG = (64, "tree", "pairwise", "float", "torch", 0.0)


@torch.library.custom_op("tgn_dispatch_bench::rms_norm", mutates_args=())  # type: ignore[misc]
def _custom(x: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int, topology: str, leaf: str,
            accumulate: str, casting_mode: str, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward.forward(x, weight, eps, chunk_size, topology, leaf, accumulate, casting_mode, offset)


@_custom.register_fake  # type: ignore[misc]
def _custom_fake(x: torch.Tensor, weight: torch.Tensor | None, *config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(*x.shape[:-1], 1)


def _custom_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.config = inputs[3:]


def _custom_backward(ctx: Any, dy: torch.Tensor, _drms: Any) -> tuple[Any, ...]:
    x, w, rms = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(dy, x, w, rms, *ctx.config, "float", [True, True])
    return (dx, dw) + (None,) * 7


_custom.register_autograd(_custom_backward, setup_context=_custom_setup)


class _OpInFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rms = rms_norm_op(x, weight, eps, *CONFIG)
        ctx.save_for_backward(x, weight, rms)
        return y  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, w, rms = ctx.saved_tensors
        dx, dw = rms_norm_backward_op(dy, x, w, rms, *CONFIG, "float", [True, True])
        return dx, dw, None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, D, generator=g)
    w = (1 + 0.1 * torch.randn(D, generator=g)).requires_grad_()
    xg = x.clone().requires_grad_()
    eps = torch.finfo(torch.float32).eps
    methods = {
        "custom_op + register_autograd": lambda: _custom(xg, w, eps, *CONFIG),
        "Library + register_autograd": lambda: rms_norm_op(xg, w, eps, *CONFIG),
        "Library op in autograd.Function": lambda: _OpInFunction.apply(xg, w, eps),
        "EagerRMSNorm (no dispatcher)": lambda: eager_apply(xg, w, (eps, *CONFIG)),
        "EagerRMSNorm via Function.apply": lambda: EagerRMSNorm.apply(xg, w, (eps, *CONFIG)),
    }
    with torch.no_grad():
        want = tgn.normalize_sync(x, w)
    for name, fn in methods.items():
        out = fn()
        y = out[0] if isinstance(out, tuple) else out
        if not torch.equal(y.detach().view(torch.int32), want.view(torch.int32)):
            raise SystemExit(f"{name}: bits differ from normalize_sync")

    def no_grad() -> None:
        with torch.no_grad():
            tgn.normalize_sync(x, w)

    calls = 200
    timed = {k: repeated(v, calls) for k, v in methods.items()}
    timed["no_grad normalize_sync"] = repeated(no_grad, calls)
    t = interleaved_medians(timed, args.rounds)
    base = t["no_grad normalize_sync"]
    print(f"# eager dispatch, (1, {D}) fp32, x requires grad, forward only; torch {torch.__version__}")
    print("| registration | us per call | / no_grad call |\n|---|---|---|")
    for name, seconds in t.items():
        print(f"| {name} | {seconds / calls * 1e6:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
