"""`--data.mix`: sources sampled by weight, deterministic, resumable, reported as a table."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from lifecycle_cli.cli import main
from lifecycle_cli.curate.mixture import ROUND, MixedBlocks, quotas
from lifecycle_cli.data.args import TextData
from lifecycle_cli.data.text import prepare
from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import train_bpe
from lifecycle_cli.train.logs import read_metrics

SEQ = 16


def words(letters: str, n: int, rng: random.Random) -> str:
    return " ".join("".join(rng.choices(letters, k=rng.randint(2, 7))) for _ in range(n))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Two corpora whose tokens cannot be confused: "low" writes only a-m, "high" only n-z;
    "low" is twice as large."""
    folder = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    out = {}
    for name, letters, docs in (("low", "abcdefghijklm", 120), ("high", "nopqrstuvwxyz", 60)):
        path = folder / f"{name}.jsonl"
        with path.open("w") as f:
            for _ in range(docs):
                f.write(json.dumps({"text": words(letters, 60, rng)}) + "\n")
        out[name] = path
    out["tokenizer"] = folder / "tok"
    train_bpe([out["low"].with_suffix(".jsonl")], 300, out["tokenizer"],
              texts=[path.read_text() for path in (out["low"], out["high"])])  # fmt: skip
    return out


def mix_data(corpora, cache: Path, low: float = 3, high: float = 1) -> TextData:
    return TextData(
        mix={"low": {"path": corpora["low"], "weight": low},
             "high": {"path": corpora["high"], "weight": high}},
        cache_dir=cache, num_workers=0,
    )  # fmt: skip


def source_by_content(tokenizer, blocks) -> list[str]:
    """Which corpus each block's text comes from, read from its letters alone."""
    out = []
    for row in blocks.tolist():
        text = tokenizer.decode(row).replace("<|endoftext|>", " ")  # eos, between documents
        letters = {c for c in text if c.isalpha()}
        assert letters and (letters <= set("abcdefghijklm") or letters <= set("nopqrstuvwxyz"))
        out.append("low" if letters <= set("abcdefghijklm") else "high")
    return out


def test_quotas_follow_the_weights():
    assert quotas([3, 1]).tolist() == [7500, 2500]
    q = quotas([67, 15, 4.5, 4.5, 4.5, 2.5, 2])  # LLaMA's mixture
    assert q.sum() == ROUND and q.tolist()[:2] == [6700, 1500]
    assert quotas([1, 1e-9]).tolist() == [ROUND - 1, 1]  # a source is never starved


def test_every_source_reads_its_samples_in_turn_across_rounds(corpora, tmp_path):
    from lifecycle_cli.tokenizer import Tokenizer

    train, _ = prepare(mix_data(corpora, tmp_path), Tokenizer(corpora["tokenizer"]), SEQ)
    source, within = train.locate(range(3 * ROUND))  # three whole rounds
    for s, share in ((0, 0.75), (1, 0.25)):
        mine = np.sort(within[source == s])
        # Each sample of a source is read once: no round repeats another...
        assert (mine == np.arange(len(mine))).all()
        assert len(mine) == 3 * ROUND * share  # ...and each round holds its exact share


def test_three_to_one_shares_hold_and_a_resumed_stream_is_the_same(corpora, tmp_path):
    from lifecycle_cli.tokenizer import Tokenizer

    tok = Tokenizer(corpora["tokenizer"])
    train, val = prepare(mix_data(corpora, tmp_path), tok, SEQ, seed=5)
    assert isinstance(train, MixedBlocks)
    n = 3000
    blocks = train.get(range(n))
    # Token shares, measured on what the blocks hold (each block is SEQ + 1 tokens of one source)
    seen = source_by_content(tok, blocks)
    share = seen.count("low") / n
    assert abs(share - 0.75) < 0.03
    # The larger source is not oversampled because it is larger: 3:1 despite sizes 2:1.
    assert train.sources[0].num_tokens > 1.5 * train.sources[1].num_tokens
    # A restarted process (the cache reopened) resuming at sample k reads exactly what the
    # uninterrupted run reads from k on, with the same proportions.
    again, _ = prepare(mix_data(corpora, tmp_path), tok, SEQ, seed=5)
    k = 1234
    assert (again.get(range(k, n)) == blocks[k:]).all()
    assert abs(seen[k:].count("low") / (n - k) - 0.75) < 0.03
    # Another seed: another order, same shares.
    other, _ = prepare(mix_data(corpora, tmp_path), tok, SEQ, seed=6)
    assert not (other.get(range(200)) == blocks[:200]).all()
    # Validation: every block of every source once per pass.
    assert len(val) == sum(len(s) for s in val.sources)
    assert set(source_by_content(tok, val.get(range(len(val))))) == {"low", "high"}


