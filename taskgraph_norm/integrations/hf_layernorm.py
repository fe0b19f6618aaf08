"""``torch.nn.LayerNorm`` -> :class:`taskgraph_norm.LayerNorm`, for
:func:`~taskgraph_norm.integrations.replace_norms`.

Only ``torch.nn.LayerNorm`` itself is mapped (GPT-2, GPT-NeoX, OPT, Falcon, Phi, BERT,
... hold it as it is); a subclass, or a class of its own named ``...LayerNorm`` (T5's,
which is an RMSNorm), may compute otherwise and is refused.  The replacement computes
``F.layer_norm``'s formula with a fixed reduction order (docs/layernorm.md): the
same operations, a division by a correctly rounded ``sqrt`` where torch multiplies by
``rsqrt``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layernorm import LayerNorm
from .swap import adopt, class_path

__all__ = ["LAYER_NORM_CLASS", "LAYER_OPTIONS", "is_layer_norm", "layer_norm_replacement", "restore_layer_norm",
           "why_not_layer_norm"]

#: The one LayerNorm class mapped.
LAYER_NORM_CLASS = class_path(nn.LayerNorm)

#: The options both modules take (tgn.RMSNorm's casting_mode and offset have no meaning here).
LAYER_OPTIONS = ("topology", "chunk_size", "leaf", "accumulate", "weight_grad")


def is_layer_norm(module: nn.Module) -> bool:
    """``torch.nn.LayerNorm`` exactly (not a subclass)."""
    return class_path(type(module)) == LAYER_NORM_CLASS


def why_not_layer_norm(module: nn.Module) -> str | None:
    """Why a ``torch.nn.LayerNorm`` cannot be replaced exactly, or ``None`` when it can."""
    if "forward" in vars(module):
        return "its forward is wrapped on the instance (an accelerate device_map or offload hook?)"
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is not None and not isinstance(p, nn.Parameter):
            return f"its {name} is not a Parameter"
    if isinstance(getattr(module, "eps", None), bool) or not isinstance(getattr(module, "eps", None), (float, int)):
        return "no numeric eps in its 'eps' attribute"
    return None


def layer_norm_replacement(module: nn.Module, options: dict[str, Any]) -> LayerNorm:
    """A :class:`~taskgraph_norm.LayerNorm` holding ``module``'s weight and bias (the same
    Parameter objects) and eps, with ``options``' graph.

    Raises
    ------
    ConfigError, NotImplementedError
        a bad option (as ``tgn.LayerNorm`` raises it).
    """
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    new = LayerNorm(tuple(getattr(module, "normalized_shape")), float(getattr(module, "eps")),
                    elementwise_affine=weight is not None, bias=bias is not None, device="meta",
                    **options)
    if weight is not None:
        new.weight = weight  # the same Parameters: optimizer state and ties keep working
    if bias is not None:
        new.bias = bias
    adopt(new, module)
    return new


def restore_layer_norm(replacement: LayerNorm, original: nn.Module) -> None:
    """``original`` gets ``replacement``'s current weight and bias Parameters and training mode."""
    for name in ("weight", "bias"):
        p = getattr(replacement, name)
        if p is not None:
            setattr(original, name, p)
    original.train(replacement.training)
