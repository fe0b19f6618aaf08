"""The native team (backends/native/team.py, native_team.c): the direct path shares a large
input's rows among torch's threads (torch's own OpenMP team, or native_team.c's one
worker thread): each runs its own part of the rows, then steals blocks left in the
others' parts.  Which thread runs
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
from taskgraph_norm.backends.native import direct
from taskgraph_norm.backends.native import team

from ._trust_helpers import native_status
from .helpers import assert_bits_equal, backend_backward, bits_equal, retries, spy_direct_calls

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


def _shared_calls(fn: object) -> int:
    """Call ``fn`` until the worker has run some rows (it may be slow to wake on a busy
    machine); returns the rows it ran."""
    start = team.worker_rows()
    for _ in retries():
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

        def call() -> None:
            got.append(tgn.normalize_sync(x, w, topology=topology, accumulate=accumulate))

        if grain_rows < rows:
            assert _shared_calls(call) > 0, "the worker never ran a row"
        else:  # one block: the caller runs it alone (no waiting for a worker that never comes)
            start = team.worker_rows()
            call()
            assert team.worker_rows() == start
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


def test_a_sleeping_team_leaves_short_forward_calls_to_the_caller(monkeypatch: pytest.MonkeyPatch,
                                                                   two_threads: None) -> None:
    """Under OMP_WAIT_POLICY=PASSIVE (team.PASSIVE) on torch's OpenMP team, a forward of
    at most PASSIVE_SERIAL_NUMEL elements runs on the caller alone (the C face, the
    module under grad, LayerNorm); a larger one is shared; the bits are the same.  The
    negative control: under the default policy the same call is shared."""
    if not team.use_openmp(True):
        pytest.skip("torch's parallel backend here is not OpenMP")
    x, w, _ = _inputs(64, 4096)
    assert x.numel() == team.PASSIVE_SERIAL_NUMEL
    big, wb, _ = _inputs(65, 4096)
    b = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    xg = x.clone().requires_grad_()
    module = tgn.RMSNorm(4096)
    monkeypatch.setattr(team, "PASSIVE", True)
    assert (team.threads(x.numel()), team.threads(big.numel()), team.threads()) == (1, 2, 2)
    start = team.worker_rows()
    alone = [tgn.normalize_sync(x, w), module(xg).detach(), tgn.layer_norm_sync(x, w, b)]
    for _ in range(5):
        tgn.normalize_sync(x, w), module(xg), tgn.layer_norm_sync(x, w, b)
    assert team.worker_rows() == start, "a worker ran rows of a call the caller should run alone"
    assert _shared_calls(lambda: tgn.normalize_sync(big, wb)) > 0
    monkeypatch.setattr(team, "PASSIVE", False)
    for call in (lambda: tgn.normalize_sync(x, w), lambda: module(xg), lambda: tgn.layer_norm_sync(x, w, b)):
        assert _shared_calls(call) > 0
    shared = [tgn.normalize_sync(x, w), module(xg).detach(), tgn.layer_norm_sync(x, w, b)]
    for a, s in zip(alone, shared):
        assert_bits_equal(a, s)
    monkeypatch.setattr(team, "PASSIVE", True)
    try:  # native_team.c's own worker spins for its next job: no floor there
        assert team.use_openmp(False) is False and team.threads(x.numel()) == 2
    finally:
        team.use_openmp(True)


@pytest.mark.parametrize("threads", [3, 4, 7])
def test_more_threads_than_cores_get_the_same_bits(runtime: str, threads: int) -> None:
    """Each of torch's threads owns a part of the rows and steals from the others; with
    more threads than cores (parts whose owner runs late) nothing changes a bit."""
    x, w, _ = _inputs(301, 1024)
    expected = tgn.normalize_sync(x, w, executor="reference")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tgn.clear_caches()
        for _ in range(5):
            assert_bits_equal(tgn.normalize_sync(x, w), expected)
    finally:
        torch.set_num_threads(before)


def _configs() -> list[tuple[str, bytes, object]]:
    """``(kind, rows_config bytes, the recipe whose adds tensor they point into)``."""
    from taskgraph_norm.backends.native import loader as native
    from taskgraph_norm.pipeline import for_config

    plan = for_config(1024, 64, "tree", "pairwise", "float", "auto", "torch", 0.0).plan
    assert plan is not None
    recipe = native.FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv), plan.root)
    kernels = native.module()
    float_cfg = kernels.rows_config(exact=0, hidden=1024, chunk=recipe.chunk_size, adds=recipe.adds.data_ptr(),
                                    n_adds=recipe.n_adds, root=recipe.root, total_flags=native.TOTAL_AS_RMS,
                                    grain=3)
    return [("float", float_cfg, recipe),
            ("exact", kernels.rows_config(exact=1, hidden=1024, grain=3, offset=0.25), None)]


def test_the_direct_call_is_the_row_kernels_call(two_threads: None, runtime: str) -> None:
    """The module's ``rows_call`` (the direct path's call: a configuration packed once
    by ``rows_config``, the tensors as addresses) on the team gives the bits of the row
    kernels called whole on one thread (``float_rows``, ``exact_rows``), totals
    included; ``total=None`` writes no totals; bad arguments raise, never crash."""
    from taskgraph_norm.backends.native import loader as native

    rows_call = native.module().rows_call
    x, w, r = _inputs(301, 1024)
    for kind, cfg, recipe in _configs():
        width = 1 if kind == "float" else 2
        dtype = torch.float32 if kind == "float" else torch.float64
        outs = []
        for residual in (False, True):
            y, h = torch.empty_like(x), torch.empty_like(x)
            total = torch.full((301, width), -1.0, dtype=dtype)
            assert rows_call(cfg, x.data_ptr(), y.data_ptr(), 301, w.data_ptr(), 1e-6, total.data_ptr(),
                             r.data_ptr() if residual else None, h.data_ptr() if residual else None, 2, False) == 0
            y2 = torch.empty_like(x)
            assert rows_call(cfg, x.data_ptr(), y2.data_ptr(), 301, w.data_ptr(), 1e-6, None,
                             r.data_ptr() if residual else None, h.data_ptr() if residual else None, 2, False) == 0
            assert_bits_equal(y2, y)  # no totals kept: the same y
            assert bool((total != -1.0).all()), f"{kind}: a row's total was not written"
            y1, h1, total1 = torch.empty_like(x), torch.empty_like(x), torch.empty_like(total)
            res = {"residual": r, "h": h1} if residual else {}
            if kind == "float":
                assert native.float_rows(x, recipe, total1, y1, w, 1e-6, flags=native.TOTAL_AS_RMS, **res) == 0
            else:
                assert native.exact_rows(x, total1, y1, w, 1e-6, offset=0.25, **res) == 0
            assert_bits_equal(y, y1)
            assert_bits_equal(total, total1)
            if residual:
                assert_bits_equal(h, h1)
            outs.append(y)
        assert not bits_equal(outs[0], outs[1])  # negative control: the residual changes y
    cfg = _configs()[1][1]
    assert rows_call(cfg, 0, 0, 0, None, 1e-6, None, None, None, 2, False) == 0  # an empty input
    with pytest.raises(TypeError):
        rows_call(cfg, x.data_ptr())
    with pytest.raises(TypeError):
        rows_call(cfg[:-1], None, None, 5, None, 1e-6, None, None, None, 2, False)  # not a configuration
    with pytest.raises(ValueError):
        rows_call(cfg, None, None, 5, None, 1e-6, None, None, None, 2, False)
    with pytest.raises(TypeError):
        rows_call(cfg, x.data_ptr(), None, 5, None, "eps", None, None, None, 2, False)
    with pytest.raises(ValueError):
        native.module().rows_config(exact=1)  # no hidden size


@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_the_backward_shares_whole_row_blocks_with_the_same_bits(runtime: str, accumulate: str) -> None:
    """The native backward runs on the team too (ops/backward.py): whole row blocks of 32
    per claim, so each block's weight-gradient sum is one thread's, merged in one order
    (tests/test_backward_merge.py); any thread count and
    grain gives the torch ops' bits, and the other threads really run rows."""
    from taskgraph_norm import pipeline
    from taskgraph_norm.backends.native import grads as native_grads
    from taskgraph_norm.ops import backward as bw
    from taskgraph_norm.ops import library as ops_library

    rows, hidden = 301, 512
    x, w, dy = _inputs(rows, hidden)
    pipe = pipeline.for_config(hidden, 64, "tree", "pairwise", accumulate, "auto")
    _, rms = ops_library.rms_norm_op(x, w, 1e-6, 64, "tree", "pairwise", accumulate, "torch", 0.0)
    want = backend_backward("torch_ops", pipe, dy, x, w, rms, True, True)
    recipe = native_grads.recipe_of(pipe.plan)  # type: ignore[arg-type]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for grain in (1, 32, 33, 64, 1000):
                dx, dw = torch.empty_like(x), torch.empty(hidden)
                start = team.worker_rows()
                for _ in retries():  # until a worker has run a block (it may wake late:
                    assert native_grads.backward_rows(x, dy, w, rms, recipe, dx, dw,  # see below)
                                                      exact=accumulate == "exact", threads=team.threads(),
                                                      grain=grain) == 0
                    if threads == 1 or grain >= rows or team.worker_rows() > start:
                        break
                assert threads == 1 or grain >= rows or team.worker_rows() > start, "no other thread ran rows"
                assert_bits_equal(dx, want[0])
                assert_bits_equal(dw, want[1])
    finally:
        torch.set_num_threads(before)
    # negative control: the weight gradient of other rows' blocks differs
    assert not bits_equal(want[1], backend_backward("torch_ops", pipe, dy.flip(0), x, w, rms, True, True)[1])


