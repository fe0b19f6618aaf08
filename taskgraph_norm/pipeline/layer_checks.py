"""LayerNorm's input checks: reject what ``torch.nn.functional.layer_norm`` rejects, with
torch's error types (and its messages where it has one), plus ``eps`` and autocast.

``F.layer_norm`` (torch 2.x, CPU and CUDA) takes a weight and a bias of the input's
dtype, or fp32 ones for an fp16/bf16 input ("mixed dtype"), and returns the input's
dtype; any other mix is a ``RuntimeError``.  Our own parameters (topology, chunk
size, ...) are checked by the builder.
"""

from __future__ import annotations

import torch

from ..checks import _TORCH_TYPE_NAMES, SUPPORTED_DTYPES, check_out
from ..errors import (BiasShapeError, ConfigError, DeviceMismatchError, DtypeError, InputShapeError,
                      ParameterDtypeError, WeightShapeError)
from ..kernels.layer import LAYER_EPS

__all__ = ["autocast_layer_inputs", "check_layer_input", "check_layer_out", "resolve_layer_eps"]

_HALF = (torch.float16, torch.bfloat16)

#: The device types whose autocast runs ``layer_norm`` in fp32 (CUDA's autocast lists it
#: among its fp32 ops; CPU autocast leaves it alone: a bf16 input stays bf16).
AUTOCAST_FP32_DEVICES = ("cuda",)


def check_layer_input(x: object, hidden: int, weight: object | None, bias: object | None) -> None:
    """Reject what ``F.layer_norm(x, (hidden,), weight, bias)`` rejects.

    Raises
    ------
    TypeError
        ``x``, ``weight`` or ``bias`` is not a tensor (``None`` allowed for the last two).
    DtypeError (NotImplementedError)
        ``x`` is not fp32, fp64, fp16 or bf16.
    InputShapeError (RuntimeError)
        ``x``'s last dim is not ``hidden`` (a 0-d ``x`` included, as torch says).
    WeightShapeError, BiasShapeError, DeviceMismatchError, ParameterDtypeError (RuntimeError)
        a parameter of the wrong shape, device or dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != hidden:
        raise InputShapeError((hidden,), tuple(x.shape))
    if x.dtype not in SUPPORTED_DTYPES:
        name = _TORCH_TYPE_NAMES.get(x.dtype, str(x.dtype).removeprefix("torch."))
        error = DtypeError(name)
        error.args = (f'"layer_norm" not implemented for {name!r}',)
        raise error
    dtypes = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != (hidden,):
            raise (WeightShapeError if name == "weight" else BiasShapeError)(tuple(p.shape), (hidden,))
        if p.device != x.device:
            raise DeviceMismatchError(p.device, x.device)
        dtypes.append(p.dtype)
    if dtypes and (len(set(dtypes)) > 1 or not (dtypes[0] == x.dtype or (x.dtype in _HALF
                                                                              and dtypes[0] == torch.float32))):
        raise ParameterDtypeError(x.dtype, dtypes)


def check_layer_out(out: object | None, x: torch.Tensor, *inputs: torch.Tensor | None) -> None:
    """``out`` must be a tensor of ``x``'s shape, dtype and device, not partly over an input."""
    check_out(out, x, x.dtype, *inputs)


def resolve_layer_eps(eps: object) -> float:
    """``eps=None`` means ``F.layer_norm``'s 1e-5; else a real number."""
    if eps is None:
        return LAYER_EPS
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError("eps", eps, "a float or None")
    return float(eps)


def autocast_layer_inputs(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What autocast hands ``layer_norm``: on a device whose autocast runs it in fp32
    (CUDA), fp16/bf16 tensors become fp32 (so the result is fp32, as torch's); elsewhere
    the tensors as they are."""
    device = x.device.type
    if device not in AUTOCAST_FP32_DEVICES or not torch.is_autocast_enabled(device):
        return x, weight, bias

    def up(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.float() if t is not None and t.dtype in _HALF and t.device.type == device else t

    xf = up(x)
    assert xf is not None
    return xf, up(weight), up(bias)
