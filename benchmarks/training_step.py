"""Training-step figures of the ops (issue 14): grad-enabled calls and forward+backward.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/training_step.py [--rounds 15]

Measured side by side in one run (interleaved rounds, medians), each with its target:

* ``tgn.RMSNorm(4096)`` forward with grad enabled (x requires grad: the op, which
  also returns the per-row ``rms`` the backward reads) against the same call under
  ``no_grad`` (the direct kernel), at (1, 4096) and (4096, 4096) fp32: at most 1.5x;
  the two outputs are checked to be the same bits first;
* forward + backward at (4096, 4096) fp32: ``tgn.RMSNorm`` against
  ``torch.nn.RMSNorm``, ``y.backward(dy)`` each: at most 1.0x;
* for scale, (1, 4096) forward + backward; forward + backward at (64, 4096),
  (1024, 4096) and (4096, 4096) with the native backward's row blocks shared among
  torch's threads against the same on one thread; and ``normalize_sync`` under no_grad at
  (1, 4096) against ``F.rms_norm`` (at most 1.0x) and against the warm path as it
  was before the ops (what asking whether a call needs the op costs).

torch's OpenMP threads spin-wait between ops; on a loaded machine that stalls
them, so run torch baselines with ``OMP_WAIT_POLICY=PASSIVE`` (printed below).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import TARGET_HEADER, interleaved_medians, repeated, target_row  # noqa: E402

D = 4096


def _input(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, D, generator=g), torch.randn(rows, D, generator=g)


def _norms() -> tuple[tgn.RMSNorm, torch.nn.RMSNorm]:
    ours, theirs = tgn.RMSNorm(D), torch.nn.RMSNorm(D)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(1)))
        theirs.weight.copy_(ours.weight)
    return ours, theirs


def grad_vs_no_grad(rows: int, rounds: int) -> str:
    norm, _ = _norms()
    x, _ = _input(rows)
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        plain = norm(x)
    if not torch.equal(norm(xg).detach().view(torch.int32), plain.view(torch.int32)):
        raise SystemExit("grad-enabled output bits differ from no_grad's")
    calls = max(1, 256 // rows)
    grad_calls = repeated(lambda: norm(xg), calls)
    plain_calls = repeated(lambda: norm(x), calls)

    def no_grad() -> None:  # the context entered once per timing, not per call
        with torch.no_grad():
            plain_calls()

    t = interleaved_medians({"grad": grad_calls, "no_grad": no_grad}, rounds)
    return target_row(f"forward with grad ({rows}, {D})", t["grad"] / calls, t["no_grad"] / calls,
                      "same call under no_grad", 1.5)


def forward_backward(rows: int, rounds: int, target: float | None) -> str:
    ours, theirs = _norms()
    x, dy = _input(rows)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    calls = max(1, 64 // rows)

    def step(norm: torch.nn.Module, xi: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            xi.grad = None
            norm.zero_grad(set_to_none=True)
            norm(xi).backward(dy)
        return run

    t = interleaved_medians({"ours": repeated(step(ours, xo), calls), "torch": repeated(step(theirs, xt), calls)},
                            rounds)
    return target_row(f"forward+backward ({rows}, {D})", t["ours"] / calls, t["torch"] / calls,
                      "torch.nn.RMSNorm", target)


def shared_backward(rows: int, rounds: int) -> str:
    """Forward + backward of ``tgn.RMSNorm`` with the native backward's row blocks shared
    among torch's threads (native_team.c) against the same on one thread (the split
    switched off through ``ops.backward.SPLIT_NUMEL``), interleaved."""
    from taskgraph_norm.ops import backward as bw

    ours, _ = _norms()
    x, dy = _input(rows)
    xo = x.clone().requires_grad_()
    calls = max(1, 64 // rows)
    split = bw.SPLIT_NUMEL

    def step(split_at: int) -> Callable[[], None]:
        def run() -> None:
            bw.SPLIT_NUMEL = split_at
            try:
                xo.grad = None
                ours.zero_grad(set_to_none=True)
                ours(xo).backward(dy)
            finally:
                bw.SPLIT_NUMEL = split
        return run

    t = interleaved_medians({"shared": repeated(step(split), calls), "one": repeated(step(1 << 62), calls)},
                            rounds)
    return target_row(f"forward+backward ({rows}, {D}), backward rows shared", t["shared"] / calls,
                      t["one"] / calls, "the backward on one thread", None)


def small_no_grad(rounds: int) -> list[str]:
    """``normalize_sync`` now (it asks :func:`ops.route` first), the warm path as it was
    before the ops (a pipeline lookup and call: ``before``), and ``F.rms_norm``."""
    x, _ = _input(1)
    w = 1 + 0.1 * torch.randn(D)
    calls = 256
    pipe = tgn.pipeline.for_config(D, 64, "tree", "pairwise", "float", "auto")
    key = (D, 64, "tree", "pairwise", "float", "auto")
    t = interleaved_medians({
        "ours": repeated(lambda: tgn.normalize_sync(x, w), calls),
        "before": repeated(lambda: tgn.pipeline._by_config.get(key, pipe)(x, w, None, None), calls),
        "torch": repeated(lambda: F.rms_norm(x, (D,), w), calls),
    }, rounds)
    return [target_row(f"normalize_sync no_grad (1, {D})", t["ours"] / calls, t["torch"] / calls,
                       "F.rms_norm(x, (D,), w)", 1.0),
            target_row(f"normalize_sync no_grad (1, {D}), routing cost", t["ours"] / calls, t["before"] / calls,
                       "the warm path before the ops", None)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"# training step: torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load {os.getloadavg()[0]:.1f}, "
          f"{tgn.backends.native.loader.describe()}")
    print(TARGET_HEADER)
    print(grad_vs_no_grad(1, args.rounds))
    print(grad_vs_no_grad(D, max(3, args.rounds // 3)))
    print(forward_backward(D, max(3, args.rounds // 3), 1.0))
    print(forward_backward(1, args.rounds, None))
    for rows in (64, 1024, D):
        print(shared_backward(rows, args.rounds if rows < D else max(3, args.rounds // 3)))
    print("\n".join(small_no_grad(args.rounds)))


if __name__ == "__main__":
    main()
