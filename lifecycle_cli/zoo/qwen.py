"""Qwen2 / Qwen2.5 (biases on q, k, v), Qwen3 (RMSNorm on queries and keys) and Qwen3-MoE
(Qwen3 attention, sparse mixture-of-experts blocks)."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.zoo.hf import Rule
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "Qwen"
MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")

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
    dict(
        name="Qwen3-30B-A3B", hf_model_type="qwen3_moe", norm="rmsnorm", mlp="moe", bias=False,
        qk_norm=True, block_size=40960, vocab_size=151936, n_layer=48, n_embd=2048, n_head=32,
        n_query_groups=4, head_size=128, intermediate_size=6144, n_expert=128,
        n_expert_per_token=8, expert_intermediate_size=768, norm_eps=1e-6, rope_base=1000000.0,
        router_aux_loss_coef=0.001,
    ),
]  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    out = llama_config_from_hf(hf)
    if hf["model_type"] == "qwen2":
        out["attn_bias"] = True
    else:
        out.update(qk_norm=True, attn_bias=bool(hf.get("attention_bias", False)))
    # transformers 5 writes num_local_experts, 4 wrote num_experts
    n_expert = hf.get("num_experts") or hf.get("num_local_experts")
    if hf["model_type"] == "qwen3_moe" and n_expert:
        step = hf.get("decoder_sparse_step", 1)
        only = set(hf.get("mlp_only_layers") or ())
        out.update(
            mlp="moe",
            n_expert=n_expert,
            n_expert_per_token=hf["num_experts_per_tok"],
            expert_intermediate_size=hf["moe_intermediate_size"],
            moe_norm_topk=bool(hf.get("norm_topk_prob", True)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            dense_layers=[i for i in range(out["n_layer"]) if i in only or (i + 1) % step != 0]
            or None,
        )
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    out = llama_config_to_hf(config)
    if config.hf_model_type in ("qwen3", "qwen3_moe"):
        out["attention_bias"] = config.attn_bias
    if config.hf_model_type == "qwen3_moe":
        out.update(
            num_experts=config.n_expert if config.mlp == "moe" else 0,
            num_experts_per_tok=config.n_expert_per_token,
            moe_intermediate_size=config.expert_intermediate_size,
            norm_topk_prob=config.moe_norm_topk,
            router_aux_loss_coef=config.router_aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=list(config.dense_layers or ()),
        )
    return out


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config, qk_norm=config.qk_norm, experts="qwen")
