"""Which FINALIZE step differs between the CPU and the device? (diagnostic)

Feeds identical fp32 inputs to each elementwise step on both devices and counts
the elements whose bits differ.
"""

from __future__ import annotations

import torch

dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)
total = torch.rand(1 << 20, generator=g) * 4096
x = torch.randn(1 << 20, generator=g)
rms = torch.rand(1 << 20, generator=g) + 0.5
D = 4095
steps = {
    "total / D (python scalar)": lambda t, x, r: t / D,
    "total / full_like(D)": lambda t, x, r: t / torch.full_like(t, D),
    "torch.div(total, 0-d device tensor)": lambda t, x, r: torch.div(t, torch.tensor(float(D), device=t.device)),
    "total + eps": lambda t, x, r: t + 1.1920928955078125e-07,
    "sqrt": lambda t, x, r: torch.sqrt(t),
    "x / rms (tensor)": lambda t, x, r: x / r,
    "x * w": lambda t, x, r: x * r,
    "x * x": lambda t, x, r: x * x,
    "a + b": lambda t, x, r: t + r,
}
for name, fn in steps.items():
    a = fn(total, x, rms)
    b = fn(total.to(dev), x.to(dev), rms.to(dev)).cpu()
    print(f"{name:40s} {(a.view(torch.int32) != b.view(torch.int32)).sum().item()} of {a.numel()} differ")
