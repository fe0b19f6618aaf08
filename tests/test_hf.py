"""taskgraph_norm.integrations.transformers on tiny random Hugging Face models (no downloads).

Every family gets a two-layer model from its config with its norm weights
perturbed (so the weight, the offset and the casting order all matter).  Figures
on this CPU (transformers 5.24, torch 2.13), replaced against stock logits:
fp32 max abs difference <= 3e-7 (HF multiplies by ``rsqrt`` and sums in torch's
order; we divide by a correctly rounded ``sqrt`` in the graph's order); bf16 0 in
every family but Gemma 3 (0.0034: one bf16 norm output that rounds the other way
moves the logits by a bf16 ulp).  The bounds below are those with margin.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
import re
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.errors import ConfigError, MissingDependencyError, UnsupportedNormError  # noqa: E402
from taskgraph_norm.integrations import transformers as hf  # noqa: E402
from taskgraph_norm.integrations import replace_rmsnorm, restore_rmsnorm, rmsnorm_replaced  # noqa: E402

from . import hf_helpers  # noqa: E402
from .helpers import bits_equal  # noqa: E402
from .hf_helpers import Calls, assert_close_to_stock, assert_compiles_as_one_graph  # noqa: E402
from .hf_helpers import assert_norms_batch_invariant, logits, rows_that_differ_alone  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
HEAD = dict(head_dim=16)
CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": lambda: transformers.LlamaConfig(**BASE),
    "mistral": lambda: transformers.MistralConfig(**BASE),
    "mixtral": lambda: transformers.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": lambda: transformers.Qwen2Config(**BASE),
    "qwen3": lambda: transformers.Qwen3Config(**BASE, **HEAD),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**BASE, **HEAD, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32),
    "gemma": lambda: transformers.GemmaConfig(**BASE, **HEAD),
    "gemma2": lambda: transformers.Gemma2Config(**BASE, **HEAD),
    "gemma3": lambda: transformers.Gemma3TextConfig(**BASE, **HEAD),
    "phi3": lambda: transformers.Phi3Config(**BASE),
    "olmo2": lambda: transformers.Olmo2Config(**BASE),
}
MODES = {"gemma": ("gemma", 1.0), "gemma2": ("gemma", 1.0), "gemma3": ("gemma", 1.0), "olmo2": ("torch", 0.0)}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def tiny(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype)


def hf_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_norm_is_replaced_and_the_parameters_stay(family: str) -> None:
    model = tiny(family)
    expected = hf_norms(model)
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = replace_rmsnorm(model, topology="tree", chunk_size=16)
    assert names == expected and len(names) >= 5
    mode, offset = MODES.get(family, ("llama", 0.0))
    for name in names:
        norm = model.get_submodule(name)
        assert type(norm) is tgn.RMSNorm
        assert (norm.casting_mode, norm.offset, norm.topology, norm.chunk_size) == (mode, offset, "tree", 16)
    # The same Parameter objects (dtype, device, requires_grad with them), the same state_dict.
    assert all(p is params[n] for n, p in model.named_parameters())
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(bits_equal(after[k], v) for k, v in state.items())
    if family == "qwen3":  # q_norm/k_norm over head_dim
        assert model.get_submodule("model.layers.0.self_attn.q_norm").normalized_shape == (16,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_logits_are_close_to_stock(family: str, dtype: torch.dtype) -> None:
    model = tiny(family, dtype)
    assert_close_to_stock(model, replace_rmsnorm, ids(), dtype, TOL[dtype])


def test_llama_mode_matters_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # Negative control: "torch" casting (multiply in fp32, round once) on a bf16 Llama
    # is further from stock than "llama" casting (round, then multiply in bf16).
    key = "transformers.models.llama.modeling_llama.LlamaRMSNorm"
    gaps = {}
    for mode in ("llama", "torch"):
        monkeypatch.setitem(hf.FAMILIES, key, hf.NormFamily(mode, 0.0, "variance_epsilon"))
        model = tiny("llama", torch.bfloat16)
        x = ids(4, 16)
        stock = logits(model, x)
        replace_rmsnorm(model)
        diff = (logits(model, x).float() - stock.float()).abs()
        gaps[mode] = (diff.max().item(), (diff > 0).float().mean().item())
    assert gaps["torch"][0] > gaps["llama"][0] and gaps["torch"][1] > gaps["llama"][1] + 0.05, gaps


class OddRMSNorm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class SubclassedNorm(transformers.models.llama.modeling_llama.LlamaRMSNorm):  # type: ignore[misc]
    pass


@pytest.mark.parametrize("odd", [OddRMSNorm, lambda d: nn.LayerNorm(d), SubclassedNorm])
def test_an_unknown_norm_is_refused_and_nothing_is_replaced(odd: Callable[[int], nn.Module]) -> None:
    model = tiny("llama")
    model.model.layers[1].post_attention_layernorm = odd(64)
    before = [type(m) for m in model.modules()]
    with pytest.raises(UnsupportedNormError, match=r"model\.layers\.1\.post_attention_layernorm") as info:
        replace_rmsnorm(model)
    assert isinstance(info.value, ValueError)
    assert [type(m) for m in model.modules()] == before
    # skip= leaves that part alone and replaces the rest.
    names = replace_rmsnorm(model, skip=["model.layers.1.post_attention_layernorm"])
    assert len(names) == 4 and "model.layers.1.post_attention_layernorm" not in names


def test_a_wrapped_forward_or_fp64_olmo2_weight_is_refused() -> None:
    model = tiny("llama")
    norm = model.model.norm
    norm.forward = lambda x: x  # what accelerate's hooks do to a module
    with pytest.raises(UnsupportedNormError, match="wrapped"):
        replace_rmsnorm(model)
    olmo = tiny("olmo2", torch.float64)
    with pytest.raises(UnsupportedNormError, match="float64"):
        replace_rmsnorm(olmo)


def test_options_are_checked_before_anything_is_replaced() -> None:
    model = tiny("llama")
    with pytest.raises(ConfigError, match="casting_mode"):
        replace_rmsnorm(model, casting_mode="torch")
    with pytest.raises(ConfigError, match="chunk_size"):
        replace_rmsnorm(model, chunk_size=0)
    assert not any(isinstance(m, tgn.RMSNorm) for m in model.modules())
    assert replace_rmsnorm(model) and replace_rmsnorm(model) == []  # already ours: left alone


def test_restore_gives_the_stock_modules_and_logits_back() -> None:
    model = tiny("gemma3", torch.bfloat16)
    originals = {n: model.get_submodule(n) for n in hf_norms(model)}
    x = ids()
    stock = logits(model, x)
    replace_rmsnorm(model)
    assert not bits_equal(logits(model, x), stock)  # gemma3 bf16: some logits move
    assert sorted(restore_rmsnorm(model)) == sorted(originals)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert bits_equal(logits(model, x), stock)
    with pytest.raises(RuntimeError), rmsnorm_replaced(model) as names:
        assert model.get_submodule(names[0]) is not originals[names[0]]
        raise RuntimeError("restored on the way out")
    assert all(model.get_submodule(n) is m for n, m in originals.items())


def test_hooks_ties_and_an_optimizer_carry_over() -> None:
    model = tiny("llama")
    shared = model.model.layers[0].input_layernorm
    model.model.layers[1].input_layernorm = shared  # one module held in two places
    seen: list[torch.Size] = []
    handle = model.model.norm.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = replace_rmsnorm(model)
    assert "model.layers.1.input_layernorm" in names
    assert model.model.layers[1].input_layernorm is model.model.layers[0].input_layernorm
    before = model.model.norm.weight.detach().clone()
    loss = model(ids(), labels=ids()).loss
    loss.backward()
    optimizer.step()
    assert seen == [torch.Size([3, 7, 64])]
    assert not bits_equal(model.model.norm.weight.detach(), before)  # the optimizer moved the live weight
    handle.remove()
    logits(model, ids())
    assert len(seen) == 1


def test_without_transformers_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"taskgraph-norm\[hf\]"):
        replace_rmsnorm(nn.Sequential(nn.Linear(2, 2)))


def _forward_source(path: str) -> str:
    """``forward`` and ``__init__`` of a class, without docstrings, comments, type
    annotations, default values or the class's own name (what computes, only)."""
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    parts = []
    for fn in (cls.forward, cls.__init__):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.arguments, ast.arg)):
                for field in ("returns", "annotation"):
                    if hasattr(node, field):
                        setattr(node, field, None)
                if isinstance(node, ast.arguments):
                    node.defaults, node.kw_defaults = [], [None] * len(node.kwonlyargs)
            if isinstance(node, ast.FunctionDef) and node.body and isinstance(node.body[0], ast.Expr) and (
                    isinstance(node.body[0].value, ast.Constant)):
                node.body = node.body[1:] or [ast.Pass()]
        parts.append(ast.unparse(tree).replace(name, "Norm"))
    return " ".join(parts)