@pytest.mark.parametrize("with_rms", [False, True], ids=["x_hat", "x and rms"])
def test_the_exact_weight_gradient_shares_columns_with_the_same_state(runtime: str, with_rms: bool) -> None:
    """The exact dW kernel's columns run on the team (ops/exact_grad.py): each
    column's state is one thread's, so any thread count and grain gives the torch
    form's state, bit for bit, and other threads really run columns."""
    from taskgraph_norm.backends.native import grads as native_grads
    from taskgraph_norm.kernels import exact_sum as es

    rows, cols = 70, 1000
    g = torch.Generator().manual_seed(11)
    dy = torch.randn(rows, cols, generator=g)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-40, 40, (1, cols), generator=g).float())
    rms = (1 + torch.rand(rows, 1, generator=g)).contiguous()
    x_hat = torch.div(x, rms) if with_rms else x
    want = es.add_products_(es.empty_state(cols), dy, x_hat)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for grain in (1, 32, 100, 2000):
                state = es.empty_state(cols)
                start = team.worker_rows()
                assert native_grads.exact_dw(state, dy, x, rms=rms if with_rms else None,
                                             threads=team.threads(), grain=grain) == 0
                assert_bits_equal(state, want)
                if threads > 1 and grain < cols:
                    ran = team.worker_rows() > start
                    for _ in retries():  # a worker may wake late (torch's OpenMP threads spin
                        if ran:          # on the cores a while after its ops): its share went
                            break        # to the caller; let them go idle and call again
                        native_grads.exact_dw(es.empty_state(cols), dy, x, rms=rms if with_rms else None,
                                              threads=team.threads(), grain=grain)
                        ran = team.worker_rows() > start
                    assert ran, f"no other thread ran columns ({threads} threads, grain {grain})"
    finally:
        torch.set_num_threads(before)
    # negative control: one ulp of one dy changes the state
    dy2 = dy.clone()
    dy2.view(torch.int32)[3, 7] += 1
    assert not bits_equal(es.add_products_(es.empty_state(cols), dy2, x_hat), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hidden", [4096, 4100])
def test_streaming_stores_of_a_large_output_change_no_bit(
    monkeypatch: pytest.MonkeyPatch, hidden: int, dtype: torch.dtype
) -> None:
    """From ``STREAM_BYTES`` of output on, FINALIZE writes with non-temporal stores (where
    a row is aligned: 4100-wide rows alternate); the bits are the rows' computed alone.
    bf16 and fp16 outputs too (native_narrow.c's fused FINALIZE; llama's, which
    rounds in fp32 scratch first, streams nothing into the scratch)."""
    from taskgraph_norm.constants import STREAM_BYTES

    size = torch.finfo(dtype).bits // 8
    rows = -(-STREAM_BYTES // (size * hidden))
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(rows, hidden, generator=g).to(dtype), torch.randn(hidden, generator=g).to(dtype)
    modes = ("torch", "llama") if dtype != torch.float32 else ("torch",)
    taken = spy_direct_calls(monkeypatch)
    for mode in modes:
        y = tgn.normalize_sync(x, w, casting_mode=mode)
        assert y.numel() * y.element_size() >= STREAM_BYTES and taken[-1] is True
        for part in (x[:7], x[rows // 2: rows // 2 + 5], x[-3:]):
            start = (part.data_ptr() - x.data_ptr()) // size
            got = y.view(-1)[start: start + part.numel()].view_as(part)
            assert bits_equal(got, tgn.normalize_sync(part, w, casting_mode=mode)), mode
        out = torch.empty_like(y)
        assert bits_equal(tgn.normalize_sync(x, w, out=out, casting_mode=mode), y), mode
        with tgn.backends.use("torch_ops"):
            ref = tgn.normalize_sync(x[:64], w, casting_mode=mode)
        assert bits_equal(y[:64], ref), mode
