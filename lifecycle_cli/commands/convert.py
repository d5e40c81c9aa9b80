"""`llmcycle convert`: hand a checkpoint back to the ecosystem."""

from __future__ import annotations

from pathlib import Path

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
