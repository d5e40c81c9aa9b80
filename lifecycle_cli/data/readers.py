"""Reading pretraining text: which files `--data.path` names, and the documents in them.

Inputs are `.txt` files (one document each), `.jsonl` files (one document per line, field
`text`) and `.parquet` files (one document per row, column `text`). Work is cut into parts of
about `PART_BYTES` so that one huge file still keeps every tokenizer worker busy: `.jsonl` files
at line starts, `.txt` files at "safe" line breaks (a newline between two non-space characters;
splitting there does not change what a GPT-2 style byte-level BPE produces) and `.parquet` files
by row group. A long `.txt` document is further read in passages of about `PASSAGE_CHARS`
characters cut the same way; passages, like other documents, are the unit of the
train/validation split. The parts and passages depend only on the files, never on the number of
workers, so the tokens and the split do not either.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Optional

from lifecycle_cli.data.corpus import bundled_corpus
from lifecycle_cli.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
PART_BYTES = 8 << 20
PASSAGE_CHARS = 1 << 14


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


class Part(NamedTuple):
    """A slice of one input file that one worker reads (and tokenizes) on its own."""

    path: str
    kind: str  # "txt", "jsonl" or "parquet"
    start: int  # byte offset (txt, jsonl) or row group (parquet)
    end: int
    size: int  # file size (txt, jsonl) or number of rows before this row group (parquet)
    split: str  # "auto" (held out by fraction), "train" or "val"
    passage_chars: int


def plan(files: Sequence[Path], split: str) -> list[Part]:
    """`files` cut into parts, each to be read into the split `split` ("auto": by fraction)."""
    parts = []
    for path in files:
        kind = path.suffix.lower()[1:]
        if kind == "parquet":
            rows = 0
            meta = _parquet_file(path).metadata
            for group in range(meta.num_row_groups):
                parts.append(Part(str(path), kind, group, group + 1, rows, split, 0))
                rows += meta.row_group(group).num_rows
            continue
        try:
            size = path.stat().st_size
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        n = max(1, math.ceil(size / PART_BYTES))
        for i in range(n):
            start, end = i * size // n, (i + 1) * size // n
            parts.append(Part(str(path), kind, start, end, size, split, PASSAGE_CHARS))
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


def read_part(part: Part) -> Iterator[tuple[str, bool, bool]]:
    """(text, starts a document, ends a document) for each passage of `part`."""
    if part.kind == "txt":
        yield from _read_txt(part)
    elif part.kind == "jsonl":
        yield from ((text, True, True) for text in _read_jsonl(part))
    else:
        yield from ((text, True, True) for text in _read_parquet(part))


def iter_texts(files: Sequence[Path]) -> Iterator[str]:
    """The documents of `files` one by one, read as the token cache reads them (for training a
    tokenizer); a long .txt file comes as consecutive passages. Raises the same UserErrors."""
    files = list(files)
    for path in files:
        for part in plan([path], "train"):
            for text, _, _ in read_part(part):
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


def _read_txt(part: Part) -> Iterator[tuple[str, bool, bool]]:
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


def _read_jsonl(part: Part) -> Iterator[str]:
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


def _read_parquet(part: Part) -> Iterator[str]:
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
