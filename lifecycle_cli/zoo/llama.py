"""Llama 2 / Llama 3 / SmolLM2, and the Llama weight layout other families build on."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo.hf import (
    Rule,
    check_act,
    linear_rules,
    require,
    rope_from_hf,
    rope_to_hf,
    rule,
    sliding_from_hf,
    sliding_to_hf,
)

NAME = "Llama"
MODEL_TYPES = ("llama",)

_LLAMA = dict(norm="rmsnorm", mlp="swiglu", bias=False, hf_model_type="llama")
CONFIGS = [
    dict(
        _LLAMA, name="Llama-2-7b-hf", block_size=4096, vocab_size=32000, n_layer=32,
        n_embd=4096, n_head=32, intermediate_size=11008, norm_eps=1e-5,
    ),
    dict(
        _LLAMA, name="Llama-3.2-1B", block_size=131072, vocab_size=128256, n_layer=16,
        n_embd=2048, n_head=32, n_query_groups=8, intermediate_size=8192, norm_eps=1e-5,
        rope_base=500000.0, tie_embeddings=True,
        rope_scaling=dict(
            type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_seq_len=8192,
        ),
    ),
    dict(
        _LLAMA, name="Llama-3.1-8B", block_size=131072, vocab_size=128256, n_layer=32,
        n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336, norm_eps=1e-5,
        rope_base=500000.0,
        rope_scaling=dict(
            type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_seq_len=8192,
        ),
    ),
    dict(
        _LLAMA, name="SmolLM2-135M", block_size=8192, vocab_size=49152, n_layer=30,
        n_embd=576, n_head=9, n_query_groups=3, intermediate_size=1536, norm_eps=1e-5,
        rope_base=100000.0, tie_embeddings=True,
    ),
]  # fmt: skip

SILU = {"silu": ""}


def llama_config_from_hf(hf: dict[str, Any], act_key: str = "hidden_act", acts=SILU) -> dict:
    """Config fields shared by every family with Llama's config.json keys."""
    n_head = require(hf, "num_attention_heads")
    approximate = check_act(hf, act_key, acts)
    return dict(
        hf_model_type=hf["model_type"],
        block_size=hf.get("max_position_embeddings", 4096),
        vocab_size=require(hf, "vocab_size"),
        n_layer=require(hf, "num_hidden_layers"),
        n_embd=require(hf, "hidden_size"),
        n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=require(hf, "intermediate_size"),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="geglu" if approximate else "swiglu",
        gelu_approximate=approximate or "none",
        bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        **rope_from_hf(hf),
        **sliding_from_hf(hf),
    )


def llama_config_to_hf(config: Config) -> dict[str, Any]:
    return dict(
        model_type=config.hf_model_type,
        max_position_embeddings=config.block_size,
        vocab_size=config.vocab_size,
        num_hidden_layers=config.n_layer,
        hidden_size=config.n_embd,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        head_dim=config.head_size,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        tie_word_embeddings=config.tie_embeddings,
        **rope_to_hf(config),
        **sliding_to_hf(config),
    )


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise UserError("config.json: attention_bias != mlp_bias is not supported")
    out = llama_config_from_hf(hf)
    out["bias"] = bool(hf.get("attention_bias", False))
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    return dict(llama_config_to_hf(config), attention_bias=config.bias, mlp_bias=config.bias)


def llama_rules(
    config: Config,
    fused_qkv: bool = False,
    fused_gate_up: bool = False,
    qk_norm: bool = False,
    experts: str = "mixtral",
) -> list[Rule]:
    """The Llama layout: model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.

    Gemma 2's four norms and Mixtral's experts use the same layout with other names.
    """
    a, m = "model.layers.{}.self_attn", "model.layers.{}.mlp"
    if fused_qkv:
        qkv = linear_rules("blocks.{}.attn.qkv", f"{a}.qkv_proj", config.attn_bias)
    else:
        qkv = [
            rule("blocks.{}.attn.qkv.weight", tuple(f"{a}.{p}_proj.weight" for p in "qkv"), "qkv")
        ]
        if config.attn_bias:
            qkv.append(
                rule("blocks.{}.attn.qkv.bias", tuple(f"{a}.{p}_proj.bias" for p in "qkv"), "qkv")
            )
    rules = [
        rule("wte.weight", "model.embed_tokens.weight"),
        rule("ln_f.weight", "model.norm.weight"),
        *qkv,
        *linear_rules("blocks.{}.attn.proj", f"{a}.o_proj", config.bias),
    ]
    if config.pre_norm:
        rules.append(rule("blocks.{}.norm_1.weight", "model.layers.{}.input_layernorm.weight"))
    if qk_norm:
        rules += [
            rule("blocks.{}.attn.q_norm.weight", f"{a}.q_norm.weight"),
            rule("blocks.{}.attn.k_norm.weight", f"{a}.k_norm.weight"),
        ]
    layer = "model.layers.{}"
    if config.post_attention_norm:  # Gemma 2 and OLMo 2 name their norms after where they sit
        rules += [
            rule(
                "blocks.{}.post_attention_norm.weight", f"{layer}.post_attention_layernorm.weight"
            ),
            rule("blocks.{}.post_mlp_norm.weight", f"{layer}.post_feedforward_layernorm.weight"),
        ]
        if config.pre_norm:
            rules.append(
                rule("blocks.{}.norm_2.weight", f"{layer}.pre_feedforward_layernorm.weight")
            )
    elif config.pre_norm:
        rules.append(rule("blocks.{}.norm_2.weight", f"{layer}.post_attention_layernorm.weight"))
    if config.mlp == "moe":
        rules += expert_rules(config, *(EXPERT_NAMES[experts]))
    if config.mlp != "moe" or config.dense_layers:
        if fused_gate_up:
            ours = ("blocks.{}.mlp.fc_1.weight", "blocks.{}.mlp.fc_2.weight")
            rules.append(rule(ours, f"{m}.gate_up_proj.weight", "halves"))
            rules += linear_rules("blocks.{}.mlp.proj", f"{m}.down_proj", config.bias)
        else:
            rules += linear_rules("blocks.{}.mlp.fc_1", f"{m}.gate_proj", config.bias)
            rules += linear_rules("blocks.{}.mlp.fc_2", f"{m}.up_proj", config.bias)
            rules += linear_rules("blocks.{}.mlp.proj", f"{m}.down_proj", config.bias)
    if not config.tie_embeddings:
        rules.append(rule("lm_head.weight", "lm_head.weight"))
    return rules


# How checkpoints name a mixture's router and experts: (block, router, gate, up, down).
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", "w1", "w3", "w2"),
    "qwen": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
}


def expert_rules(config: Config, block: str, router: str, gate: str, up: str, down: str):
    """One tensor per expert and projection: model.layers.N.{block}.experts.E.{gate,up,down}."""
    e = f"model.layers.{{}}.{block}"
    return [
        *linear_rules("blocks.{}.mlp.gate", f"{e}.{router}", config.router_bias),
        rule("blocks.{}.mlp.experts.{}.fc_1.weight", f"{e}.experts.{{}}.{gate}.weight"),
        rule("blocks.{}.mlp.experts.{}.fc_2.weight", f"{e}.experts.{{}}.{up}.weight"),
        rule("blocks.{}.mlp.experts.{}.proj.weight", f"{e}.experts.{{}}.{down}.weight"),
    ]


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config)
