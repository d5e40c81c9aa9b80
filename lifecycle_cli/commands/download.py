"""`llmcycle download`: get a model into a checkpoint folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional, Union

from lifecycle_cli.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def download(
    repo_id: Optional[str] = None,
    checkpoint_dir: Path = Path("checkpoints"),
    revision: Optional[str] = None,
    access_token: Optional[str] = None,
    from_dir: Optional[Path] = None,
    from_gguf: Optional[Path] = None,
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None,
    dataset: Optional[str] = None,
    files: Optional[Union[list[str], str]] = None,
) -> None:
    """Get a model into a checkpoint folder, <checkpoint_dir>/<repo_id>; or, with
    `--dataset org/name`, a data set's files into the Hugging Face cache (the folder printed
    is what `--data.path` takes).

    The Hugging Face download (config, safetensors weights, tokenizer files) goes to
    huggingface_hub's cache (under $HF_HOME), so an interrupted download resumes when the
    command is run again; the checkpoint folder appears only once it is complete.

    Args:
        repo_id: The model's Hugging Face id, `org/name`; or `list` to print the supported
            families and named models.
        checkpoint_dir: Folder the model lands under.
        revision: Branch, tag or commit on the Hub.
        access_token: Hugging Face token for gated or private models (default: $HF_TOKEN, else
            the token `hf auth login` saved).
        from_dir: Convert this local Hugging Face folder (config.json, safetensors, tokenizer
            files) instead of downloading.
        from_gguf: Import this GGUF file (llama.cpp, Ollama, LM Studio) instead of downloading;
            the checkpoint is <checkpoint_dir>/<repo_id>, or the file's name without .gguf.
        dtype: Store the weights as float32, float16 or bfloat16 (default: as published;
            float32 for a GGUF).
        dataset: A Hugging Face data set repo, `org/name`, to download instead of a model: its
            parquet, JSON(L), text, CSV and TSV files.
        files: With --dataset, only the files matching this glob (`"data/train-*"`) or these
            globs (`"[*.parquet, *.json]"`).
    """
    if dataset is not None:
        files = [files] if isinstance(files, str) else files
        download_dataset(dataset, repo_id, revision, access_token, files)
        return
    if files is not None:
        raise UserError("--files applies to --dataset downloads")
    if from_gguf is not None:
        download_gguf(
            Path(from_gguf), repo_id, checkpoint_dir, from_dir, revision, access_token, dtype
        )
        return
    if repo_id is None:
        raise UserError(
            "name a model (llmcycle download org/name), a data set (--dataset org/name), or list"
        )
    if repo_id == "list":
        print_model_table()
        return
    out_dir = checkpoint_dir / checked_repo_id(repo_id)
    if from_dir is None:
        from lifecycle_cli.zoo.hub import fetch

        token = access_token or os.environ.get("HF_TOKEN") or None
        hf_dir = fetch(repo_id, revision=revision, token=token)
    elif revision is not None or access_token is not None:
        raise UserError("--revision and --access_token apply to Hub downloads, not --from_dir")
    else:
        hf_dir = Path(from_dir)
    from lifecycle_cli.zoo.convert import convert_hf_checkpoint

    # The conversion writes atomically; on failure, also take back the folders made for it.
    made = [p for p in (out_dir.parent, checkpoint_dir) if not p.exists()]
    try:
        config = convert_hf_checkpoint(hf_dir, out_dir, dtype=dtype, name=repo_id.split("/")[-1])
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    source = repo_id if from_dir is None else str(from_dir)
    print(f"Converted {source} ({config.hf_model_type}) into {out_dir}")


def download_gguf(
    path: Path,
    repo_id: Optional[str],
    checkpoint_dir: Path,
    from_dir: Optional[Path],
    revision: Optional[str],
    access_token: Optional[str],
    dtype: Optional[str],
) -> None:
    if from_dir is not None or revision is not None or access_token is not None:
        raise UserError("--from_gguf takes none of --from_dir, --revision, --access_token")
    from lifecycle_cli.zoo.gguf import import_gguf

    out_dir = checkpoint_dir / checked_repo_id(repo_id or path.name.removesuffix(".gguf"))
    config = import_gguf(path, out_dir, dtype=dtype, name=out_dir.name)
    print(f"Imported {path} ({config.hf_model_type}) into {out_dir}")


def download_dataset(
    dataset: str,
    repo_id: Optional[str],
    revision: Optional[str],
    access_token: Optional[str],
    files: Optional[list[str]],
) -> None:
    if repo_id is not None:
        raise UserError(f"give a model ({repo_id}) or --dataset {dataset}, not both")
    from lifecycle_cli.zoo.hub import fetch_dataset

    token = access_token or os.environ.get("HF_TOKEN") or None
    folder = fetch_dataset(checked_repo_id(dataset), revision=revision, token=token, files=files)
    count = sum(1 for p in folder.rglob("*") if p.is_file())
    print(f"Downloaded {count} file(s) of the data set {dataset} into {folder}")
    print(f"Train on them with --data.path {folder}")


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
