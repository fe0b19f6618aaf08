"""The gated norm's one native pass (backends/native/gated_rows.py, native_gated.c): a
no-grad call of a gated (and grouped) RMSNorm reads ``x`` and the gate once and writes
``y`` once.  Its bits must be the torch-ops construction's (ops/gated.py under
``backends.use("torch_ops")``), for fp32, bf16 and fp16, grouped or not, either gate
order, each cast order, on one thread and on two (rows shared by the team); a row with
a NaN or an infinity is left to that construction (the pass reports it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import backends
from taskgraph_norm.backends.native import team
from taskgraph_norm.ops import gated as gated_ops
from taskgraph_norm.ops.gated import gated_rms_norm

from ._trust_helpers import build_probe, build_runs, native_status
from .helpers import assert_bits_equal, bits_equal, retries

NATIVE, WHY_NOT = native_status()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each call of the one pass: True where it gave ``y``, False where it left the call."""
    seen: list[bool] = []
    real = gated_ops._one_pass

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        y = real(*args, **kwargs)
        seen.append(y is not None)
        return y

    monkeypatch.setattr(gated_ops, "_one_pass", spy)
    return seen


def _inputs(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * torch.logspace(-1, 1, hidden)
    x[::5] *= 1e-3  # rows of other scales
    x[1::7] *= 3e2
    z = torch.randn(rows, hidden, generator=g) * 3
    return x.to(dtype), z.to(dtype)


def _both(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None, **options: Any) -> tuple[torch.Tensor, ...]:
    """(the default path's y, the torch-ops construction's y), no gradient."""
    with torch.no_grad():
        y = gated_rms_norm(x, z, w, 1e-6, **options)
        with backends.use("torch_ops"):
            ref = gated_rms_norm(x, z, w, 1e-6, **options)
    return y, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("after", [False, True], ids=["gate before", "gate after"])
@pytest.mark.parametrize("group_size", [None, 64], ids=["whole rows", "groups of 64"])
@pytest.mark.parametrize("mode", ["llama", "torch"])
def test_one_pass_has_the_torch_ops_bits(dtype: torch.dtype, after: bool, group_size: int | None, mode: str,
                                         threads: int, passes: list[bool]) -> None:
    # 3000 rows of 256: enough for the team to share them on two threads.
    x, z = _inputs(3000, 256, dtype)
    w = (torch.randn(256, generator=torch.Generator().manual_seed(1)) * 0.5 + 1).to(dtype)
    shared = team.worker_rows()
    y, ref = _both(x, z, w, group_size=group_size, norm_before_gate=after, casting_mode=mode)
    assert passes == [True]
    for _ in retries() if threads == 2 else ():  # the rows are shared (a worker may wake late: call again)
        if team.worker_rows() > shared:
            break
        with torch.no_grad():
            gated_rms_norm(x, z, w, 1e-6, group_size=group_size, norm_before_gate=after, casting_mode=mode)
    assert threads == 1 or team.worker_rows() > shared, "no other thread ran rows"
    assert y.dtype == ref.dtype
    assert_bits_equal(y, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_dtype", ["none", torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("after", [False, True], ids=["gate before", "gate after"])
@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("torch", 0.0), ("torch", 1.0), ("gemma", 1.0)])
def test_weights_offsets_and_small_shapes(dtype: torch.dtype, w_dtype: Any, after: bool, mode: str,
                                          offset: float, passes: list[bool]) -> None:
    g = torch.Generator().manual_seed(3)
    w = None if w_dtype == "none" else (torch.randn(96, generator=g) * 0.5).to(w_dtype)
    for shape, group_size in [((1, 96), None), ((5, 96), 32), ((2, 3, 96), 48), ((37, 96), 3)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        z = (torch.randn(shape, generator=g) * 3).to(dtype)
        y, ref = _both(x, z, w, group_size=group_size, norm_before_gate=after, casting_mode=mode,
                       offset=offset if w is not None else 0.0)
        assert y.dtype == ref.dtype and y.shape == ref.shape
        assert_bits_equal(y, ref)
    assert passes and all(passes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("after", [False, True], ids=["gate before", "gate after"])
def test_nan_and_inf_rows_are_left_to_the_construction(dtype: torch.dtype, after: bool, threads: int,
                                                        passes: list[bool]) -> None:
    x, z = _inputs(2500, 128, dtype, seed=4)
    w = torch.randn(128, generator=torch.Generator().manual_seed(5)).to(dtype)
    y, ref = _both(x, z, w, group_size=32, norm_before_gate=after, casting_mode="llama")
    assert passes == [True]  # (finite: the pass runs)
    assert_bits_equal(y, ref)
    for poison in (float("nan"), float("inf"), -float("inf")):
        for which in ("x", "gate"):
            xp, zp = x.clone(), z.clone()
            (xp if which == "x" else zp)[1777, 40] = poison
            passes.clear()
            y, ref = _both(xp, zp, w, group_size=32, norm_before_gate=after, casting_mode="llama")
            assert_bits_equal(y, ref)
            if which == "x":  # a non-finite x always makes a NaN total or result
                assert passes == [False], poison


@pytest.mark.parametrize("after", [False, True], ids=["gate before", "gate after"])
def test_llama_bf16_rows_edge_values_keep_the_construction_bits(after: bool, passes: list[bool]) -> None:
    """llama's bf16 rows with a weight take native_gated.c's shortest loop (one NaN test
    at the end, vcvtneps2bf16 for y): results that are subnormal, a NaN made on the way
    (0/0 with eps 0, inf * 0 from the weight and a zero gate), a weight holding a NaN and
    infinite results must still give the construction's bits."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(64, 128, generator=g)
    x[3, 5:40] = 1e-38  # tiny against the row's rms: subnormal quotients and results
    x[4, :] = 3e-39  # a row of bf16 subnormals (its rms too)
    x[5, 7:100] = 9e-41
    x, z = x.to(torch.bfloat16), (torch.randn(64, 128, generator=g) * 3).to(torch.bfloat16)
    w = (torch.randn(128, generator=g) * 0.5 + 1).to(torch.bfloat16)
    w[9] = 1e-30  # products near the bottom of the range
    cases = {"subnormal results": (x, z, w, 1e-6, True)}
    zero_row = x.clone()
    zero_row[6] = 0.0
    cases["0/0 with eps 0"] = (zero_row, z, w, 0.0, False)
    w_inf, z_zero = w.clone(), z.clone()
    w_inf[20] = float("inf")
    z_zero[10, 20] = 0.0  # silu(0) = 0: inf * 0 after the gate, or (x * 0) * inf before it
    z_zero[11, 21] = 0.0
    cases["infinite weight, zero gate"] = (x, z_zero, w_inf, 1e-6, False)
    w_nan = w.clone()
    w_nan[30] = float("nan")
    cases["a NaN in the weight"] = (x, z, w_nan, 1e-6, False)
    for name, (xi, zi, wi, eps, finite) in cases.items():
        passes.clear()
        with torch.no_grad():
            y = gated_rms_norm(xi, zi, wi, eps, norm_before_gate=after, casting_mode="llama")
            with backends.use("torch_ops"):
                ref = gated_rms_norm(xi, zi, wi, eps, norm_before_gate=after, casting_mode="llama")
        assert_bits_equal(y, ref, msg=name)
        if finite:  # the pass ran, and the subnormal vectors were met
            assert passes == [True], name
            assert bool((y.float().abs() < 2.0 ** -126).logical_and(y != 0).any()), name
        else:  # a NaN in the result: the call is left to the construction
            assert passes == [False], name


def test_gradient_and_inference_modes(passes: list[bool]) -> None:
    x, z = _inputs(300, 128, torch.bfloat16, seed=6)
    w = torch.randn(128, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with torch.no_grad():
        ref = gated_rms_norm(x, z, w, 1e-6, group_size=64, casting_mode="llama")
    with torch.inference_mode():
        assert_bits_equal(gated_rms_norm(x, z, w, 1e-6, group_size=64, casting_mode="llama"), ref)
    assert passes == [True, True]
    wp = w.clone().requires_grad_(True)
    y = gated_rms_norm(x, z, wp, 1e-6, group_size=64, casting_mode="llama")  # a gradient to record
    assert passes == [True, True]  # not asked: the construction under autograd
    assert_bits_equal(y.detach(), ref)


def test_negative_controls(passes: list[bool]) -> None:
    """The comparison finds one changed bit, and the gate's order and the groups change
    the result: a test above that passes is not blind."""
    x, z = _inputs(400, 128, torch.bfloat16, seed=8)
    w = torch.randn(128, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    y, ref = _both(x, z, w, group_size=64, casting_mode="llama")
    assert bits_equal(y, ref)
    flipped = y.clone()
    flipped.view(torch.int16)[17, 3] ^= 1
    assert not bits_equal(flipped, ref)
    other_order, _ = _both(x, z, w, group_size=64, norm_before_gate=True, casting_mode="llama")
    assert not bits_equal(other_order, ref)
    whole, _ = _both(x, z, w, group_size=None, casting_mode="llama")
    assert not bits_equal(whole, ref)
    assert all(passes)


def test_strided_input_is_left_to_the_construction(passes: list[bool]) -> None:
    x, z = _inputs(64, 256, torch.float32, seed=10)
    xs, zs = x[:, ::2], z[:, ::2]
    y, ref = _both(xs, zs, None, group_size=32, casting_mode="torch")
    assert passes == [False]
    assert_bits_equal(y, ref)


PROBE = build_probe("test_native_gated", """
    import hashlib, torch
    from taskgraph_norm import backends
    from taskgraph_norm.backends.native import loader as native
    from taskgraph_norm.ops import gated
    from taskgraph_norm.testing import bits
    print(native.library_path().name if native.available() else None)
    taken = []
    real = gated._one_pass
    def spy(*a, **k):
        y = real(*a, **k)
        taken.append(y is not None)
        return y
    gated._one_pass = spy
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(300, 200, generator=g) * 4).to(dtype)
        z = (torch.randn(300, 200, generator=g) * 4).to(dtype)
        w = (1 + 0.3 * torch.randn(200, generator=g)).to(dtype)
        for after, size, mode in ((a, s, m) for a in (False, True) for s in (None, 40) for m in ("llama", "torch")):
            with torch.no_grad():
                y = gated.gated_rms_norm(x, z, w, 1e-6, group_size=size, norm_before_gate=after, casting_mode=mode)
            print(dtype, after, size, mode, hashlib.sha256(bits(y).numpy().tobytes()).hexdigest()[:16])
    print("taken", all(taken), len(taken))
    gated._one_pass = real  # the probes after this one run in the same interpreter
""")


def test_the_portable_build_gives_the_host_builds_bits() -> None:
    """TGN_NATIVE=portable (plain C, no AVX-512 lanes) against the default build and
    the torch ops (TGN_NATIVE=0)."""
    portable, default, off = build_runs(PROBE)
    for proc in (portable, default, off):
        assert proc.returncode == 0, proc.stderr
    p, d, o = (proc.stdout.splitlines() for proc in (portable, default, off))
    assert p[0].startswith("_native_portable") and o[0] == "None"
    assert p[-1] == d[-1] == "taken True 24" and o[-1] == "taken True 0"
    assert p[1:-1] == d[1:-1] == o[1:-1] and len(p) == 26
    # negative control: the digests see the dtype, the gate's order, the groups and (but
    # for fp32 rows, where llama's casts are the identity) the cast order
    assert len({line.split()[-1] for line in p[1:-1]}) == 20


@pytest.mark.parametrize("grain_rows", [1, 7, 300])
def test_every_blocking_of_the_rows_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch, grain_rows: int,
                                                        threads: int, passes: list[bool]) -> None:
    from taskgraph_norm.backends.native import gated_rows

    x, z = _inputs(299, 256, torch.bfloat16, seed=12)
    w = torch.randn(256, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    _, ref = _both(x, z, w, group_size=64, casting_mode="llama")
    monkeypatch.setattr(gated_rows, "SPLIT_NUMEL", 1)
    monkeypatch.setattr(gated_rows, "TEAM_GRAIN", grain_rows * 256)
    tgn.clear_caches()  # (the one pass's configurations hold the grain)
    try:
        y, _ = _both(x, z, w, group_size=64, casting_mode="llama")
    finally:
        tgn.clear_caches()
    assert passes and all(passes)
    assert_bits_equal(y, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_narrow_gate_value_has_the_torch_forms_silu(dtype: torch.dtype) -> None:
    """A bf16 or fp16 gate's silu is read from a table of all 65536 values (native_gate.c),
    made by the fp64 series: each value's bits must be kernels/gate.py's, NaNs, infinities,
    zeros and subnormals included, wherever the value sits in the gate."""
    from taskgraph_norm.backends.native import gate as native_gate
    from taskgraph_norm.kernels.gate import silu

    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    shuffled = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(14))]
    for g in (every, shuffled, every[3:].reshape(-1, 1)):
        table, _ = native_gate.silu_sigmoid(g, False)
        series, _ = native_gate.silu_sigmoid(g, True)  # (the sigmoid asked: the series itself)
        assert_bits_equal(table, silu(g, torch.float32))
        assert_bits_equal(table, series)
    # negative control: torch's own fp32 silu is not correctly rounded, and the compare sees it
    assert not bits_equal(native_gate.silu_sigmoid(every, False)[0], torch.nn.functional.silu(every.float()))
