"""Pretraining text: `--data.*` -> (train, validation) blocks of tokens, cached and reused.

The jobs live apart: `corpus` (the text bundled with Python, the default data), `readers`
(which files `--data.path` names and the documents in them) and `shards` (tokenizing in
parallel into a cache of memory-mapped token files, served as `TokenBlocks`). `prepare` puts
them together for the pretrain verb; `resolve_files` and `iter_texts` are here too, for training
a tokenizer on the same documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from lifecycle_cli.data.args import TextData
from lifecycle_cli.data.corpus import bundled_corpus, cache_root
from lifecycle_cli.data.readers import iter_texts, resolve_files
from lifecycle_cli.data.shards import TokenBlocks, build_shards, split_blocks
from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import Tokenizer

__all__ = [
    "TextData",
    "TokenBlocks",
    "bundled_corpus",
    "cache_root",
    "iter_texts",
    "prepare",
    "resolve_files",
    "training_files",
]


def prepare(
    data: TextData, tokenizer: Tokenizer, seq_length: int, seed: int = 42
) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, validation) blocks of `seq_length + 1` tokens of `data`.

    Tokenizes the files once (each document followed by eos) and caches the shards under
    `data.cache_dir`; a later call with the same files, tokenizer, split and curation reuses
    them. Call it on one rank first and on the others after a barrier: they then only open the
    cache. With `data.mix` each source is prepared on its own and the result is a
    `MixedBlocks` sampling them by weight.
    """
    if seq_length < 1:
        raise UserError(f"the sequence length must be at least 1, got {seq_length}")
    if tokenizer.eos_id is None:
        raise UserError(
            f"the tokenizer in {tokenizer.checkpoint_dir} has no eos token to end documents with"
        )
    val_files = None if data.val_path is None else resolve_files(data.val_path)
    if val_files is None and not 0 < data.val_fraction < 1:
        raise UserError(
            f"--data.val_fraction must be between 0 and 1, got {data.val_fraction} "
            "(or give validation files with --data.val_path)"
        )
    if data.num_workers is not None and data.num_workers < 0:
        raise UserError(f"--data.num_workers must be >= 0, got {data.num_workers}")
    if data.mix is None:
        train_files = resolve_files(data.path)
        train, val = _blocks(data, train_files, val_files, tokenizer, seq_length, seed)
        _check_sizes(train, val, train_files, val_files, data.val_fraction)
        return train, val
    return _mixture(data, val_files, tokenizer, seq_length, seed)


def training_files(data: TextData) -> list[Path]:
    """Every training file `data` names: --data.path's, or all --data.mix sources'."""
    if data.mix is None:
        return resolve_files(data.path)
    files: dict[Path, None] = {}
    for source in data.mix.values():
        files.update(dict.fromkeys(resolve_files(source.path)))
    return list(files)


def _blocks(data, train_files, val_files, tokenizer, seq_length, seed):
    from lifecycle_cli.curate.curation import Curation

    cache_dir = data.cache_dir if data.cache_dir is not None else cache_root() / "tokens"
    curation = Curation.from_args(data)
    folder, manifest = build_shards(
        train_files, val_files, data.val_fraction, tokenizer, cache_dir, data.num_workers, curation
    )
    train = split_blocks(folder, manifest, "train", seq_length, seed)
    val = split_blocks(folder, manifest, "val", seq_length, None)
    report = manifest.get("curation")
    if report and report["documents"] and train.num_documents + val.num_documents == 0:
        raise UserError(
            f"--data.filters/--data.dedup removed all {report['documents']} documents of "
            f"{_describe(train_files)} ({', '.join(sorted(report['removed']))}); loosen them"
        )
    return train, val


def _mixture(data: TextData, val_files, tokenizer, seq_length: int, seed: int):
    from lifecycle_cli.curate.mixture import MixedBlocks

    if data.path is not None:
        raise UserError("give --data.path or --data.mix, not both")
    if not data.mix:
        raise UserError("--data.mix names no source")
    trains, vals, weights = {}, {}, {}
    for i, (name, source) in enumerate(data.mix.items()):
        if not source.weight > 0:
            raise UserError(f"--data.mix {name}: weight must be > 0, got {source.weight}")
        files = resolve_files(source.path)
        # A source holds out its own share, or none when --data.val_path is the validation.
        own_val = None if val_files is None else []
        train, val = _blocks(data, files, own_val, tokenizer, seq_length, seed + 7919 * (i + 1))
        if len(train) == 0:
            raise UserError(
                f"--data.mix {name}: {train.num_tokens} training tokens, fewer than one block "
                f"of seq_length + 1 = {seq_length + 1}; give it more text or use a shorter "
                "--train.max_seq_length"
            )
        trains[name], vals[name], weights[name] = train, val, source.weight
    if val_files is not None:
        # The validation files as the "training" split of their own shards.
        val, _ = _blocks(data, val_files, [], tokenizer, seq_length, None)
        val.seed, vals = None, {"val": val}
    train, val = MixedBlocks(trains, weights, seed), MixedBlocks(vals)
    train.curation = {name: t.curation for name, t in trains.items()}
    if len(val) == 0:
        raise UserError(
            f"the validation data of --data.mix holds {val.num_tokens} tokens, fewer than one "
            f"block of seq_length + 1 = {seq_length + 1}; raise --data.val_fraction, give "
            "--data.val_path or use a shorter --train.max_seq_length"
        )
    return train, val


def _describe(files: Sequence[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0]} and {len(files) - 1} other file(s)"


def _check_sizes(
    train: TokenBlocks,
    val: TokenBlocks,
    train_files: list[Path],
    val_files: Optional[list[Path]],
    val_fraction: float,
) -> None:
    width = train.seq_length + 1
    if train.num_documents + (0 if val_files else val.num_documents) == 0:
        raise UserError(f"no text in {_describe(train_files)}: the corpus is empty")
    if val_files is not None and val.num_documents == 0:
        raise UserError(f"no text in the validation data {_describe(val_files)}")
    if len(train) == 0:
        raise UserError(
            f"the training split holds {train.num_tokens} tokens ({train.num_documents} "
            f"document(s)), fewer than one block of seq_length + 1 = {width}; give more text or "
            "a shorter --train.max_seq_length"
        )
    if len(val) == 0:
        if val_files is not None:
            where = f"the validation data {_describe(val_files)} holds"
            fix = "give more validation text"
        else:
            total = train.num_documents + val.num_documents
            where = (
                f"the validation split ({val.num_documents} of {total} documents at "
                f"--data.val_fraction {val_fraction}) holds"
            )
            fix = "raise --data.val_fraction, give --data.val_path"
        raise UserError(
            f"{where} {val.num_tokens} tokens, fewer than one block of seq_length + 1 = "
            f"{width}; {fix} or use a shorter --train.max_seq_length"
        )
