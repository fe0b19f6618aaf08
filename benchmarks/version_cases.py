"""The cases that ``benchmarks/versions.py`` times in each version's worker.

They mirror what ``small_calls.py`` and ``training_step.py`` time for this library
(the torch baselines are left out: both versions run the same torch), with the
same inputs and the same number of calls per timing, and they reach the library
only through the public API that old and new versions share (``normalize_sync``,
``await normalize``, ``RMSNorm``), passed in as ``tgn``: the worker imports the
package of the tree under test and hands it over.

Two figures of ``training_step.py`` are not mirrored because they reach private
knobs: the backward on one thread (``ops.backward.SPLIT_NUMEL``) and the warm path
as it was before the ops (``pipeline._by_config``).  Their other sides are here
(forward+backward at 64, 1024 and 4096 rows; ``normalize_sync (1, 4096)``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import repeated  # noqa: E402

__all__ = ["Case", "SUITES", "cases"]

D = 4096


@dataclass(frozen=True)
class Case:
    """One figure: ``run()`` makes ``calls`` calls of the library (one timing)."""

    name: str
    calls: int
    run: Callable[[], object]


def _input(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, D, generator=g), 1 + 0.1 * torch.randn(D, generator=g)


def _norm(tgn: ModuleType) -> torch.nn.Module:
    norm = tgn.RMSNorm(D)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(1)))
    module: torch.nn.Module = norm
    return module


def _normalize_sync(tgn: ModuleType, rows: int) -> Case:
    x, w = _input(rows)
    calls = max(1, 256 // rows)  # small_calls.py: about a millisecond of work or more
    return Case(f"normalize_sync ({rows}, {D})", calls, repeated(lambda: tgn.normalize_sync(x, w), calls))


def _awaited(tgn: ModuleType) -> Case:
    x, w = _input(1)
    calls = 500

    async def awaited() -> None:
        for _ in range(calls):
            await tgn.normalize(x, w)

    return Case(f"await normalize (1, {D}), {calls} per event loop", calls, lambda: anyio.run(awaited))


def _fresh_output(tgn: ModuleType) -> list[Case]:
    x, w = _input(D)
    out = torch.empty_like(x).zero_()
    return [Case(f"normalize_sync ({D}, {D}), fresh output", 1, lambda: tgn.normalize_sync(x, w)),
            Case(f"normalize_sync ({D}, {D}), out=", 1, lambda: tgn.normalize_sync(x, w, out=out))]


def _forward(tgn: ModuleType, rows: int) -> list[Case]:
    norm = _norm(tgn)
    x, _ = _input(rows)
    xg = x.clone().requires_grad_()
    calls = max(1, 256 // rows)
    plain_calls = repeated(lambda: norm(x), calls)

    def no_grad() -> None:  # the context entered once per timing, not per call
        with torch.no_grad():
            plain_calls()

    return [Case(f"RMSNorm forward with grad ({rows}, {D})", calls, repeated(lambda: norm(xg), calls)),
            Case(f"RMSNorm forward under no_grad ({rows}, {D})", calls, no_grad)]


def _forward_backward(tgn: ModuleType, rows: int, weight_grad: str | None = None) -> Case:
    norm = _norm(tgn) if weight_grad is None else _with_weight(tgn.RMSNorm(D, weight_grad=weight_grad))
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(rows, D, generator=g), torch.randn(rows, D, generator=g)
    xg = x.clone().requires_grad_()
    calls = max(1, 64 // rows)

    def step() -> None:
        xg.grad = None
        norm.zero_grad(set_to_none=True)
        norm(xg).backward(dy)

    grads = "" if weight_grad is None else f", weight_grad={weight_grad!r}"
    return Case(f"RMSNorm forward+backward ({rows}, {D}){grads}", calls, repeated(step, calls))


def _with_weight(norm: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(1)))  # type: ignore[operator]
    return norm


def small_calls(tgn: ModuleType) -> list[Case]:
    """``small_calls.py``'s figures of ours."""
    return [*(_normalize_sync(tgn, rows) for rows in (1, 64, 256, 1024)), _awaited(tgn), *_fresh_output(tgn)]


def training_step(tgn: ModuleType) -> list[Case]:
    """``training_step.py``'s figures of ours (its no_grad ``normalize_sync (1, 4096)`` too)."""
    return [*_forward(tgn, 1), *_forward(tgn, D),
            *(_forward_backward(tgn, rows) for rows in (1, 64, 1024, D)),
            _normalize_sync(tgn, 1)]


def exact_dw(tgn: ModuleType) -> list[Case]:
    """``targets.py --only exact_dw``'s two steps: ``weight_grad="exact"`` and ``"float"``."""
    return [_forward_backward(tgn, rows, grad) for rows in (64, 1024) for grad in ("exact", "float")]


SUITES: dict[str, Callable[[ModuleType], list[Case]]] = {"small_calls": small_calls, "training_step": training_step,
                                                         "exact_dw": exact_dw}
#: What ``"both"`` runs.
BOTH = ("small_calls", "training_step")


def cases(tgn: ModuleType, suite: str) -> list[Case]:
    """The cases of ``suite`` (a key of :data:`SUITES`, or ``"both"``: each name once)."""
    chosen = [SUITES[name] for name in BOTH] if suite == "both" else [SUITES[suite]]
    by_name: dict[str, Case] = {}
    for make in chosen:
        for case in make(tgn):
            by_name.setdefault(case.name, case)
    return list(by_name.values())
