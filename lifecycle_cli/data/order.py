"""The sample order every training dataset shares, so the loop's data position is one integer.

Global sample index i reads item perm_e[i % n] of epoch e = i // n, where perm_e is a
permutation of the n items that depends on (seed, e) only. Any rank can therefore read its slice
of any global batch, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np


def sample_items(
    indices: Sequence[int], n: int, seed: Optional[int], cache: dict[int, np.ndarray]
) -> np.ndarray:
    """Item index of each global sample index (seed None: dataset order, epoch after epoch).

    `cache` keeps the permutations of the last two epochs seen (a batch spans at most two).
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if n == 0:
        raise IndexError("the dataset is empty")
    if idx.size and idx.min() < 0:
        raise IndexError(f"sample indices must be >= 0, got {int(idx.min())}")
    epochs, pos = np.divmod(idx, n)
    if seed is None:
        return pos
    out = np.empty_like(pos)
    for epoch in np.unique(epochs).tolist():
        perm = cache.get(epoch)
        if perm is None:
            import torch

            g = torch.Generator().manual_seed(seed + epoch)
            perm = torch.randperm(n, generator=g).numpy()
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[epoch] = perm
        where = epochs == epoch
        out[where] = perm[pos[where]]
    return out
