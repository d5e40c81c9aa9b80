"""SmolLM3: the Llama shape with RoPE left out of every 4th layer (NoPE layers)."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo.hf import Rule
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "SmolLM3"
MODEL_TYPES = ("smollm3",)

CONFIGS = [
    dict(
        name="SmolLM3-3B", hf_model_type="smollm3", norm="rmsnorm", mlp="swiglu", bias=False,
        block_size=65536, vocab_size=128256, n_layer=36, n_embd=2048, n_head=16,
        n_query_groups=4, intermediate_size=11008, norm_eps=1e-6, rope_base=5000000.0,
        tie_embeddings=True, nope_layers=[i for i in range(36) if (i + 1) % 4 == 0],
    ),
]  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise UserError("config.json: attention_bias != mlp_bias is not supported")
    n_layer = hf.get("num_hidden_layers", 0)
    uses_rope = hf.get("no_rope_layers")  # 1: the layer uses RoPE
    if uses_rope is None:
        interval = hf.get("no_rope_layer_interval", 4)
        uses_rope = [int((i + 1) % interval != 0) for i in range(n_layer)]
    out = llama_config_from_hf(hf)
    out.update(
        bias=bool(hf.get("attention_bias", False)),
        nope_layers=[i for i, rope in enumerate(uses_rope) if not rope],
    )
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    out = llama_config_to_hf(config)
    nope = set(config.nope_layers or ())
    layers = range(config.n_layer)
    out.update(
        attention_bias=config.bias,
        mlp_bias=config.bias,
        no_rope_layers=[int(i not in nope) for i in layers],
        use_sliding_window=config.sliding_window is not None,
        layer_types=[
            "sliding_attention" if config.is_sliding(i) else "full_attention" for i in layers
        ],
    )
    return out


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config)
