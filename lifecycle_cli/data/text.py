"""Pretraining text: files -> cached, memory-mapped token shards -> blocks in a seeded order.

Inputs are `.txt` files (one document each), `.jsonl` files (one document per line, field
`text`) and `.parquet` files (one document per row, column `text`). They are tokenized once, in
worker processes, each document followed by eos, into one token file per split (`train.bin`,
`val.bin`: uint16 or uint32, read with `numpy.memmap`) plus a manifest, in a cache folder named by
a hash of everything that decides the tokens (the files with their sizes and mtimes, the tokenizer
files, the split). Later calls, and the other ranks of a distributed run, reuse that folder.

Work is cut into parts of about `_PART_BYTES` so that one huge file still keeps every worker busy:
`.jsonl` files at line starts, `.txt` files at "safe" line breaks (a newline between two
non-space characters; splitting there does not change what a GPT-2 style byte-level BPE produces)
and `.parquet` files by row group. A long `.txt` document is further read in passages of about
`_PASSAGE_CHARS` characters cut the same way; passages, like other documents, are the unit of the
train/validation split. The parts and passages depend only on the files, never on the number of
workers, so the tokens and the split do not either.

`TokenBlocks` serves a split as non-overlapping blocks of `seq_length + 1` tokens. Sample `i` of
the endless training stream is block `perm_e[i % n]` of epoch `e = i // n`, `perm_e` a permutation
derived from `(seed, e)` alone: the position in the data is one integer, and every rank can read
its slice of a global batch without talking to the others.
"""

from __future__ import annotations

import array
import ast
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sysconfig
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np

from lifecycle_cli.data.args import TextData
from lifecycle_cli.data.order import sample_items
from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import TOKENIZER_FILES, Tokenizer

if TYPE_CHECKING:
    import torch

SUFFIXES = (".txt", ".jsonl", ".parquet")
MANIFEST = "manifest.json"
_FORMAT = 1  # bump when the layout or the tokenization rules change: old caches are then ignored
_PART_BYTES = 8 << 20
_PASSAGE_CHARS = 1 << 14
_BYTES_PER_WORKER = 4 << 20
_CORPUS_VERSION = 1


def cache_root() -> Path:
    """Where llmcycle caches data: $LLMCYCLE_CACHE, else ~/.cache/llmcycle."""
    env = os.environ.get("LLMCYCLE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmcycle"


def resolve_files(paths: Optional[Sequence[Path]]) -> list[Path]:
    """The input files named by `paths`: files as given, folders expanded (recursively, sorted,
    hidden entries skipped) into their .txt/.jsonl/.parquet files; None: the bundled corpus."""
    if paths is None:
        return bundled_corpus()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: dict[Path, None] = {}
    for given in map(Path, paths):
        if given.is_dir():
            found = [
                p
                for p in sorted(given.rglob("*"))
                if p.suffix.lower() in SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(given).parts)
            ]
            if not found:
                raise UserError(f"no {', '.join(SUFFIXES)} files in the folder {given}")
            files.update(dict.fromkeys(found))
        elif given.is_file():
            if given.suffix.lower() not in SUFFIXES:
                raise UserError(
                    f"{given}: unsupported file type {given.suffix or '(no extension)'!r}; "
                    f"pretraining text must be {', '.join(SUFFIXES)}"
                )
            files[given] = None
        else:
            raise UserError(f"data path {given} does not exist")
    if not files:
        raise UserError("no data files given")
    return list(files)


# ---------------------------------------------------------------------------------------------
# The bundled corpus: text that ships with CPython

_STDLIB_SKIP = {
    "__pycache__",
    "__phello__",
    "dist-packages",
    "encodings",  # a hundred generated codec modules with the same boilerplate
    "ensurepip",
    "idlelib",
    "lib-dynload",
    "lib2to3",
    "pydoc_data",  # read as topics instead
    "site-packages",
    "tkinter",
    "turtledemo",
}


