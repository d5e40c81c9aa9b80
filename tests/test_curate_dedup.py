"""`--data.dedup` and `--data.filters`: planted duplicates and bad documents go, nothing else."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lifecycle_cli.curate.curation import describe
from lifecycle_cli.data.args import QualityFilters, TextData
from lifecycle_cli.data.text import prepare
from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import train_bpe

_letters = random.Random(0)
VOCAB = ["".join(_letters.choices("abcdefghijklmnopqrstuvwxyz", k=_letters.randint(2, 8)))
         for _ in range(400)] + ["the", "of", "and", "a", "to", "in", "is", "it"]  # fmt: skip


def document(rng: random.Random, n: int = 240) -> str:
    lines = [" ".join(rng.choices(VOCAB, k=12)) + "." for _ in range(n // 12)]
    return "\n".join(lines)


def change_words(text: str, k: int, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), k):
        words[i] = "changed"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 distinct documents, then: 3 exact copies (one with other whitespace), one more as a
    .txt file, and 3 near copies with 3 of 240 words changed."""
    rng = random.Random(1)
    folder = tmp_path_factory.mktemp("dedup")
    originals = [document(rng) for _ in range(40)]
    exact = [originals[3], originals[17], originals[29].replace("\n", "\n\n  ")]
    near = [change_words(originals[i], 3, rng) for i in (5, 21, 33)]
    records = originals[:20] + [exact[0], near[0]] + originals[20:] + exact[1:] + near[1:]
    with (folder / "docs.jsonl").open("w") as f:
        for text in records:
            f.write(json.dumps({"text": text}) + "\n")
    (folder / "zz-copy.txt").write_text(originals[8])
    tok = train_bpe(None, 600, folder / "tok", texts=records)
    return dict(folder=folder, originals=originals, near=near, tok=tok)


def curated(planted, cache: Path, **fields) -> tuple:
    """(training blocks, tokens of both splits, their text)."""
    data = TextData(path=[planted["folder"]], cache_dir=cache, num_workers=0, **fields)
    train, val = prepare(data, planted["tok"], 32)
    tokens = train.tokens.tolist() + val.tokens.tolist()
    return train, len(tokens), planted["tok"].decode(tokens)


def test_minhash_removes_exact_and_near_copies_and_nothing_else(planted, tmp_path):
    train, tokens, text = curated(planted, tmp_path, dedup="minhash")
    report = train.curation
    assert report["documents"] == 40 + 3 + 1 + 3
    assert report["removed"]["exact"]["documents"] == 4
    assert report["removed"]["near"]["documents"] == 3
    for original in planted["originals"]:
        assert text.count(original) == 1  # every original kept, once
    for copy in planted["near"]:
        assert copy not in text
    # The tokens removed are those of the copies (each document ends with eos).
    tok = planted["tok"]
    near_tokens = sum(len(tok.encode(t, eos=True)) for t in planted["near"])
    assert report["removed"]["near"]["tokens"] == near_tokens
    _, whole, _ = curated(planted, tmp_path)  # no curation
    removed = sum(r["tokens"] for r in report["removed"].values())
    assert tokens + removed == whole


def test_exact_keeps_near_copies_and_the_cache_key_includes_the_settings(planted, tmp_path):
    train, _, text = curated(planted, tmp_path, dedup="exact")
    assert list(train.curation["removed"]) == ["exact"]
    assert train.curation["removed"]["exact"]["documents"] == 4
    assert all(copy in text for copy in planted["near"])
    # Same settings: the same cache folder, read back; other settings: another folder.
    again = curated(planted, tmp_path, dedup="exact")[0]
    assert again.path == train.path and again.curation == train.curation
    other = curated(planted, tmp_path, dedup="minhash")[0]
    plain = curated(planted, tmp_path)[0]
    assert len({train.path.parent, other.path.parent, plain.path.parent}) == 3
    assert plain.curation is None


def test_quality_filters_remove_the_planted_bad_documents(tmp_path):
    rng = random.Random(2)
    good = [document(rng) for _ in range(12)]
    bad = {
        "min_words": "too short to be a document",
        "max_symbol_ratio": " ".join("{}#@!%^&*" for _ in range(40)) + " " + document(rng, 24),
        "max_digit_ratio": " ".join(str(rng.randrange(10**8)) for _ in range(60)) + " the end",
        "max_repeated_lines": "\n".join(["click here to subscribe now"] * 30 + [document(rng, 24)]),
        "max_non_text": document(rng, 60) + "\x00\x01\x02\x03\x0e\x0f\x10\ufffd\x7f" * 12,
    }
    path = tmp_path / "mixed.jsonl"
    with path.open("w") as f:
        for text in good[:6] + list(bad.values()) + good[6:]:
            f.write(json.dumps({"text": text}) + "\n")
    tok = train_bpe(None, 500, tmp_path / "tok", texts=good + list(bad.values()))
    data = TextData(path=path, cache_dir=tmp_path / "c", num_workers=0, val_fraction=0.25,
                    filters=QualityFilters())  # fmt: skip
    train, val = prepare(data, tok, 16)
    removed = train.curation["removed"]
    assert {rule: r["documents"] for rule, r in removed.items()} == dict.fromkeys(bad, 1)
    for rule, text in bad.items():
        assert removed[rule]["tokens"] == len(tok.encode(text, eos=True)), rule
    kept = tok.decode(train.tokens.tolist() + val.tokens.tolist())
    assert all(text in kept for text in good)
    lines = describe(train.curation)
    assert lines[0].startswith("Curation: removed 5 of 17 documents")
    # A threshold turned off keeps what it would remove.
    off = QualityFilters(min_words=None)
    data = TextData(path=path, cache_dir=tmp_path / "c", num_workers=0, val_fraction=0.25,
                    filters=off)  # fmt: skip
    assert "min_words" not in prepare(data, tok, 16)[0].curation["removed"]


def test_bad_curation_settings_are_one_line(planted, tmp_path):
    with pytest.raises(UserError, match="--data.filters.max_digit_ratio must be a share"):
        curated(planted, tmp_path, filters=QualityFilters(max_digit_ratio=3))
    with pytest.raises(UserError, match="--data.dedup_threshold must be in"):
        curated(planted, tmp_path, dedup="minhash", dedup_threshold=1.5)


def test_parallel_workers_remove_the_same_documents(planted, tmp_path):
    one = TextData(path=[planted["folder"]], cache_dir=tmp_path / "a", num_workers=0,
                   dedup="minhash")  # fmt: skip
    two = TextData(path=[planted["folder"]], cache_dir=tmp_path / "b", num_workers=2,
                   dedup="minhash")  # fmt: skip
    a, _ = prepare(one, planted["tok"], 32)
    b, _ = prepare(two, planted["tok"], 32)
    assert a.curation == b.curation
    assert (a.tokens == b.tokens).all()
