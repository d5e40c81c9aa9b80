"""Pretraining text: files -> cached token shards -> blocks in a seeded, rank-independent order."""

import json
import math
import os
import pickle
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lifecycle_cli.data import readers, shards
from lifecycle_cli.data.text import (
    TextData,
    bundled_corpus,
    iter_texts,
    prepare,
    resolve_files,
)
from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import train_bpe

TOPICS = [topics[k] for k in sorted(topics)]
SHORT = [t for t in TOPICS if len(t) < 3000]  # one passage each


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe(None, 512, tmp_path_factory.mktemp("tok"), texts=TOPICS[:30])


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMCYCLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def write_parquet(path: Path, texts, **kwargs) -> Path:
    pq.write_table(pa.table({"text": texts}), path, **kwargs)
    return path


def encoded(tok, docs) -> list[int]:
    return [i for doc in docs for i in tok.encode(doc, eos=True)]


def documents(tok, tokens) -> list[str]:
    """The documents of a split's token stream (split at eos)."""
    ids = np.asarray(tokens)
    ends = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a:b]) for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_txt_jsonl_parquet_and_folders_give_the_tokens_of_each_document_plus_eos(tmp_path, tok):
    docs = SHORT[:10]
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deep").mkdir(parents=True)
    (corpus / "a.txt").write_text(docs[0], encoding="utf-8")
    write_jsonl(corpus / "b" / "c.jsonl", docs[1:5])
    with open(corpus / "b" / "c.jsonl", "a") as f:
        f.write("\n   \n")  # blank lines are no documents
    write_parquet(corpus / "b" / "deep" / "d.parquet", docs[5:8], row_group_size=2)
    (corpus / "notes.md").write_text("not text data")
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "e.txt").write_text(docs[8], encoding="utf-8")
    (tmp_path / "val.txt").write_text(docs[9], encoding="utf-8")

    files = resolve_files([corpus, tmp_path / "e.txt"])
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert names == ["corpus/a.txt", "corpus/b/c.jsonl", "corpus/b/deep/d.parquet", "e.txt"]
    assert list(iter_texts(files)) == docs[:9]

    data = TextData(path=[str(corpus), tmp_path / "e.txt"], val_path=tmp_path / "val.txt")
    train, val = prepare(data, tok, seq_length=16)
    assert train.tokens.dtype == np.uint16
    assert train.tokens.tolist() == encoded(tok, docs[:9])
    assert val.tokens.tolist() == encoded(tok, docs[9:])
    assert (train.num_documents, val.num_documents) == (9, 1)
    assert len(train) == len(train.tokens) // 17
    rows = train.get(range(len(train)))
    assert rows.dtype == torch.int64 and rows.shape == (len(train), 17)


