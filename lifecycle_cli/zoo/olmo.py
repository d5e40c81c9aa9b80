"""OLMo 2: the Llama shape with norms after attention and MLP (none before) and RMSNorm over
the whole query and key projections."""

from __future__ import annotations

from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo.hf import Rule
from lifecycle_cli.zoo.llama import llama_config_from_hf, llama_config_to_hf, llama_rules

NAME = "OLMo 2"
MODEL_TYPES = ("olmo2",)

_OLMO2 = dict(
    hf_model_type="olmo2", norm="rmsnorm", mlp="swiglu", bias=False, pre_norm=False,
    post_attention_norm=True, post_mlp_norm=True, qk_norm=True, qk_norm_scope="all",
    norm_eps=1e-6, block_size=4096, vocab_size=100352, rope_base=500000.0,
)  # fmt: skip
CONFIGS = [
    dict(
        _OLMO2, name="OLMo-2-0425-1B", n_layer=16, n_embd=2048, n_head=16,
        intermediate_size=8192,
    ),
    dict(
        _OLMO2, name="OLMo-2-1124-7B", n_layer=32, n_embd=4096, n_head=32,
        intermediate_size=11008,
    ),
    dict(
        _OLMO2, name="OLMo-2-1124-13B", n_layer=40, n_embd=5120, n_head=40,
        intermediate_size=13824,
    ),
]  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("attention_bias"):
        raise UserError("config.json: attention_bias true is not supported for olmo2")
    out = llama_config_from_hf(hf)
    out.update(
        pre_norm=False, post_attention_norm=True, post_mlp_norm=True, qk_norm=True,
        qk_norm_scope="all",
    )  # fmt: skip
    return out


def config_to_hf(config: Config) -> dict[str, Any]:
    return dict(llama_config_to_hf(config), attention_bias=False)


def weight_rules(config: Config) -> list[Rule]:
    return llama_rules(config, qk_norm=True)
