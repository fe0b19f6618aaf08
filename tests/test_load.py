"""Load: many threads at once give single-threaded bits; warm calls keep memory flat."""

from __future__ import annotations

import os
import random
import threading

import pytest
import torch

import taskgraph_norm as tgn

from .helpers import bits_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CONFIGS = (
    {"topology": "tree"}, {"topology": "linear"}, {"topology": "tree", "chunk_size": 100},
    {"topology": "race", "accumulate": "exact"}, {"topology": "cat"}, {"topology": "tree", "leaf": "native"},
)
SHAPES = ((1, 4096), (3, 1000), (64, 256), (300, 128), (2, 5, 64))


def _call(k: int) -> tuple[dict[str, object], torch.Tensor, torch.Tensor | None, bool]:
    """Call number ``k`` of the mix: a seeded shape, dtype, configuration, weight, out=."""
    rnd = random.Random(k)
    shape, dtype, config = rnd.choice(SHAPES), rnd.choice(DTYPES), rnd.choice(CONFIGS)
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(shape, generator=gen) * 2.0 ** rnd.randint(-20, 20)).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype) if k % 3 else None
    return dict(config), x, w, bool(k % 2)


def _run(k: int) -> torch.Tensor:
    config, x, w, use_out = _call(k)
    out = torch.empty_like(x) if use_out else None
    y = tgn.normalize_sync(x, w, out=out, **config)  # type: ignore[arg-type]
    assert out is None or y is out
    return y


def test_eight_threads_of_mixed_calls_give_single_threaded_bits() -> None:
    calls = 8 * 200
    expected = [_run(k) for k in range(calls)]
    got: list[torch.Tensor | None] = [None] * calls
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for k in range(t, calls, 8):
                got[k] = _run(k)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    differing = [k for k in range(calls) if not bits_equal(got[k], expected[k])]  # type: ignore[arg-type]
    assert differing == []


def test_the_mix_would_see_a_difference() -> None:
    # Negative control: the same comparison finds a one-ulp change in one element.
    y = _run(5)
    z = y.clone()
    ints = z.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[z.element_size()]).view(-1)
    ints[0] ^= 1  # one ulp in the last place of one element
    assert not bits_equal(y, z) and bits_equal(y, _run(5))


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_resident_memory_is_flat_over_10000_warm_calls() -> None:
    x, w = torch.randn(8, 4096), torch.randn(4096)
    xb = x.to(torch.bfloat16)
    for _ in range(500):  # warm every cache first
        tgn.normalize_sync(x, w)
        tgn.normalize_sync(xb, w.to(torch.bfloat16), topology="linear")
    before = _rss_bytes()
    for _ in range(5000):
        tgn.normalize_sync(x, w)
        tgn.normalize_sync(xb, w.to(torch.bfloat16), topology="linear")
    growth = _rss_bytes() - before
    # The calls allocate ~100 KiB each; a leak of one output per call would add ~500 MiB.
    assert growth < 16 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB over 10,000 calls"
