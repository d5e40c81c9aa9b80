"""`llmcycle convert`: hand a checkpoint back to the ecosystem."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from lifecycle_cli.errors import UserError


def to_hf(checkpoint_dir: Path, out_dir: Path) -> None:
    """Export a checkpoint folder as a Hugging Face folder that
    `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load as they are.

    Args:
        checkpoint_dir: The checkpoint folder to export.
        out_dir: Where to write the Hugging Face folder (replaced if it exists).
    """
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise UserError("--out_dir must differ from checkpoint_dir (it would be replaced)")
    from lifecycle_cli.zoo.convert import export_hf

    export_hf(checkpoint_dir, out_dir)
    print(f"Exported {checkpoint_dir} to {out_dir}")


def from_gguf(
    gguf_file: Path,
    out_dir: Path,
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None,
) -> None:
    """Import a GGUF file (llama.cpp, Ollama, LM Studio) as a checkpoint folder every verb takes:
    weights dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants), config from the file's
    metadata, tokenizer rebuilt as tokenizer.json with the chat template kept.

    Args:
        gguf_file: The .gguf file (architectures llama, qwen2, qwen3, gemma, gemma2, gemma3).
        out_dir: Where to write the checkpoint folder (replaced if it exists).
        dtype: Store the weights as float32 (default), float16 or bfloat16.
    """
    from lifecycle_cli.zoo.gguf import import_gguf

    config = import_gguf(gguf_file, out_dir, dtype=dtype)
    print(f"Imported {gguf_file} ({config.hf_model_type}) into {out_dir}")
