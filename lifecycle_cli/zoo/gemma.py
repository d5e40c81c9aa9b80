"""Gemma and Gemma 2: GeGLU, (1 + weight) RMSNorm, scaled embeddings; Gemma 2 adds logit
soft-capping, norms after attention and MLP, and alternating local/global attention."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.zoo.hf import Rule, sliding_from_hf
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "Gemma"
MODEL_TYPES = ("gemma", "gemma2")

_GEMMA = dict(
    norm="rmsnorm", norm_unit_offset=True, mlp="geglu", gelu_approximate="tanh", bias=False,
    scale_embeddings=True, tie_embeddings=True, norm_eps=1e-6, vocab_size=256000,
    block_size=8192,
)  # fmt: skip
CONFIGS = [
    dict(
        _GEMMA, name="gemma-2b", hf_model_type="gemma", n_layer=18, n_embd=2048, n_head=8,
        n_query_groups=1, head_size=256, intermediate_size=16384,
    ),
    dict(
        _GEMMA, name="gemma-2-2b", hf_model_type="gemma2", n_layer=26, n_embd=2304, n_head=8,
        n_query_groups=4, head_size=256, intermediate_size=9216, attention_scale=256**-0.5,
        attention_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
        sliding_window_pattern=2, post_attention_norm=True, post_mlp_norm=True,
    ),
]  # fmt: skip

GELU_TANH = {"gelu_pytorch_tanh": "tanh", "gelu": "tanh"}  # Gemma runs "gelu" as tanh too


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    out = llama_config_from_hf(hf, act_key=act_key, acts=GELU_TANH)
    out.update(norm_unit_offset=True, scale_embeddings=True)
    if hf["model_type"] == "gemma2":
        out.update(
            attention_scale=hf.get("query_pre_attn_scalar", out["head_size"]) ** -0.5,
            attention_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            post_attention_norm=True,
            post_mlp_norm=True,
            **sliding_from_hf(hf, default_pattern=2),
        )
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    out = llama_config_to_hf(config)
    del out["hidden_act"]
    out["hidden_activation"] = "gelu_pytorch_tanh"
    if config.hf_model_type == "gemma2":
        out.update(
            query_pre_attn_scalar=round((config.attention_scale or config.head_size**-0.5) ** -2),
            attn_logit_softcapping=config.attention_logit_softcapping,
            final_logit_softcapping=config.final_logit_softcapping,
        )
    return out


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config)
