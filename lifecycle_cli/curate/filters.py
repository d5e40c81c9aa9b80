"""Heuristic quality filters (`--data.filters`): length, symbol and digit ratios, repeated
lines, non-text. Each returns why a document fails, so the report can count removals by rule.

The rules follow the heuristics of Gopher's MassiveText (Rae et al. 2021) and C4, with
thresholds set by `QualityFilters` (a null threshold turns its rule off).
"""

from __future__ import annotations

import re
from typing import Optional

from lifecycle_cli.data.args import QualityFilters

_SPACE = re.compile(r"\s")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")
_DIGIT = re.compile(r"\d")
_NON_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")

RULES = (
    "min_words",
    "max_words",
    "max_symbol_ratio",
    "max_digit_ratio",
    "max_repeated_lines",
    "max_non_text",
)


def check(filters: QualityFilters) -> None:
    """Refuse thresholds that cannot mean anything (UserError naming the flag)."""
    from lifecycle_cli.errors import UserError

    for name in RULES:
        value = getattr(filters, name)
        if value is None:
            continue
        if name.endswith("words") and (not isinstance(value, int) or value < 0):
            raise UserError(f"--data.filters.{name} must be a whole number >= 0, got {value}")
        if not name.endswith("words") and not 0 <= value <= 1:
            raise UserError(f"--data.filters.{name} must be a share between 0 and 1, got {value}")


def failed_rule(text: str, filters: QualityFilters) -> Optional[str]:
    """The first rule `text` breaks (a name in RULES), or None when it passes them all."""
    f = filters
    words = len(text.split())
    if f.min_words is not None and words < f.min_words:
        return "min_words"
    if f.max_words is not None and words > f.max_words:
        return "max_words"
    visible = len(text) - len(_SPACE.findall(text))
    if visible:
        symbols = visible - len(_LETTER_OR_DIGIT.findall(text))
        if f.max_symbol_ratio is not None and symbols / visible > f.max_symbol_ratio:
            return "max_symbol_ratio"
        if (
            f.max_digit_ratio is not None
            and len(_DIGIT.findall(text)) / visible > f.max_digit_ratio
        ):
            return "max_digit_ratio"
    if f.max_repeated_lines is not None:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if lines and (len(lines) - len(set(lines))) / len(lines) > f.max_repeated_lines:
            return "max_repeated_lines"
    if f.max_non_text is not None and text:
        if len(_NON_TEXT.findall(text)) / len(text) > f.max_non_text:
            return "max_non_text"
    return None
