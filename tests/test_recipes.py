"""What the finetune recipes rest on: rank-stabilised LoRA scaling, recipes that can generate
every synthetic answer in full, and the recipe benchmark's choice of the evaluation final/ is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lifecycle_cli.data.synthetic import TASKS, make_examples
from lifecycle_cli.errors import UserError
from lifecycle_cli.lora import LoRAArgs, inject_lora, load_lora, save_lora
from lifecycle_cli.model import GPT
from lifecycle_cli.zoo import named_config

HUB = Path(__file__).resolve().parents[1] / "config_hub" / "finetune"
RECIPES = sorted(HUB.glob("synthetic-*.yaml"))


def tiny_gpt(seed: int = 0) -> GPT:
    config = named_config(
        "pythia-14m", n_layer=1, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64,
        block_size=16, intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.mark.parametrize("rslora, scale", [(False, 16 / 16), (True, 16 / 4)])
def test_rslora_scales_adapters_by_alpha_over_sqrt_rank(rslora, scale):
    args = LoRAArgs(r=16, alpha=16, rslora=rslora)
    model = tiny_gpt()
    inject_lora(model, args)
    layer = model.blocks[0].attn.qkv
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    delta = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
    q = model.config.n_head * model.config.head_size  # query rows come first
    a, b = layer.lora_A[:16], layer.lora_B[:q]
    torch.testing.assert_close(delta[:, :q], scale * x @ a.T @ b.T, atol=1e-5, rtol=1e-4)


def test_rslora_is_saved_with_the_adapters_and_checked_on_load(tmp_path):
    args = LoRAArgs(r=4, alpha=8, rslora=True)
    model = tiny_gpt()
    inject_lora(model, args)
    save_lora(model, tmp_path / "lora.safetensors", args)
    assert load_lora(tiny_gpt(), tmp_path / "lora.safetensors").rslora is True
    plain = tiny_gpt()
    inject_lora(plain, LoRAArgs(r=4, alpha=8))  # same shapes, another scale
    with pytest.raises(UserError, match="do not fit"):
        load_lora(plain, tmp_path / "lora.safetensors")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_generate_every_synthetic_answer_in_full(recipe):
    """Exact match generates at most max_new_tokens: a byte-level BPE gives an ASCII answer at
    most one token per character, plus the end of sequence."""
    settings = yaml.safe_load(recipe.read_text())
    longest = 0
    for name in TASKS:
        train, val = make_examples(name, 300, 50)
        longest = max(longest, *(len(ex["output"]) for ex in train + val))
    assert settings["max_new_tokens"] >= longest + 1, (longest, settings["max_new_tokens"])
    assert settings["data"]["synthetic_val_size"] >= 100  # exact match on 100+ prompts
    assert settings["exact_match_samples"] >= settings["data"]["synthetic_val_size"]


def test_benchmark_reports_the_evaluation_final_holds():
    from benchmarks.recipes import chosen

    rows = [
        {"step": "0", "val_loss": "3.0", "exact_match": "0.0"},
        {"step": "10", "train_loss": "1.0"},
        {"step": "100", "val_loss": "1.0", "exact_match": "0.7"},
        {"step": "200", "val_loss": "0.9", "exact_match": "0.9"},
        {"step": "300", "val_loss": "1.2", "exact_match": "0.9"},
        {"step": "400", "val_loss": "1.5", "exact_match": "0.8"},
    ]
    assert chosen(rows, "exact_match") == (200, 0.9)  # the earliest of equal bests
    assert chosen(rows, "val_loss") == (200, 0.9)
    assert chosen(rows, None) == (400, 0.8)  # no early stopping: the last evaluation
