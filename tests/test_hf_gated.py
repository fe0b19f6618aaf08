"""``replace_rmsnorm`` on tiny random hybrid models: Mamba2, Qwen3-Next, Bamba, NemotronH.

Their gated norms become :class:`taskgraph_norm.GatedRMSNorm` (the same Parameter
objects, called as the stock modules are: ``norm(x, gate)``); logits stay within
rounding of stock, and the replaced models compile as one graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.integrations import replace_rmsnorm, restore_rmsnorm  # noqa: E402

from .helpers import bits_equal  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ATTN = dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
CONFIGS: dict[str, Callable[[], Any]] = {
    "mamba2": lambda: transformers.Mamba2Config(**BASE, state_size=16, num_heads=8, head_dim=16, n_groups=2,
                                                expand=2, chunk_size=16),
    "qwen3_next": lambda: transformers.Qwen3NextConfig(
        **BASE, **ATTN, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"]),
    "bamba": lambda: transformers.BambaConfig(**BASE, **ATTN, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
                                              mamba_d_state=16, mamba_chunk_size=16, attn_layer_indices=[1]),
    "nemotron_h": lambda: transformers.NemotronHConfig(**BASE, **ATTN, mamba_num_heads=8, mamba_head_dim=16,
                                                       n_groups=2, ssm_state_size=16, chunk_size=16,
                                                       hybrid_override_pattern="M*"),
}
#: (norm_before_gate, group_size) of each model's gated norm
GATED = {"mamba2": (False, 64), "qwen3_next": (True, None), "bamba": (False, 64), "nemotron_h": (False, 64)}
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def tiny(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the reference kernels' fallback notices)
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(ids).logits  # type: ignore[no-any-return]


def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_gated_norms_are_swapped_with_their_parameters(family: str) -> None:
    model = tiny(family)
    gated = [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNormGated")]
    params = dict(model.named_parameters())
    names = replace_rmsnorm(model)
    assert gated and set(gated) <= set(names)
    before, group = GATED[family]
    for name in gated:
        norm = model.get_submodule(name)
        assert type(norm) is tgn.GatedRMSNorm
        assert (norm.norm_before_gate, norm.group_size, norm.casting_mode) == (before, group, "llama")
    assert all(p is params[n] for n, p in model.named_parameters())
    assert sorted(restore_rmsnorm(model)) == sorted(names)
    assert all(type(model.get_submodule(n)).__name__.endswith("RMSNormGated") for n in gated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_logits_are_close_to_stock(family: str, dtype: torch.dtype) -> None:
    model = tiny(family, dtype)
    x = ids()
    stock = logits(model, x)
    replace_rmsnorm(model)
    ours = logits(model, x)
    assert ours.dtype == stock.dtype  # (Mamba2 keeps its residual stream, and logits, in fp32)
    assert (ours.float() - stock.float()).abs().max().item() <= TOL[dtype]


def test_the_swapped_module_takes_the_stock_call() -> None:
    model = tiny("qwen3_next")
    name = next(n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNormGated"))
    stock = model.get_submodule(name)
    x, gate = torch.randn(3, 16), torch.randn(3, 16)
    want = stock(x, gate)
    replace_rmsnorm(model)
    got = model.get_submodule(name)(x, gate)  # positional gate, as the stock module is called
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["mamba2", "qwen3_next"])
def test_the_replaced_model_compiles_as_one_graph(family: str) -> None:
    model = tiny(family)
    replace_rmsnorm(model)
    x = ids()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(lambda: logits(model, x))()
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:1]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert bits_equal(compiled(input_ids=x).logits, logits(model, x))
    torch._dynamo.reset()
