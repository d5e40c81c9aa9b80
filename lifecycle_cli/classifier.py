"""A class head on the one GPT: the hidden state of each text's last real token -> classes.

The GPT keeps its LM head untouched; the class head and the label names are saved beside the
checkpoint (`classifier.safetensors`, `labels.json`), so the folder still loads as a language
model everywhere and `Classifier.load` reads it back as a classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lifecycle_cli.errors import UserError
from lifecycle_cli.model import GPT

HEAD_FILE = "classifier.safetensors"
LABELS_FILE = "labels.json"


class Classifier(nn.Module):
    def __init__(self, gpt: GPT, labels: list[str]) -> None:
        super().__init__()
        self.gpt, self.labels = gpt, list(labels)
        self.config = gpt.config
        self.head = nn.Linear(gpt.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and (B,) last real positions -> (B, n_classes) logits."""
        hidden = self.gpt(input_ids, return_hidden=True)
        return self.head(hidden[torch.arange(hidden.size(0), device=hidden.device), last_index])

    def save_head(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(folder / HEAD_FILE))
        (folder / LABELS_FILE).write_text(json.dumps(self.labels, indent=2))

    @classmethod
    def load(cls, checkpoint_dir: Path | str) -> Classifier:
        from safetensors.torch import load_file

        from lifecycle_cli.checkpoint import load_model

        folder = Path(checkpoint_dir)
        if not (folder / HEAD_FILE).is_file():
            raise UserError(f"{folder} has no {HEAD_FILE}: not a classification checkpoint")
        labels = json.loads((folder / LABELS_FILE).read_text())
        model = cls(load_model(folder), labels)
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return model.eval()


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["last_index"]).float(), batch["labels"])


@torch.no_grad()
def confusion(model: nn.Module, data, batch_size: int = 32) -> torch.Tensor:
    """(true class, predicted class) counts over the whole dataset, in dataset order."""
    n = len(data.labels)
    table = torch.zeros(n, n, dtype=torch.long)
    device = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        batch = data.get(range(start, min(start + batch_size, len(data))))
        logits = model(batch["input_ids"].to(device), batch["last_index"].to(device))
        for truth, pred in zip(batch["labels"].tolist(), logits.argmax(-1).tolist()):
            table[truth, pred] += 1
    return table


def format_confusion(table: torch.Tensor, labels: list[str]) -> str:
    width = max(8, *(len(label) for label in labels)) + 2
    lines = ["true \\ predicted".ljust(width) + "".join(lab.rjust(width) for lab in labels)]
    for label, row in zip(labels, table.tolist()):
        lines.append(label.ljust(width) + "".join(str(c).rjust(width) for c in row))
    return "\n".join(lines)
