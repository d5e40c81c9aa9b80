"""Curation while token shards are prepared: which documents the quality filters and the
deduplication leave out, and the report of what each removed.

`select` reads the parts once, in order, before they are tokenized: a document (a .jsonl line,
a .parquet row, a whole .txt file however many passages it is read in) passes the filters, then
the duplicate check, and the first rule it breaks is why it is dropped. The result, one
{passage index: reason} map per part, goes to the tokenizer workers, which leave those passages
out and count their tokens. The settings are part of the token cache's key, and the report is
saved in its manifest, so a cached corpus is curated once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from lifecycle_cli.data.args import QualityFilters, TextData
from lifecycle_cli.data.readers import Part, read_part


@dataclass(frozen=True)
class Curation:
    """What to remove: `dedup` none|exact|minhash (at `threshold`), and `filters`."""

    dedup: str = "none"
    threshold: float = 0.7
    filters: Optional[QualityFilters] = None

    @classmethod
    def from_args(cls, data: TextData) -> Optional[Curation]:
        """The curation `--data.*` asks for, or None when it asks for none."""
        if data.dedup == "none" and data.filters is None:
            return None
        if data.filters is not None:
            from lifecycle_cli.curate.filters import check

            check(data.filters)
        return cls(data.dedup, data.dedup_threshold, data.filters)

    def key(self) -> dict[str, Any]:
        """What decides the result, for the token cache's key."""
        return {
            "dedup": self.dedup,
            "threshold": self.threshold if self.dedup == "minhash" else None,
            "filters": None if self.filters is None else dataclasses.asdict(self.filters),
        }


def select(parts: list[Part], curation: Curation) -> tuple[list[dict[int, str]], dict]:
    """({passage index: reason} for each part, report) of the documents to leave out.

    The report holds the documents read and, per reason (a filter rule, "exact", "near"),
    the documents removed; the workers add the tokens removed.
    """
    from lifecycle_cli.curate.dedup import Deduplicator
    from lifecycle_cli.curate.filters import failed_rule

    dedup = None if curation.dedup == "none" else Deduplicator(curation.dedup, curation.threshold)
    drops: list[dict[int, str]] = [{} for _ in parts]
    removed: dict[str, dict[str, int]] = {}
    documents = 0
    pending: list[tuple[int, int, str]] = []  # (part, passage, text) of the document so far

    def decide() -> None:
        nonlocal documents
        text = "".join(t for _, _, t in pending)
        documents += 1
        reason = None if curation.filters is None else failed_rule(text, curation.filters)
        if reason is None and dedup is not None:
            reason = dedup.duplicate(text)
        if reason is not None:
            removed.setdefault(reason, {"documents": 0, "tokens": 0})["documents"] += 1
            for p, k, _ in pending:
                drops[p][k] = reason
        pending.clear()

    from tqdm import tqdm

    bar = tqdm(parts, desc="Curating", unit="part", disable=None, leave=False)
    for p, part in enumerate(bar):
        for k, (text, first, last) in enumerate(read_part(part)):
            if first and pending:  # the previous document ended without its last passage
                decide()
            pending.append((p, k, text))
            if last:
                decide()
    bar.close()
    if pending:
        decide()
    return drops, {"settings": curation.key(), "documents": documents, "removed": removed}


def describe(report: Optional[dict], name: str = "") -> list[str]:
    """Lines saying what curation removed: documents and tokens per reason."""
    if not report:
        return []
    removed = report["removed"]
    docs = sum(r["documents"] for r in removed.values())
    tokens = sum(r["tokens"] for r in removed.values())
    where = f" of {name}" if name else ""
    lines = [
        f"Curation{where}: removed {docs:,} of {report['documents']:,} documents "
        f"({tokens:,} tokens)"
        + ("" if not removed else ": " + ", ".join(
            f"{reason} {r['documents']:,} docs / {r['tokens']:,} tokens"
            for reason, r in sorted(removed.items())
        ))
    ]  # fmt: skip
    return lines
