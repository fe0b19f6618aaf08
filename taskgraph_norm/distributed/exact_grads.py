"""Data-parallel exact weight gradients: one integer all-reduce, any world size, the same bits.

Each rank's exact sums (:class:`~taskgraph_norm.ops.exact_grad.ExactSum`,
int64 digits) are added across ranks by ``all_reduce(SUM)``: integer addition
is exact and associative, so the order in which the ranks' states meet does not
matter, and the normalised total is the state one process would have after all
the rows.  ``weight.grad`` is then its correctly rounded value: the same bits for
any world size, any split of the rows between ranks and micro-batches.

Only the digits some rank uses travel: one small ``all_reduce(MAX)`` first agrees
on the window of digits and checks that the ranks hold the same parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..errors import ExactSumError, ShardMismatchError
from ..ops.exact_grad import ExactGrad, ExactSum, exact_grads
from ..kernels import exact_sum as es

__all__ = ["all_reduce_exact_grads", "all_reduce_exact_sums", "exact_parameters", "exclude_from_ddp"]


def exact_parameters(module_or_params: torch.nn.Module | Iterable[torch.Tensor],
                     grads: ExactGrad = exact_grads) -> list[torch.Tensor]:
    """The parameters :func:`all_reduce_exact_grads` reduces: of a module, those
    ``grads`` knows (registered or accumulated), in ``parameters()`` order; an
    explicit iterable is taken as it is."""
    if isinstance(module_or_params, torch.nn.Module):
        return [p for p in module_or_params.parameters() if p in grads]
    return list(module_or_params)


def exclude_from_ddp(model: torch.nn.Module, grads: ExactGrad = exact_grads) -> list[str]:
    """Keep ``model``'s exact parameters out of DDP's buckets; call before wrapping.

    Uses DDP's ``_set_params_and_buffers_to_ignore_for_model``, naming each
    parameter both as ``named_parameters()`` does (``"w"``) and as DDP's reducer
    does (``f"{module_name}.{param_name}"``: ``".w"`` at the top level); torch reads
    one form in one place and the other in another, and a parameter missed by
    either is silently all-reduced in float.  Returns the names.
    """
    from torch.nn.parallel import DistributedDataParallel

    names: list[str] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param in grads:
                names.append(f"{module_name}.{param_name}")
                if module_name == "":
                    names.append(param_name)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)  # type: ignore[no-untyped-call]
    return names


def _window(states: list[torch.Tensor]) -> tuple[int, int]:
    """The digits ``[lo, hi)`` that are nonzero in some local state (``(0, 0)``: none)."""
    used = torch.zeros(es.DIGITS, dtype=torch.bool)
    for s in states:
        used |= (s[:es.DIGITS] != 0).any(1).cpu()
    rows = used.nonzero().flatten().tolist()
    return (rows[0], rows[-1] + 1) if rows else (0, 0)


def all_reduce_exact_grads(
    module_or_params: torch.nn.Module | Iterable[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    grads: ExactGrad = exact_grads,
) -> list[torch.Tensor]:
    """Sum the exact weight gradients over the ranks of ``group``; set each ``grad``.

    Call it on every rank after the last backward of a step (where DDP would have
    reduced), with the same module or parameters in the same order.  Afterwards
    every rank's ``p.grad`` is the correctly rounded sum of the products of
    *all* ranks' rows, bit-identical to one process running every row, and the
    carried sum is the global one.  Returns the parameters reduced.

    Raises
    ------
    ShardMismatchError
        (on every rank together) when there is no process group, or the ranks
        hold different numbers or sizes of exact parameters.
    ExactSumError
        when an exact parameter's ``grad`` was changed after the exact backward
        wrote it (DDP reducing it as well, say).
    ExactSumOverflowError
        when the total passes the accumulator's range (docs/training.md).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ShardMismatchError("all_reduce_exact_grads needs a process group: call "
                                 "torch.distributed.init_process_group first")
    params = exact_parameters(module_or_params, grads)
    changed = [i for i, p in enumerate(params) if grads.changed_since_written(p)]
    if changed:
        # Raised before any collective: every rank in this state raises; a rank that is
        # not would wait in the collective until the group's timeout.
        raise ExactSumError(
            f"the gradients of exact parameters {changed} were changed after the exact backward "
            "wrote them (is DDP reducing them too? call exclude_from_ddp(model) before wrapping)")
    sums = all_reduce_exact_sums([grads.state(p) for p in params], group)
    for p, total in zip(params, sums):
        grads.set_state(p, ExactSum.from_state(total.state.to(p.device)))
    return params


def all_reduce_exact_sums(sums: list[ExactSum], group: dist.ProcessGroup | None = None) -> list[ExactSum]:
    """Every rank's exact sums added over ``group`` (one small MAX all-reduce, then one
    integer SUM all-reduce of the digits in use): the same bits at any world size.
    Every rank passes the same number of sums of the same sizes, in the same order."""
    devices = {s.state.device for s in sums}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    states = [s.state.to(device) for s in sums]
    numel = sum(s.shape[1] for s in states)
    lo, hi = _window(states)
    # One MAX all-reduce of (x, -x) pairs gives every rank the max and the min:
    # equal counts on every rank, and the union of the digit windows.
    facts = torch.tensor([len(sums), numel, hi, -len(sums), -numel, -lo], dtype=torch.int64,
                         device=device)
    dist.all_reduce(facts, op=dist.ReduceOp.MAX, group=group)
    most, least = facts[:3].tolist(), (-facts[3:]).tolist()
    if most[:2] != least[:2]:
        raise ShardMismatchError(
            f"the ranks hold different exact parameters: between {least[0]} and {most[0]} "
            f"parameters of {least[1]} to {most[1]} elements; pass the same module on every rank")
    lo, hi = least[2], most[2]
    if not sums:
        return []
    flat = torch.cat(states, dim=1)
    payload = torch.cat([flat[lo:hi], flat[es.DIGITS:]], dim=0).contiguous()
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    total = torch.zeros_like(flat)
    total[lo:hi] = payload[:hi - lo]
    total[es.DIGITS:] = payload[hi - lo:]
    out, offset = [], 0
    for s in states:
        n = s.shape[1]
        out.append(ExactSum.from_state(total[:, offset:offset + n]))
        offset += n
    return out
