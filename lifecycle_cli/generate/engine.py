"""The one decoder: continuous batching over the slots of one static KV cache.

The path, gpt-fast style: `prefill` runs prompts through the model once, filling their slots of
the KV cache; `decode_step` then feeds one token per row (fixed shapes, so it can be compiled);
a `Sampler` turns each step's logits into every row's next token under its own settings.

`Engine` holds `max_batch_size` slots. `submit` queues a request; every `step()` prefills waiting
requests into free slots, then advances every occupied slot by one token, each row at its own
position with its own sampling settings, seed and stops, and returns what happened as events
`(key, "piece" | "done" | "error", payload)`. A row leaves its slot the step it ends (or when
`cancel`led) and the next waiting request takes it. `Generator` (generator.py) is this engine
for a batch of prompts at a time; `serve` runs it for HTTP requests.

Prompts of different lengths need no padding mask: a group prefilled together is padded at the
end, then every row decodes at its own position and never attends to cache positions past it
(where the padding of a shorter prompt went). A slot remembers which tokens its keys and values
belong to, so a prompt that starts like the slot's last one (a chat's next turn) prefills only
the rest.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from lifecycle_cli.errors import UserError
from lifecycle_cli.generate.options import SamplingParams, check_prompt_length
from lifecycle_cli.generate.sampling import Sampler
from lifecycle_cli.generate.text import TextStream

if TYPE_CHECKING:
    from lifecycle_cli.generate.speculative import Drafter
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import Tokenizer

log = logging.getLogger("llmcycle.generate")

Event = tuple[Any, str, Any]  # (key, "piece" | "done" | "error", payload)


def prefill(
    model: GPT, idx: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """Run prompts (B, T) at positions `input_pos` (T,) into the KV cache; the logits (B, V) at
    index `last` (B,) of each row (its last prompt token)."""
    return model(idx, input_pos=input_pos, logits_at=last)[:, 0]


def decode_step(model: GPT, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One token per row (B, 1) at `input_pos` ((1,) shared, or (B, 1) per row) -> logits (B, V).

    Shapes never change between steps: this is what `--compile` compiles."""
    return model(token, input_pos=input_pos)[:, -1]


def fast_decode_layout(model: GPT) -> None:
    """Store the weights of linear layers with at least as many outputs as inputs column-major,
    in place (same values, same shapes).

    Decoding multiplies one vector per row by every weight matrix, reading all of it from
    memory. For such "wide" layers MKL streams a column-major weight 1.5-4x faster (the output
    head of a small model above all: it is most of what is read per token); "narrow" layers are
    as fast as they are. CPU only; prefill barely changes, and checkpoint writing makes tensors
    contiguous again.
    """
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, torch.nn.Linear) or weight is None or weight.dim() != 2:
                continue
            out_features, in_features = weight.shape
            if (
                weight.device.type == "cpu"
                and weight.is_contiguous()
                and out_features >= in_features
            ):
                weight.data = weight.data.t().contiguous().t()


def cache_length(need: int, context: int) -> int:
    """The KV cache length for `need` positions: a power of two from 256 up to the context (a
    compiled step is compiled a few times at most; attention reads what it is given)."""
    return min(max(256, 1 << (need - 1).bit_length()), context)


@dataclass
class Row:
    """A request in a slot."""

    key: Any
    slot: int
    prompt: list[int]
    params: SamplingParams
    stops: set[int]
    budget: int
    stream: bool
    text: Optional[TextStream]
    tokens: list[int] = field(default_factory=list)  # generated so far
    batch: int = 1  # the most rows this one decoded with in one step
    first_token_at: Optional[float] = None  # time.perf_counter()
    drafted: int = 0  # speculative decoding: tokens the draft proposed
    accepted: int = 0  # ... and the target kept

    @property
    def generated(self) -> int:
        return len(self.tokens)


