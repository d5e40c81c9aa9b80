"""GPT-2: learned positions, LayerNorm, GELU (tanh), biases everywhere, tied embeddings."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo.hf import Rule, check_act, linear_rules, norm_rules, rule

NAME = "GPT-2"
MODEL_TYPES = ("gpt2",)

_GPT2 = dict(
    hf_model_type="gpt2", block_size=1024, vocab_size=50257, norm="layernorm", norm_eps=1e-5,
    mlp="gelu", gelu_approximate="tanh", bias=True, tie_embeddings=True,
    position_embedding="learned",
)  # fmt: skip
CONFIGS = [
    dict(_GPT2, name="gpt2", n_layer=12, n_embd=768, n_head=12),
    dict(_GPT2, name="gpt2-medium", n_layer=24, n_embd=1024, n_head=16),
]

ACTS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UserError(f"config.json: GPT-2 with {flag}=true is not supported")
    return dict(
        _GPT2,
        block_size=hf.get("n_positions", 1024),
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_embd=hf["n_embd"],
        n_head=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        gelu_approximate=check_act(hf, "activation_function", ACTS),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def config_to_hf(config: Config) -> dict[str, Any]:
    return dict(
        model_type="gpt2",
        n_positions=config.block_size,
        n_ctx=config.block_size,
        vocab_size=config.vocab_size,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_inner=config.intermediate_size,
        layer_norm_epsilon=config.norm_eps,
        activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        tie_word_embeddings=config.tie_embeddings,
    )


def weight_rules(config: Config) -> list[Rule]:
    h = "transformer.h.{}"
    rules = [
        rule("wte.weight", "transformer.wte.weight"),
        rule("wpe.weight", "transformer.wpe.weight"),
        *norm_rules("blocks.{}.norm_1", f"{h}.ln_1", config),
        *linear_rules("blocks.{}.attn.qkv", f"{h}.attn.c_attn", True, "transpose"),
        *linear_rules("blocks.{}.attn.proj", f"{h}.attn.c_proj", True, "transpose"),
        *norm_rules("blocks.{}.norm_2", f"{h}.ln_2", config),
        *linear_rules("blocks.{}.mlp.fc", f"{h}.mlp.c_fc", True, "transpose"),
        *linear_rules("blocks.{}.mlp.proj", f"{h}.mlp.c_proj", True, "transpose"),
        *norm_rules("ln_f", "transformer.ln_f", config),
    ]
    if not config.tie_embeddings:
        rules.append(rule("lm_head.weight", "lm_head.weight"))
    return rules


def canonical_hf_name(name: str) -> str:
    """The original OpenAI checkpoints name tensors without the `transformer.` prefix."""
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
