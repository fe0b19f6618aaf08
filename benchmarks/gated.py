"""Gated, grouped RMSNorm against the stock Hugging Face modules (issue 24, items 1 and 5).

    python benchmarks/gated.py [--fractions] [--speed] [--rounds 7] [--rows 4096]

``--fractions`` (item 1): for each gated family ``replace_rmsnorm`` covers, the stock
module and its :class:`tgn.GatedRMSNorm` replacement (same weight, perturbed) on the
same random ``x`` and ``gate``; prints the fraction of output elements whose bits
differ, in bf16 and fp32, and the largest difference.  The only differences left are
the square root (we divide by a correctly rounded ``sqrt``; they multiply by
``rsqrt``), the sum's order and ``silu``'s last bit (ours is the fp64 value rounded
once, torch's fp32 ``silu`` is not correctly rounded).

``--speed`` (item 5): the stock module under ``torch.compile`` against ours (eager,
the direct path, and under ``torch.compile``), no grad, interleaved round-robin,
medians: Mamba2's gated rows (2048, 8192) with groups of 1024 and Qwen3-Next's gated
rows (32768, 128), bf16.  Target: ours at most 1.0x the compiled stock module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import warnings

import torch

import taskgraph_norm as tgn
from taskgraph_norm.integrations import replace_rmsnorm
from taskgraph_norm.tools.bench import interleaved_medians

#: (module, class, norm_before_gate, group_size or None)
FAMILIES = [
    ("mamba2", "Mamba2RMSNormGated", 256),
    ("bamba", "BambaRMSNormGated", 256),
    ("nemotron_h", "NemotronHRMSNormGated", 256),
    ("granitemoehybrid", "GraniteMoeHybridRMSNormGated", 256),
    ("zamba2", "Zamba2RMSNormGated", 256),
    ("qwen3_next", "Qwen3NextRMSNormGated", None),
    ("qwen3_5", "Qwen3_5RMSNormGated", None),
    ("qwen3_5_moe", "Qwen3_5MoeRMSNormGated", None),
    ("olmo_hybrid", "OlmoHybridRMSNormGated", None),
]


def stock_module(mod: str, cls: str, hidden: int, group: int | None) -> torch.nn.Module:
    klass = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), cls)
    m = klass(hidden, group, eps=1e-6) if group is not None else klass(hidden, eps=1e-6)
    with torch.no_grad():
        m.weight.add_(0.2 * torch.randn(hidden, generator=torch.Generator().manual_seed(5)))
    return m


def swapped(stock: torch.nn.Module) -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.norm = stock
    replace_rmsnorm(holder)
    return holder.norm


def fractions(rows: int) -> None:
    hidden = 1024
    print(f"rows {rows}, hidden {hidden}; fraction of output elements that differ from the stock module")
    print("| class | gate | group | bf16 differ | bf16 max abs | fp32 differ | fp32 max abs |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(rows, hidden, generator=g) * torch.logspace(-1, 1, hidden)
    z0 = torch.randn(rows, hidden, generator=g) * 2
    for mod, cls, group in FAMILIES:
        cells = []
        for dtype in (torch.bfloat16, torch.float32):
            stock = stock_module(mod, cls, hidden, group).to(dtype)
            ours = swapped(stock_module(mod, cls, hidden, group).to(dtype))
            x, z = x0.to(dtype), z0.to(dtype)
            with torch.no_grad():
                a, b = stock(x, z), ours(x, z)
            assert a.dtype == b.dtype, (cls, a.dtype, b.dtype)
            cells += [f"{(a != b).float().mean().item():.4%}", f"{(a.float() - b.float()).abs().max().item():.3g}"]
        order = "after" if group is None else "before"
        print(f"| `{cls}` | {order} | {group or 'none'} | " + " | ".join(cells) + " |")


def speed(rounds: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        importlib.import_module("torch._inductor.compile_fx")
    cases = [("Mamba2 (2048, 8192), groups of 1024", "mamba2", "Mamba2RMSNormGated", (2048, 8192), 1024),
             ("Qwen3-Next (32768, 128)", "qwen3_next", "Qwen3NextRMSNormGated", (32768, 128), None)]
    print(f"load {os.getloadavg()[0]:.2f}, threads {torch.get_num_threads()}, rounds {rounds}, bf16, no grad")
    print("| case | stock compiled ms | ours eager ms | ours compiled ms | eager / stock | compiled / stock |")
    print("|---|---|---|---|---|---|")
    for label, mod, cls, shape, group in cases:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(torch.bfloat16)
        z = torch.randn(shape, generator=g).to(torch.bfloat16)
        stock = stock_module(mod, cls, shape[1], group).to(torch.bfloat16)
        ours = swapped(stock_module(mod, cls, shape[1], group).to(torch.bfloat16))
        stock_c = torch.compile(stock)
        ours_c = torch.compile(ours, fullgraph=True)
        with torch.no_grad():
            methods = {"stock": lambda: stock_c(x, z), "eager": lambda: ours(x, z), "compiled": lambda: ours_c(x, z)}
            for f in methods.values():
                f()
            t = interleaved_medians(methods, rounds)
        ms = {k: v * 1e3 for k, v in t.items()}
        print(f"| {label} | {ms['stock']:.2f} | {ms['eager']:.2f} | {ms['compiled']:.2f} | "
              f"{t['eager'] / t['stock']:.2f}x | {t['compiled'] / t['stock']:.2f}x |")
    print(f"load {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args()
    both = not (args.fractions or args.speed)
    if args.fractions or both:
        fractions(args.rows)
    if args.speed or both:
        speed(args.rounds)


if __name__ == "__main__":
    main()