def test_long_txt_cut_into_parts_and_passages_keeps_the_tokens(tmp_path, tok, monkeypatch):
    # Parts of ~3 kB for two workers, passages of ~700 characters: the tokens must still be
    # those of the whole file (blank lines, trailing spaces, indentation and non-ASCII at cuts).
    long = "\n\n".join(TOPICS[:12]) + "\nCafé “naïve” 中文 ok \n\nend\n"
    (tmp_path / "long.txt").write_text(long, encoding="utf-8")
    monkeypatch.setattr(readers, "PART_BYTES", 3000)
    monkeypatch.setattr(readers, "PASSAGE_CHARS", 700)
    passages = list(iter_texts([tmp_path / "long.txt"]))
    assert len(passages) > 20 and "".join(passages) == long

    data = TextData(path=[tmp_path / "long.txt"], val_fraction=0.1, num_workers=2)
    train, val = prepare(data, tok, seq_length=8)
    assert train.num_documents + val.num_documents == len(passages)
    # Each passage encoded alone (eos after the last) gives the tokens of the whole file...
    ids = [tok.encode(p, eos=i == len(passages) - 1) for i, p in enumerate(passages)]
    assert [i for piece in ids for i in piece] == tok.encode(long, eos=True)
    # ...and every 10th passage is held out.
    held = [i for i in range(len(passages)) if (i + 1) // 10 > i // 10]
    assert val.tokens.tolist() == [t for i in held for t in ids[i]]
    assert train.tokens.tolist() == [t for i, p in enumerate(ids) if i not in held for t in p]


def test_the_cache_is_reused_invalidated_and_never_trusted_half_written(
    tmp_path, tok, cache, monkeypatch
):
    f = write_jsonl(tmp_path / "docs.jsonl", SHORT[:40])
    calls = []
    real = shards._tokenize

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(shards, "_tokenize", counting)
    data = TextData(path=[f])
    train, val = prepare(data, tok, 16)
    manifest = next((cache / "tokens").glob("*/manifest.json"))
    stamp = manifest.stat().st_mtime_ns
    again, _ = prepare(data, tok, 16)
    shorter, _ = prepare(data, tok, 4)  # the block length is no part of the key
    assert len(calls) == 1 and manifest.stat().st_mtime_ns == stamp
    assert np.array_equal(again.tokens, train.tokens) and len(shorter) > len(train)

    # A changed file, or another split, is tokenized again.
    write_jsonl(f, SHORT[:41])
    os.utime(f, ns=(stamp + 10**9, stamp + 10**9))
    changed, changed_val = prepare(data, tok, 16)
    assert len(calls) == 2
    assert changed.num_documents + changed_val.num_documents == 41
    prepare(TextData(path=[f], val_fraction=0.2), tok, 16)
    assert len(calls) == 3

    # A damaged shard is not trusted; an interrupted build leaves nothing behind.
    changed.path.write_bytes(changed.path.read_bytes()[:-2])
    repaired, _ = prepare(data, tok, 16)
    assert len(calls) == 4 and repaired.num_tokens == changed.num_tokens

    def interrupted(*args):
        yield next(real(*args))
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_tokenize", interrupted)
    monkeypatch.setattr(readers, "PART_BYTES", 1000)
    with pytest.raises(KeyboardInterrupt):
        prepare(TextData(path=[f], val_fraction=0.3), tok, 16)
    folders = sorted(p.name for p in (cache / "tokens").iterdir())
    assert len(folders) == 3 and not any(n.startswith(".") for n in folders)


def test_sample_order_is_a_seeded_permutation_per_epoch_and_ranks_share_it(tmp_path, tok):
    f = write_jsonl(tmp_path / "docs.jsonl", SHORT[:30])
    train, val = prepare(TextData(path=[f]), tok, 8, seed=1)
    n, width = len(train), 9
    assert n >= 50
    blocks = np.asarray(train.tokens[: n * width]).reshape(n, width)
    ids = [train.block_ids(range(e * n, (e + 1) * n)) for e in range(3)]
    for e in range(3):
        assert sorted(ids[e].tolist()) == list(range(n))  # each epoch: every block once
        rows = train.get(range(e * n, (e + 1) * n)).numpy()
        assert np.array_equal(rows, blocks[ids[e]])
    assert not np.array_equal(ids[0], ids[1])

    # Another instance, a pickled copy (data loader workers) and the same seed agree; a
    # different seed does not.
    other, _ = prepare(TextData(path=[f]), tok, 8, seed=1)
    probe = [5, 3 * n + 2, 0, 7 * n - 1, n]
    assert train.get(probe).equal(other.get(probe))
    assert pickle.loads(pickle.dumps(train)).get(probe).equal(train.get(probe))
    reseeded, _ = prepare(TextData(path=[f]), tok, 8, seed=2)
    assert not np.array_equal(reseeded.block_ids(range(n)), ids[0])

    # Two ranks reading interleaved slices of each global batch of 8 see what one reader sees,
    # across an epoch boundary.
    world, batch = 2, 8
    for step in range(n // batch - 1, n // batch + 2):
        start = step * batch
        ranks = [train.get(range(start + r, start + batch, world)) for r in range(world)]
        together = np.empty((batch, width), dtype=np.int64)
        for r in range(world):
            together[r::world] = ranks[r].numpy()
        assert np.array_equal(together, train.get(range(start, start + batch)).numpy())

    # Validation: fixed order, every block once.
    v = val.get(range(len(val))).numpy()
    assert np.array_equal(v, np.asarray(val.tokens[: len(val) * width]).reshape(-1, width))

    # The unigram baseline is the cross-entropy under add-one smoothed train counts.
    counts = np.bincount(blocks.ravel(), minlength=tok.vocab_size)
    own = train.unigram_loss()
    p = (counts + 1) / (counts.sum() + tok.vocab_size)
    assert own == pytest.approx(-(counts * np.log(p)).sum() / counts.sum())
    baseline = val.unigram_loss(train)
    assert 0 < own < math.log(tok.vocab_size) and 0 < baseline < math.log(tok.vocab_size)


def test_validation_documents_are_held_out_whole_and_disjoint_from_training(tmp_path, tok):
    docs = [f"Document {i}. " + SHORT[i % 40][:300] for i in range(60)]
    f = write_jsonl(tmp_path / "docs.jsonl", docs)
    train, val = prepare(TextData(path=[f], val_fraction=0.1), tok, 8)
    held, kept = documents(tok, val.tokens), documents(tok, train.tokens)
    assert held == [docs[i] for i in range(9, 60, 10)]
    assert kept == [d for d in docs if d not in held]
    assert (train.num_documents, val.num_documents) == (54, 6)


def _bad_inputs(tmp: Path) -> list[tuple[TextData, str]]:
    def txt(name: str, content: str) -> Path:
        (tmp / name).write_text(content, encoding="utf-8")
        return tmp / name

    def jsonl(name: str, *lines: str) -> Path:  # two good lines, then these
        good = [json.dumps({"text": "fine"}), json.dumps({"text": "also fine"})]
        (tmp / name).write_text("\n".join([*good, *lines]) + "\n", encoding="utf-8")
        return tmp / name

    (tmp / "latin1.txt").write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    pq.write_table(pa.table({"body": ["x"]}), tmp / "no_text.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp / "ints.parquet")
    (tmp / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    (tmp / "data.csv").write_text("text\nhello\n")
    (tmp / "other").mkdir()
    (tmp / "other" / "readme.md").write_text("nothing to read")
    three = [json.dumps({"text": f"short document {i}"}) for i in range(3)]
    return [
        (
            TextData([txt("empty.txt", ""), txt("blank.txt", " \n\n\t")]),
            r"no text in .*empty\.txt and 1 other file\(s\): the corpus is empty",
        ),
        (TextData([jsonl("bad.jsonl", "{not json")]), r"bad\.jsonl:3: not a JSON line \(Expect"),
        (TextData([jsonl("b.jsonl", '{"txt": "x"}')]), r'b\.jsonl:3: .*string field "text", no'),
        (TextData([jsonl("n.jsonl", '{"text": 3}')]), r'n\.jsonl:3: .*"text" is int'),
        (TextData([jsonl("l.jsonl", "[1, 2]")]), r"l\.jsonl:3: .*found list"),
        (TextData([jsonl("s.jsonl", '{"text": "\\ud800"}')]), r's\.jsonl:3: "text" holds invalid'),
        (TextData([tmp / "latin1.txt"]), r"latin1\.txt:2: not UTF-8 text"),
        (
            TextData([tmp / "no_text.parquet"]),
            r'no_text\.parquet: no column "text" \(columns: body',
        ),
        (TextData([tmp / "ints.parquet"]), r'ints\.parquet: row 1: column "text" holds int'),
        (TextData([tmp / "broken.parquet"]), r"cannot read .*broken\.parquet as parquet"),
        (TextData([tmp / "data.csv"]), r"data\.csv: unsupported file type '\.csv'"),
        (TextData([tmp / "missing.txt"]), r"missing\.txt does not exist"),
        (TextData([tmp / "other"]), r"no \.txt, \.jsonl, \.parquet files in the folder .*other"),
        (
            TextData([jsonl("few.jsonl", *three)]),
            r"validation split \(0 of 5 documents at --data.val_fraction 0.05\) holds 0 tokens, "
            r"fewer than one block of seq_length \+ 1 = 33",
        ),
        (
            TextData([txt("tiny.txt", "tiny")], val_path=[jsonl("v.jsonl", *three * 9)]),
            r"training split holds \d+ tokens \(1 document\(s\)\), fewer than one block .* 33",
        ),
        (
            TextData([txt("t.txt", SHORT[0] * 3)], val_path=[txt("tv.txt", "x")]),
            r"validation data .*tv\.txt holds 2 tokens, fewer than one block",
        ),
        (TextData([txt("z.txt", "zero")], val_fraction=0), r"val_fraction must be between 0"),
    ]


def test_bad_input_ends_in_one_user_error_naming_file_and_line(tmp_path, tok):
    for data, message in _bad_inputs(tmp_path):
        with pytest.raises(UserError, match=message) as e:
            prepare(data, tok, 32)
        assert "\n" not in str(e.value)


def test_worker_processes_report_errors_intact(tmp_path, tok, monkeypatch):
    lines = [json.dumps({"text": t}) for t in SHORT[:40]]
    lines[33] = '{"text": "unterminated'
    f = tmp_path / "big.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(readers, "PART_BYTES", 4000)  # the bad line sits in a later part
    assert len(readers.plan([f], "auto")) > 5
    messages = []
    for workers in (0, 2):
        with pytest.raises(UserError) as e:
            prepare(TextData(path=[f], num_workers=workers), tok, 8)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{f}:34: not a JSON line (Unterminated string starting at")


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundled")


def test_bundled_corpus_is_a_few_mb_of_python_text_built_deterministically(tmp_path, corpus_root):
    files = bundled_corpus(corpus_root)
    stamps = [p.stat().st_mtime_ns for p in files]
    started = time.perf_counter()
    again = bundled_corpus(corpus_root)  # written once, then only listed
    assert time.perf_counter() - started < 0.5
    assert again == files and [p.stat().st_mtime_ns for p in again] == stamps
    fresh = bundled_corpus(tmp_path / "elsewhere")  # built a second time from scratch
    assert [p.name for p in fresh] == [p.name for p in files]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files, fresh))
    chars = sum(len(p.read_text(encoding="utf-8")) for p in files)
    assert 1_500_000 < chars < 6_000_000
    names = {p.name for p in files}
    assert {"topic-assert.txt", "module-json.decoder.txt"} <= names
    assert not any(
        n.startswith(("module-test.", "module-idlelib", "module-tkinter")) for n in names
    )
    assert (files[0].parent / "topic-assert.txt").read_text(encoding="utf-8") == topics["assert"]
    decoder = (files[0].parent / "module-json.decoder.txt").read_text(encoding="utf-8")
    assert "class JSONDecoder(object)\n    Simple JSON" in decoder


def test_pretraining_defaults_to_the_bundled_corpus(tok, corpus_root, monkeypatch):
    monkeypatch.setenv("LLMCYCLE_CACHE", str(corpus_root))
    train, val = prepare(TextData(), tok, 64)
    assert train.num_tokens > 1_000_000 and len(val) > 20
    assert val.num_documents == (train.num_documents + val.num_documents) // 20
    loss = val.unigram_loss(train)
    assert math.isfinite(loss) and 0 < loss < math.log(tok.vocab_size)
