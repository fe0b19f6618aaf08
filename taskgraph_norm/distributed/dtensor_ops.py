"""Sharding rules for the ``torch.library`` ops, for DTensors that reach them directly.

The faces run a DTensor call themselves (:mod:`.dtensor`); a DTensor handed straight to
``torch.ops.taskgraph_norm.rms_norm`` (or ``layer_norm``, or their backwards) is
DTensor's own dispatch, which asks these rules: a row dim sharded (or everything
replicated) runs the op on the local rows and keeps the placement (the weight
replicated; its gradient ``Partial()``, as torch's ``nn.RMSNorm``), and anything else,
the normalised dim sharded included, is redistributed to ``Replicate()`` by DTensor
before the op runs (an all-gather: the one-process bits, without the tensor-parallel
reduction of the faces).  ``register_sharding`` is torch's (experimental, torch 2.6+);
without it the ops have no DTensor rule and DTensor says so.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["register"]

try:  # torch >= 2.6
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding as _register_sharding

    _register: Any = _register_sharding
except ImportError:  # pragma: no cover
    _register = None


def _maybe(t: object, placement: Any) -> Any:
    return None if t is None else placement


def _rules(x: Any, tensors: list[object], row_like: list[bool], n_args: int,
           outputs: list[str]) -> list[tuple[list[Any], list[Any]]]:
    """Everything replicated, or one row dim ``d`` sharded: ``row_like[i]`` says whether the
    ``i``-th tensor argument has ``x``'s rows (else it is a weight, replicated);
    ``outputs`` says each output's placement under a row sharding (``"row"`` or ``"sum"``)."""
    pad = [None] * (n_args - len(tensors))
    rules: list[tuple[list[Any], list[Any]]] = [
        ([Replicate() for _ in outputs], [_maybe(t, Replicate()) for t in tensors] + pad)]
    for d in range(x.ndim - 1):
        ins = [_maybe(t, Shard(d) if rows else Replicate()) for t, rows in zip(tensors, row_like)]
        outs = [Shard(d) if kind == "row" else Partial() for kind in outputs]
        rules.append((outs, ins + pad))
    return rules


def _rms(x: Any, weight: Any, *rest: Any) -> Any:
    return _rules(x, [x, weight], [True, False], 2 + len(rest), ["row", "row"])


def _rms_backward(dy: Any, x: Any, weight: Any, rms: Any, *rest: Any) -> Any:
    return _rules(x, [dy, x, weight, rms], [True, True, False, True], 4 + len(rest), ["row", "sum"])


def _layer(x: Any, weight: Any, bias: Any, *rest: Any) -> Any:
    return _rules(x, [x, weight, bias], [True, False, False], 3 + len(rest), ["row", "row", "row"])


def _layer_backward(dy: Any, x: Any, weight: Any, bias: Any, mean: Any, den: Any, *rest: Any) -> Any:
    return _rules(x, [dy, x, weight, bias, mean, den], [True, True, False, False, True, True], 6 + len(rest),
                  ["row", "sum", "sum"])


def register() -> None:
    """Register the rules of the four ops (once, when :mod:`taskgraph_norm.distributed` is imported)."""
    if _register is None:  # pragma: no cover
        return
    ops = torch.ops.taskgraph_norm
    for op, rule in ((ops.rms_norm, _rms), (ops.rms_norm_backward, _rms_backward), (ops.layer_norm, _layer),
                     (ops.layer_norm_backward, _layer_backward)):
        _register(op.default)(rule)