class Engine:
    """Continuous batching over `max_batch_size` slots of the model's KV cache.

    Streamed rows (`submit(..., stream=True)`) report each text piece; every row ends with a
    `done` payload: `text` (empty for streamed rows), `token_ids`, `finish_reason` ("stop" or
    "length"), `prompt_tokens`, `completion_tokens`, `batch` and `first_token_at`.

    compile: compile `decode_step` with `torch.compile` (inductor with weight freezing: the
    weights must not change while this engine is in use). Compiled steps always decode every
    slot over the whole cache, so their shapes only change when the cache grows.
    raise_errors: let a failing step raise (a library call) instead of ending the rows it
    concerned with `error` events (a server, which must stay up).
    drafter: speculative decoding (speculative.py) whenever one row decodes alone (without a
    repetition penalty): the draft proposes, the target verifies in one eager forward pass.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Optional[Tokenizer] = None,
        max_batch_size: int = 1,
        *,
        compile: bool = False,
        raise_errors: bool = False,
        drafter: Optional[Drafter] = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.drafter = drafter
        self.device = next(model.parameters()).device
        self.compiled, self._compile_checked = compile, False
        self._decode = decode_step
        if compile:
            self._decode = torch.compile(
                decode_step, fullgraph=True, dynamic=False, options={"freezing": True}
            )
        self.raise_errors = raise_errors
        self.waiting: deque[tuple[Any, list[int], SamplingParams, bool]] = deque()
        self._cache: Any = None  # the model's cache as this engine last set it
        self.resize(max_batch_size)

    @property
    def context(self) -> int:
        return self.model.max_seq_length

    @property
    def cache_len(self) -> int:
        return self._cache_shape[1] if self._cache_shape else 0

    def resize(self, max_batch_size: int) -> None:
        """Change the number of slots (only while idle)."""
        if self.busy():
            raise RuntimeError("cannot resize a busy engine")
        self.slots: list[Optional[Row]] = [None] * max_batch_size
        self.cached: list[list[int]] = [[] for _ in range(max_batch_size)]
        self.sampler = Sampler(max_batch_size, self.model.config.vocab_size, self.device)
        self._cache_shape: Optional[tuple[int, int]] = None

    def forget(self) -> None:
        """Forget which tokens the slots hold: the next prompts are prefilled whole."""
        self.cached = [[] for _ in self.slots]

    def busy(self) -> bool:
        return bool(self.waiting) or self.running() > 0

    def running(self) -> int:
        return sum(row is not None for row in getattr(self, "slots", ()))

    def stop_ids(self, params: SamplingParams) -> set[int]:
        """Token ids that end a row: the tokenizer's end-of-sequence ids (unless `ignore_eos`),
        the row's stop token ids, and stop strings that are a single special token (a chat
        template's end of turn never shows up in the decoded text, so it is caught as a token)."""
        ids = set(params.stop_token_ids)
        if self.tokenizer is not None:
            if not params.ignore_eos:
                ids.update(self.tokenizer.eos_ids)
            for s in params.stop:
                encoded = self.tokenizer.encode(s, bos=False)
                if len(encoded) == 1 and self.tokenizer.decode(encoded, True) == "":
                    ids.add(encoded[0])
        return ids

    def submit(
        self,
        key: Any,
        ids: Sequence[int],
        params: SamplingParams,
        stream: bool = False,
        what: str = "the prompt",
    ) -> None:
        """Queue a prompt; a UserError now if it leaves no room to generate."""
        ids = [int(t) for t in ids]
        check_prompt_length(len(ids), self.context, what)
        self.waiting.append((key, ids, params, stream))

    def cancel(self, key: Any) -> Optional[list[int]]:
        """Drop request `key`, waiting or running: the tokens it had generated (None if it was
        not here: unknown or already done)."""
        for i, (waiting, *_) in enumerate(self.waiting):
            if waiting == key:
                del self.waiting[i]
                return []
        for row in self.slots:
            if row is not None and row.key == key:
                self._release(row)
                return row.tokens
        return None

    def step(self) -> list[Event]:
        events: list[Event] = []
        with torch.inference_mode():
            admitted = []
            while self.waiting and None in self.slots:
                key, ids, params, stream = self.waiting.popleft()
                try:
                    admitted.append(self._admit(key, ids, params, stream))
                except Exception as e:
                    self._fail([], e, events, "admitting a request failed", key)
            if len(admitted) > 1:  # reuse a slot's cache alone only when it saves much
                admitted = [(r, s if 2 * s >= len(r.prompt) else 0) for r, s in admitted]
            for group in _prefill_groups(admitted):
                try:
                    self._prefill(group, events)
                except Exception as e:
                    self._fail([row for row, _ in group], e, events, "prefill failed")
            rows = [row for row in self.slots if row is not None]
            if rows:
                try:
                    if not (len(rows) == 1 and self._speculate(rows[0], events)):
                        self._decode_rows(rows, events)
                except Exception as e:
                    self._fail(rows, e, events, "decode step failed")
        return events

    # ---- internals -----------------------------------------------------------------------

    def _fail(self, rows: list[Row], e: Exception, events: list, what: str, key=None) -> None:
        if self.raise_errors:
            raise e
        user = isinstance(e, UserError)
        if not user:
            log.exception(what)
        payload = {"status": 400 if user else 500, "message": str(e)}
        for row in rows:
            if self.slots[row.slot] is row:
                self._release(row)
        for k in [row.key for row in rows] if key is None else [key]:
            events.append((k, "error", payload))

    def _admit(self, key: Any, ids: list[int], params: SamplingParams, stream: bool):
        """A row for the prompt in a free slot (the one that holds the longest start of it),
        with room in the cache; (row, tokens already cached). Not prefilled yet."""
        free = [i for i, row in enumerate(self.slots) if row is None]
        reuse = [_common_prefix(self.cached[i], ids, len(ids) - 1) if self.cached[i] else 0
                 for i in free]  # fmt: skip
        start = max(reuse)
        slot = free[reuse.index(start)]
        budget = min(params.max_new_tokens, self.context - len(ids))
        self._reserve(len(ids) + budget)
        if not self.cached[slot]:  # the cache was replaced
            start = 0
        text = TextStream(self.tokenizer, ids, params.stop) if self.tokenizer else None
        row = Row(key, slot, ids, params, self.stop_ids(params), budget, stream, text)
        self.slots[slot] = row
        self.sampler.assign(slot, params, ids)
        self.cached[slot] = self.cached[slot][:start]
        return row, start

    def _reserve(self, length: int) -> None:
        """Make the cache hold `length` positions per slot, keeping what it holds."""
        model = self.model
        ours = self._cache_shape is not None and model.kv_cache is self._cache
        if not ours:
            if self.running():
                raise RuntimeError("the model's KV cache was replaced while requests ran")
            self._cache_shape, self.cached = None, [[] for _ in self.slots]
        if ours and length <= self.cache_len:
            return
        shape = (len(self.slots), cache_length(length, self.context))
        if ours:
            model.resize_kv_cache(*shape)
        else:
            model.set_kv_cache(*shape, device=self.device)
        self._cache, self._cache_shape = model.kv_cache, shape

    def _prefill(self, group: list[tuple[Row, int]], events: list) -> None:
        """The prompts of new rows through the model in one call (padded at the end), their keys
        and values into the rows' slots, and each row's first token. `start` > 0 (a group of
        one) feeds only the part of the prompt its slot does not hold yet."""
        rows = [row for row, _ in group]
        start = group[0][1]
        # Rows with the same prompt (GRPO's group of samples of one prompt, the same request
        # twice) share one prefill: its keys and values are copied into each of their slots.
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(row.prompt), len(first)) for row in rows]
        unique = [rows[source.index(u)] for u in range(len(first))]
        T = max(len(row.prompt) for row in rows)
        idx = torch.zeros(len(unique), T - start, dtype=torch.long)
        for i, row in enumerate(unique):
            idx[i, : len(row.prompt) - start] = torch.tensor(row.prompt[start:], dtype=torch.long)
        idx = idx.to(self.device)
        last = torch.tensor([len(row.prompt) - 1 - start for row in unique], device=self.device)
        input_pos = torch.arange(start, T, device=self.device)
        slots = [row.slot for row in rows]
        shared = None
        if len(unique) < len(rows):
            shared = torch.tensor(source, device=self.device)
            window = self.model.kv_cache_rows(torch.tensor(slots, device=self.device), T, shared)
        elif slots == list(range(slots[0], slots[0] + len(slots))):
            window = self.model.kv_cache_window(slots[0], slots[-1] + 1, T)
        else:  # not side by side: prefill apart, then copy into the slots
            window = self.model.kv_cache_rows(torch.tensor(slots, device=self.device), T)
        with window:
            logits = prefill(self.model, idx, input_pos, last)
        if shared is not None:
            logits = logits[shared]
        for row in rows:
            self.cached[row.slot] = list(row.prompt)
        for row, token in zip(rows, self.sampler(logits, slots)):
            self._take(row, token, events)

    def _decode_rows(self, rows: list[Row], events: list) -> None:
        """One token for every running row. The step covers the slots from the first used one
        to the last (every slot when compiled); free slots between them ride along (token 0 at
        position 0, output ignored): the cache rows stay where they are."""
        slots = [row.slot for row in rows]
        first, end = (0, len(self.slots)) if self.compiled else (min(slots), max(slots) + 1)
        n = end - first
        tokens, positions = [0] * n, [0] * n
        for row in rows:
            tokens[row.slot - first] = row.tokens[-1]
            positions[row.slot - first] = len(row.prompt) + row.generated - 1
            row.batch = max(row.batch, len(rows))
        for slot in range(first, end):
            if self.slots[slot] is None:
                self.cached[slot] = []  # its position 0 is overwritten
        token_in = torch.tensor(tokens, dtype=torch.long, device=self.device).view(n, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        pos = pos if n == 1 else pos.view(n, 1)
        # Attention reads every position of the window it is given: eager steps get only the
        # positions in use (most of a batch-32 step's time is these reads).
        length = self.cache_len if self.compiled else max(positions) + 1
        with self.model.kv_cache_window(first, end, length):
            if self.compiled and not self._compile_checked:
                logits = self._first_compiled_step(token_in, pos)
            else:
                logits = self._decode(self.model, token_in, pos)
        for row in rows:
            self.cached[row.slot].append(row.tokens[-1])
        if slots != list(range(first, end)):
            logits = logits[torch.tensor(slots, device=self.device) - first]
        for row, token in zip(rows, self.sampler(logits, slots)):
            self._take(row, token, events)

    def _speculate(self, row: Row, events: list) -> bool:
        """Advance one row by a speculative step (False if it cannot take one)."""
        from lifecycle_cli.generate.speculative import verify

        drafter = self.drafter
        if drafter is None or row.params.repetition_penalty != 1:
            return False
        p = len(row.prompt) + row.generated - 1  # the position of the row's last token
        k = min(drafter.k, row.budget - row.generated, drafter.context - p)
        if k < 1:
            return False
        drafter.reserve(self.cache_len)
        seq = row.prompt + row.tokens
        generator = self.sampler.generators[row.slot]
        drafts, draft_probs = drafter.propose(seq, k, row.params, generator)
        idx = torch.cat([torch.tensor([row.tokens[-1]], device=self.device), drafts])
        positions = torch.arange(p, p + k + 1, device=self.device)
        with self.model.kv_cache_window(row.slot, row.slot + 1, p + k + 1):
            logits = self.model(idx.view(1, -1), input_pos=positions)[0]
        n, token, *proposed = torch.cat(
            [verify(drafts, draft_probs, logits, row.params, generator), drafts]
        ).tolist()
        kept = proposed[:n]
        drafter.kept(seq, kept, k)
        self.cached[row.slot] += [row.tokens[-1], *kept]
        row.drafted += k
        row.accepted += n
        for t in [*kept, token]:
            if self.slots[row.slot] is not row:  # ended (a stop, the budget)
                break
            self._take(row, t, events)
        return True

    def _first_compiled_step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        try:
            logits = self._decode(self.model, token, input_pos)
        except Exception as e:  # inductor needs a working C++ compiler (or Triton on GPU)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--compile failed ({reason}); run without --compile") from e
        self._compile_checked = True
        return logits

    def _take(self, row: Row, token: int, events: list) -> None:
        if row.first_token_at is None:
            row.first_token_at = time.perf_counter()
        finish, piece = None, ""
        if token in row.stops:
            finish = "stop"
        else:
            row.tokens.append(token)
            self.sampler.observe(row.slot, token)
            if row.text is not None:
                piece = row.text.add(token)
            if row.text is not None and row.text.stopped:
                finish = "stop"
            elif row.generated >= row.budget:
                finish = "length"
        if finish is not None and row.text is not None:
            piece += row.text.finish()
        if row.stream and piece:
            events.append((row.key, "piece", piece))
        if finish is not None:
            self._release(row)
            done = {
                "text": "" if row.stream or row.text is None else row.text.text,
                "token_ids": row.tokens,
                "finish_reason": finish,
                "prompt_tokens": len(row.prompt),
                "completion_tokens": row.generated,
                "batch": row.batch,
                "first_token_at": row.first_token_at,
                "drafted": row.drafted,
                "accepted": row.accepted,
            }
            events.append((row.key, "done", done))

    def _release(self, row: Row) -> None:
        self.slots[row.slot] = None
        self.sampler.release(row.slot)


def _prefill_groups(admitted: list[tuple[Row, int]], max_tokens: int = 8192) -> list[list]:
    """New rows in groups to prefill together: a row that reuses its slot's cache alone, the
    others by length, so that padding to the longest prompt of a group at most doubles its
    tokens (plus some slack for short prompts)."""
    groups: list[list] = [[item] for item in admitted if item[1] > 0]
    fresh: list[list] = []
    real = 0  # the prompt tokens of the last group
    for item in sorted((i for i in admitted if i[1] == 0), key=lambda i: len(i[0].prompt)):
        group = fresh[-1] if fresh else None
        n = len(item[0].prompt)
        if group is not None:
            padded = n * (len(group) + 1)
            if padded <= 2 * (real + n) + 256 and padded <= max_tokens:
                group.append(item)
                real += n
                continue
        fresh.append([item])
        real = n
    for group in fresh:  # in slot order: side by side slots prefill in place
        group.sort(key=lambda item: item[0].slot)
    return groups + fresh


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n
