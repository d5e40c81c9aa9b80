"""`TextStream`: one row's new tokens as text that is safe to show (never half a UTF-8
character, never the start of a stop string)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lifecycle_cli.tokenizer import Tokenizer


class TextStream:
    """Turns one row's new tokens into text that is safe to show, piece by piece.

    Decodes a window of the id list that starts a few tokens back (the end of the prompt
    included, so that tokenizers which drop a leading space at the start of a decode still give
    it) and emits only the part that is stable: nothing while the text ends in an incomplete
    UTF-8 sequence, and nothing that could still turn out to be the start of a stop string.
    """

    WINDOW = 6  # tokens of context kept before the first unread one

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.WINDOW :])
        self.prefix_offset = 0  # start of the decoded window
        self.read_offset = len(self.ids)  # ids before this are already text
        self.stop = tuple(stop)
        self.held = ""  # stable text not yet shown: it may begin a stop string
        self.text = ""  # everything shown so far
        self.stopped = False  # a stop string was found; nothing more will be shown

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one new token; return the text that may be shown now ('' if none)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible yet)
        new = after[len(before) :]
        self.prefix_offset = max(0, len(self.ids) - self.WINDOW)
        self.read_offset = len(self.ids)
        if len(self.ids) > 4 * self.WINDOW:  # keep the window short: decoding stays O(1)
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset, self.read_offset = 0, self.read_offset - drop
        return self._release(self.held + new)

    def _release(self, pending: str) -> str:
        if not self.stop:
            self.held = ""
            return self._show(pending)
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return self._show(pending[: min(hits)])
        keep = max((_overlap(pending, s) for s in self.stop), default=0)
        self.held = pending[len(pending) - keep :] if keep else ""
        return self._show(pending[: len(pending) - keep])

    def _show(self, piece: str) -> str:
        self.text += piece
        return piece

    def finish(self) -> str:
        """The row ended without a stop string: the text held back is output after all."""
        if self.stopped:
            return ""
        # Bytes that never completed a character are shown as they decode (U+FFFD).
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.read_offset = len(self.ids)
        piece = self._release(self.held + after[len(before) :])
        if not self.stopped and self.held:
            piece += self._show(self.held)
        self.held = ""
        return piece


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
