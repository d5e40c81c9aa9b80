"""Record files: the text of a data file, and the JSON records of a .json or .jsonl file.

Shared by the instruction and classification readers. Every problem is a UserError naming the
file and the line ("FILE:LINE: ...").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lifecycle_cli.errors import UserError


def read_json_records(path: Path) -> list[tuple[str, Any]]:
    """(location, value) for each record of a .jsonl file (one JSON value per non-blank line)
    or a .json file (a list of records; a file of one record per line also works). Locations
    are "FILE:LINE" (a JSON list adds "record N"). Unreadable text is a UserError."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() == ".json":
        stripped = text.lstrip()
        if stripped.startswith("["):
            return list(_json_list(path, text))
        if stripped.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":
                    raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
            else:
                what = "an object" if isinstance(value, dict) else type(value).__name__
                raise UserError(f"{path}: expected a JSON list of records, found {what}")
        elif stripped:
            raise UserError(f"{path}:{_line_of(text, len(text) - len(stripped))}: not valid JSON")
    out = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{number}: not valid JSON: {e.msg} (column {e.colno})"
            ) from None
    return out


def read_text(path: Path) -> str:
    """The whole of a UTF-8 data file (a BOM dropped); a missing, unreadable or non-UTF-8 file is
    a UserError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"data path {path} is a folder; give a file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


_SPACE = re.compile(r"\s*")


def _json_list(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """The items of a JSON list with the line each starts on (json.loads gives no positions)."""
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, 0).end() + 1  # after "["
    index, line, counted = 0, 1, 0  # `line` is the line of offset `counted`

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    while True:
        pos = _SPACE.match(text, pos).end()
        if text.startswith("]", pos) and index == 0:
            pos += 1
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{e.lineno}: record {index + 1}: not valid JSON: {e.msg}"
            ) from None
        yield f"{path}:{line_at(pos)}: record {index + 1}", value
        index += 1
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("]", pos):
            pos += 1
            break
        else:
            raise UserError(f"{path}:{line_at(pos)}: expected ',' or ']' after a record")
    if text[pos:].strip():
        raise UserError(f"{path}:{line_at(pos)}: unexpected text after the list")
