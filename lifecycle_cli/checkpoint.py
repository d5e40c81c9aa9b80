"""Checkpoint folders: write them atomically, read them back.

A folder holds `model_config.yaml`, `model.safetensors` (or shards plus
`model.safetensors.index.json`), the tokenizer files and, where known, `generation_config.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lifecycle_cli.config import CONFIG_FILE, Config
from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from lifecycle_cli.model import GPT

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


@contextmanager
def atomic_dir(out_dir: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; it becomes `out_dir` only if the block succeeds.

    A crash leaves `out_dir` as it was (an old version survives until the new one is complete).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


class ShardWriter:
    """Write tensors one at a time into safetensors shards of at most `max_shard_bytes`.

    Holds at most one shard in memory. One shard is named `model.safetensors`; several are
    `model-0000i-of-0000N.safetensors` with an index, as Hugging Face names them.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out_dir / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.out_dir / WEIGHTS_FILE)
            return
        weight_map, n = {}, len(self.shards)
        for i, (path, names) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in index order when sharded; [] if none."""
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{folder / INDEX_FILE} is damaged: expected JSON with a weight_map of tensor "
                "names to shard files"
            ) from None
        return [folder / name for name in names]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    return sorted(folder.glob("*.safetensors"))


def iter_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from safetensors files, one tensor in memory at a time. A missing,
    truncated or corrupt file is a UserError naming it."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            why = getattr(e, "strerror", None) or " ".join(str(e).split())
            raise UserError(
                f"{path} cannot be read as safetensors ({why}): the file is truncated or "
                "corrupt; download, convert or save it again"
            ) from None


def check_checkpoint_dir(checkpoint_dir: Path | str) -> Path:
    """The folder as a Path, or a UserError saying what is missing."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    if (folder / "train_state" / ".metadata").is_file() and not weight_files(folder):
        raise UserError(
            f"{folder} is a sharded (FSDP) step folder, for --resume: its weights are "
            f"distributed-checkpoint shards; use {folder.parent / 'final'}, the consolidated model"
        )
    if not (folder / CONFIG_FILE).is_file():
        hint = (
            "; it looks like a Hugging Face folder: convert it with "
            f"`llmcycle download <name> --from_dir {folder}`"
            if (folder / "config.json").is_file()
            else ""
        )
        raise UserError(f"{folder} is not a checkpoint folder: no {CONFIG_FILE}{hint}")
    if not weight_files(folder):
        raise UserError(f"checkpoint folder {folder} has no {WEIGHTS_FILE}")
    return folder


def load_config(checkpoint_dir: Path | str) -> Config:
    return Config.from_file(check_checkpoint_dir(checkpoint_dir) / CONFIG_FILE)


def save_checkpoint(
    out_dir: Path | str,
    model: GPT,
    tokenizer_dir: Optional[Path] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `model` (config and weights) and the tokenizer files of `tokenizer_dir`."""
    with atomic_dir(out_dir) as tmp:
        write_checkpoint_files(
            tmp, model.config, model.state_dict(), tokenizer_dir, max_shard_bytes
        )
    return Path(out_dir)


def write_checkpoint_files(
    folder: Path,
    config: Config,
    state_dict: dict[str, torch.Tensor],
    tokenizer_dir: Optional[Path] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Fill an existing (temporary) folder with a checkpoint's files."""
    config.save(folder / CONFIG_FILE)
    writer = ShardWriter(folder, max_shard_bytes)
    for name, tensor in state_dict.items():
        if not (config.tie_embeddings and name == "lm_head.weight"):
            writer.add(name, tensor.detach())
    writer.close()
    if tokenizer_dir is not None:
        copy_side_files(Path(tokenizer_dir), folder)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files and generation_config.json travel with the weights."""
    from lifecycle_cli.tokenizer import copy_tokenizer_files

    copy_tokenizer_files(src, dst)
    if (src / GENERATION_CONFIG_FILE).is_file():
        shutil.copy2(src / GENERATION_CONFIG_FILE, dst / GENERATION_CONFIG_FILE)


def load_model(
    checkpoint_dir: Path | str,
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> GPT:
    """Build the model a checkpoint folder describes and load its weights."""
    import torch

    from lifecycle_cli.model import GPT

    folder = check_checkpoint_dir(checkpoint_dir)
    config = load_config(folder)
    with torch.device("meta"):
        model = GPT(config)
    # Cast on `meta`, then allocate: a bfloat16 model never passes through float32 memory.
    model = model.to(dtype or torch.float32).to_empty(device=device or "cpu")
    if config.tie_embeddings:  # to_empty gives every module its own tensor
        model.lm_head.weight = model.wte.weight
    load_weights(model, folder)
    model.reset_rope()
    return model.eval()


def load_weights(model: GPT, checkpoint_dir: Path | str) -> None:
    """Copy a checkpoint folder's weights into `model`, whose config must match the folder's."""
    folder = Path(checkpoint_dir)
    state = dict(iter_tensors(weight_files(folder)))
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state.get("wte.weight")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise UserError(
            f"{folder}: weights do not match the model config "
            f"(missing: {', '.join(missing[:3]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:3]) or 'none'}; "
            f"other shape: {', '.join(mismatched[:3]) or 'none'})"
        )
    model.load_state_dict(state)
