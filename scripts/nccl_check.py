"""The distributed path on a GPU with the nccl backend (one GPU: world size 1).

One rank, one GPU: exercises the nccl all_gather / all_reduce calls and the
device kernels of tgn.distributed, and compares the bits with single-process
normalize on the CPU.  Multi-rank nccl needs one GPU per rank.
"""

from __future__ import annotations

import socket
import sys

import torch
import torch.distributed as dist

import taskgraph_norm as tgn
from taskgraph_norm.testing import count_bit_differences


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "nccl"  # "gloo" for a CPU dry run
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    try:
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            for hidden in (1000, 4096):
                x = (torch.randn(64, hidden, generator=g) * torch.logspace(-3, 3, hidden)).to(dtype)
                w = torch.randn(hidden, generator=g).to(dtype)
                for topology, accumulate in (("tree", "float"), ("linear", "float"), ("race", "exact")):
                    want = tgn.normalize_sync(x, w, topology=topology, accumulate=accumulate)
                    got = tgn.distributed.normalize_sync(
                        x.to(device), w.to(device), hidden_size=hidden, topology=topology, accumulate=accumulate
                    ).cpu()
                    diff = count_bit_differences(got, want)
                    print(f"{backend} W=1 {dtype} D={hidden} {topology}/{accumulate}: "
                          f"{diff} of {got.numel()} elements differ from CPU normalize")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
