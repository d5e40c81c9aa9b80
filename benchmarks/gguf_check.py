"""`make check-gguf`: every family `convert to_gguf` writes, run by llama.cpp itself.

For each tiny random model (TINY_FAMILIES, with a byte-level BPE and a chat template) this
exports f32, f16 and q8_0 GGUF files and, through llama-cpp-python (its own virtual environment,
built from source: `LLAMA_PYTHON`), checks:

- f32 logits within 1e-3 of llmcycle's, at every position of a 64-token sequence;
- the same greedy continuation (24 tokens) from f32 and from f16 as `llmcycle generate`;
- q8_0: >= 95% top-1 agreement with llmcycle's f32 logits over 100 positions;
- the chat template llama.cpp reads formats a conversation exactly as `llmcycle chat` does;
- llama.cpp decode tokens/s on q8_0 next to llmcycle's generate on the same checkpoint.

Run: python -m benchmarks.gguf_check [--llama_python PATH] [--families llama,qwen2]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_COMMON = dict(
    vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128,
    block_size=256, norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5,
)  # fmt: skip
_GEMMA = dict(
    _COMMON, mlp="geglu", gelu_approximate="tanh", norm_unit_offset=True, scale_embeddings=True,
    tie_embeddings=True, head_size=16, norm_eps=1e-6,
)  # fmt: skip
# One tiny model per exported family, each with the features llama.cpp must get right.
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        _COMMON, hf_model_type="llama", rope_base=500000.0,
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_seq_len=8192),
    ),
    "mistral": dict(_COMMON, hf_model_type="mistral", rope_base=1e6, n_query_groups=1),
    "qwen2": dict(_COMMON, hf_model_type="qwen2", attn_bias=True, tie_embeddings=True,
                  rope_base=1e6, norm_eps=1e-6),
    "qwen3": dict(_COMMON, hf_model_type="qwen3", qk_norm=True, head_size=32, rope_base=1e6,
                  norm_eps=1e-6),
    "gemma": dict(_GEMMA, hf_model_type="gemma", n_query_groups=1),
    "gemma2": dict(
        _GEMMA, hf_model_type="gemma2", attention_scale=16**-0.5, post_attention_norm=True,
        post_mlp_norm=True, attention_logit_softcapping=20.0, final_logit_softcapping=10.0,
        sliding_window=16, sliding_window_pattern=2,
    ),
    "gemma3": dict(
        _GEMMA, hf_model_type="gemma3_text", attention_scale=16**-0.5, n_layer=3,
        post_attention_norm=True, post_mlp_norm=True, qk_norm=True, sliding_window=16,
        sliding_window_pattern=3, rope_base=1e6, rope_local_base=10000.0,
    ),
}  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on Python's own help text, eos <|im_end|>, a ChatML template."""
    from pydoc_data.topics import topics

    from lifecycle_cli.tokenizer import train_bpe

    train_bpe(None, vocab_size, out, texts=list(topics.values())[:50], special_tokens=SPECIAL)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def tiny_checkpoint(family: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random-init checkpoint folder of `family` (weights perturbed so every norm and bias
    matters), with the tokenizer of `tokenizer_dir`."""
    import torch

    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.config import Config
    from lifecycle_cli.model import GPT

    torch.manual_seed(seed)
    model = GPT(Config.from_dict({**TINY_FAMILIES[family], "name": f"tiny-{family}"}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(out, model, tokenizer_dir)
