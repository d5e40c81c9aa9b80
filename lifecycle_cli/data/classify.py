"""Classification data: labelled texts -> token ids, the last real token's position and a class.

Files are CSV or TSV with a header naming the columns `text` and `label` (others are ignored;
TSV fields are taken as written, quotes included), or JSONL / a JSON list of
`{"text": ..., "label": ...}` records (a label may be a string or an integer). A bad row is a
UserError naming its file and line.

A text longer than max_seq_length tokens keeps its beginning (counted in `n_truncated`); the
class head reads the hidden state of the last real token, at `last_index`.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from lifecycle_cli.data.packed import PackedTokens
from lifecycle_cli.data.records import read_json_records, read_text
from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from lifecycle_cli.tokenizer import Tokenizer

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
Example = tuple[str, str]  # (text, label)


def read_classification(path: Path | str) -> list[Example]:
    """(text, label) of each row of a CSV/TSV/JSONL/JSON file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; classification "
            f"data must be {', '.join(SUFFIXES)}"
        )
    rows = _read_json(path) if suffix in (".jsonl", ".json") else _read_table(path, suffix)
    if not rows:
        raise UserError(f"{path} holds no examples")
    return rows


def _read_table(path: Path, suffix: str) -> list[Example]:
    text = read_text(path)
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    try:
        header = next(reader, None)
        if header is None:
            return []
        names = [h.strip().lower() for h in header]
        if "text" not in names or "label" not in names:
            found = ", ".join(h for h in header if h) or "nothing"
            raise UserError(
                f"{path}:1: the header must name the columns text and label, found: {found}"
            )
        text_at, label_at = names.index("text"), names.index("label")
        rows = []
        line = reader.line_num + 1  # where the next row starts (quoted fields span lines)
        for row in reader:
            where, line = f"{path}:{line}", reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if len(row) != len(header):
                raise UserError(
                    f"{where}: expected {len(header)} fields like the header, found {len(row)}"
                )
            rows.append(_check(row[text_at], row[label_at], where))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: {e}") from None
    return rows


def _read_json(path: Path) -> list[Example]:
    rows = []
    for where, record in read_json_records(path):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with text and label")
        for key in ("text", "label"):
            if key not in record:
                found = ", ".join(map(str, record)) or "none"
                raise UserError(f"{where}: missing field {key!r} (found: {found})")
        text, label = record["text"], record["label"]
        if not isinstance(text, str):
            raise UserError(f"{where}: 'text' should be a string, found {type(text).__name__}")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str):
            raise UserError(
                f"{where}: 'label' should be a string or an integer, found {type(label).__name__}"
            )
        rows.append(_check(text, label, where))
    return rows


def _check(text: str, label: str, where: str) -> Example:
    if not text.strip():
        raise UserError(f"{where}: the text is empty")
    if not label.strip():
        raise UserError(f"{where}: the label is empty")
    return text, label.strip()


class ClassificationDataset:
    """Labelled texts served as padded batches for a class head on the last real token.

    `labels`: the class names, a class's id being its index (default: the examples' labels,
    sorted; pass the training set's list to a validation set). `get(indices)` takes global
    sample indices like every dataset here: with a `seed`, sample i is example perm_e[i % n] of
    epoch e = i // n, perm_e derived from (seed, e); with seed=None, example i % n.
    """

    def __init__(
        self,
        examples: Sequence[Union[Example, dict]],
        tokenizer: Tokenizer,
        labels: Optional[Sequence[str]] = None,
        max_seq_length: int = 256,
        seed: Optional[int] = 42,
    ) -> None:
        if max_seq_length < 1:
            raise UserError(f"the sequence length must be at least 1, got {max_seq_length}")
        pairs = [(e["text"], e["label"]) if isinstance(e, dict) else tuple(e) for e in examples]
        self.labels = list(labels) if labels is not None else sorted({lb for _, lb in pairs})
        index = {name: i for i, name in enumerate(self.labels)}
        self.max_seq_length, self.seed = max_seq_length, seed
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if self.pad_id is None:
            self.pad_id = 0  # padding is never read: the head takes last_index
        self.n_truncated = 0
        ids, classes = [], []
        for text, label in pairs:
            if label not in index:
                raise UserError(
                    f"label {label!r} is not among the training labels ({', '.join(self.labels)})"
                )
            tokens = tokenizer.encode(text)
            if not tokens:
                raise UserError(f"the text {text!r} has no tokens")
            if len(tokens) > max_seq_length:
                self.n_truncated += 1
                tokens = tokens[:max_seq_length]
            ids.append(tokens)
            classes.append(index[label])
        self.tokens = PackedTokens(ids, seed)
        self.lengths = self.tokens.lengths
        self.targets = np.array(classes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return (
            f"ClassificationDataset({len(self)} examples, labels={self.labels}, "
            f"max_seq_length={self.max_seq_length}, {self.n_truncated} truncated)"
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.targets, minlength=len(self.labels))
        return {name: int(c) for name, c in zip(self.labels, counts)}

    def get(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"input_ids": (B, T) right-padded, "last_index": (B,) position of each row's last
        real token, "labels": (B,) class ids, "n_tokens": 0-d count of real tokens}."""
        import torch

        rows = self.tokens.rows(indices)
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        inputs = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for b, i in enumerate(rows.tolist()):
            inputs[b, : lengths[b]] = self.tokens.ids(i)
        return {
            "input_ids": torch.from_numpy(inputs),
            "last_index": torch.from_numpy(lengths - 1),
            "labels": torch.from_numpy(self.targets[rows]),
            "n_tokens": torch.tensor(int(lengths.sum()), dtype=torch.long),
        }


_SPAM = (
    "win free prize cash offer click claim urgent winner bonus money reward deal limited "
    "discount lottery credit guaranteed"
).split()
_HAM = (
    "meeting lunch tomorrow project family dinner report weekend call notes garden book "
    "school train coffee office birthday"
).split()
_FILLER = "please the your today now see about with for this and we you it our".split()


def make_separable_examples(n: int, seed: int = 0) -> list[Example]:
    """`n` (text, label) pairs, "spam" or "ham" (half each; spam gets the odd one), whose
    sentences mix shared filler words with words only their class uses: a set a classifier
    must get right, for tests and demos. Shuffled; the same for the same seed."""
    rng = random.Random(f"llmcycle-separable/{seed}")
    out = []
    for k in range(n):
        label, vocab = ("spam", _SPAM) if k < (n + 1) // 2 else ("ham", _HAM)
        words = rng.sample(vocab, rng.randint(2, 4)) + rng.sample(_FILLER, rng.randint(2, 4))
        rng.shuffle(words)
        out.append((" ".join(words).capitalize() + rng.choice(".!?"), label))
    rng.shuffle(out)
    return out
