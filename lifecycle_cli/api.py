"""The Python API: `LLM.load(folder)` gives the model and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lifecycle_cli.checkpoint import load_model
from lifecycle_cli.config import Config
from lifecycle_cli.model import GPT
from lifecycle_cli.tokenizer import Tokenizer


class LLM:
    """A loaded checkpoint: `llm.model` (the GPT module) and `llm.tokenizer`."""

    def __init__(self, model: GPT, tokenizer: Optional[Tokenizer], checkpoint_dir: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint_dir = checkpoint_dir

    @property
    def config(self) -> Config:
        return self.model.config

    @classmethod
    def load(
        cls,
        checkpoint_dir: Path | str,
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> LLM:
        """Load any checkpoint folder the tool wrote (float32 on CPU unless `dtype` says)."""
        checkpoint_dir = Path(checkpoint_dir)
        model = load_model(checkpoint_dir, device=device, dtype=dtype)
        has_tokenizer = (checkpoint_dir / "tokenizer.json").is_file()
        return cls(model, Tokenizer(checkpoint_dir) if has_tokenizer else None, checkpoint_dir)
