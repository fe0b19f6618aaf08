"""The concurrent executor on an accelerator: lanes launch on their own streams,
cross-stream dependencies go through events (no host waits), the caller's
stream is ordered after the output, and bits match the reference on the device.

Run with ``pytest -m gpu``; every test skips cleanly without CUDA or MPS.
"""

from __future__ import annotations

import time

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors.concurrent.devices import live_streams
from taskgraph_norm.executors.concurrent.schedules import Random, Replay

from ._executor_helpers import call_graph, run, wide_input
from .helpers import bits_equal


def _accelerator() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return None


DEVICE = _accelerator()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA or MPS device"),
]


def _sync() -> None:
    torch.accelerator.synchronize()


@pytest.mark.parametrize("topology,leaf,accumulate", [
    ("tree", "pairwise", "float"), ("linear", "pairwise", "float"), ("cat", "pairwise", "float"),
    ("race", "pairwise", "exact"), ("standard", "pairwise", "float"),
])
def test_gpu_concurrent_matches_reference_bits(topology: str, leaf: str, accumulate: str) -> None:
    assert DEVICE is not None
    g = tgn.build_graph(4096, chunk_size=256, topology=topology, leaf=leaf, accumulate=accumulate)
    x = wide_input(64, 4096, seed=1).to(DEVICE)
    w = torch.randn(4096).to(DEVICE)

    async def main() -> tuple[torch.Tensor, torch.Tensor]:
        async with tgn.WorkerPool(4, device=DEVICE) as pool:
            ref = await tgn.execute(g, x, w, executor="reference")
            got = await tgn.execute(g, x, w, executor="concurrent", pool=pool, schedule=Random(3))
            return ref.cpu(), got.cpu()  # .cpu() runs on the caller's stream: it must see the result

    ref, got = run(main)
    assert bits_equal(ref, got)


def test_gpu_race_replay_and_arrival_order() -> None:
    assert DEVICE is not None
    g = tgn.build_graph(4096, chunk_size=256, topology="race")  # 16 chunks
    x = wide_input(8, 4096, seed=2).to(DEVICE)

    async def main() -> None:
        async with tgn.WorkerPool(4, device=DEVICE) as pool:
            outputs = set()
            for seed in range(12):
                traces: list[tgn.Trace] = []
                y = await tgn.execute(g, x, executor="concurrent", pool=pool, schedule=Random(seed),
                                      trace=traces.append)
                again = await tgn.execute(g, x, executor="concurrent", pool=pool, schedule=Replay(traces[0]))
                ref = await tgn.execute(g, x, executor="reference", arrival=traces[0].arrival)
                assert bits_equal(y.cpu(), again.cpu()) and bits_equal(y.cpu(), ref.cpu())
                outputs.add(y.cpu().view(torch.int32).numpy().tobytes())
            assert len(outputs) > 1  # negative control: race order shows in the bits on the device too

    run(main)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda._sleep is CUDA-only")
def test_cross_stream_dependencies_use_events_not_host_waits() -> None:
    """Producers enqueue ~0.3 s of GPU sleep; execute must return on the host long
    before that (nothing waits on the host), and the values must still be right
    (the consumers' streams waited on the producers' events)."""
    assert DEVICE is not None
    khz = getattr(torch.cuda.get_device_properties(DEVICE), "clock_rate", 2_000_000)
    cycles = int(khz * 1e3 * 0.3)  # ~0.3 s of GPU time

    def slow_plus_one(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)  # host time too, so the two producers overlap on two lanes
        torch.cuda._sleep(cycles)
        return x + 1

    def times_three(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x * 3

    functions = {"slow": slow_plus_one, "fast": times_three, "join": lambda a, b: a * 2 + b}
    g = call_graph({"a": ("slow", ("x",)), "b": ("fast", ("x",)), "c": ("join", ("a", "b"))}, "c")
    x = torch.arange(1 << 20, device=DEVICE, dtype=torch.float32)
    expected = (x + 1) * 2 + x * 3

    async def main() -> tuple[float, set[str], torch.Tensor]:
        async with tgn.WorkerPool(4, device=DEVICE) as pool:
            assert pool.uses_streams
            lanes: set[str] = set()
            host = float("inf")
            for _ in range(4):
                traces: list[tgn.Trace] = []
                _sync()
                t0 = time.perf_counter()
                y = await tgn.execute(g, x, executor="concurrent", pool=pool, trace=traces.append,
                                      functions=functions)
                host = min(host, time.perf_counter() - t0)
                lanes |= {s.worker for s in traces[0].spans}
                assert torch.equal(y.cpu(), expected.cpu())  # on the caller's stream, no explicit sync
            return host, lanes, y

    host, lanes, _ = run(main)
    assert host < 0.15, f"execute waited on the host ({host:.3f} s)"
    assert len(lanes) >= 2  # the nodes really spread over streams


def test_gpu_pools_release_their_streams() -> None:
    assert DEVICE is not None
    before = live_streams()
    with tgn.WorkerPool(3, device=DEVICE) as pool:
        assert live_streams() == before + (3 if pool.uses_streams else 0)
        if not pool.uses_streams:  # an accelerator without torch streams: one in-order queue
            assert pool.max_workers == 1
    assert live_streams() == before
    g = tgn.build_graph(256, chunk_size=32, topology="tree")
    x = torch.randn(4, 256, device=DEVICE)
    with pytest.raises(tgn.ConfigError):
        run(lambda: tgn.execute(g, x, executor="concurrent", device="cpu"))
