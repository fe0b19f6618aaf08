"""replace_norms on tiny random Hugging Face models whose norms are ``torch.nn.LayerNorm``
(GPT-2, GPT-NeoX, OPT, Falcon, Phi, BERT; no downloads).

Every family gets a two-layer model from its config with its LayerNorm weights and
biases perturbed.  Figures on this CPU (transformers 5.25, torch 2.13), replaced
against stock logits: fp32 max abs difference <= 2e-6 (torch multiplies by ``rsqrt``
and sums in its order; we divide by a correctly rounded ``sqrt`` in the graph's
order); bf16 0 in every family.  The bounds below are those with margin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.errors import ConfigError, UnsupportedNormError  # noqa: E402
from taskgraph_norm.integrations import (  # noqa: E402
    norms_replaced,
    replace_norms,
    replace_rmsnorm,
    restore_norms,
    restore_rmsnorm,
)

from . import hf_helpers  # noqa: E402
from .helpers import bits_equal  # noqa: E402
from .hf_helpers import Calls, assert_close_to_stock, assert_compiles_as_one_graph  # noqa: E402
from .hf_helpers import assert_norms_batch_invariant, logits, rows_that_differ_alone  # noqa: E402

V = 128
TOKENS = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS: dict[str, Callable[[], Any]] = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **TOKENS),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, max_position_embeddings=64, **TOKENS),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          word_embed_proj_dim=64, max_position_embeddings=64, **TOKENS),
    "falcon": lambda: transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **TOKENS),
    "phi": lambda: transformers.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64, **TOKENS),
    "bert": lambda: transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64, **TOKENS),
}
#: LayerNorm modules each tiny model holds (a negative check on the counting too).
COUNTS = {"gpt2": 5, "gpt_neox": 5, "opt": 5, "falcon": 3, "phi": 3, "bert": 6}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def tiny(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(CONFIGS[family]()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.2)
                m.bias.add_(torch.randn_like(m.bias) * 0.2)
    return model.to(dtype)


def stock_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.LayerNorm]


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_layernorm_is_replaced_and_the_parameters_stay(family: str) -> None:
    model = tiny(family)
    expected = stock_norms(model)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eps = {n: model.get_submodule(n).eps for n in expected}
    names = replace_norms(model, topology="linear", chunk_size=16)
    assert names == expected and len(names) == COUNTS[family]
    for name in names:
        norm = model.get_submodule(name)
        assert type(norm) is tgn.LayerNorm
        assert (norm.topology, norm.chunk_size, norm.eps, norm.normalized_shape) == ("linear", 16, eps[name], (64,))
    assert all(p is params[n] for n, p in model.named_parameters())
    after = model.state_dict()
    assert list(after) == list(state) and all(bits_equal(after[k], v) for k, v in state.items())
    assert not any(type(m) is nn.LayerNorm for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_logits_are_close_to_stock(family: str, dtype: torch.dtype) -> None:
    model = tiny(family, dtype)
    x = ids()
    stock = assert_close_to_stock(model, replace_norms, x, dtype, TOL[dtype])
    restore_norms(model)
    assert bits_equal(logits(model, x), stock)


def test_a_model_with_both_kinds_is_replaced_in_one_call() -> None:
    # A Llama whose final norm is a torch.nn.LayerNorm: replace_rmsnorm refuses it (and
    # replaces nothing), replace_norms takes both kinds.
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **TOKENS)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.model.norm = nn.LayerNorm(64, eps=1e-6)
    with pytest.raises(UnsupportedNormError, match=r"model\.norm.*replace_norms"):
        replace_rmsnorm(model)
    assert not any(isinstance(m, (tgn.RMSNorm, tgn.LayerNorm)) for m in model.modules())
    x = ids()
    stock = logits(model, x)
    names = replace_norms(model, chunk_size=32)
    assert len(names) == 5 and type(model.model.norm) is tgn.LayerNorm and model.model.norm.eps == 1e-6
    assert sum(type(m) is tgn.RMSNorm for m in model.modules()) == 4
    assert (logits(model, x) - stock).abs().max().item() <= 1e-5
    assert replace_norms(model) == [] and replace_rmsnorm(model) == []  # ours: left alone
    assert restore_rmsnorm(model) and type(model.model.norm) is tgn.LayerNorm  # only the RMSNorms
    assert restore_norms(model) == ["model.norm"] and type(model.model.norm) is nn.LayerNorm


class SubclassedLayerNorm(nn.LayerNorm):
    pass


class T5LikeLayerNorm(nn.Module):  # a "LayerNorm" by name that computes something else
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.mark.parametrize("odd", [SubclassedLayerNorm, T5LikeLayerNorm])
def test_an_unknown_norm_is_refused_and_nothing_is_replaced(odd: Callable[[int], nn.Module]) -> None:
    model = tiny("gpt2")
    model.transformer.h[1].ln_2 = odd(64)
    before = [type(m) for m in model.modules()]
    with pytest.raises(UnsupportedNormError, match=r"transformer\.h\.1\.ln_2"):
        replace_norms(model)
    assert [type(m) for m in model.modules()] == before
    names = replace_norms(model, skip=["transformer.h.1.ln_2"])
    assert len(names) == 4 and "transformer.h.1.ln_2" not in names


def test_options_are_checked_before_anything_is_replaced() -> None:
    model = tiny("opt")
    with pytest.raises(ConfigError, match="casting_mode"):
        replace_norms(model, casting_mode="torch")
    with pytest.raises(ConfigError, match="chunk_size"):
        replace_norms(model, chunk_size=0)
    with pytest.raises(TypeError, match="replace_norms.*executor"):
        replace_norms(model, executor="reference")
    model.model.decoder.final_layer_norm.forward = lambda x: x  # what accelerate's hooks do
    with pytest.raises(UnsupportedNormError, match="wrapped"):
        replace_norms(model)
    assert not any(isinstance(m, tgn.LayerNorm) for m in model.modules())


def test_no_bias_and_no_affine_layernorms_are_replaced_too() -> None:
    model = nn.Sequential(nn.LayerNorm(32, bias=False), nn.Linear(32, 32), nn.LayerNorm(32, elementwise_affine=False),
                          nn.Unflatten(-1, (4, 8)), nn.LayerNorm((4, 8)))
    with torch.no_grad():
        model[0].weight.normal_()
    x = torch.randn(5, 32)
    stock = model(x).detach()
    weight = model[0].weight
    assert replace_norms(model) == ["0", "2", "4"]
    assert model[0].weight is weight and model[0].bias is None and model[2].weight is None
    assert model[4].normalized_shape == (4, 8)
    torch.testing.assert_close(model(x).detach(), stock)


def test_training_reaches_the_same_parameters() -> None:
    model = tiny("gpt2").train()
    ln = model.transformer.ln_f
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[torch.Size] = []
    model.transformer.ln_f.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with norms_replaced(model, chunk_size=16) as names:
        assert model.transformer.ln_f is not ln and model.transformer.ln_f.training
        before = (ln.weight.detach().clone(), ln.bias.detach().clone())
        model(ids(), labels=ids()).loss.backward()
        optimizer.step()
        assert len(names) == 5 and seen == [torch.Size([3, 7, 64])]
    assert model.transformer.ln_f is ln  # restored, with the trained parameters
    assert not bits_equal(ln.weight.detach(), before[0]) and not bits_equal(ln.bias.detach(), before[1])


# --- batch invariance and compile -------------------------------------------------


def norm_calls(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> Calls:
    return hf_helpers.norm_calls(model, x, mask, (tgn.LayerNorm, nn.LayerNorm, BatchDependentLayerNorm))


class BatchDependentLayerNorm(nn.Module):
    """Negative control: chunking that follows the row count (what the graph forbids)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        return tgn.layer_norm_sync(x, self.weight, self.bias, topology="linear",  # type: ignore[no-any-return]
                                   chunk_size=64 if rows == 1 else 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["gpt2", "falcon", "bert"])
def test_norm_outputs_are_batch_invariant(family: str, dtype: torch.dtype) -> None:
    model = tiny(family, dtype)
    replace_norms(model)
    assert_norms_batch_invariant(model, norm_calls, ids(5, 9), COUNTS[family])


def test_the_invariance_check_finds_a_batch_dependent_norm() -> None:
    model = tiny("gpt2")
    for block in model.transformer.h:
        block.ln_1 = BatchDependentLayerNorm(block.ln_1)
    calls = [c for c in norm_calls(model, ids(5, 9)) if isinstance(c[0], BatchDependentLayerNorm)]
    assert len(calls) == 2 and rows_that_differ_alone(calls) > 0


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_replaced_model_compiles_as_one_graph(family: str) -> None:
    model = tiny(family)
    replace_norms(model)
    assert_compiles_as_one_graph(model, ids())
