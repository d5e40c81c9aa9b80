"""Phi-3: the Llama shape with fused qkv_proj and gate_up_proj."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.zoo.hf import Rule
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "Phi-3"
MODEL_TYPES = ("phi3",)

CONFIGS = [
    dict(
        name="Phi-3-mini-4k-instruct", hf_model_type="phi3", norm="rmsnorm", mlp="swiglu",
        bias=False, block_size=4096, vocab_size=32064, n_layer=32, n_embd=3072, n_head=32,
        intermediate_size=8192, norm_eps=1e-5, sliding_window=2047,
    ),
]  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return llama_config_from_hf(hf)


def config_to_hf(config: Config) -> dict[str, Any]:
    return llama_config_to_hf(config)


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config, fused_qkv=True, fused_gate_up=True)
