"""What the Hugging Face tests (test_hf.py, test_hf_layernorm.py) share: the logits of a
tiny model, the norm calls of one forward, the rows a norm gives other bits alone, and
the one-graph compile check."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .helpers import bits_equal

Calls = list[tuple[nn.Module, torch.Tensor, torch.Tensor]]


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits  # type: ignore[no-any-return]


def norm_calls(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, is_norm: type | tuple[type, ...] | None = None,
               name_suffix: str = "") -> Calls:
    """(module, input, output) of every norm call in one forward: modules that are
    ``is_norm`` instances or whose class name ends in ``name_suffix`` (when given)."""
    calls: Calls = []
    handles = [m.register_forward_hook(lambda m, a, out: calls.append((m, a[0], out)))
               for m in model.modules()
               if (is_norm is not None and isinstance(m, is_norm))
               or (name_suffix and type(m).__name__.endswith(name_suffix))]
    logits(model, x, mask)
    for h in handles:
        h.remove()
    return calls


def rows_that_differ_alone(calls: Calls) -> int:
    """How many rows a norm gives other bits alone than it gave inside its batch."""
    bad = 0
    with torch.no_grad():
        for module, inputs, outputs in calls:
            xs, ys = inputs.reshape(-1, inputs.shape[-1]), outputs.reshape(-1, outputs.shape[-1])
            bad += sum(not bits_equal(module(xs[i:i + 1]), ys[i:i + 1]) for i in range(xs.shape[0]))
    return bad


def assert_compiles_as_one_graph(model: nn.Module, x: torch.Tensor) -> None:
    """``model`` compiles as one graph with no break, and ``fullgraph=True`` gives the eager bits."""

    def forward() -> torch.Tensor:
        return logits(model, x)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:1]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert bits_equal(compiled(input_ids=x).logits, forward())
    torch._dynamo.reset()


def assert_close_to_stock(model: nn.Module, replace: Callable[[nn.Module], object], x: torch.Tensor,
                          dtype: torch.dtype, tol: float) -> torch.Tensor:
    """``replace(model)`` moves the logits (of ``dtype``) by at most ``tol``; returns the stock logits."""
    stock = logits(model, x)
    replace(model)
    ours = logits(model, x)
    assert ours.dtype == stock.dtype == dtype
    assert (ours.float() - stock.float()).abs().max().item() <= tol
    return stock


def assert_norms_batch_invariant(model: nn.Module, calls_of: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], Calls],
                                 x: torch.Tensor, count: int) -> None:
    """Every one of the ``count`` norm calls gives each row the bits it gave in the batch
    (padded sequences too), and a sequence alone through the model meets its first norm
    with the batch's bits (the same embedding rows) and leaves with them."""
    mask = torch.ones_like(x)
    mask[1, 6:] = mask[3, 2:] = 0
    for m in (None, mask):
        calls = calls_of(model, x, m)
        assert len(calls) == count and rows_that_differ_alone(calls) == 0
    alone, batched = calls_of(model, x[2:3], None), calls_of(model, x, None)
    assert bits_equal(alone[0][2], batched[0][2][2:3])
