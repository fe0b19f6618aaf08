"""Casting modes and the weight offset (docs/design.md, "Casting modes, offset and
the fused residual add"): every executor gives
the bits of ``kernels.finalize`` (the oracle), and the modes match Hugging Face's
own RMSNorm modules up to their ``rsqrt``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import kernels, pipeline
from taskgraph_norm.executors import reference_sum_of_squares
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.errors import ConfigError

from .helpers import assert_bits_equal, bits_equal, run_compiled, spy_direct_calls

D = 200  # three full chunks of 64 and a ragged one
EPS = 1e-6
MODES = [("torch", 0.0), ("llama", 0.0), ("gemma", 1.0), ("llama", 0.5), ("torch", -0.25)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = [None, "same", torch.float32]


def _inputs(dtype: torch.dtype, weight: Any, rows: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, D, generator=gen) * 3).to(dtype)
    if weight is None:
        return x, None
    return x, torch.randn(D, generator=gen).to(dtype if weight == "same" else weight)


def _oracle(graph: tgn.Graph, x: torch.Tensor, w: torch.Tensor | None, mode: str, offset: float) -> torch.Tensor:
    total = reference_sum_of_squares(graph, x)
    return kernels.finalize(x, total, D, EPS, w, mode, offset)


def _run(executor: str, x: torch.Tensor, w: torch.Tensor | None, **options: Any) -> torch.Tensor:
    y: torch.Tensor = tgn.normalize_sync(x, w, EPS, chunk_size=64, executor=executor, **options)
    return y


@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("weight", WEIGHTS, ids=["none", "same", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("mode", "offset"), MODES)
def test_every_executor_gives_the_oracle_bits(
    mode: str, offset: float, dtype: torch.dtype, weight: Any, accumulate: str
) -> None:
    x, w = _inputs(dtype, weight)
    graph = tgn.build_graph(D, chunk_size=64, accumulate=accumulate, casting_mode=mode, offset=offset)
    want = _oracle(graph, x, w, mode, offset)
    assert want.dtype == kernels.output_dtype(dtype, None if w is None else w.dtype, mode)
    options = dict(accumulate=accumulate, casting_mode=mode, offset=offset)
    for executor in ("reference", "concurrent", "compiled"):
        assert_bits_equal(_run(executor, x, w, **options), want)
    with native.disabled():  # the compiled executor's torch ops
        assert_bits_equal(_run("compiled", x, w, **options), want)
    out = torch.empty_like(want)
    assert tgn.normalize_sync(x, w, EPS, chunk_size=64, out=out, **options) is out
    assert_bits_equal(out, want)


def test_llama_differs_from_torch_where_it_rounds_twice() -> None:
    """Negative control: the oracle tells the modes apart on bf16 (else the test
    above could not fail for a mode that was ignored)."""
    x, w = _inputs(torch.bfloat16, "same", rows=32)
    torch_y, llama_y = (_run("compiled", x, w, casting_mode=m) for m in ("torch", "llama"))
    assert not bits_equal(torch_y, llama_y)
    gemma_y = _run("compiled", x, w, casting_mode="gemma", offset=1.0)
    assert not bits_equal(torch_y, gemma_y)


def test_fp64_weight_in_llama_mode_returns_fp64() -> None:
    x, _ = _inputs(torch.float32, None)
    w = torch.randn(D, dtype=torch.float64)
    graph = tgn.build_graph(D, chunk_size=64, casting_mode="llama")
    want = _oracle(graph, x, w, "llama", 0.0)
    assert want.dtype == torch.float64
    assert_bits_equal(_run("compiled", x, w, casting_mode="llama"), want)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = getattr(native, name)

    def spy(*args: Any, **kwargs: Any) -> int:
        calls.append({**kwargs, "y": args[3] if len(args) > 3 else kwargs.get("y")})
        result: int = real(*args, **kwargs)
        return result

    monkeypatch.setattr(native, name, spy)
    return calls


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("mode", "offset"), [("llama", 0.0), ("gemma", 1.0)])
def test_bf16_modes_run_the_native_finalize(
    monkeypatch: pytest.MonkeyPatch, mode: str, offset: float, wdtype: torch.dtype
) -> None:
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    calls = _spy(monkeypatch, "float_rows")
    x, w = _inputs(torch.bfloat16, wdtype)
    graph = tgn.build_graph(D, chunk_size=64, casting_mode=mode, offset=offset)
    want = run_compiled(graph, x, w, EPS)  # the compiled executor's tiles
    assert calls and all(c["y"] is not None for c in calls)  # FINALIZE fused in C
    if mode == "llama":
        assert all(c["flags"] & native.ROUND_QUOTIENT for c in calls)
    taken = spy_direct_calls(monkeypatch)
    assert_bits_equal(_run("compiled", x, w, casting_mode=mode, offset=offset), want)
    assert taken == [True]  # the pipeline's call: the direct path (native_narrow.c)
    tgn.clear_caches()


@pytest.mark.parametrize(("mode", "offset"), [("llama", 0.0), ("gemma", 1.0)])
def test_fp32_modes_take_the_direct_path(monkeypatch: pytest.MonkeyPatch, mode: str, offset: float) -> None:
    taken = spy_direct_calls(monkeypatch)
    x, w = _inputs(torch.float32, torch.float32)
    graph = tgn.build_graph(D, chunk_size=64, casting_mode=mode, offset=offset)
    assert_bits_equal(_run("auto", x, w, casting_mode=mode, offset=offset), _oracle(graph, x, w, mode, offset))
    assert taken == [True]
    tgn.clear_caches()


def test_the_semantics_are_graph_attributes_and_a_default_graph_is_unchanged() -> None:
    default = tgn.build_graph(256)
    assert default["finalize"].attrs == {"hidden_size": 256, "domain": "float"}
    assert dict(default["x"].attrs) == {}
    gemma = tgn.build_graph(256, casting_mode="gemma", offset=1.0, residual=True)
    assert gemma["finalize"].attrs["casting_mode"] == "gemma"
    assert gemma["finalize"].attrs["offset"] == 1.0
    assert gemma["x"].attrs["residual"] is True
    assert gemma.meta["casting_mode"] == "gemma"
    p_default, p_gemma = tgn.prove(default), tgn.prove(gemma)
    assert (p_gemma.deterministic, p_gemma.batch_invariant, p_gemma.rule) == (
        p_default.deterministic, p_default.batch_invariant, p_default.rule)
    assert p_gemma.fingerprint != p_default.fingerprint
    assert tgn.prove(tgn.build_graph(256, casting_mode="llama")).fingerprint not in (
        p_default.fingerprint, p_gemma.fingerprint)
    assert "gemma, w+1" in tgn.to_mermaid(gemma)


def test_bad_semantics_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'torch', 'llama', 'gemma'"):
        tgn.normalize_sync(torch.ones(2, 8), casting_mode="mistral")
    with pytest.raises(ValueError, match="offset"):
        tgn.normalize_sync(torch.ones(2, 8), casting_mode="gemma", offset=float("nan"))
    # an offset without a weight is accepted and has no effect (Liger-Kernel's behaviour)
    x = torch.randn(2, 8)
    assert_bits_equal(tgn.normalize_sync(x, casting_mode="gemma", offset=1.0), tgn.normalize_sync(x, casting_mode="gemma"))
    with pytest.raises(ConfigError, match="standard"):
        tgn.build_graph(8, topology="standard", casting_mode="llama")
    with pytest.raises(ConfigError, match="out"):
        tgn.normalize_sync(torch.ones(2, 8).bfloat16(), torch.ones(8), casting_mode="llama",
                           out=torch.empty(2, 8, dtype=torch.bfloat16))


def test_rmsnorm_module_takes_the_modes_and_loads_torch_state() -> None:
    torch_norm = torch.nn.RMSNorm(D, eps=EPS)
    with torch.no_grad():
        torch_norm.weight.copy_(torch.randn(D))
    norm = tgn.RMSNorm(D, eps=EPS, chunk_size=64, casting_mode="gemma", offset=1.0)
    norm.load_state_dict(torch_norm.state_dict())
    x, _ = _inputs(torch.bfloat16, None)
    graph = tgn.build_graph(D, chunk_size=64, casting_mode="gemma", offset=1.0)
    with torch.no_grad():
        assert_bits_equal(norm(x), _oracle(graph, x, norm.weight.detach(), "gemma", 1.0))
    assert "casting_mode='gemma'" in repr(norm)
    bare = tgn.RMSNorm(D, eps=EPS, chunk_size=64, elementwise_affine=False, offset=1.0)  # no weight: no effect
    assert_bits_equal(bare(x), tgn.RMSNorm(D, eps=EPS, chunk_size=64, elementwise_affine=False)(x))


# --- against Hugging Face's modules (tiny, built in memory: nothing downloaded) ---------


def _differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() != b.float()).float().mean())


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama_mode_matches_hf_llama_rmsnorm(wdtype: torch.dtype) -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hidden = 1024
    hf = llama.LlamaRMSNorm(hidden, eps=EPS).to(wdtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden))
        x = torch.randn(64, hidden).bfloat16()
        want = hf(x)
        ours = tgn.normalize_sync(x, hf.weight, EPS, casting_mode="llama")
        torch_mode = tgn.normalize_sync(x, hf.weight, EPS)
    assert ours.dtype == want.dtype
    assert _differ(ours, want) <= 0.01
    assert _differ(torch_mode, want) > 0.1 or torch_mode.dtype != want.dtype  # the control: torch mode is not HF's


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gemma_mode_matches_hf_gemma_rmsnorm(family: str) -> None:
    module = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    cls = getattr(module, f"{family.capitalize()}RMSNorm")
    hidden = 1024
    hf = cls(hidden, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden) * 0.1)
        x = torch.randn(64, hidden).bfloat16()
        want = hf(x)
        ours = tgn.normalize_sync(x, hf.weight, EPS, casting_mode="gemma", offset=1.0)
        no_offset = tgn.normalize_sync(x, hf.weight, EPS, casting_mode="gemma")
    assert ours.dtype == want.dtype
    assert _differ(ours, want) <= 0.01
    assert _differ(no_offset, want) > 0.5  # the control: without the offset it is another function
