"""Qwen2 / Qwen2.5 (biases on q, k, v) and Qwen3 (RMSNorm on queries and keys)."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.zoo.hf import Rule
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "Qwen"
MODEL_TYPES = ("qwen2", "qwen3")

CONFIGS = [
    dict(
        name="Qwen2.5-0.5B", hf_model_type="qwen2", norm="rmsnorm", mlp="swiglu", bias=False,
        attn_bias=True, block_size=32768, vocab_size=151936, n_layer=24, n_embd=896, n_head=14,
        n_query_groups=2, intermediate_size=4864, norm_eps=1e-6, rope_base=1000000.0,
        tie_embeddings=True,
    ),
    dict(
        name="Qwen2.5-7B", hf_model_type="qwen2", norm="rmsnorm", mlp="swiglu", bias=False,
        attn_bias=True, block_size=131072, vocab_size=152064, n_layer=28, n_embd=3584,
        n_head=28, n_query_groups=4, intermediate_size=18944, norm_eps=1e-6,
        rope_base=1000000.0,
    ),
    dict(
        name="Qwen3-0.6B", hf_model_type="qwen3", norm="rmsnorm", mlp="swiglu", bias=False,
        qk_norm=True, block_size=40960, vocab_size=151936, n_layer=28, n_embd=1024, n_head=16,
        n_query_groups=8, head_size=128, intermediate_size=3072, norm_eps=1e-6,
        rope_base=1000000.0, tie_embeddings=True,
    ),
]  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    out = llama_config_from_hf(hf)
    if hf["model_type"] == "qwen2":
        out["attn_bias"] = True
    else:
        out.update(qk_norm=True, attn_bias=bool(hf.get("attention_bias", False)))
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    out = llama_config_to_hf(config)
    if config.hf_model_type == "qwen3":
        out["attention_bias"] = config.attn_bias
    return out


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config, qk_norm=config.qk_norm)
