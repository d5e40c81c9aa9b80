"""A reward model: the one GPT with a scalar head on the hidden state of a response's last token.

Trained by `align --objective reward_model` (Bradley-Terry: -log sigmoid(r(chosen) -
r(rejected))). Its folder is a plain checkpoint plus `reward_head.safetensors` and
`reward_model.json` (what marks it as a reward model), so it still loads as a language model
everywhere and `RewardModel.load` reads it back for `evaluate --reward_model` and GRPO.

The position scored is that of the last response token before the end-of-sequence token: the
hidden state that has read the whole response, the same whether or not the eos follows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lifecycle_cli.errors import UserError
from lifecycle_cli.model import GPT

HEAD_FILE = "reward_head.safetensors"
MARKER_FILE = "reward_model.json"


class RewardModel(nn.Module):
    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def max_seq_length(self) -> int:
        return self.gpt.max_seq_length

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and (B,) positions of each row's last response token -> (B,)."""
        hidden = self.gpt(input_ids, return_hidden=True)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        return self.head(hidden[rows, last_index]).squeeze(-1).float()

    def save_head(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(folder / HEAD_FILE))
        marker = {"kind": "reward_model", "head": HEAD_FILE, "scores": "last response token"}
        (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path | str, device="cpu") -> RewardModel:
        from safetensors.torch import load_file

        from lifecycle_cli.checkpoint import load_model

        folder = Path(folder)
        if not is_reward_model(folder):
            raise UserError(
                f"{folder} is not a reward model (no {MARKER_FILE}); train one with "
                "`llmcycle align CKPT --objective reward_model`"
            )
        model = cls(load_model(folder, device=device))
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
        """Rewards (N,) of token sequences prompt + response (without the eos)."""
        device = self.head.weight.device
        out = []
        for start in range(0, len(sequences), batch_size):
            chunk = [list(s) for s in sequences[start : start + batch_size]]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
            last = torch.tensor([len(s) - 1 for s in chunk])
            out.append(self(ids.to(device), last.to(device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def is_reward_model(folder: Path | str) -> bool:
    return (Path(folder) / MARKER_FILE).is_file()


def last_response_index(labels: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last labelled position of a preference batch: the input position
    that holds the response's last token (its label is the eos)."""
    positions = torch.arange(labels.size(1), device=labels.device).expand_as(labels)
    return torch.where(labels != -100, positions, 0).amax(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected) (InstructGPT's reward-model loss)."""
    return -F.logsigmoid(chosen - rejected)
