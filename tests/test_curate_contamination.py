"""Contamination: evaluation examples planted in a training corpus are found, others are not."""

from __future__ import annotations

import json
import random

import pytest

from lifecycle_cli.curate.contamination import format_report, report
from lifecycle_cli.errors import UserError

_rng = random.Random(3)
VOCAB = ["".join(_rng.choices("abcdefghijklmnopqrstuvwxyz", k=_rng.randint(3, 9)))
         for _ in range(2000)]  # fmt: skip


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(VOCAB, k=n)).capitalize() + "."


def test_planted_examples_are_reported_per_task(tmp_path):
    rng = random.Random(4)
    qa = [sentence(rng, 20) + " " + sentence(rng, 6) for _ in range(20)]
    other = [sentence(rng, 30) for _ in range(10)]
    # Corpus: filler text with three qa examples copied in (one shouted, with other
    # punctuation), one across two passages of a long .txt file, and one of which only
    # 12 consecutive words (fewer than n = 13) appear.
    filler = [sentence(rng, 40) for _ in range(50)]
    docs = filler[:20] + [f"Q: {qa[2]} A: yes"] + filler[20:40]
    docs.append("Trivia! " + qa[7].upper().replace(" ", ", "))
    with (tmp_path / "web.jsonl").open("w") as f:
        for doc in docs + filler[40:]:
            f.write(json.dumps({"text": doc}) + "\n")
    # A long .txt file is read in passages cut at the first line break after 16,384
    # characters: one word per line from just before there puts the cut inside the example.
    # 24 words of the example, cut after 12: no 13-gram lies within one passage.
    words = qa[11].split()[:24]
    length = 16_383 - sum(len(w) + 1 for w in words[:12])
    filler_line = " ".join(rng.choices(VOCAB, k=4000))[:length]
    book = filler_line + "\n" + "\n".join(words) + "\n" + filler_line
    (tmp_path / "book.txt").write_text(book)
    partial = " ".join(qa[15].split()[3:15])
    (tmp_path / "notes.txt").write_text("See " + partial + " and so on.")

    rows = report({"qa": qa, "other": other, "tiny": ["Yes.", "No way"]}, [str(tmp_path)])
    by_task = {r["task"]: r for r in rows}
    assert by_task["qa"] == {
        "task": "qa", "examples": 20, "contaminated": 3, "share": 0.15, "too_short": 0,
    }  # fmt: skip
    assert by_task["other"]["contaminated"] == 0 and by_task["other"]["share"] == 0.0
    assert by_task["tiny"]["too_short"] == 2 and by_task["tiny"]["contaminated"] == 0
    # The partial copy counts at a shorter n.
    shorter = {r["task"]: r for r in report({"qa": qa}, [str(tmp_path)], n=10)}
    assert shorter["qa"]["contaminated"] == 4
    assert "qa" in format_report(rows)[1] and "15.0%" in format_report(rows)[1]


def test_bad_corpus_paths_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        report({"t": ["some words here"]}, [str(tmp_path / "missing")])