def test_every_mapped_class_computes_like_its_family() -> None:
    # If transformers changes one class's formula, its mapping must be looked at again.
    first: dict[hf.NormFamily, str] = {}
    for path, family in hf.FAMILIES.items():
        if path.startswith("transformers."):
            source = _forward_source(path)
            assert source == first.setdefault(family, source), path
    assert len(first) == 6  # llama, gemma, olmo2, nemotron_h, and the two gated families


# --- batch invariance ------------------------------------------------------------


def norm_calls(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> Calls:
    return hf_helpers.norm_calls(model, x, mask, tgn.RMSNorm, "RMSNorm")


class BatchDependentRMSNorm(nn.Module):
    """Negative control: chunking that follows the row count (what the graph forbids)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        return tgn.normalize_sync(x, self.weight, 1e-6, topology="linear", chunk_size=64 if rows == 1 else 4)  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_norm_outputs_are_batch_invariant(family: str, dtype: torch.dtype) -> None:
    model = tiny(family, dtype)
    replace_rmsnorm(model)
    assert_norms_batch_invariant(model, norm_calls, ids(5, 9), len(hf_norms(tiny(family))))


def test_the_invariance_check_finds_a_batch_dependent_norm() -> None:
    model = tiny("llama")
    for layer in model.model.layers:
        layer.input_layernorm = BatchDependentRMSNorm(layer.input_layernorm.weight)
    calls = [c for c in norm_calls(model, ids(5, 9)) if isinstance(c[0], BatchDependentRMSNorm)]
    assert rows_that_differ_alone(calls) > 0


def _alone_vs_batch(model: nn.Module, x: torch.Tensor) -> bool:
    batched = logits(model, x)
    return all(bits_equal(logits(model, x[i:i + 1]), batched[i:i + 1]) for i in range(x.shape[0]))


def test_the_model_is_as_batch_invariant_as_stock_or_more() -> None:
    # Matmuls and attention are not ours: the logits are invariant only where the
    # stock model's other layers are (benchmarks/model.py measures it).  Replacing
    # the norms must never take invariance away.
    model = tiny("llama")
    x = ids(7, 12)
    stock = _alone_vs_batch(model, x)
    replace_rmsnorm(model)
    assert _alone_vs_batch(model, x) or not stock


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_the_replaced_model_compiles_as_one_graph(family: str) -> None:
    model = tiny(family)
    replace_rmsnorm(model)
    assert_compiles_as_one_graph(model, ids())
