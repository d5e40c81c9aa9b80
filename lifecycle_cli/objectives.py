"""Training objectives: what a batch's loss is. The loop does not know which one it runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens 0..t; `batch` is (B, T + 1)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def masked_sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100 (the response, by default)."""
    logits = model(batch["input_ids"])
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100
    )
