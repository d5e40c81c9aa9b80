"""Mistral (sliding-window attention) and Mixtral (sparse mixture of experts)."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.zoo.hf import Rule
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "Mistral"
MODEL_TYPES = ("mistral", "mixtral")

_COMMON = dict(
    norm="rmsnorm", bias=False, block_size=32768, vocab_size=32000, n_layer=32, n_embd=4096,
    n_head=32, n_query_groups=8, intermediate_size=14336, norm_eps=1e-5,
)  # fmt: skip
CONFIGS = [
    dict(
        _COMMON, name="Mistral-7B-v0.1", hf_model_type="mistral", mlp="swiglu",
        sliding_window=4096,
    ),
    dict(
        _COMMON, name="Mistral-7B-Instruct-v0.3", hf_model_type="mistral", mlp="swiglu",
        vocab_size=32768, rope_base=1000000.0,
    ),
    dict(
        _COMMON, name="Mixtral-8x7B-v0.1", hf_model_type="mixtral", mlp="moe", n_expert=8,
        n_expert_per_token=2, rope_base=1000000.0,
    ),
]  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    out = llama_config_from_hf(hf)
    if hf["model_type"] == "mixtral":
        out.update(
            mlp="moe",
            n_expert=hf["num_local_experts"],
            n_expert_per_token=hf["num_experts_per_tok"],
        )
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    out = llama_config_to_hf(config)
    if config.mlp == "moe":
        out.update(num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_per_token)
    return out


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config)
