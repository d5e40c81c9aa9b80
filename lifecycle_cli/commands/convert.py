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


def to_peft(checkpoint_dir: Path, out_dir: Path) -> None:
    """Export a LoRA run's adapters in PEFT's format (adapter_config.json +
    adapter_model.safetensors): `peft.PeftModel.from_pretrained(base, out_dir)` puts them on
    the `convert to_hf` export of the base and computes what the run's merged final/ computes.

    Args:
        checkpoint_dir: The LoRA run (`finetune`/`align --method lora` out_dir), its final/ or
            its lora.safetensors.
        out_dir: Where to write the PEFT adapter folder (replaced if it exists).
    """
    from lifecycle_cli.zoo.peft import export_peft

    export_peft(checkpoint_dir, out_dir)
    print(f"Exported the LoRA adapters of {checkpoint_dir} to {out_dir} (PEFT format)")


def to_gguf(
    checkpoint_dir: Path,
    out_file: Path,
    dtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] = "f16",
    ollama: bool = False,
) -> None:
    """Export a checkpoint folder as one GGUF file that llama.cpp, Ollama and LM Studio run:
    llama.cpp's tensor names and layout, the architecture's metadata, the tokenizer and the
    chat template (the checkpoint's prompt style) inside. Families: llama, mistral, qwen2,
    qwen3, gemma, gemma2, gemma3; anything llama.cpp would run differently is refused first.

    Args:
        checkpoint_dir: The checkpoint folder (a LoRA run's merged `final/`).
        out_file: The .gguf file to write (replaced if it exists).
        dtype: Type of the 2-D weights: f32, f16, bf16, or quantized q8_0 / q4_0 (gguf.quants);
            norms and biases stay f32.
        ollama: Also write a `Modelfile` beside it for `ollama create NAME -f Modelfile`.
    """
    from lifecycle_cli.zoo.gguf import export_gguf

    path, config = export_gguf(checkpoint_dir, out_file, dtype=dtype)
    print(f"Exported {checkpoint_dir} ({config.hf_model_type}, {dtype}) to {path}")
    if ollama:
        from lifecycle_cli.zoo.templates import modelfile

        target = path.parent / "Modelfile"
        target.write_text(modelfile(Path(checkpoint_dir), path), encoding="utf-8")
        print(f"Wrote {target}: ollama create NAME -f {target}")


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
