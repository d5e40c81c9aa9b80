"""Data mixtures: several token sources sampled in proportion to their weights.

Global sample index i (the loop's data position, one integer) decides everything: it falls in
round r = i // R of R = `ROUND` samples, in which source s owns exactly q_s slots (its weight's
share of R, largest remainders rounded up), laid out by a permutation seeded with (seed, r).
Sample i is then sample r·q_s + (its rank among s's slots of the round) of source s, which
reads its own blocks epoch after epoch in its own seeded order. So shares are exact to 1/R
within every round, any rank can read any slice, and a resumed run reads on exactly as the
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np

from lifecycle_cli.data.shards import TokenBlocks, unigram_loss

if TYPE_CHECKING:
    import torch

ROUND = 10_000


def quotas(weights: Sequence[float], size: int = ROUND) -> np.ndarray:
    """Slots per source in a round of `size`: proportional to `weights`, largest remainders
    rounded up, and at least one for every source."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * size
    q = np.maximum(np.floor(exact).astype(np.int64), 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    k = 0
    while q.sum() < size:
        q[order[k % len(q)]] += 1
        k += 1
    while q.sum() > size:  # only when tiny weights were raised to one slot
        q[np.argmax(q)] -= 1
    return q


class MixedBlocks:
    """Blocks of several `TokenBlocks` sources. With `weights` (training) sample i comes from
    the source the round schedule gives it; without (validation) the sources are read one
    after another, in order, every block once per pass."""

    def __init__(
        self,
        sources: dict[str, TokenBlocks],
        weights: Optional[dict[str, float]] = None,
        seed: Optional[int] = None,
    ) -> None:
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.seed = seed
        self.weights = None if weights is None else [float(weights[n]) for n in self.names]
        self.seq_length = self.sources[0].seq_length
        self.vocab_size = max(s.vocab_size for s in self.sources)
        self.num_tokens = sum(s.num_tokens for s in self.sources)
        self.num_documents = sum(s.num_documents for s in self.sources)
        if self.weights is not None:
            self.quotas = quotas(self.weights)
            # Slot owners of a round before permuting, and each slot's rank within its source.
            self._owner = np.repeat(np.arange(len(self.sources)), self.quotas)
            self._offsets = np.concatenate([[0], np.cumsum(self.quotas)[:-1]])
        self._starts = np.cumsum([0] + [len(s) for s in self.sources])
        self._rounds: dict[int, np.ndarray] = {}
        self.curation: Optional[dict] = None  # source -> what curation removed from it

    def __len__(self) -> int:
        """Blocks over all sources (one pass of each)."""
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rounds": {}}

    def _round(self, r: int) -> np.ndarray:
        perm = self._rounds.get(r)
        if perm is None:
            if self.seed is None:
                perm = np.arange(ROUND)
            else:
                import torch

                g = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
                perm = torch.randperm(ROUND, generator=g).numpy()
            if len(self._rounds) >= 2:
                self._rounds.pop(next(iter(self._rounds)))
            self._rounds[r] = perm
        return perm

    def locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index within that source) of each global sample index."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.weights is None:
            pos = idx % len(self)
            source = np.searchsorted(self._starts, pos, side="right") - 1
            return source, pos - self._starts[source]
        source, within = np.empty_like(idx), np.empty_like(idx)
        rounds, slots = np.divmod(idx, ROUND)
        for r in np.unique(rounds).tolist():
            at = rounds == r
            slot = self._round(r)[slots[at]]  # the slot of the unpermuted round
            s = self._owner[slot]
            source[at] = s
            within[at] = r * self.quotas[s] + slot - self._offsets[s]
        return source, within

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """LongTensor (len(indices), seq_length + 1): the blocks of these global samples."""
        import torch

        source, within = self.locate(indices)
        out = torch.empty((len(source), self.seq_length + 1), dtype=torch.long)
        for s in np.unique(source).tolist():
            at = np.flatnonzero(source == s)
            out[torch.from_numpy(at)] = self.sources[s].get(within[at])
        return out

    def counts(self) -> np.ndarray:
        """How often each token id occurs in the sources' blocks."""
        size = self.vocab_size
        return sum(np.pad(c, (0, size - len(c))) for c in (s.counts() for s in self.sources))

    def unigram_loss(self, counts_from=None) -> float:
        """As `TokenBlocks.unigram_loss`, over all sources."""
        ref = self.counts() if counts_from is None else counts_from.counts()
        return unigram_loss(self.counts(), ref, self.vocab_size)

    def table(self, budget_tokens: Optional[int] = None) -> list[dict]:
        """One row per source: documents, tokens, weight (its share of the samples) and the
        epochs (passes over its tokens) the token budget takes from it."""
        shares = self.quotas / ROUND if self.weights is not None else None
        rows = []
        for i, (name, src) in enumerate(zip(self.names, self.sources)):
            row = {"source": name, "documents": src.num_documents, "tokens": src.num_tokens}
            if shares is not None:
                row["weight"] = float(shares[i])
                if budget_tokens is not None and src.num_tokens:
                    row["epochs"] = budget_tokens * float(shares[i]) / src.num_tokens
            rows.append(row)
        return rows


def format_table(rows: list[dict], budget_tokens: Optional[int] = None) -> list[str]:
    """The mixture as the papers print it (GPT-3's and LLaMA's tables)."""
    at = f"epochs at {budget_tokens:,} tokens" if budget_tokens else "epochs"
    lines = [f"{'source':<16}{'documents':>12}{'tokens':>14}{'weight':>9}{at:>28}"]
    for r in rows:
        epochs = f"{r['epochs']:.2f}" if "epochs" in r else "-"
        lines.append(
            f"{r['source']:<16}{r['documents']:>12,}{r['tokens']:>14,}"
            f"{100 * r.get('weight', 0):>8.1f}%{epochs:>28}"
        )
    return lines


def write_table(path, rows: list[dict]) -> None:
    """The table as tab-separated values (source, documents, tokens, weight, epochs)."""
    cols = ("source", "documents", "tokens", "weight", "epochs")
    text = "\t".join(cols) + "\n"
    for r in rows:
        text += "\t".join(_cell(r.get(c)) for c in cols) + "\n"
    from pathlib import Path

    Path(path).write_text(text, encoding="utf-8")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
