"""Swap a Hugging Face ``transformers`` model's norm modules for :class:`taskgraph_norm.RMSNorm`
(:func:`replace_rmsnorm`) and :class:`taskgraph_norm.LayerNorm` (:func:`replace_norms`,
which swaps both kinds in one call).

Each supported norm class belongs to a :class:`NormFamily`: the casting mode and
weight offset that reproduce its arithmetic (docs/model.md lists them and what
"reproduce" means: the same operations, with a division by a correctly rounded
``sqrt`` where Hugging Face multiplies by ``rsqrt``, and a fixed reduction order
where it uses torch's).  The classes are named by module path and qualified name,
so ``transformers`` need not import a model to know it, and a copy of a class
under another name (remote code, a subclass) is not mistaken for the original.

``transformers`` is imported lazily (the ``[hf]`` extra): importing this module
needs only torch.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError, UnsupportedNormError
from ..layernorm import LayerNorm
from ..module import GatedRMSNorm, RMSNorm
from .hf_layernorm import LAYER_OPTIONS, is_layer_norm, layer_norm_replacement, restore_layer_norm, why_not_layer_norm
from .swap import adopt, class_path, original_of, skipped, slots

__all__ = [
    "FAMILIES", "NormFamily", "norms_replaced", "register_norm_class", "replace_norms", "replace_rmsnorm",
    "restore_norms", "restore_rmsnorm", "rmsnorm_replaced",
]

HF_EXTRA = "pip install 'taskgraph-norm[hf]'"

#: Our own modules: left alone by every replace.
_OURS = (RMSNorm, GatedRMSNorm, LayerNorm)


@dataclass(frozen=True)
class NormFamily:
    """How a norm class computes, in :class:`~taskgraph_norm.RMSNorm`'s terms.

    ``eps_attr`` names the attribute holding its epsilon; ``weight_dtypes``, when
    set, are the weight dtypes for which ``casting_mode`` reproduces the class
    (outside them it is refused rather than approximated).  ``gate``, for a gated
    class (:class:`~taskgraph_norm.GatedRMSNorm`): ``"before"`` (``x * silu(gate)``,
    then the norm: Mamba2) or ``"after"`` (the norm, the weight, then ``*
    silu(gate)``: Qwen3-Next); ``group_attr`` names its group-size attribute.
    """

    casting_mode: str
    offset: float
    eps_attr: str
    weight_dtypes: frozenset[torch.dtype] | None = None
    gate: str | None = None
    group_attr: str | None = None


#: ``(x.float() * rsqrt(mean + eps)).to(x.dtype)``, then ``weight * that``.
LLAMA = NormFamily("llama", 0.0, "variance_epsilon")
#: ``(x.float() * rsqrt(...)) * (1 + weight.float())`` in fp32, cast once.
GEMMA = NormFamily("gemma", 1.0, "eps")
#: ``(weight * x.float() * rsqrt(...)).to(x.dtype)``: multiply before casting, in the
#: promoted dtype of the weight and fp32 -- fp32 (``"torch"``) unless the weight is fp64.
OLMO2 = NormFamily("torch", 0.0, "variance_epsilon",
                   frozenset({torch.float16, torch.bfloat16, torch.float32}))
#: NemotronH: ``(weight.to(fp32) * x.float() * rsqrt(...)).to(x.dtype)``: ``"torch"``'s
#: order for every weight dtype (fp32, bf16 and fp16 inputs).
NEMOTRON_H = NormFamily("torch", 0.0, "variance_epsilon", frozenset({torch.float16, torch.bfloat16, torch.float32,
                                                                      torch.float64}), group_attr=None)
#: ``torch.nn.RMSNorm`` itself: ``"torch"`` is its definition.
TORCH = NormFamily("torch", 0.0, "eps")
#: Mamba2's gated norm: ``h = x.float() * silu(gate.float())``, each group of
#: ``group_size`` times ``rsqrt(mean + eps)``, ``.to(x.dtype)``, then ``weight * that``.
MAMBA2_GATED = NormFamily("llama", 0.0, "variance_epsilon", gate="before", group_attr="group_size")
#: Qwen3-Next's gated norm: ``(x.float() * rsqrt(...)).to(x.dtype)``, ``weight * that``,
#: then ``* silu(gate.float())`` in fp32, cast to ``x.dtype``.
QWEN3_NEXT_GATED = NormFamily("llama", 0.0, "variance_epsilon", gate="after")

_M = "transformers.models"

#: Norm class (``module.qualname``) -> its family.  tests/test_hf.py checks that every
#: class of a family has the same ``forward`` source as the family's first class.
FAMILIES: dict[str, NormFamily] = {
    **{f"{_M}.{mod}.modeling_{mod}.{cls}": LLAMA for mod, cls in [
        ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("mixtral", "MixtralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"), ("qwen3", "Qwen3RMSNorm"),
        ("qwen3_moe", "Qwen3MoeRMSNorm"), ("phi3", "Phi3RMSNorm"), ("granite", "GraniteRMSNorm"),
        ("deepseek_v3", "DeepseekV3RMSNorm"), ("glm4", "Glm4RMSNorm"),
        ("mamba2", "Mamba2RMSNorm"), ("bamba", "BambaRMSNorm"), ("granitemoehybrid", "GraniteMoeHybridRMSNorm"),
        ("zamba2", "Zamba2RMSNorm"),
    ]},
    **{f"{_M}.{mod}.modeling_{mod}.{cls}": GEMMA for mod, cls in [
        ("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm"),
        ("qwen3_next", "Qwen3NextRMSNorm"), ("qwen3_5", "Qwen3_5RMSNorm"), ("qwen3_5_moe", "Qwen3_5MoeRMSNorm"),
    ]},
    **{f"{_M}.{mod}.modeling_{mod}.{cls}": OLMO2 for mod, cls in [
        ("olmo2", "Olmo2RMSNorm"), ("olmo3", "Olmo3RMSNorm"), ("olmo_hybrid", "OlmoHybridRMSNorm"),
    ]},
    f"{_M}.nemotron_h.modeling_nemotron_h.NemotronHRMSNorm": NEMOTRON_H,
    "torch.nn.modules.normalization.RMSNorm": TORCH,
    **{f"{_M}.{mod}.modeling_{mod}.{cls}": MAMBA2_GATED for mod, cls in [
        ("mamba2", "Mamba2RMSNormGated"), ("bamba", "BambaRMSNormGated"), ("nemotron_h", "NemotronHRMSNormGated"),
        ("granitemoehybrid", "GraniteMoeHybridRMSNormGated"), ("zamba2", "Zamba2RMSNormGated"),
    ]},
    **{f"{_M}.{mod}.modeling_{mod}.{cls}": QWEN3_NEXT_GATED for mod, cls in [
        ("qwen3_next", "Qwen3NextRMSNormGated"), ("qwen3_5", "Qwen3_5RMSNormGated"),
        ("qwen3_5_moe", "Qwen3_5MoeRMSNormGated"), ("olmo_hybrid", "OlmoHybridRMSNormGated"),
    ]},
}

#: Class names that look like a norm: refused unless mapped, so that a model is never
#: left with a norm this library did not account for (LayerNorm, T5LayerNorm, gated
#: RMSNorms, ...).  Containers such as ``...LayerNormConvLayer`` do not match.
_NORM_NAME = re.compile(r"(rms|layer)_?norm\w{0,5}$", re.IGNORECASE)

def register_norm_class(cls: type[nn.Module], family: NormFamily) -> None:
    """Map ``cls`` (exactly this class, not its subclasses) to ``family``.

    For a norm class of your own or of a model family not in :data:`FAMILIES`,
    once you have checked that ``family.casting_mode`` reproduces its arithmetic.

    Raises
    ------
    ConfigError
        for an unknown casting mode or a non-finite offset (checked by building
        one :class:`~taskgraph_norm.RMSNorm`).
    """
    RMSNorm(8, casting_mode=family.casting_mode, offset=family.offset, device="meta")
    FAMILIES[class_path(cls)] = family


def _require_transformers() -> None:
    try:
        importlib.import_module("transformers")
    except ImportError as exc:
        raise MissingDependencyError("transformers", "replacing a Hugging Face model's norms",
                                     HF_EXTRA) from exc


def _family(module: nn.Module) -> NormFamily | None:
    return FAMILIES.get(class_path(type(module)))


def _looks_like_norm(module: nn.Module) -> bool:
    """A norm by its class name, or a subclass of a LayerNorm/RMSNorm or of a mapped
    class (a subclass may compute otherwise, so it is refused unless mapped itself)."""
    return (isinstance(module, (nn.LayerNorm, nn.RMSNorm))
            or _NORM_NAME.search(type(module).__name__) is not None
            or any(class_path(c) in FAMILIES for c in type(module).__mro__))


def _why_not(module: nn.Module, family: NormFamily) -> str | None:
    """Why ``module`` cannot be replaced exactly, or ``None`` when it can."""
    if "forward" in vars(module):
        return "its forward is wrapped on the instance (an accelerate device_map or offload hook?)"
    weight = getattr(module, "weight", None)
    if weight is not None and not isinstance(weight, nn.Parameter):
        return "its weight is not a Parameter"
    if weight is not None and family.weight_dtypes is not None and weight.dtype not in family.weight_dtypes:
        return f"with a {weight.dtype} weight it multiplies in that dtype, which no casting mode does"
    if not isinstance(getattr(module, family.eps_attr, None), (float, int, type(None))):
        return f"no numeric eps in its {family.eps_attr!r} attribute"
    if family.group_attr is not None and not isinstance(getattr(module, family.group_attr, None), int):
        return f"no int group size in its {family.group_attr!r} attribute"
    if family.gate is not None and getattr(module, "activation", "silu") != "silu":
        return "its gate's activation is not silu"
    return None


def _replacement(module: nn.Module, family: NormFamily, options: dict[str, Any]) -> RMSNorm | GatedRMSNorm:
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if weight is not None else tuple(getattr(module, "normalized_shape"))
    eps = getattr(module, family.eps_attr)
    new: RMSNorm | GatedRMSNorm
    if family.gate is not None:
        group = getattr(module, family.group_attr) if family.group_attr else None
        new = GatedRMSNorm(shape[0], None if eps is None else float(eps), group_size=group,
                           norm_before_gate=family.gate == "after", elementwise_affine=weight is not None,
                           device="meta", casting_mode=family.casting_mode, offset=family.offset, **options)
    else:
        new = RMSNorm(shape, None if eps is None else float(eps), elementwise_affine=weight is not None,
                      device="meta", casting_mode=family.casting_mode, offset=family.offset, **options)
    if weight is not None:
        new.weight = weight  # the same Parameter: optimizer state and ties keep working
    adopt(new, module)
    return new


def _plan(child: nn.Module, options: dict[str, Any], layer: bool) -> tuple[str | None, Callable[[], nn.Module]]:
    """Why ``child`` cannot be replaced (``None`` when it can), and how to build its replacement."""
    if layer and is_layer_norm(child):
        return why_not_layer_norm(child), lambda: layer_norm_replacement(child, options)
    family = _family(child)
    if family is None:
        if is_layer_norm(child):
            return "a torch.nn.LayerNorm: replace_norms swaps LayerNorms as well as RMSNorms", nn.Identity
        return "no casting mode is known to reproduce this class (register_norm_class maps one)", nn.Identity
    return _why_not(child, family), lambda: _replacement(child, family, options)


def _replace(model: nn.Module, skip: Iterable[str], options: dict[str, Any], layer: bool) -> list[str]:
    """:func:`replace_rmsnorm` (``layer=False``) or :func:`replace_norms` (``layer=True``)."""
    _require_transformers()
    for name in ("casting_mode", "offset"):
        if name in options:
            raise ConfigError(name, options[name], "no value: each norm class's family sets it")
    skip_names = tuple(skip)
    if _looks_like_norm(model) and not isinstance(model, _OURS):
        raise UnsupportedNormError([("<model>", class_path(type(model)), "the model itself is a norm; "
                                     "replace it by assignment in its parent")])
    found: list[tuple[str, nn.Module, str, nn.Module, Callable[[], nn.Module]]] = []
    refused: list[tuple[str, str, str]] = []
    for name, parent, attr, child in slots(model):
        if isinstance(child, _OURS) or skipped(name, skip_names) or not _looks_like_norm(child):
            continue
        reason, build = _plan(child, options, layer)
        if reason is not None:
            refused.append((name, class_path(type(child)), reason))
        else:
            found.append((name, parent, attr, child, build))
    if refused:
        raise UnsupportedNormError(refused, "leave a part of the model as it is with skip=[name, ...]")
    made: dict[int, nn.Module] = {}
    for _, _, _, child, build in found:  # build all first: a bad option fails before any swap
        if id(child) not in made:
            made[id(child)] = build()
    for _, parent, attr, child, _ in found:
        setattr(parent, attr, made[id(child)])
    return [name for name, *_ in found]


def replace_rmsnorm(model: nn.Module, *, skip: Iterable[str] = (), **options: Any) -> list[str]:
    """Replace every RMSNorm module of ``model`` in place with a :class:`taskgraph_norm.RMSNorm`
    (a gated one, Mamba2's or Qwen3-Next's, with a :class:`taskgraph_norm.GatedRMSNorm`).

    Each replacement gets the casting mode and offset of its class's family
    (:data:`FAMILIES`), the module's eps, and its weight: the same
    :class:`~torch.nn.Parameter` object, so ``state_dict`` keys and values, the
    parameter's dtype, device and ``requires_grad``, weight ties and optimizer
    state are untouched.  Forward hooks registered on a module carry over.
    All or nothing: every module is checked and every replacement built before
    the first one is swapped in.

    Parameters
    ----------
    model:
        A ``transformers`` model (or any ``nn.Module`` holding mapped norm classes).
    skip:
        Module names (and everything under them) to leave as they are, e.g. a
        vision tower's ``"model.vision_tower"`` whose LayerNorms have no mapping.
    **options:
        Passed to every :class:`~taskgraph_norm.RMSNorm` (``topology``,
        ``chunk_size``, ``leaf``, ``accumulate``...), never ``casting_mode`` or
        ``offset``, which come from the family.

    Returns
    -------
    list[str]
        The replaced modules' names (a module held in two places is named twice).
        Norms that already are :class:`~taskgraph_norm.RMSNorm` or
        :class:`~taskgraph_norm.LayerNorm` are left alone.

    Raises
    ------
    MissingDependencyError
        without ``transformers`` (``pip install 'taskgraph-norm[hf]'``).
    ConfigError
        for ``casting_mode``/``offset`` in ``options``, or a bad option.
    UnsupportedNormError
        naming every norm-like module (a class whose name ends in ``RMSNorm`` or
        ``LayerNorm``, or any ``nn.LayerNorm``/``nn.RMSNorm``) that has no
        mapping or cannot be swapped safely (a ``torch.nn.LayerNorm`` included:
        :func:`replace_norms` swaps those too); nothing is replaced.
    """
    return _replace(model, skip, options, layer=False)


def replace_norms(model: nn.Module, *, skip: Iterable[str] = (), **options: Any) -> list[str]:
    """:func:`replace_rmsnorm` that swaps ``torch.nn.LayerNorm`` modules too, in one call.

    Every mapped RMSNorm becomes a :class:`~taskgraph_norm.RMSNorm` (as
    :func:`replace_rmsnorm` makes it) and every ``torch.nn.LayerNorm`` (the class
    itself, not a subclass) a :class:`~taskgraph_norm.LayerNorm` holding the same
    weight and bias Parameters and eps.  All or nothing, as :func:`replace_rmsnorm`:
    any other norm-like module is refused and nothing is replaced.

    ``options`` go to every replacement, so only the options both modules take:
    ``topology``, ``chunk_size``, ``leaf``, ``accumulate``, ``weight_grad``.

    Raises
    ------
    TypeError
        for another option.
    MissingDependencyError, ConfigError, UnsupportedNormError
        as :func:`replace_rmsnorm`.
    """
    for name in options:
        if name not in LAYER_OPTIONS and name not in ("casting_mode", "offset"):
            raise TypeError(f"replace_norms() got an unexpected keyword argument {name!r} "
                            f"(options: {', '.join(LAYER_OPTIONS)})")
    return _replace(model, skip, options, layer=True)


def _restore(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> list[str]:
    restored: list[str] = []
    for name, parent, attr, child in list(slots(model)):
        original = original_of(child)
        if original is None or not isinstance(child, kinds):
            continue
        if isinstance(child, LayerNorm):
            restore_layer_norm(child, original)
        else:
            if child.weight is not None:
                original.weight = child.weight
            original.train(child.training)
        setattr(parent, attr, original)
        restored.append(name)
    return restored


def restore_rmsnorm(model: nn.Module) -> list[str]:
    """Put back every module :func:`replace_rmsnorm` replaced in ``model``.

    The original gets the replacement's current weight Parameter (the same object
    unless something swapped it since, e.g. ``load_state_dict(assign=True)``) and
    training mode.  Returns the restored modules' names; other
    :class:`~taskgraph_norm.RMSNorm` modules (and every LayerNorm) stay.
    """
    return _restore(model, (RMSNorm, GatedRMSNorm))


def restore_norms(model: nn.Module) -> list[str]:
    """Put back every module :func:`replace_norms` (or :func:`replace_rmsnorm`) replaced:
    RMSNorms as :func:`restore_rmsnorm` does, LayerNorms with the replacement's current
    weight and bias Parameters."""
    return _restore(model, _OURS)


@contextmanager
def rmsnorm_replaced(model: nn.Module, *, skip: Iterable[str] = (), **options: Any) -> Iterator[list[str]]:
    """``with rmsnorm_replaced(model, topology="tree") as names:`` -- :func:`replace_rmsnorm`
    on entry, :func:`restore_rmsnorm` on exit (even on an error)."""
    names = replace_rmsnorm(model, skip=skip, **options)
    try:
        yield names
    finally:
        restore_rmsnorm(model)


@contextmanager
def norms_replaced(model: nn.Module, *, skip: Iterable[str] = (), **options: Any) -> Iterator[list[str]]:
    """:func:`replace_norms` on entry, :func:`restore_norms` on exit (even on an error)."""
    names = replace_norms(model, skip=skip, **options)
    try:
        yield names
    finally:
        restore_norms(model)
