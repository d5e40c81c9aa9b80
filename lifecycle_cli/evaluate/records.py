"""Task files read record by record: anything malformed is one line naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lifecycle_cli.errors import UserError


def read_jsonl(path: Path | str, check: Callable[[dict], Any]) -> list[Any]:
    """The records of a JSONL file, each passed through `check` (which raises ValueError with
    what is wrong, or returns the normalised record). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object, got {record!r:.40}")
            try:
                out.append(check(record))
            except ValueError as err:
                raise UserError(f"{path}:{line_no}: {err}") from None
    if not out:
        raise UserError(f"task file {path} has no records")
    return out


def text_field(record: dict, name: str, required: bool = True) -> str:
    """`record[name]` as a non-empty string; ValueError otherwise."""
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        got = "missing" if value is None else f"{value!r:.40}"
        raise ValueError(f'field "{name}" must be a non-empty string (got {got})')
    return value


def read_texts(path: Path | str) -> list[tuple[str, str]]:
    """(name, text) documents of a text file or folder: a .txt file is one document, each line
    of a .jsonl file (field "text") one; folders are searched recursively, in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise UserError(f"folder {path} has no .txt or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"text file {path} does not exist")
    docs: list[tuple[str, str]] = []
    for file in files:
        if file.suffix == ".jsonl":
            texts = read_jsonl(file, lambda r: text_field(r, "text"))
            docs += [(f"{file}:{i}", t) for i, t in enumerate(texts, 1)]
        else:
            try:
                docs.append((str(file), file.read_text(encoding="utf-8")))
            except UnicodeDecodeError as err:
                raise UserError(f"{file}: not UTF-8 text ({err.reason})") from None
    return [(name, text) for name, text in docs if text]
