"""GPT-NeoX / Pythia: parallel residual, partial RoPE, interleaved fused qkv."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.zoo.hf import Rule, check_act, linear_rules, norm_rules, rope_from_hf, rope_to_hf

NAME = "GPT-NeoX"
MODEL_TYPES = ("gpt_neox",)

_PYTHIA = dict(
    hf_model_type="gpt_neox", block_size=2048, vocab_size=50304, norm="layernorm",
    norm_eps=1e-5, mlp="gelu", bias=True, rotary_percentage=0.25, parallel_residual=True,
)  # fmt: skip
CONFIGS = [
    dict(_PYTHIA, name="pythia-14m", n_layer=6, n_embd=128, n_head=4, intermediate_size=512),
    dict(_PYTHIA, name="pythia-70m", n_layer=6, n_embd=512, n_head=8),
    dict(_PYTHIA, name="pythia-160m", n_layer=12, n_embd=768, n_head=12),
    dict(_PYTHIA, name="pythia-1b", n_layer=16, n_embd=2048, n_head=8),
]

ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    rope = rope_from_hf(hf)
    if "rotary_pct" in hf:  # transformers 4 name
        rope["rotary_percentage"] = float(hf["rotary_pct"])
    if "rotary_emb_base" in hf:
        rope["rope_base"] = float(hf["rotary_emb_base"])
    return dict(
        _PYTHIA,
        block_size=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        gelu_approximate=check_act(hf, "hidden_act", ACTS),
        bias=hf.get("attention_bias", True),
        parallel_residual=hf.get("use_parallel_residual", True),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        **rope,
    )


def config_to_hf(config: Config) -> dict[str, Any]:
    rope = rope_to_hf(config)
    return dict(
        model_type="gpt_neox",
        max_position_embeddings=config.block_size,
        vocab_size=config.vocab_size,
        num_hidden_layers=config.n_layer,
        hidden_size=config.n_embd,
        num_attention_heads=config.n_head,
        intermediate_size=config.intermediate_size,
        layer_norm_eps=config.norm_eps,
        hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new",
        attention_bias=config.bias,
        use_parallel_residual=config.parallel_residual,
        tie_word_embeddings=config.tie_embeddings,
        rotary_pct=config.rotary_percentage,
        rotary_emb_base=config.rope_base,
        **rope,
    )


def weight_rules(config: Config) -> list[Rule]:
    layer = "gpt_neox.layers.{}"
    qkv = f"{layer}.attention.query_key_value"
    rules = [
        Rule(("wte.weight",), ("gpt_neox.embed_in.weight",)),
        *norm_rules("blocks.{}.norm_1", f"{layer}.input_layernorm", config),
        *norm_rules("blocks.{}.norm_2", f"{layer}.post_attention_layernorm", config),
        *linear_rules("blocks.{}.attn.qkv", qkv, config.bias, "neox_qkv"),
        *linear_rules("blocks.{}.attn.proj", f"{layer}.attention.dense", config.bias),
        *linear_rules("blocks.{}.mlp.fc", f"{layer}.mlp.dense_h_to_4h", config.bias),
        *linear_rules("blocks.{}.mlp.proj", f"{layer}.mlp.dense_4h_to_h", config.bias),
        *norm_rules("ln_f", "gpt_neox.final_layer_norm", config),
    ]  # fmt: skip
    if not config.tie_embeddings:
        rules.append(Rule(("lm_head.weight",), ("embed_out.weight",)))
    return rules
