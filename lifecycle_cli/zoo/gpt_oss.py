"""GPT-OSS: a mixture of biased, clamped-SwiGLU experts behind a biased router, attention with
learned sinks and biased projections, sliding-window and full layers alternating, YaRN RoPE.

Experts are stored fused per layer (experts.gate_up_proj with gate and up interleaved along
its last dimension, experts.down_proj), or quantized to MXFP4 as *_blocks and *_scales (the
published checkpoints), which are dequantized while converting.
"""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.zoo.hf import Rule, linear_rules, rule
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "GPT-OSS"
MODEL_TYPES = ("gpt_oss",)

_GPT_OSS = dict(
    hf_model_type="gpt_oss", norm="rmsnorm", norm_eps=1e-5, mlp="moe", bias=True,
    router_bias=True, attention_sinks=True, swiglu_limit=7.0, swiglu_alpha=1.702,
    block_size=131072, vocab_size=201088, n_embd=2880, n_head=64, n_query_groups=8,
    head_size=64, intermediate_size=2880, n_expert_per_token=4, sliding_window=128,
    sliding_window_pattern=2, rope_base=150000.0, router_aux_loss_coef=0.9,
    rope_scaling=dict(
        type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_seq_len=4096,
        truncate=False, attention_factor=None,
    ),
)  # fmt: skip
CONFIGS = [
    dict(_GPT_OSS, name="gpt-oss-20b", n_layer=24, n_expert=32),
    dict(_GPT_OSS, name="gpt-oss-120b", n_layer=36, n_expert=128),
]


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    out = llama_config_from_hf(hf)
    out.update(
        bias=bool(hf.get("attention_bias", True)),
        mlp="moe",
        n_expert=hf["num_local_experts"],
        n_expert_per_token=hf["num_experts_per_tok"],
        router_bias=True,
        attention_sinks=True,
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.9)),
    )
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    out = llama_config_to_hf(config)
    out.update(
        attention_bias=config.bias,
        num_local_experts=config.n_expert,
        num_experts_per_tok=config.n_expert_per_token,
        intermediate_size=config.expert_intermediate_size,
        swiglu_limit=config.swiglu_limit,
        swiglu_alpha=config.swiglu_alpha,
        router_aux_loss_coef=config.router_aux_loss_coef,
    )
    return out


def weight_rules(config: Config) -> list[Rule]:
    """Llama's attention and norms, plus sinks, the router and the fused experts.

    The plain rules come first: exporting writes them; reading takes whichever is stored.
    """
    dense = config.__class__(**{**config.to_dict(), "mlp": "swiglu"})
    rules = llama_rules(dense)
    rules = [r for r in rules if ".mlp." not in r.ours[0]]
    a, m = "model.layers.{}.self_attn", "model.layers.{}.mlp"
    experts = range(config.n_expert)
    fc = {
        name: tuple(f"blocks.{{}}.mlp.experts.{e}.{name}" for e in experts)
        for name in ("fc_1.weight", "fc_2.weight", "proj.weight", "fc_1.bias", "fc_2.bias",
                     "proj.bias")
    }  # fmt: skip
    gate_up = fc["fc_1.weight"] + fc["fc_2.weight"]
    return [
        *rules,
        rule("blocks.{}.attn.sinks", f"{a}.sinks"),
        *linear_rules("blocks.{}.mlp.gate", f"{m}.router", True),
        rule(gate_up, f"{m}.experts.gate_up_proj", "experts_gate_up"),
        rule(
            fc["fc_1.bias"] + fc["fc_2.bias"], f"{m}.experts.gate_up_proj_bias", "experts_gate_up"
        ),
        rule(fc["proj.weight"], f"{m}.experts.down_proj", "experts_down"),
        rule(fc["proj.bias"], f"{m}.experts.down_proj_bias", "experts"),
        rule(
            gate_up,
            (f"{m}.experts.gate_up_proj_blocks", f"{m}.experts.gate_up_proj_scales"),
            "mxfp4_gate_up",
        ),
        rule(
            fc["proj.weight"],
            (f"{m}.experts.down_proj_blocks", f"{m}.experts.down_proj_scales"),
            "mxfp4_down",
        ),
    ]
