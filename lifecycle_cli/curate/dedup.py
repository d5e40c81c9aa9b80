"""Duplicate removal (`--data.dedup`): exact copies by content hash, near copies by MinHash LSH.

`Deduplicator.duplicate(text)` says whether a document repeats one seen before (and remembers
it if not), so the first copy of each document stays. Exact: SHA-256 of the text with runs of
whitespace made one space. Near (minhash): the MinHash of the document's word 5-grams
(lowercased) looked up in datasketch's `MinHashLSH` index, which finds earlier documents whose
estimated Jaccard similarity exceeds the threshold.
"""

from __future__ import annotations

import hashlib
from typing import Optional

from lifecycle_cli.errors import UserError

SHINGLE_WORDS = 5
NUM_PERM = 128


class Deduplicator:
    """Remembers the documents seen so far; `mode` is "exact" or "minhash" (exact first)."""

    def __init__(self, mode: str, threshold: float = 0.7) -> None:
        if mode not in ("exact", "minhash"):
            raise ValueError(f"unknown dedup mode {mode!r}")
        self.mode, self.threshold = mode, threshold
        self._hashes: set[bytes] = set()
        self._lsh = None
        if mode == "minhash":
            if not 0 < threshold < 1:
                raise UserError(f"--data.dedup_threshold must be in (0, 1), got {threshold}")
            try:
                from datasketch import MinHashLSH
            except ImportError:
                raise UserError(
                    "--data.dedup minhash needs datasketch: pip install 'llmcycle[curate]'"
                ) from None
            self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._count = 0

    def duplicate(self, text: str) -> Optional[str]:
        """ "exact" or "near" when `text` repeats an earlier document, else None (and it is
        remembered)."""
        words = text.split()
        digest = hashlib.sha256(" ".join(words).encode("utf-8")).digest()
        if digest in self._hashes:
            return "exact"
        self._hashes.add(digest)
        if self._lsh is None:
            return None
        sketch = minhash(words)
        if self._lsh.query(sketch):
            return "near"
        self._lsh.insert(self._count, sketch, check_duplication=False)
        self._count += 1
        return None


def minhash(words: list[str]):
    """The MinHash of a document's lowercased word 5-grams (the whole text when shorter)."""
    from datasketch import MinHash

    lower = [w.lower() for w in words]
    n = SHINGLE_WORDS
    shingles = {" ".join(lower[i : i + n]) for i in range(max(1, len(lower) - n + 1))}
    sketch = MinHash(num_perm=NUM_PERM, seed=1)
    sketch.update_batch([s.encode("utf-8") for s in shingles])
    return sketch
