"""The native team (executors/team.py, native_team.c): the direct path shares a large
input's rows among torch's threads (torch's own OpenMP team, or native_team.c's one
worker thread), which claim blocks of rows from an atomic counter.  Which thread runs
a row, and how the rows are blocked, must not change a bit; the rows must really be
shared; other callers, nested calls and forked children must neither hang nor change
the bits."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors import direct, team

from ._trust_helpers import native_status
from .helpers import assert_bits_equal, bits_equal

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=["openmp", "own worker"])
def runtime(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs on torch's OpenMP team and on native_team.c's own worker."""
    want = request.param == "openmp"
    got = team.use_openmp(want)
    try:
        if want and not got:
            pytest.skip("torch's parallel backend here is not OpenMP")
        assert got == want
        yield str(request.param)
    finally:
        team.use_openmp(True)


def _inputs(rows: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    x = torch.randn(rows, hidden, generator=g)
    x[::5] *= 1e-3  # rows of other scales
    x[1::7] *= 3e4
    return x, torch.randn(hidden, generator=g), torch.randn(rows, hidden, generator=g)


def _shared_calls(fn: object, tries: int = 50) -> int:
    """Call ``fn`` until the worker has run some rows (it may be slow to wake on a busy
    machine); returns the rows it ran."""
    start = team.worker_rows()
    for _ in range(tries):
        fn()  # type: ignore[operator]
        if team.worker_rows() > start:
            break
    return team.worker_rows() - start


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("topology", ["tree", "linear"])
def test_every_blocking_of_the_rows_gives_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, two_threads: None, runtime: str, accumulate: str, topology: str
) -> None:
    rows, hidden = 203, 1024
    x, w, r = _inputs(rows, hidden)
    reference = tgn.normalize_sync(x, w, topology=topology, accumulate=accumulate, executor="reference")
    ref_y, ref_h = tgn.normalize_sync(x, w, topology=topology, accumulate=accumulate, executor="reference",
                                      residual=r)
    monkeypatch.setattr(direct, "SPLIT_NUMEL", 1)
    for grain_rows in (1, 7, 64, rows + 1):  # rows + 1: the caller alone
        monkeypatch.setattr(direct, "TEAM_GRAIN", grain_rows * hidden)
        tgn.clear_caches()
        got: list[torch.Tensor] = []
        ran = _shared_calls(lambda: got.append(tgn.normalize_sync(x, w, topology=topology, accumulate=accumulate)))
        if grain_rows < rows:
            assert ran > 0, "the worker never ran a row"
        for y in got:
            assert_bits_equal(y, reference)
        y, h = tgn.normalize_sync(x, w, topology=topology, accumulate=accumulate, residual=r)
        assert_bits_equal(y, ref_y)
        assert_bits_equal(h, ref_h)
    # negative control: a one-ulp change in one row's input shows in its output
    x2 = x.clone()
    x2.view(torch.int32)[100, 3] += 1
    assert not bits_equal(tgn.normalize_sync(x2, w, topology=topology, accumulate=accumulate), reference)


def test_the_rms_the_ops_keep_is_the_same_bits_over_the_team(
    monkeypatch: pytest.MonkeyPatch, two_threads: None, runtime: str
) -> None:
    """The grad-enabled forward asks the direct call for each row's rms too (``total``)."""
    x, w, _ = _inputs(300, 1024)
    dy = torch.randn_like(x)
    grads = []
    for grain_rows in (3, 301):
        monkeypatch.setattr(direct, "SPLIT_NUMEL", 1)
        monkeypatch.setattr(direct, "TEAM_GRAIN", grain_rows * 1024)
        tgn.clear_caches()
        xg = x.clone().requires_grad_(True)
        tgn.normalize_sync(xg, w).backward(dy)
        assert xg.grad is not None
        grads.append(xg.grad)
    assert_bits_equal(grads[0], grads[1])


def test_concurrent_callers_and_a_busy_team_get_the_same_bits(two_threads: None, runtime: str) -> None:
    """Eight threads call at once: on OpenMP each its own team; on the own worker, one
    caller owns it and the others run their rows alone."""
    x, w, _ = _inputs(512, 2048)
    assert x.numel() >= direct.SPLIT_NUMEL
    expected = tgn.normalize_sync(x, w, executor="reference")
    failures: list[str] = []

    def work() -> None:
        for _ in range(20):
            if not bits_equal(tgn.normalize_sync(x, w), expected):
                failures.append("differs")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert failures == []


def test_one_torch_thread_means_no_sharing(runtime: str) -> None:
    """``torch.set_num_threads(1)`` is respected: no other thread runs a row."""
    x, w, _ = _inputs(512, 2048)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = team.worker_rows()
        for _ in range(5):
            tgn.normalize_sync(x, w)
        assert team.worker_rows() == start
    finally:
        torch.set_num_threads(before)


def test_the_openmp_team_is_torch_own_runtime() -> None:
    """The OpenMP entry is looked up among the libraries already loaded (never loaded
    anew), and it is the runtime torch reports."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend here is not OpenMP")
    assert team.use_openmp(True) and team.openmp()
    assert team.use_openmp(False) is False and not team.openmp()
    assert team.use_openmp(True)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: exactly one OpenMP runtime is mapped (ours is torch's, none loaded anew)
        runtimes = {line.split()[-1] for line in maps.read_text().splitlines()
                    if re.search(r"lib(g|i)?omp[^/]*\.so", line.split()[-1])}
        assert len(runtimes) == 1, runtimes
