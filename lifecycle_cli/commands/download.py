"""`llmcycle download`: get a model into a checkpoint folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from lifecycle_cli.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def download(
    repo_id: str,
    checkpoint_dir: Path = Path("checkpoints"),
    revision: Optional[str] = None,
    access_token: Optional[str] = None,
    from_dir: Optional[Path] = None,
    dtype: Optional[str] = None,
) -> None:
    """Get a model into a checkpoint folder, <checkpoint_dir>/<repo_id>.

    Args:
        repo_id: The model's Hugging Face id, `org/name`; or `list` to print the supported
            families and named models.
        checkpoint_dir: Folder the model lands under.
        revision: Branch, tag or commit on the Hub.
        access_token: Hugging Face token for gated models (default: $HF_TOKEN).
        from_dir: Convert this local Hugging Face folder (config.json, safetensors, tokenizer
            files) instead of downloading.
        dtype: Store the weights as float32, float16 or bfloat16 (default: as published).
    """
    if repo_id == "list":
        print_model_table()
        return
    out_dir = checkpoint_dir / checked_repo_id(repo_id)
    if from_dir is None:
        raise UserError(
            "downloading from the Hub is not available yet (it lands with issue #3); "
            "convert a local Hugging Face folder with --from_dir PATH"
        )
    if revision is not None or access_token is not None:
        raise UserError("--revision and --access_token apply to Hub downloads, not --from_dir")
    from lifecycle_cli.zoo.convert import convert_hf_checkpoint

    config = convert_hf_checkpoint(from_dir, out_dir, dtype=dtype, name=repo_id.split("/")[-1])
    print(f"Converted {from_dir} ({config.hf_model_type}) into {out_dir}")


def checked_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a plain `org/name` that cannot escape checkpoint_dir."""
    if not REPO_ID.match(repo_id) or ".." in repo_id.split("/"):
        raise UserError(f"repo id {repo_id!r} is not of the form org/name")
    return repo_id


def print_model_table() -> None:
    from lifecycle_cli.zoo import model_table

    for family, model_types, names in model_table():
        print(f"{family} (model_type: {model_types})")
        for name in names:
            print(f"  {name}")
    print("Any Hugging Face checkpoint of these model_types converts; the names above are")
    print("built-in configurations (e.g. `llmcycle pretrain <name>`).")
