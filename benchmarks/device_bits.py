"""How many output elements differ between the CPU and an accelerator, per method.

    python benchmarks/device_bits.py [--rows 256] [--hidden 4096]

Certified graphs with pairwise leaves are asserted bit-identical across devices in
tests/test_devices.py; this script records what the paths without that promise
(torch.sum leaves, cat, torch's own F.rms_norm) happen to do on this device.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import taskgraph_norm as tgn
from taskgraph_norm.testing import count_bit_differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device, name = torch.device("mps"), "mps"
    else:
        raise SystemExit("no CUDA or MPS device")
    x = torch.randn(args.rows, args.hidden, generator=torch.Generator().manual_seed(0))
    x = x * torch.logspace(-3, 3, args.hidden)
    methods = {
        "tree, pairwise leaf": lambda t: tgn.normalize_sync(t),
        "linear, pairwise leaf": lambda t: tgn.normalize_sync(t, topology="linear"),
        "tree, native leaf": lambda t: tgn.normalize_sync(t, leaf="native"),
        "cat": lambda t: tgn.normalize_sync(t, topology="cat"),
        "exact, native leaf": lambda t: tgn.normalize_sync(t, leaf="native", accumulate="exact"),
        "torch F.rms_norm": lambda t: F.rms_norm(t, (args.hidden,)),
    }
    print(f"{name}, torch {torch.__version__}, input {args.rows}x{args.hidden} fp32\n")
    print("| method | elements differing from CPU |")
    print("|---|---|")
    for label, fn in methods.items():
        diff = count_bit_differences(fn(x.to(device)).cpu(), fn(x))
        print(f"| {label} | {diff} of {x.numel()} |")


if __name__ == "__main__":
    main()
