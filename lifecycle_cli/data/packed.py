"""`PackedTokens`: the storage under the finetuning datasets.

Token sequences of different lengths (one per example) live in one flat int64 array with their
offsets, so a dataset of many short examples costs one array, not a list per example, and pickles
cheaply into data loader workers. Rows are read in the sample order every dataset shares
(`order.sample_items`): global sample index i reads sequence perm_e[i % n] of epoch e = i // n.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np

from lifecycle_cli.data.order import sample_items


class PackedTokens:
    """Sequences of token ids, stored flat; `seed` None reads them in order, epoch after epoch."""

    def __init__(self, sequences: Iterable[Sequence[int]], seed: Optional[int] = None) -> None:
        sequences = list(sequences)
        self.seed = seed
        self.lengths = np.array([len(x) for x in sequences], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        total = int(self._offsets[-1])
        self._ids = np.fromiter((t for x in sequences for t in x), np.int64, total)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perms": {}}  # the permutations are rebuilt on demand

    def ids(self, i: int) -> np.ndarray:
        """The token ids of sequence `i` (a view)."""
        return self._ids[self._offsets[i] : self._offsets[i + 1]]

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """Which sequence each global sample index reads."""
        return sample_items(indices, len(self), self.seed, self._perms)
