"""Contamination: which evaluation examples also occur in a training corpus.

As GPT-3's analysis (Brown et al. 2020, appendix C) does: an example is contaminated when one of
its word n-grams (13 by default; text lowercased, punctuation dropped) occurs in the corpus.
Examples shorter than n words are checked on their whole text, if they have at least
`MIN_WORDS` words; shorter ones are counted as too short to tell. The corpus is read as
pretraining reads it; n-grams across the passages of a long .txt document are seen too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from lifecycle_cli.errors import UserError

MIN_WORDS = 8
_WORD = re.compile(r"[^\W_]+")


def normalized_words(text: str) -> list[str]:
    """Lowercased words, punctuation and spacing dropped."""
    return _WORD.findall(text.lower())


def ngrams(words: Sequence[str], n: int) -> Iterable[str]:
    for i in range(len(words) - n + 1):
        yield " ".join(words[i : i + n])


def report(texts_by_task: dict[str, list[str]], corpus_paths: list[str], n: int = 13) -> list[dict]:
    """Per task: {"task", "examples", "contaminated", "share", "too_short"} for the examples
    with a word n-gram (or, shorter than n words, their whole text) in the corpus files
    (.txt, .jsonl, .parquet files or folders, read as pretraining reads them)."""
    from lifecycle_cli.data.readers import plan, read_part, resolve_files

    if n < 1:
        raise UserError(f"the n-gram length must be at least 1, got {n}")
    # n-gram -> the (task, example) pairs that hold it; short examples by their whole text.
    grams: dict[int, dict[str, set[tuple[str, int]]]] = {}
    too_short = dict.fromkeys(texts_by_task, 0)
    for task, texts in texts_by_task.items():
        for i, text in enumerate(texts):
            words = normalized_words(text)
            if len(words) < min(n, MIN_WORDS):
                too_short[task] += 1
                continue
            size = min(n, len(words))
            table = grams.setdefault(size, {})
            for gram in ngrams(words, size):
                table.setdefault(gram, set()).add((task, i))
    hit: set[tuple[str, int]] = set()
    files = resolve_files([Path(p) for p in corpus_paths])
    longest = max(grams, default=1)
    carry: list[str] = []  # the end of the previous passage of the same document
    for part in plan(files, "train"):
        for text, first, _ in read_part(part):
            words = (carry if not first else []) + normalized_words(text)
            for size, table in grams.items():
                for gram in ngrams(words, size):
                    found = table.get(gram)
                    if found:
                        hit |= found
            carry = words[len(words) - longest + 1 :] if longest > 1 else []
    rows = []
    for task, texts in texts_by_task.items():
        contaminated = sum(1 for key in hit if key[0] == task)
        rows.append(
            {
                "task": task,
                "examples": len(texts),
                "contaminated": contaminated,
                "share": contaminated / len(texts) if texts else 0.0,
                "too_short": too_short[task],
            }
        )
    return rows


def format_report(rows: list[dict], n: int = 13) -> list[str]:
    """The report as a table."""
    lines = [f"{'task':<24}{'examples':>10}{'contaminated':>14}{'share':>9}  ({n}-gram overlap)"]
    for r in rows:
        lines.append(
            f"{r['task']:<24}{r['examples']:>10,}{r['contaminated']:>14,}{100 * r['share']:>8.1f}%"
        )
    return lines