def bundled_corpus(cache_dir: Optional[Path] = None) -> list[Path]:
    """Text that ships with CPython, as .txt files in the cache (written once): each help topic
    of `pydoc_data.topics`, and for each standard-library module its docstrings in `help()`
    style (signatures with indented docstrings), read with `ast` from the .py sources (tests,
    idlelib, tkinter, encodings and site-packages left out). About 2.3 MB on CPython 3.11; the
    same files on every machine with the same Python. `cache_dir` defaults to `cache_root()`.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / "corpus" / f"cpython-{platform.python_version()}-v{_CORPUS_VERSION}"
    if not out.is_dir():
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for name, text in _corpus_documents():
                (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
            _rename_into_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out.glob("*.txt"))


def _corpus_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield "topic-" + re.sub(r"[^A-Za-z0-9._-]", "_", topic), topics[topic]
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = []
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = [
            d
            for d in subfolders
            if d not in _STDLIB_SKIP and not d.startswith(("test", "config-", "."))
        ]
        rel = Path(folder).relative_to(stdlib).parts
        sources += [(*rel, n) for n in names if n.endswith(".py") and not n.startswith("test")]
    for parts in sorted(sources):
        try:
            tree = ast.parse(Path(stdlib, *parts).read_bytes())
        except (SyntaxError, ValueError, OSError):  # deliberately broken test data, odd files
            continue
        module = ".".join(parts).removesuffix(".py").removesuffix(".__init__")
        text = _module_help(module, tree)
        if text:
            yield "module-" + module, text


def _module_help(module: str, tree: ast.Module) -> str:
    """A module's docstrings, laid out like `help(module)`; "" when it has none."""
    body: list[str] = []
    _members_help(tree, "", body)
    doc = ast.get_docstring(tree)
    if not doc and not body:
        return ""
    head = f"{module}\n{'=' * len(module)}\n\n" + (f"{doc}\n\n" if doc else "")
    return head + "".join(body)


def _members_help(node: ast.Module | ast.ClassDef, indent: str, out: list[str]) -> None:
    def docblock(doc: str, indent: str) -> str:
        return "".join(f"{indent}{line}\n" if line else "\n" for line in doc.splitlines()) + "\n"

    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(child)
            if doc:
                kind = "async def" if isinstance(child, ast.AsyncFunctionDef) else "def"
                out.append(f"{indent}{kind} {child.name}({ast.unparse(child.args)})\n")
                out.append(docblock(doc, indent + "    "))
        elif isinstance(child, ast.ClassDef):
            members: list[str] = []
            _members_help(child, indent + "    ", members)
            doc = ast.get_docstring(child)
            if doc or members:
                bases = ", ".join(ast.unparse(b) for b in child.bases)
                out.append(f"{indent}class {child.name}" + (f"({bases})\n" if bases else "\n"))
                out.append(docblock(doc, indent + "    ") if doc else "")
                out.extend(members)


# ---------------------------------------------------------------------------------------------
# Reading documents: files are cut into parts; a part yields passages


class _Part(NamedTuple):
    path: str
    kind: str  # "txt", "jsonl" or "parquet"
    start: int  # byte offset (txt, jsonl) or row group (parquet)
    end: int
    size: int  # file size (txt, jsonl) or number of rows before this row group (parquet)
    split: str  # "auto" (held out by fraction), "train" or "val"
    passage_chars: int


def _plan(files: Sequence[Path], split: str) -> list[_Part]:
    parts = []
    for path in files:
        kind = path.suffix.lower()[1:]
        if kind == "parquet":
            rows = 0
            meta = _parquet_file(path).metadata
            for group in range(meta.num_row_groups):
                parts.append(_Part(str(path), kind, group, group + 1, rows, split, 0))
                rows += meta.row_group(group).num_rows
            continue
        try:
            size = path.stat().st_size
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        n = max(1, math.ceil(size / _PART_BYTES))
        for i in range(n):
            start, end = i * size // n, (i + 1) * size // n
            parts.append(_Part(str(path), kind, start, end, size, split, _PASSAGE_CHARS))
    return parts


