"""QLoRA: 4-bit packed base weights under LoRA adapters (bitsandbytes' CPU path here; the CLI
itself asks for CUDA)."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lifecycle_cli.linear import Linear
from lifecycle_cli.lora import LoRAArgs, LoRALinear, inject_lora, merge_lora
from lifecycle_cli.model import GPT
from lifecycle_cli.objectives import next_token_loss
from lifecycle_cli.quantize import dequantize_blocks, is_4bit, quantize_blocks
from tests.test_lora import TOKENS, model_for, tiny, train

ARGS = LoRAArgs(r=4, alpha=8, dropout=0.0, key=True, projection=True, embedding=True)


def block_linears(model: GPT) -> dict[str, nn.Module]:
    return {n: m for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("family", ["SmolLM2-135M", "pythia-14m"])
def test_packed_base_is_close_small_and_frozen(family):
    reference = model_for(tiny(family, n_embd=64, intermediate_size=128))  # 64-value blocks
    model = copy.deepcopy(reference)
    before = sum(m.weight.numel() * 4 for m in block_linears(model).values())
    quantize_blocks(model)
    inject_lora(model, ARGS)  # adapts the packed layers

    layers = block_linears(model)
    assert all(is_4bit(m.weight) for m in layers.values())  # adapted (qkv, proj) and not (mlp)
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    packed = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    assert packed * 8 == before  # 4 bits instead of 32
    assert all(n.endswith((".lora_A", ".lora_B")) for n, p in model.named_parameters()
               if p.requires_grad)  # fmt: skip

    originals = block_linears(reference)
    for name, layer in layers.items():
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        error = (w - originals[name].weight).norm() / originals[name].weight.norm()
        assert error < 0.11, name  # NF4 on Gaussian weights: ~0.09
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))  # adapters: no-op


def test_adapters_train_on_the_packed_base_and_merge_into_its_dequantized_weights():
    model = model_for(tiny("SmolLM2-135M"))
    quantize_blocks(model)
    inject_lora(model, ARGS)
    packed = {n: m.weight.clone() for n, m in block_linears(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):  # fit one batch: the adapters learn through the packed matmuls
        loss = next_token_loss(model, TOKENS)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(m.weight, packed[n]) for n, m in block_linears(model).items())
    adapted = model(TOKENS)

    dequantize_blocks(model)
    assert not any(is_4bit(m.weight) for m in block_linears(model).values())
    torch.testing.assert_close(model(TOKENS), adapted, atol=1e-5, rtol=1e-5)
    merge_lora(model)
    assert all(type(m) is Linear for m in block_linears(model).values())
    assert list(model.state_dict()) == list(GPT(model.config).state_dict())
    torch.testing.assert_close(model(TOKENS), adapted, atol=1e-5, rtol=1e-5)


def test_packed_state_loads_onto_a_base_quantized_again():
    """What resuming a QLoRA run does: quantize the original base again, load the step's
    tensors (packed weights and adapters) onto it, and get the same model."""
    base = model_for(tiny("SmolLM2-135M"))
    model = copy.deepcopy(base)
    quantize_blocks(model)
    inject_lora(model, ARGS)
    train(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    again = copy.deepcopy(base)
    quantize_blocks(again)
    inject_lora(again, ARGS)
    again.load_state_dict(state)
    assert torch.equal(again(TOKENS), model(TOKENS))


def test_quantizing_after_lora_is_refused_by_name():
    """Packed layers are wrapped by LoRA, not the other way round: quantize first."""
    model = model_for(tiny("SmolLM2-135M"))
    inject_lora(model, ARGS)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv is a LoRALinear"):
        quantize_blocks(model)