def test_the_table_gives_epochs_at_the_token_budget(corpora, tmp_path):
    from lifecycle_cli.tokenizer import Tokenizer

    train, _ = prepare(mix_data(corpora, tmp_path, 1, 1), Tokenizer(corpora["tokenizer"]), SEQ)
    rows = train.table(budget_tokens=100_000)
    low, high = rows
    assert (low["source"], low["weight"], high["weight"]) == ("low", 0.5, 0.5)
    assert low["epochs"] == pytest.approx(50_000 / low["tokens"])
    assert high["epochs"] == pytest.approx(50_000 / high["tokens"])


def test_bad_mixtures_are_one_line(corpora, tmp_path):
    from lifecycle_cli.tokenizer import Tokenizer

    tok = Tokenizer(corpora["tokenizer"])
    with pytest.raises(UserError, match="--data.mix high: weight must be > 0"):
        prepare(mix_data(corpora, tmp_path, 1, 0), tok, SEQ)
    both = mix_data(corpora, tmp_path)
    both.path = [corpora["low"]]
    with pytest.raises(UserError, match="--data.path or --data.mix, not both"):
        prepare(both, tok, SEQ)


def run_pretrain(corpora, out: Path, cache: Path, *extra: str) -> int:
    config = {
        "model_config": dict(name="mix-tiny", block_size=SEQ, n_layer=1, n_embd=32, n_head=2,
                             norm="rmsnorm", mlp="swiglu", bias=False, intermediate_size=64),
        "tokenizer_dir": str(corpora["tokenizer"]),
        "out_dir": str(out),
        "data": {"mix": {"low": {"path": str(corpora["low"]), "weight": 3},
                         "high": {"path": str(corpora["high"]), "weight": 1}},
                 "cache_dir": str(cache), "num_workers": 0, "dedup": "exact"},
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 4,
                  "save_interval": 2, "keep_last": None},
        "eval": {"interval": None, "max_iters": 2},
    }  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["pretrain", "--config", str(path), *extra])


def test_pretrain_on_a_mixture_saves_the_table_and_resumes_exactly(corpora, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert run_pretrain(corpora, tmp_path / "a", cache) == 0
    out = capsys.readouterr().out
    assert "Data mixture:" in out
    assert "Curation of low: removed 0 of 120 documents" in out  # one report per source
    assert "Curation of high: removed 0 of 60 documents" in out
    table = (tmp_path / "a" / "data_mix.tsv").read_text().splitlines()
    assert table[0] == "source\tdocuments\ttokens\tweight\tepochs"
    rows = {line.split("\t")[0]: line.split("\t") for line in table[1:]}
    assert float(rows["low"][3]) == 0.75 and float(rows["high"][3]) == 0.25
    budget = 4 * 4 * SEQ  # steps x global batch x tokens
    assert float(rows["high"][4]) == pytest.approx(budget * 0.25 / int(rows["high"][2]), 1e-4)
    # Resuming from step 2 in another folder continues with the same batches.
    resume = str(tmp_path / "a" / "step-000002")
    assert run_pretrain(corpora, tmp_path / "b", cache, "--resume", resume) == 0

    def losses(folder):
        rows = read_metrics(folder / "metrics.csv")
        return {int(r["step"]): float(r["train_loss"]) for r in rows if r["train_loss"]}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [3, 4]
    assert np.allclose([a[3], a[4]], [b[3], b[4]], rtol=0, atol=1e-6)
