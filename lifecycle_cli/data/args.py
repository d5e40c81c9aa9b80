"""Data flags (`--data.*`) of the verbs that train.

Kept apart from the readers so that building a verb's --help imports no torch (jsonargparse
also evaluates the `if TYPE_CHECKING:` imports of a flag dataclass's module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union


@dataclass
class MixSource:
    """One source of a data mixture."""

    path: Union[Path, list[Path]]
    """Its files or folders, read like --data.path."""
    weight: float = 1.0
    """Its sampling weight (normalised over the sources): the share of training samples
    drawn from it, however large it is (a small source is repeated, a large one cut)."""


@dataclass
class QualityFilters:
    """Heuristic quality filters applied while the token shards are prepared; a document
    failing any of them is left out. A threshold set to null turns its filter off."""

    min_words: Optional[int] = 20
    """Fewest words (whitespace-separated) a document must have."""
    max_words: Optional[int] = 100_000
    """Most words a document may have."""
    max_symbol_ratio: Optional[float] = 0.3
    """Largest share of non-space characters that are neither letters nor digits."""
    max_digit_ratio: Optional[float] = 0.3
    """Largest share of non-space characters that are digits."""
    max_repeated_lines: Optional[float] = 0.3
    """Largest share of (non-blank) lines that repeat an earlier line of the document."""
    max_non_text: Optional[float] = 0.01
    """Largest share of characters that are not text: control characters other than
    newline and tab, and the replacement character left by undecodable bytes."""


@dataclass
class TextData:
    """Pretraining text: files or folders of .txt, .jsonl (field "text") or .parquet (column
    "text"), tokenized once and cached."""

    path: Union[Path, list[Path], None] = None
    """A file or folder (searched recursively), or a list of them (`[a.txt, more/]`): .txt (one
    document per file), .jsonl (one document per line, in the field "text") and .parquet (one
    document per row, in the column "text"). Default: text that ships with Python (its help
    topics and the standard library's docstrings, about 2 MB)."""
    val_fraction: float = 0.05
    """Share of the documents held out for validation, spread evenly through the corpus (a
    long .txt file counts as passages of about 16,000 characters)."""
    val_path: Union[Path, list[Path], None] = None
    """A validation file or folder (or a list of them) to use instead of holding out part of
    --data.path."""
    num_workers: Optional[int] = None
    """Processes that tokenize in parallel. Default: one per CPU core, at most one per 4 MB of
    input; 0 or 1 tokenizes in this process."""
    cache_dir: Optional[Path] = None
    """Where token shards are cached and reused. Default: $LLMCYCLE_CACHE/tokens, else
    ~/.cache/llmcycle/tokens."""
    mix: Optional[dict[str, MixSource]] = None
    """Several sources sampled by weight, instead of --data.path: name -> {path, weight}, e.g.
    in a --config YAML `mix: {web: {path: web/, weight: 3}, books: {path: b.jsonl, weight:
    1}}`. Each source holds out its own validation share; the run prints and saves
    (data_mix.tsv) each source's tokens, weight and epochs at the planned token budget."""
    dedup: Literal["none", "exact", "minhash"] = "none"
    """Remove duplicate documents before tokenizing (the first copy stays): exact (same text,
    whitespace aside) or minhash (exact, then near duplicates by MinHash LSH over word
    5-grams; needs datasketch: pip install 'llmcycle[curate]')."""
    dedup_threshold: float = 0.7
    """Estimated Jaccard similarity of word 5-grams above which --data.dedup minhash counts
    two documents as near duplicates."""
    filters: Optional[QualityFilters] = None
    """Heuristic quality filters (`--data.filters '{}'` for the defaults, or set thresholds:
    --data.filters.min_words 50). A .txt file is one document."""

    def __post_init__(self) -> None:
        # Always a list from here on, however it was given.
        for name in ("path", "val_path"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                setattr(self, name, [Path(value)])
            elif value is not None:
                setattr(self, name, [Path(p) for p in value])
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if self.mix is not None:  # plain dicts too, from Python
            self.mix = {
                k: v if isinstance(v, MixSource) else MixSource(**v) for k, v in self.mix.items()
            }
        for source in (self.mix or {}).values():
            if isinstance(source.path, (str, os.PathLike)):
                source.path = [Path(source.path)]
            else:
                source.path = [Path(p) for p in source.path]


@dataclass
class InstructData:
    """Finetuning data: a file of instructions, conversations or labelled texts, or synthetic
    tasks."""

    path: Optional[Path] = None
    """JSON (a list of records) or JSONL (one record per line), Alpaca style (instruction,
    input, output) or chat style (messages: [{role, content}], the last from the assistant);
    for classification also CSV/TSV with a header naming the columns text and label."""
    format: Literal["auto", "alpaca", "chat", "classification"] = "auto"
    """What the records are: auto tells from the file (CSV/TSV or text+label records:
    classification; else Alpaca or chat, record by record)."""
    val_path: Optional[Path] = None
    """A validation file in the same format, instead of holding out part of --data.path."""
    val_fraction: float = 0.1
    """Share of the examples held out (at random, seeded) for validation."""
    mask_prompt: bool = True
    """Compute the loss on the response tokens only (false: on prompt tokens too)."""
    synthetic: Optional[str] = None
    """Comma-separated synthetic tasks to train on instead of a file (lifecycle_cli.data.synthetic:
    copy, reverse, ..., lookup), or a group: all, tuning, held_out."""
    synthetic_train_size: int = 2000
    """Training examples per synthetic task."""
    synthetic_val_size: int = 100
    """Validation examples per synthetic task (never among the training examples)."""
    seed: int = 42
    """Seed of the validation split and of the synthetic examples."""

    def __post_init__(self) -> None:
        paths_as_paths(self, "path", "val_path")


@dataclass
class PreferenceData:
    """Preference pairs: a prompt with a chosen and a rejected response, or synthetic pairs."""

    path: Optional[Path] = None
    """JSON (a list of records) or JSONL (one per line) with prompt, chosen and rejected: strings,
    or chat messages (prompt: the conversation so far; chosen/rejected: the final assistant turn,
    or whole conversations that share everything but it)."""
    val_path: Optional[Path] = None
    """A validation file in the same format, instead of holding out part of --data.path."""
    val_fraction: float = 0.1
    """Share of the pairs held out (at random, seeded) for validation."""
    synthetic: Optional[str] = None
    """Comma-separated synthetic tasks (or all, tuning, held_out) to build pairs from instead of
    a file: chosen is the right answer, rejected a plausible wrong one."""
    synthetic_train_size: int = 1000
    """Training pairs per synthetic task."""
    synthetic_val_size: int = 100
    """Validation pairs per synthetic task (their prompts never among the training ones)."""
    seed: int = 42
    """Seed of the validation split and of the synthetic pairs."""

    def __post_init__(self) -> None:
        paths_as_paths(self, "path", "val_path")


def paths_as_paths(args: object, *names: str) -> None:
    """Turn the string (or PathLike) fields `names` of a dataclass into Paths, as YAML and the
    command line give strings."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, (str, os.PathLike)):
            setattr(args, name, Path(value))
