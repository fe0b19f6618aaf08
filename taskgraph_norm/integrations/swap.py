"""What every swap of a model's norm module shares: naming a class, walking a model's
slots, and handing a replacement the original's hooks and a way back.

:mod:`.transformers` (RMSNorm families, :func:`~.transformers.replace_norms`) and
:mod:`.hf_layernorm` (``torch.nn.LayerNorm``) build on it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["ORIGINAL", "adopt", "class_path", "original_of", "skipped", "slots"]

#: Where a replacement keeps the module it replaced (a plain attribute, so it is not a
#: submodule: no state_dict keys, not moved by ``.to()``).
ORIGINAL = "_tgn_replaced_module"

#: Forward hooks travel with the module: the replacement shares the original's dicts,
#: so a hook registered on either (and its handle) keeps working.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def class_path(cls: type) -> str:
    """``module.qualname``: a class named without importing it, and a copy under another
    name (remote code, a subclass) never taken for the original."""
    return f"{cls.__module__}.{cls.__qualname__}"


def slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(name, parent, attribute, child)`` for every submodule in ``named_modules``
    order, a shared module once per place it is held."""
    seen: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        seen[name] = module
        if name:
            parent, _, attr = name.rpartition(".")
            yield name, seen[parent], attr, module


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def adopt(new: nn.Module, old: nn.Module) -> None:
    """``new`` takes ``old``'s training mode and forward hooks, and keeps ``old`` to be
    put back (:func:`original_of`)."""
    new.train(old.training)
    for hooks in _HOOK_DICTS:
        object.__setattr__(new, hooks, getattr(old, hooks))
    object.__setattr__(new, ORIGINAL, old)


def original_of(module: nn.Module) -> nn.Module | None:
    """The module a replacement replaced, or ``None`` for a module that replaced none."""
    original = vars(module).get(ORIGINAL)
    return original if isinstance(original, nn.Module) else None
