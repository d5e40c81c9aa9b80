"""Token shards: parts of the input files -> one cached, memory-mapped token file per split.

Parts are tokenized once, in worker processes, each document followed by eos, into `train.bin`
and `val.bin` (uint16 or uint32, read with `numpy.memmap`) plus a manifest, in a cache folder
named by a hash of everything that decides the tokens (the files with their sizes and mtimes, the
tokenizer files, the split). Later calls, and the other ranks of a distributed run, reuse that
folder.

`TokenBlocks` serves a split as non-overlapping blocks of `seq_length + 1` tokens. Sample `i` of
the endless training stream is block `perm_e[i % n]` of epoch `e = i // n`, `perm_e` a permutation
derived from `(seed, e)` alone: the position in the data is one integer, and every rank can read
its slice of a global batch without talking to the others.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from lifecycle_cli.data import readers
from lifecycle_cli.data.corpus import rename_into_place
from lifecycle_cli.data.order import sample_items
from lifecycle_cli.data.readers import Part, plan, read_part
from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import TOKENIZER_FILES, Tokenizer

if TYPE_CHECKING:
    import torch

    from lifecycle_cli.curate.curation import Curation

MANIFEST = "manifest.json"
_FORMAT = 1  # bump when the layout or the tokenization rules change: old caches are then ignored
_BYTES_PER_WORKER = 4 << 20


def build_shards(
    train_files: list[Path],
    val_files: Optional[list[Path]],
    val_fraction: float,
    tokenizer: Tokenizer,
    cache_dir: Path,
    num_workers: Optional[int] = None,
    curation: Optional[Curation] = None,
) -> tuple[Path, dict]:
    """(cache folder, manifest) of the token shards of these files, tokenized now unless a
    complete cache of the same files, tokenizer, split and curation is already under
    `cache_dir`. Without `val_files`, `val_fraction` of the passages is held out, evenly
    spread. With `curation`, the documents it removes are left out (before the split) and the
    manifest's "curation" says how many documents and tokens each rule removed."""
    dtype = "uint16" if tokenizer.vocab_size < 1 << 16 else "uint32"
    key = {
        "format": _FORMAT,
        "train": _stats(train_files),
        "val": None if val_files is None else _stats(val_files),
        "val_fraction": None if val_files is not None else val_fraction,
        "tokenizer": _tokenizer_hash(tokenizer),
        "dtype": dtype,
        "part_bytes": readers.PART_BYTES,
        "passage_chars": readers.PASSAGE_CHARS,
    }
    if curation is not None:  # absent otherwise: caches made before curation stay valid
        key["curation"] = curation.key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir).expanduser() / digest
    manifest = _load_manifest(folder, key)
    if manifest is None:
        parts = plan(train_files, "auto" if val_files is None else "train")
        parts += plan(val_files or [], "val")
        workers = num_workers
        if workers is None:  # starting a worker costs about as much as tokenizing 2 MB
            total = sum(size for _, size, _ in key["train"] + (key["val"] or []))
            workers = min(_cpu_count(), max(1, total // _BYTES_PER_WORKER))
        workers = min(workers, len(parts))
        drops, report = [{} for _ in parts], None
        if curation is not None:
            from lifecycle_cli.curate.curation import select

            drops, report = select(parts, curation)
        jobs = list(zip(parts, drops))
        _build(folder, key, jobs, tokenizer, dtype, val_fraction, workers, report)
        manifest = _load_manifest(folder, key)
        if manifest is None:
            raise UserError(f"the token cache in {folder} is unreadable after writing it")
    return folder, manifest


def split_blocks(
    folder: Path, manifest: dict, split: str, seq_length: int, seed: Optional[int]
) -> TokenBlocks:
    """The blocks of `split` ("train" or "val") of the shards in `folder`."""
    info = manifest["splits"][split]
    blocks = TokenBlocks(
        folder / info["file"],
        info["tokens"],
        manifest["dtype"],
        seq_length,
        manifest["vocab_size"],
        folder / info["counts"],
        seed,
        info["documents"],
    )
    blocks.curation = manifest.get("curation")
    return blocks


# ---------------------------------------------------------------------------------------------
# Tokenizing: worker processes turn parts into token arrays; the parent writes the shards

_WORKER: dict = {}


def _typecode(dtype: str) -> str:
    if dtype == "uint16":
        return "H"
    return "I" if array.array("I").itemsize == 4 else "L"


Job = tuple[Part, dict[int, str]]  # a part and {passage index: why it is left out}
Tokenized = tuple[np.ndarray, np.ndarray, dict[str, int]]


def _tokenize_part(job: Job, tokenizer: Tokenizer, dtype: str) -> Tokenized:
    """The tokens of the kept passages of the part, the token count of each kept passage, and
    the tokens left out, by reason."""
    part, drop = job
    ids = array.array(_typecode(dtype))  # compact, unlike a list of Python ints
    lengths = array.array("q")
    removed: dict[str, int] = {}
    for k, (text, first, last) in enumerate(read_part(part)):
        tokens = tokenizer.encode(text, bos=None if first else False, eos=last)
        if k in drop:
            removed[drop[k]] = removed.get(drop[k], 0) + len(tokens)
            continue
        ids.extend(tokens)
        lengths.append(len(tokens))
    return np.frombuffer(ids, dtype=dtype), np.frombuffer(lengths, dtype=np.int64), removed


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _worker_task(job: Job) -> Tokenized | str:
    try:
        return _tokenize_part(job, _WORKER["tokenizer"], _WORKER["dtype"])
    except UserError as e:  # sent back as its message; the parent raises it again
        return str(e)


def _tokenize(
    jobs: list[Job], tokenizer: Tokenizer, dtype: str, num_workers: int
) -> Iterator[Tokenized]:
    """Tokenized parts, in order."""
    if num_workers <= 1:
        for job in jobs:
            yield _tokenize_part(job, tokenizer, dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the parent may hold threads (torch, the tokenizers library) that a fork
    # would copy in an undefined state. An executor, unlike multiprocessing.Pool, fails instead
    # of hanging when a worker dies.
    ctx = multiprocessing.get_context("spawn")
    chunk = max(1, min(16, len(jobs) // (num_workers * 4)))
    pool = ProcessPoolExecutor(num_workers, ctx, _init_worker, (tokenizer, dtype))
    try:
        for result in pool.map(_worker_task, jobs, chunksize=chunk):
            if isinstance(result, str):
                raise UserError(result)
            yield result
    except BrokenProcessPool:
        raise UserError(
            "a tokenizer worker process died (out of memory? or, in your own script, a call "
            'outside `if __name__ == "__main__":`); --data.num_workers 0 tokenizes in this '
            "process"
        ) from None
    finally:  # on an error, or when the caller stops early: do not tokenize the rest
        pool.shutdown(wait=True, cancel_futures=True)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _build(
    out: Path,
    key: dict,
    jobs: list[Job],
    tokenizer: Tokenizer,
    dtype: str,
    val_fraction: float,
    num_workers: int,
    curation: Optional[dict] = None,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.time()
    try:
        splits = {s: {"tokens": 0, "documents": 0} for s in ("train", "val")}
        counts = {s: np.zeros(tokenizer.vocab_size, np.int64) for s in splits}
        files = {s: open(tmp / f"{s}.bin", "wb") for s in splits}
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="Tokenizing", unit="part", disable=None, leave=False)
        try:
            index = 0  # of the passage among those the fraction splits
            tokenized = _tokenize(jobs, tokenizer, dtype, num_workers)
            for (part, _), (ids, lengths, removed) in zip(jobs, tokenized):
                for reason, n in removed.items():
                    curation["removed"][reason]["tokens"] += n
                if part.split == "auto":
                    i = np.arange(index, index + len(lengths), dtype=np.float64)
                    index += len(lengths)
                    # Passage i is held out when the running count floor(i * f) steps up: exactly
                    # floor(n * f) of n passages, evenly spread, whatever the parts or workers.
                    held_out = np.floor((i + 1) * val_fraction) > np.floor(i * val_fraction)
                else:
                    held_out = np.full(len(lengths), part.split == "val")
                mask = np.repeat(held_out, lengths)
                for split, chosen, docs in (("val", mask, held_out), ("train", ~mask, ~held_out)):
                    tokens = ids[chosen]
                    tokens.tofile(files[split])
                    counts[split] = _add_counts(counts[split], tokens)
                    splits[split]["tokens"] += len(tokens)
                    splits[split]["documents"] += int(docs.sum())
                bar.update()
        finally:
            bar.close()
            for f in files.values():
                f.close()
        for split, info in splits.items():
            np.save(tmp / f"{split}.counts.npy", counts[split])
            info.update(file=f"{split}.bin", counts=f"{split}.counts.npy")
        manifest = {
            "format": _FORMAT,
            "dtype": dtype,
            "vocab_size": tokenizer.vocab_size,
            "splits": splits,
            "key": key,
            "seconds": round(time.time() - started, 3),
        }
        if curation is not None:
            manifest["curation"] = curation
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if _file_stats(key) != (key["train"], key["val"]):
            raise UserError("input files changed while they were being tokenized; run again")
        if out.exists():
            if _load_manifest(out, key) is not None:
                return  # another process (a rank without a barrier) finished first: keep its
            shutil.rmtree(out, ignore_errors=True)  # a damaged cache of the same key
        rename_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _add_counts(counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    new = np.bincount(tokens, minlength=len(counts))
    if len(new) > len(counts):  # ids beyond vocab_size: should not happen, but stay correct
        counts = np.pad(counts, (0, len(new) - len(counts)))
    counts += new
    return counts


def _stats(files: Sequence[Path]) -> list[list]:
    out = []
    for path in files:
        try:
            st = path.stat()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _file_stats(key: dict) -> tuple[list, list | None]:
    train = _stats([Path(p) for p, _, _ in key["train"]])
    val = None if key["val"] is None else _stats([Path(p) for p, _, _ in key["val"]])
    return train, val


def _tokenizer_hash(tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(tokenizer.checkpoint_dir) / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    h.update(json.dumps([tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size]).encode())
    return h.hexdigest()


def _load_manifest(folder: Path, key: dict) -> dict | None:
    """The manifest of a complete cache folder for `key`, or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != _FORMAT or manifest.get("key") != key:
            return None
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for info in manifest["splits"].values():
            if (folder / info["file"]).stat().st_size != info["tokens"] * itemsize:
                return None
            if not (folder / info["counts"]).is_file():
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


# ---------------------------------------------------------------------------------------------
# Serving blocks


class TokenBlocks:
    """One split as non-overlapping blocks of `seq_length + 1` tokens (the remainder dropped).

    `get(indices)` takes global sample indices of an endless stream. With a `seed`, sample `i`
    is block `perm_e[i % n]` of epoch `e = i // n`, where `perm_e` depends on `(seed, e)` only;
    without one (validation) it is block `i % n`, so `get(range(len(blocks)))` is every block in
    order.
    """

    def __init__(
        self,
        path: Path,
        num_tokens: int,
        dtype: str,
        seq_length: int,
        vocab_size: int,
        counts_path: Path,
        seed: Optional[int] = None,
        num_documents: int = 0,
    ) -> None:
        self.path, self.num_tokens, self.dtype = Path(path), num_tokens, dtype
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed
        self.counts_path, self.num_documents = Path(counts_path), num_documents
        self.num_blocks = num_tokens // (seq_length + 1)
        self._tokens: Optional[np.ndarray] = None
        self._perms: dict[int, np.ndarray] = {}
        self.curation: Optional[dict] = None  # what curation removed from the corpus, if any

    def __len__(self) -> int:
        """Distinct blocks in one epoch."""
        return self.num_blocks

    def __repr__(self) -> str:
        return (
            f"TokenBlocks({str(self.path)!r}, {self.num_blocks} blocks of "
            f"{self.seq_length} + 1 tokens, seed={self.seed})"
        )

    def __getstate__(self) -> dict:
        # Pickled (data loader workers, spawned processes) as a path: reopened on first use.
        return {**self.__dict__, "_tokens": None, "_perms": {}}

    @property
    def tokens(self) -> np.ndarray:
        """The split's whole token stream (read-only memory map; remainder included)."""
        if self._tokens is None:
            if self.num_tokens == 0:
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens = np.memmap(self.path, self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def block_ids(self, indices: Sequence[int]) -> np.ndarray:
        """Which block each global sample index reads."""
        if self.num_blocks == 0:
            raise IndexError("no blocks: the split holds fewer than seq_length + 1 tokens")
        return sample_items(indices, self.num_blocks, self.seed, self._perms)

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """LongTensor (len(indices), seq_length + 1): the blocks of these global sample
        indices (a range, a list, an array)."""
        import torch

        width = self.seq_length + 1
        starts = self.block_ids(indices) * width
        rows = self.tokens[starts[:, None] + np.arange(width)]
        return torch.from_numpy(rows.astype(np.int64))

    def counts(self) -> np.ndarray:
        """How often each token id occurs in this split's blocks."""
        counts = np.load(self.counts_path)
        tail = self.tokens[self.num_blocks * (self.seq_length + 1) :]
        return counts - np.bincount(tail, minlength=len(counts))[: len(counts)]

    def unigram_loss(self, counts_from: Optional[TokenBlocks] = None) -> float:
        """Cross-entropy (nats per token) of this split's tokens under the unigram distribution
        of `counts_from`'s token counts (default: this split), add-one smoothed over the
        vocabulary: the loss of a model that learned token frequencies only.
        `val.unigram_loss(train)` is the baseline a pretrained model must beat."""
        own = self.counts()
        return unigram_loss(
            own, own if counts_from is None else counts_from.counts(), self.vocab_size
        )


def unigram_loss(own: np.ndarray, ref: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of tokens counted `own` under the add-one smoothed
    unigram distribution of the counts `ref`."""
    size = max(len(own), len(ref), vocab_size)
    own, ref = np.pad(own, (0, size - len(own))), np.pad(ref, (0, size - len(ref)))
    if own.sum() == 0:
        raise ValueError("unigram_loss of a split without blocks")
    logp = np.log(ref + 1.0) - np.log(ref.sum() + size)
    return float(-(own * logp).sum() / own.sum())
