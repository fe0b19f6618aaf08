"""A bf16 Llama decoder with its norms replaced: a training step and an inference_mode
forward at a batch that splits the norms' rows across threads (8 x 1024 tokens).

The model is built from a config (no downloads), two layers of width 256, with its
norm weights perturbed so that they matter.  Its norms see (8, 1024, 256) bf16
activations: under grad in the training step and under ``inference_mode`` in the
forward, the modes whose hand-over to worker threads the face matrix checks one
norm at a time (tests/test_faces.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.integrations import replace_rmsnorm  # noqa: E402

from .helpers import assert_bits_equal  # noqa: E402

BATCH, TOKENS, VOCAB = 8, 1024, 512


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=TOKENS, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model = model.to(torch.bfloat16)
    names = replace_rmsnorm(model)
    assert len(names) == 2 * 2 + 1 and all(isinstance(model.get_submodule(n), tgn.RMSNorm) for n in names)
    return model


def token_ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(seed))


def norm_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "norm" in n}


def test_training_step_is_finite_and_repeats_bit_for_bit() -> None:
    """One step (forward, ``loss.backward()``, SGD) twice from the same start: a finite
    loss, finite gradients for every norm weight, and the same bits both times."""
    first = tiny_llama().train()
    second = copy.deepcopy(first)
    ids = token_ids(1)
    runs = []
    for model in (first, second):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        runs.append((loss.detach(), {n: p.grad for n, p in norm_weights(model).items()}, norm_weights(model)))
    (loss, grads, weights), (loss2, grads2, weights2) = runs
    assert torch.isfinite(loss), loss
    assert_bits_equal(loss2, loss, "loss")
    for name, grad in grads.items():
        assert grad is not None and bool(torch.isfinite(grad).all()), f"{name}: gradient {grad}"
        assert_bits_equal(grads2[name], grad, f"{name}.grad")
        assert bool(torch.isfinite(weights[name]).all())
        assert_bits_equal(weights2[name].detach(), weights[name].detach(), f"{name} after the step")


def test_inference_mode_forward_is_finite_and_repeats_bit_for_bit() -> None:
    model = tiny_llama().eval()
    ids = token_ids(2)
    with torch.inference_mode():
        logits = model(ids).logits
        again = model(ids).logits
    assert logits.shape == (BATCH, TOKENS, VOCAB) and logits.dtype == torch.bfloat16
    assert bool(torch.isfinite(logits).all())
    assert_bits_equal(again, logits, "logits of a second run")
