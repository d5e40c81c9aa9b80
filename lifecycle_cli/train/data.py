"""What the loop needs of a task's data: a length and batches by global sample index.

The datasets in `lifecycle_cli.data` (token blocks, SFT and classification examples) satisfy it
structurally. A batch is either a (B, T + 1) tensor of token blocks or a dict of tensors; a dict
may carry `n_tokens` (the tokens the model really reads) for the throughput figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, Union

if TYPE_CHECKING:
    from torch import Tensor

Batch = Union["Tensor", dict[str, "Tensor"]]


class TrainData(Protocol):
    """Samples by index: step s of the loop reads samples [s*G, (s+1)*G) of an endless stream,
    so `get` takes any index (the dataset wraps around and orders its samples by its seed)."""

    def __len__(self) -> int:
        """Samples in one pass (an epoch)."""
        ...

    def get(self, indices: Sequence[int]) -> Batch:
        """The batch of these samples."""
        ...