def _parquet_file(path: Path | str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for files it cannot read
        raise UserError(f"cannot read {path} as parquet: {e}") from None
    if "text" not in pf.schema_arrow.names:
        columns = ", ".join(pf.schema_arrow.names) or "none"
        raise UserError(f'{path}: no column "text" (columns: {columns})')
    return pf


def _read_part(part: _Part) -> Iterator[tuple[str, bool, bool]]:
    """(text, starts a document, ends a document) for each passage of `part`."""
    if part.kind == "txt":
        yield from _read_txt(part)
    elif part.kind == "jsonl":
        yield from ((text, True, True) for text in _read_jsonl(part))
    else:
        yield from ((text, True, True) for text in _read_parquet(part))


def iter_texts(files: Sequence[Path]) -> Iterator[str]:
    """The documents of `files` one by one, read as `prepare` reads them (for training a
    tokenizer); a long .txt file comes as consecutive passages. Raises the same UserErrors."""
    files = list(files)
    for path in files:
        for part in _plan([path], "train"):
            for text, _, _ in _read_part(part):
                yield text


def _is_safe_break(before: str, after: str) -> bool:
    # Byte-level BPE pre-tokenizers keep a newline between two non-space characters as a token
    # of its own: cutting the text right after it leaves every token as it was.
    return bool(before) and not before.isspace() and bool(after) and not after.isspace()


def _next_safe_break(f, pos: int, size: int) -> int:
    """The first offset >= pos right after a safe line break in the open binary file `f`."""
    if pos <= 0 or pos >= size:
        return min(max(pos, 0), size)
    base = max(pos - 5, 0)  # 4 bytes before the newline hold its previous character
    f.seek(base)
    buf = f.read(1 << 16)
    i = pos - 1 - base
    while True:
        at_eof = base + len(buf) >= size
        j = buf.find(b"\n", i)
        while j >= 0 and (j + 5 <= len(buf) or at_eof):
            before = buf[max(j - 4, 0) : j].decode("utf-8", "replace")[-1:]
            after = buf[j + 1 : j + 5].decode("utf-8", "replace")[:1]
            if _is_safe_break(before, after):
                return base + j + 1
            j = buf.find(b"\n", j + 1)
        if at_eof:
            return size
        more = f.read(1 << 16)
        if not more:  # the file shrank since it was measured
            return size
        pending = j if j >= 0 else len(buf)
        drop = max(pending - 4, 0)
        base, buf, i = base + drop, buf[drop:] + more, pending - drop


def _passage_ends(text: str, n: int) -> Iterator[int]:
    """End offsets of passages of about `n` characters of `text`, cut at safe line breaks."""
    start = 0
    while start < len(text):
        end = len(text)
        j = text.find("\n", start + n - 1) if start + n < len(text) else -1
        while j >= 0:
            if _is_safe_break(text[j - 1 : j], text[j + 1 : j + 2]):
                end = j + 1
                break
            j = text.find("\n", j + 1)
        yield end
        start = end


def _line_number(path: str, offset: int) -> int:
    """The 1-based line of `path` that holds byte `offset`."""
    lines, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            done += len(chunk)
    return lines


def _read_txt(part: _Part) -> Iterator[tuple[str, bool, bool]]:
    try:
        with open(part.path, "rb") as f:
            start = _next_safe_break(f, part.start, part.size)
            end = _next_safe_break(f, part.end, part.size)
            if start >= end:
                return
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        raise UserError(f"cannot read {part.path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = _line_number(part.path, start + e.start)
        raise UserError(f"{part.path}:{line}: not UTF-8 text") from None
    if start == 0:
        text = text.removeprefix("\ufeff")
    last = end >= part.size
    if start == 0 and last and not text.strip():
        return  # a blank file is no document
    begin = 0
    for stop in _passage_ends(text, part.passage_chars):
        yield text[begin:stop], start == 0 and begin == 0, last and stop == len(text)
        begin = stop


def _read_jsonl(part: _Part) -> Iterator[str]:
    try:
        with open(part.path, "rb") as f:
            start = 0
            if part.start > 0:
                f.seek(part.start - 1)
                f.readline()
                start = f.tell()
            pos, k = start, 0
            while pos < part.end:
                line = f.readline()
                if not line:
                    break
                pos += len(line)
                k += 1
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip(b"\r\n"))
                except ValueError as e:
                    if isinstance(e, json.JSONDecodeError):
                        why = f"{e.msg} at column {e.colno}"
                    else:
                        why = "not UTF-8 text"
                    where = f"{part.path}:{_line_number(part.path, start) + k - 1}"
                    raise UserError(f"{where}: not a JSON line ({why})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    where = f"{part.path}:{_line_number(part.path, start) + k - 1}"
                    if not isinstance(record, dict):
                        found = f"found {type(record).__name__}"
                    elif "text" not in record:
                        found = f'no "text" among its fields {", ".join(list(record)[:8])}'
                    else:
                        found = f'"text" is {type(text).__name__}'
                    raise UserError(
                        f'{where}: expected a JSON object with a string field "text", {found}'
                    )
                if not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:  # "\ud800" escapes: no tokenizer takes them
                        where = f"{part.path}:{_line_number(part.path, start) + k - 1}"
                        raise UserError(f'{where}: "text" holds invalid Unicode') from None
                if text.strip():
                    yield text
    except OSError as e:
        raise UserError(f"cannot read {part.path}: {e.strerror or e}") from None


def _read_parquet(part: _Part) -> Iterator[str]:
    pf = _parquet_file(part.path)
    row = part.size
    try:
        batches = pf.iter_batches(batch_size=1024, row_groups=[part.start], columns=["text"])
        for batch in batches:
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise UserError(
                        f'{part.path}: row {row}: column "text" holds {type(text).__name__}, '
                        "not strings"
                    )
                if text.strip():
                    yield text
    except UserError:
        raise
    except Exception as e:  # corrupt data pages surface as assorted pyarrow errors
        raise UserError(f"cannot read {part.path} as parquet: {e}") from None


# ---------------------------------------------------------------------------------------------
# Tokenizing: worker processes turn parts into token arrays; the parent writes the shards

_WORKER: dict = {}


def _typecode(dtype: str) -> str:
    if dtype == "uint16":
        return "H"
    return "I" if array.array("I").itemsize == 4 else "L"


def _tokenize_part(part: _Part, tokenizer: Tokenizer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of `part` and the token count of each of its passages."""
    ids = array.array(_typecode(dtype))  # compact, unlike a list of Python ints
    lengths = array.array("q")
    for text, first, last in _read_part(part):
        tokens = tokenizer.encode(text, bos=None if first else False, eos=last)
        ids.extend(tokens)
        lengths.append(len(tokens))
    return np.frombuffer(ids, dtype=dtype), np.frombuffer(lengths, dtype=np.int64)


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _worker_task(part: _Part) -> tuple[np.ndarray, np.ndarray] | str:
    try:
        return _tokenize_part(part, _WORKER["tokenizer"], _WORKER["dtype"])
    except UserError as e:  # sent back as its message; the parent raises it again
        return str(e)


def _tokenize(
    parts: list[_Part], tokenizer: Tokenizer, dtype: str, num_workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenized parts, in order."""
    if num_workers <= 1:
        for part in parts:
            yield _tokenize_part(part, tokenizer, dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the parent may hold threads (torch, the tokenizers library) that a fork
    # would copy in an undefined state. An executor, unlike multiprocessing.Pool, fails instead
    # of hanging when a worker dies.
    ctx = multiprocessing.get_context("spawn")
    chunk = max(1, min(16, len(parts) // (num_workers * 4)))
    pool = ProcessPoolExecutor(num_workers, ctx, _init_worker, (tokenizer, dtype))
    try:
        for result in pool.map(_worker_task, parts, chunksize=chunk):
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


def _rename_into_place(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`; if another process got there first, keep its."""
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise


def _build(
    out: Path,
    key: dict,
    parts: list[_Part],
    tokenizer: Tokenizer,
    dtype: str,
    val_fraction: float,
    num_workers: int,
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

        bar = tqdm(total=len(parts), desc="Tokenizing", unit="part", disable=None, leave=False)
        try:
            index = 0  # of the passage among those the fraction splits
            for part, (ids, lengths) in zip(parts, _tokenize(parts, tokenizer, dtype, num_workers)):
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if _file_stats(key) != (key["train"], key["val"]):
            raise UserError("input files changed while they were being tokenized; run again")
        if out.exists():
            if _load_manifest(out, key) is not None:
                return  # another process (a rank without a barrier) finished first: keep its
            shutil.rmtree(out, ignore_errors=True)  # a damaged cache of the same key
        _rename_into_place(tmp, out)
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
        ref = own if counts_from is None else counts_from.counts()
        size = max(len(own), len(ref), self.vocab_size)
        own, ref = np.pad(own, (0, size - len(own))), np.pad(ref, (0, size - len(ref)))
        if own.sum() == 0:
            raise ValueError("unigram_loss of a split without blocks")
        logp = np.log(ref + 1.0) - np.log(ref.sum() + size)
        return float(-(own * logp).sum() / own.sum())


# ---------------------------------------------------------------------------------------------
# The entry point


def prepare(
    data: TextData, tokenizer: Tokenizer, seq_length: int, seed: int = 42
) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, validation) blocks of `seq_length + 1` tokens of `data`.

    Tokenizes the files once (each document followed by eos) and caches the shards under
    `data.cache_dir`; a later call with the same files, tokenizer and split reuses them. Call it
    on one rank first and on the others after a barrier: they then only open the cache.
    """
    if seq_length < 1:
        raise UserError(f"the sequence length must be at least 1, got {seq_length}")
    if tokenizer.eos_id is None:
        raise UserError(
            f"the tokenizer in {tokenizer.checkpoint_dir} has no eos token to end documents with"
        )
    train_files = resolve_files(data.path)
    val_files = None if data.val_path is None else resolve_files(data.val_path)
    if val_files is None and not 0 < data.val_fraction < 1:
        raise UserError(
            f"--data.val_fraction must be between 0 and 1, got {data.val_fraction} "
            "(or give validation files with --data.val_path)"
        )
    if data.num_workers is not None and data.num_workers < 0:
        raise UserError(f"--data.num_workers must be >= 0, got {data.num_workers}")
    dtype = "uint16" if tokenizer.vocab_size < 1 << 16 else "uint32"
    key = {
        "format": _FORMAT,
        "train": _stats(train_files),
        "val": None if val_files is None else _stats(val_files),
        "val_fraction": None if val_files is not None else data.val_fraction,
        "tokenizer": _tokenizer_hash(tokenizer),
        "dtype": dtype,
        "part_bytes": _PART_BYTES,
        "passage_chars": _PASSAGE_CHARS,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    cache_dir = data.cache_dir if data.cache_dir is not None else cache_root() / "tokens"
    folder = Path(cache_dir).expanduser() / digest

    manifest = _load_manifest(folder, key)
    if manifest is None:
        parts = _plan(train_files, "auto" if val_files is None else "train")
        parts += _plan(val_files or [], "val")
        workers = data.num_workers
        if workers is None:  # starting a worker costs about as much as tokenizing 2 MB
            total = sum(size for _, size, _ in key["train"] + (key["val"] or []))
            workers = min(_cpu_count(), max(1, total // _BYTES_PER_WORKER))
        workers = min(workers, len(parts))
        _build(folder, key, parts, tokenizer, dtype, data.val_fraction, workers)
        manifest = _load_manifest(folder, key)
        if manifest is None:
            raise UserError(f"the token cache in {folder} is unreadable after writing it")

    def blocks(split: str, seed: Optional[int]) -> TokenBlocks:
        info = manifest["splits"][split]
        return TokenBlocks(
            folder / info["file"],
            info["tokens"],
            manifest["dtype"],
            seq_length,
            manifest["vocab_size"],
            folder / info["counts"],
            seed,
            info["documents"],
        )

    train, val = blocks("train", seed), blocks("val", None)
    _check_sizes(train, val, train_files, val_files, data.val_fraction)
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
