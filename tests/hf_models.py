"""Tiny random-init Hugging Face models of every supported family, built without a download."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


# Sized so that every feature moves the logits far beyond the parity tolerance (1e-4): weights
# perturbed by 0.2 (not 0.05) give attention scores and logits of a few units, so Gemma 2's caps
# of 2.0 bind (removing or doubling either cap moves the logits by > 0.6; with 0.05 and caps
# 5.0/3.0, doubling the attention cap moved them by 8e-5 and passed), and a query scale of
# 12**-0.5 differs from head_dim 16's default. The weakest feature left, tanh-approximated GELU,
# still moves them by 7e-4.
NOISE = 0.2
ATTN_CAP, FINAL_CAP, QUERY_PRE_ATTN_SCALAR = 2.0, 2.0, 12


def hf_config(family: str):
    import transformers as T

    if family == "gpt2":
        return T.GPT2Config(
            vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    if family == "gpt_neox":
        return T.GPTNeoXConfig(
            **{**COMMON, "num_key_value_heads": None}, rotary_pct=0.25,
            use_parallel_residual=True, hidden_act="gelu",
        )  # fmt: skip
    if family == "llama":
        return T.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=500000.0)
    if family == "llama3":  # Llama 3.1/3.2: frequency-dependent RoPE scaling, tied head
        return T.LlamaConfig(
            **{**COMMON, "max_position_embeddings": 128}, rope_theta=500000.0,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        )  # fmt: skip
    if family == "mistral":
        return T.MistralConfig(**COMMON, sliding_window=5)
    if family == "mixtral":
        return T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2":
        return T.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**COMMON, head_dim=16)
    if family == "gemma2":
        return T.Gemma2Config(
            **COMMON, head_dim=16, query_pre_attn_scalar=QUERY_PRE_ATTN_SCALAR, sliding_window=5,
            attn_logit_softcapping=ATTN_CAP, final_logit_softcapping=FINAL_CAP,
        )  # fmt: skip
    if family == "gemma":
        return T.GemmaConfig(**COMMON, head_dim=8)
    if family == "phi3":
        return T.Phi3Config(**COMMON, sliding_window=5)
    if family in NEW_FAMILY_VARIANTS:
        return NEW_FAMILY_VARIANTS[family]()
    raise ValueError(family)


def _three_layers(**kw):
    return {**COMMON, "num_hidden_layers": 3, **kw}


def _yarn(**kw):
    return dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=8.0, beta_slow=1.0,
                original_max_position_embeddings=16, **kw)  # fmt: skip


def _t():
    import transformers as T

    return T


# The current-generation families, each in shapes that differ in size, GQA ratio and the
# sliding window (every window shorter than the 14 tokens the parity tests run).
NEW_FAMILY_VARIANTS = {
    "olmo2": lambda: _t().Olmo2Config(**COMMON, rope_theta=500000.0),
    "olmo2-mqa": lambda: _t().Olmo2Config(
        **_three_layers(hidden_size=48, num_attention_heads=6, num_key_value_heads=1)
    ),
    "smollm3": lambda: _t().SmolLM3Config(**COMMON, no_rope_layer_interval=2),
    "smollm3-mha": lambda: _t().SmolLM3Config(
        **_three_layers(num_key_value_heads=4),
        no_rope_layers=[1, 0, 0],
        rope_theta=5e6,
        tie_word_embeddings=True,
    ),
    "gemma3": lambda: _t().Gemma3TextConfig(
        **_three_layers(),
        head_dim=16,
        query_pre_attn_scalar=QUERY_PRE_ATTN_SCALAR,
        sliding_window=4,
        sliding_window_pattern=3,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        },
    ),
    "gemma3-capped": lambda: _t().Gemma3TextConfig(
        **{**COMMON, "num_key_value_heads": 1},
        head_dim=8,
        sliding_window=5,
        sliding_window_pattern=2,
        attn_logit_softcapping=ATTN_CAP,
        final_logit_softcapping=FINAL_CAP,
    ),
    "qwen3_moe": lambda: _t().Qwen3MoeConfig(
        **_three_layers(),
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "qwen3_moe-unnormed": lambda: _t().Qwen3MoeConfig(
        **{**COMMON, "num_key_value_heads": 1},
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        norm_topk_prob=False,
        sliding_window=None,
    ),
    "gpt_oss": lambda: _t().GptOssConfig(
        **COMMON,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=5,
        rope_parameters=_yarn(truncate=False),
        swiglu_limit=1.5,
    ),
    "gpt_oss-mha": lambda: _t().GptOssConfig(
        **_three_layers(num_key_value_heads=4),
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=3,
        sliding_window=3,
        rope_parameters=_yarn(),
        swiglu_limit=1.0,
    ),
}


FAMILIES = (
    "gpt2", "gpt_neox", "llama", "llama3", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
    "gemma2", "phi3",
)  # fmt: skip


def make_hf_model(family: str, out_dir: Path, seed: int = 0, vocab_size: int = 96, **save_kwargs):
    """A random-init transformers model of `family`, saved to `out_dir`; returns the model."""
    import transformers as T

    torch.manual_seed(seed)
    config = hf_config(family)
    config.vocab_size = vocab_size
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb everything so a wrong mapping shows
    # (and by NOISE, so that every feature shows).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * NOISE)
    model.eval()
    model.save_pretrained(out_dir, **save_kwargs)
    return model
