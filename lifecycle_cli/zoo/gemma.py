"""Gemma, Gemma 2 and Gemma 3: GeGLU, (1 + weight) RMSNorm, scaled embeddings; Gemma 2 adds
logit soft-capping, norms after attention and MLP, and alternating local/global attention;
Gemma 3 drops the soft-capping (its config.json may still name caps), adds QK-norm, and runs
five local layers per global one, the local ones with their own RoPE base."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo.hf import Rule, sliding_from_hf
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "Gemma"
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")

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
    *(
        dict(
            _GEMMA, name=name, hf_model_type="gemma3_text", vocab_size=vocab, block_size=ctx,
            n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=groups, head_size=hs,
            intermediate_size=inter, attention_scale=scalar**-0.5, sliding_window=window,
            sliding_window_pattern=6, post_attention_norm=True, post_mlp_norm=True, qk_norm=True,
            rope_base=1000000.0, rope_local_base=10000.0,
            rope_scaling=dict(type="linear", factor=8.0) if ctx > 32768 else None,
        )
        for name, vocab, ctx, layers, embd, heads, groups, hs, inter, scalar, window in (
            ("gemma-3-270m", 262144, 32768, 18, 640, 4, 1, 256, 2048, 256, 512),
            ("gemma-3-1b", 262144, 32768, 26, 1152, 4, 1, 256, 6912, 256, 512),
            ("gemma-3-4b", 262208, 131072, 34, 2560, 8, 4, 256, 10240, 256, 1024),
            ("gemma-3-12b", 262208, 131072, 48, 3840, 16, 8, 256, 15360, 256, 1024),
            ("gemma-3-27b", 262208, 131072, 62, 5376, 32, 16, 128, 21504, 168, 1024),
        )
    ),
]  # fmt: skip

# What transformers' Gemma3TextConfig assumes for keys a config.json leaves out (the multimodal
# repos' text_config names only a few).
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
    query_pre_attn_scalar=256, rms_norm_eps=1e-6, sliding_window=4096, sliding_window_pattern=6,
    rope_theta=1000000.0, rope_local_base_freq=10000.0, tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)  # fmt: skip

GELU_TANH = {"gelu_pytorch_tanh": "tanh", "gelu": "tanh"}  # Gemma runs "gelu" as tanh too


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf["model_type"] == "gemma3":  # the multimodal repos: their text decoder
        hf = {**hf.get("text_config", {}), "model_type": "gemma3_text"}
    if hf["model_type"] == "gemma3_text":
        hf = {**GEMMA3_TEXT_DEFAULTS, **hf}
    act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    out = llama_config_from_hf(hf, act_key=act_key, acts=GELU_TANH)
    out.update(norm_unit_offset=True, scale_embeddings=True)
    if hf["model_type"] in ("gemma2", "gemma3_text"):
        gemma3 = hf["model_type"] == "gemma3_text"
        if gemma3 and hf.get("use_bidirectional_attention"):
            raise UserError("config.json: use_bidirectional_attention is not supported")
        out.update(
            attention_scale=hf.get("query_pre_attn_scalar", out["head_size"]) ** -0.5,
            # Gemma 3 names an attention cap in config.json but never applies it.
            attention_logit_softcapping=None if gemma3 else hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            post_attention_norm=True,
            post_mlp_norm=True,
            **sliding_from_hf(hf, hf.get("sliding_window_pattern", 6 if gemma3 else 2)),
        )
    if hf["model_type"] == "gemma3_text":
        local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
        out.update(
            qk_norm=True,
            rope_local_base=float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4))),
        )
    return out


MULTIMODAL_ONLY = ("vision_tower.", "multi_modal_projector.")


def canonical_hf_name(name: str) -> str | None:
    """A multimodal Gemma 3 checkpoint's text-decoder tensors under the names a
    Gemma3ForCausalLM uses; None for the vision tower and projector (not converted)."""
    name = name.removeprefix("model.")
    if name.startswith(MULTIMODAL_ONLY):
        return None
    if name.startswith("language_model."):
        name = name.removeprefix("language_model.")
        return name if name.startswith(("model.", "lm_head.")) else f"model.{name}"
    return name if name == "lm_head.weight" else f"model.{name}"


def config_to_hf(config: Config) -> dict[str, Any]:
    out = llama_config_to_hf(config)
    del out["hidden_act"]
    out["hidden_activation"] = "gelu_pytorch_tanh"
    if config.hf_model_type == "gemma3_text":
        out.update(rope_local_base_freq=config.rope_local_base or config.rope_base)
    if config.hf_model_type in ("gemma2", "gemma3_text"):
        out.update(
            query_pre_attn_scalar=round((config.attention_scale or config.head_size**-0.5) ** -2),
            attn_logit_softcapping=config.attention_logit_softcapping,
            final_logit_softcapping=config.final_logit_softcapping,
        )
    return out


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config, qk_norm=config.qk_norm)
