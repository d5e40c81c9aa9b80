"""Pieces every family uses to talk to Hugging Face: config keys and weight-name rules.

No torch here; `zoo.convert` applies the rules to tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError


@dataclass(frozen=True)
class Rule:
    """Tensors named `hf` in a Hugging Face checkpoint are tensors named `ours` in ours.

    Names hold `{}` for indices (layer, then expert). `kind` says how values move:
      copy       one tensor each side, unchanged
      transpose  one tensor each side, transposed (GPT-2's Conv1D weights)
      qkv        hf (q, k, v) <-> ours (qkv stacked along dim 0)
      neox_qkv   hf one tensor with heads interleaved as (head, q|k|v, ...) <-> ours qkv
      halves     hf one tensor (gate; up) stacked along dim 0 <-> ours (fc_1, fc_2)
    """

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str = "copy"

    def pattern(self, name: str) -> re.Pattern:
        return re.compile(re.escape(name).replace(r"\{\}", r"(\d+)") + "$")


def rule(ours: str | tuple[str, ...], hf: str | tuple[str, ...], kind: str = "copy") -> Rule:
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)  # noqa: E731
    return Rule(as_tuple(ours), as_tuple(hf), kind)


def norm_rules(ours: str, hf: str, config: Config) -> list[Rule]:
    """weight (and bias for LayerNorm) of one norm."""
    rules = [rule(f"{ours}.weight", f"{hf}.weight")]
    if config.norm == "layernorm":
        rules.append(rule(f"{ours}.bias", f"{hf}.bias"))
    return rules


def linear_rules(ours: str, hf: str, bias: bool, kind: str = "copy") -> list[Rule]:
    rules = [rule(f"{ours}.weight", f"{hf}.weight", kind)]
    if bias:
        rules.append(rule(f"{ours}.bias", f"{hf}.bias", "copy" if kind == "transpose" else kind))
    return rules


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE fields from a config.json written by transformers 4 (rope_theta, rope_scaling) or
    5 (rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # per layer kind (Gemma 3): the global layers' RoPE
        params = params["full_attention"]
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {
        "rope_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "rotary_percentage": float(
            params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        ),
        "rope_scaling": None,
    }
    if kind == "llama3":
        out["rope_scaling"] = {
            "type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_seq_len": int(scaling["original_max_position_embeddings"]),
        }
    elif kind == "linear":
        out["rope_scaling"] = {"type": "linear", "factor": float(scaling["factor"])}
    elif kind == "yarn" and not (scaling.get("mscale") or scaling.get("mscale_all_dim")):
        out["rope_scaling"] = {
            "type": "yarn",
            "factor": float(scaling["factor"]),
            "beta_fast": float(scaling.get("beta_fast") or 32.0),
            "beta_slow": float(scaling.get("beta_slow") or 1.0),
            "original_max_seq_len": int(require(scaling, "original_max_position_embeddings")),
            "truncate": bool(scaling.get("truncate", True)),
            "attention_factor": scaling.get("attention_factor"),
        }
    elif kind != "default":
        raise UserError(
            f"config.json: rope scaling {kind!r} is not supported (supported: llama3, linear, "
            "yarn without mscale)"
        )
    return out


def rope_to_hf(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": config.rope_base}
    s = config.rope_scaling
    if s and s["type"] == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s["factor"],
            "low_freq_factor": s["low_freq_factor"],
            "high_freq_factor": s["high_freq_factor"],
            "original_max_position_embeddings": s["original_max_seq_len"],
        }
    elif s and s["type"] == "yarn":
        out["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": s["factor"],
            "beta_fast": s["beta_fast"],
            "beta_slow": s["beta_slow"],
            "original_max_position_embeddings": s["original_max_seq_len"],
            "truncate": s["truncate"],
        }
        if s.get("attention_factor") is not None:
            out["rope_scaling"]["attention_factor"] = s["attention_factor"]
    elif s:
        out["rope_scaling"] = {"rope_type": "linear", "factor": s["factor"]}
    if config.rotary_percentage != 1.0:
        out["partial_rotary_factor"] = config.rotary_percentage
    return out


def sliding_from_hf(hf: dict[str, Any], default_pattern: int = 1) -> dict[str, Any]:
    """sliding_window and sliding_window_pattern from `sliding_window` and `layer_types`."""
    window: Optional[int] = hf.get("sliding_window")
    if hf.get("use_sliding_window") is False:
        window = None
    layer_types = hf.get("layer_types")
    if not window:
        return {"sliding_window": None, "sliding_window_pattern": 1}
    if not layer_types:
        return {"sliding_window": window, "sliding_window_pattern": default_pattern}
    sliding = [t == "sliding_attention" for t in layer_types]
    if not any(sliding):
        return {"sliding_window": None, "sliding_window_pattern": 1}
    for pattern in range(1, len(sliding) + 1):
        expected = [pattern == 1 or (i + 1) % pattern != 0 for i in range(len(sliding))]
        if expected == sliding:
            return {"sliding_window": window, "sliding_window_pattern": pattern}
    raise UserError(
        "config.json: this arrangement of sliding-window layers (layer_types) is not supported"
    )


def sliding_to_hf(config: Config) -> dict[str, Any]:
    if config.sliding_window is None:
        return {"sliding_window": None}
    if config.sliding_window_pattern == 1:
        # transformers reads `layer_types` on a Mistral config as Ministral: leave it out.
        return {"sliding_window": config.sliding_window}
    types = [
        "sliding_attention" if config.is_sliding(i) else "full_attention"
        for i in range(config.n_layer)
    ]
    return {"sliding_window": config.sliding_window, "layer_types": types}


def require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise UserError(f"config.json: missing field {key!r}")
    return hf[key]


def check_act(hf: dict[str, Any], key: str, allowed: dict[str, str]) -> str:
    """Map an HF activation name onto `Config.gelu_approximate` (or '' for SiLU).

    A config.json without `key` gets the family's default, the first entry of `allowed`.
    """
    act = hf.get(key, next(iter(allowed)))
    if act not in allowed:
        raise UserError(
            f"config.json: {key}={act!r} is not supported here (supported: {', '.join(allowed)})"
        )
    return allowed[act]
