"""`Config`: one dataclass that describes every supported architecture.

A model family is a set of values for these fields (see `zoo/`, which builds on this module and
holds the named configurations: `zoo.named_config`); `model.GPT` reads them and nothing else.
No torch here: the CLI imports this module to build its help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lifecycle_cli.errors import UserError

CONFIG_FILE = "model_config.yaml"
ROPE_SCALINGS = ("llama3", "linear", "yarn")


@dataclass
class Config:
    """The shape and behaviour of a decoder-only transformer.

    Defaults describe a GPT-2-like model; families override what they need.
    """

    name: str = ""
    # Hugging Face `model_type` this architecture is exported as (`convert to_hf`).
    hf_model_type: Optional[str] = None
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_query_groups: Optional[int] = None  # None: n_head (multi-head); 1: multi-query
    head_size: Optional[int] = None  # None: n_embd // n_head
    intermediate_size: Optional[int] = None  # None: 4 * n_embd
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # Gemma's RMSNorm multiplies by (1 + weight); the stored weight stays as published.
    norm_unit_offset: bool = False
    mlp: Literal["gelu", "swiglu", "geglu", "moe"] = "gelu"
    gelu_approximate: Literal["none", "tanh"] = "none"
    # GPT-OSS's clamped SwiGLU: gate clamped to <= limit, up to [-limit, limit], then
    # (up + 1) * gate * sigmoid(swiglu_alpha * gate). None: plain SwiGLU.
    swiglu_limit: Optional[float] = None
    swiglu_alpha: float = 1.0
    # Mixture of experts (mlp "moe"): each token goes to n_expert_per_token of n_expert SwiGLU
    # experts of expert_intermediate_size (None: intermediate_size); `dense_layers` keep a dense
    # MLP of intermediate_size (Qwen3-MoE's mlp_only_layers).
    n_expert: int = 0
    n_expert_per_token: int = 0
    expert_intermediate_size: Optional[int] = None
    dense_layers: Optional[list[int]] = None
    router_bias: bool = False  # GPT-OSS
    # Renormalise the chosen experts' router probabilities to sum to 1 (Qwen3-MoE's
    # norm_topk_prob); False keeps the softmax over all experts.
    moe_norm_topk: bool = True
    # Training: coefficients of the router's load-balancing loss (Switch Transformer) and of
    # its z-loss (mean squared log-sum-exp of the router logits), added to the objective.
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    bias: bool = True  # biases of the attention and MLP linear layers
    attn_bias: Optional[bool] = None  # biases of q/k/v only (Qwen2); None: same as `bias`
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    position_embedding: Literal["rope", "learned"] = "rope"
    rope_base: float = 10000.0
    # RoPE base of the sliding-window layers (Gemma 3: 10000, the global ones 1e6, without
    # rope_scaling); None: rope_base and rope_scaling like every layer.
    rope_local_base: Optional[float] = None
    nope_layers: Optional[list[int]] = None  # layers that skip RoPE (SmolLM3: every 4th)
    rotary_percentage: float = 1.0  # share of each head rotated (Pythia: 0.25)
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_seq_len"}, {"type": "linear", "factor"} or {"type": "yarn", "factor",
    #  "beta_fast", "beta_slow", "original_max_seq_len", "truncate", "attention_factor"}
    rope_scaling: Optional[dict[str, Any]] = None
    parallel_residual: bool = False  # GPT-NeoX: x + attn(norm_1(x)) + mlp(norm_2(x))
    pre_norm: bool = True  # norm_1 / norm_2 on the input of attention / MLP (OLMo 2: False)
    post_attention_norm: bool = False  # Gemma 2, OLMo 2: norm on the attention output
    post_mlp_norm: bool = False  # Gemma 2, OLMo 2: norm on the MLP output
    qk_norm: bool = False  # RMSNorm on the queries and keys
    # "head": over each head (Qwen3, Gemma 3); "all": over the whole q and k projections,
    # before they are split into heads (OLMo 2).
    qk_norm_scope: Literal["head", "all"] = "head"
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(n_embd)
    attention_scale: Optional[float] = None  # softmax scale; None: 1/sqrt(head_size)
    attention_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    sliding_window: Optional[int] = None  # tokens a query sees (itself included)
    # With a window: every `sliding_window_pattern`-th layer attends globally
    # (Gemma 2: 2). 1: every layer uses the window (Mistral).
    sliding_window_pattern: int = 1
    # A learned logit per head that takes part in the softmax and attends to nothing (GPT-OSS).
    attention_sinks: bool = False

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise UserError(
                    f"{self._what()}: n_embd={self.n_embd} is not divisible by "
                    f"n_head={self.n_head}; set head_size"
                )
            self.head_size = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.attn_bias is None:
            self.attn_bias = self.bias
        if self.n_head % self.n_query_groups:
            raise UserError(
                f"{self._what()}: n_head={self.n_head} is not a multiple of "
                f"n_query_groups={self.n_query_groups}"
            )
        if self.mlp == "moe" and not 0 < self.n_expert_per_token <= self.n_expert:
            raise UserError(f"{self._what()}: mlp 'moe' needs 0 < n_expert_per_token <= n_expert")
        if self.rope_scaling and self.rope_scaling.get("type") not in ROPE_SCALINGS:
            raise UserError(
                f"{self._what()}: rope_scaling type {self.rope_scaling.get('type')!r} "
                f"is not supported (supported: {', '.join(ROPE_SCALINGS)})"
            )
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        for field in ("nope_layers", "dense_layers"):
            bad = [i for i in getattr(self, field) or () if not 0 <= i < self.n_layer]
            if bad:
                raise UserError(f"{self._what()}: {field} {bad} are not layers of {self.n_layer}")

    def _what(self) -> str:
        return f"model config {self.name!r}" if self.name else "model config"

    @property
    def rope_n_elem(self) -> int:
        """How many dimensions of each head RoPE rotates."""
        return int(self.rotary_percentage * self.head_size)

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.sliding_window_pattern == 1 or (layer + 1) % self.sliding_window_pattern != 0

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` has a mixture of experts (not one of `dense_layers`)."""
        return self.mlp == "moe" and layer not in (self.dense_layers or ())

    def rope_kind(self, layer: int) -> Optional[str]:
        """Which RoPE table layer `layer` uses: "global", "local" (`rope_local_base`), or None
        (no RoPE: learned positions, or one of `nope_layers`)."""
        if self.position_embedding != "rope" or layer in (self.nope_layers or ()):
            return None
        return "local" if self.rope_local_base and self.is_sliding(layer) else "global"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source}: unknown model config field(s) {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path | str) -> Config:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text())
        except OSError as e:
            raise UserError(f"cannot read model config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of config fields")
        return cls.from_dict(values, source=str(path))

    def save(self, path: Path | str) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
