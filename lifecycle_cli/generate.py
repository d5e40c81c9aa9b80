"""Sampling and streaming generation.

The path, gpt-fast style: `prefill` runs the prompt through the model once, filling the static
KV cache; `decode_step` then feeds one token per row at a time (fixed shapes, so it can be
compiled); `sample` turns each step's logits into the next tokens. `Generator` owns the model and
its cache and drives the loop for a batch of prompts, each row with its own sampling settings,
positions and stop conditions; `TextStream` turns a row's tokens into text pieces that are safe to
print (never half a UTF-8 character, never the start of a stop string).

    gen = Generator(model, tokenizer)
    for piece in gen.stream("Once upon a time", SamplingParams(max_new_tokens=32)):
        print(piece, end="", flush=True)

Batches of prompts of different lengths need no padding mask: the prompts are padded at the end
for the one prefill call, then every row decodes at its own position, and a row never attends to
cache slots past its position (where the padding of a shorter prompt went).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional, Union

import torch

from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]

# Precision names, Lightning style, with the plain dtype names as aliases.
PRECISIONS: dict[str, torch.dtype] = {
    "32-true": torch.float32,
    "32": torch.float32,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "16-true": torch.float16,
    "16": torch.float16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class SamplingParams:
    """How one row is sampled and when it stops.

    temperature 0 is greedy decoding. top_k None, top_p 1 and min_p 0 leave the distribution
    whole. repetition_penalty > 1 makes tokens already in the prompt or the output less likely
    (as in transformers: positive logits divided, negative ones multiplied). A row stops at the
    tokenizer's end-of-sequence ids, at any of `stop_token_ids`, at any of the `stop` strings
    (which are not part of the output) or after `max_new_tokens`.
    """

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Lists are welcome from callers; keep the dataclass hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be at least 1 (or unset), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise UserError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0, top_k=None)


# --------------------------------------------------------------------------------------------
# Sampling


def sample(
    logits: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 1.0,
    top_k: Optional[Union[int, torch.Tensor]] = None,
    top_p: Optional[Union[float, torch.Tensor]] = None,
    min_p: Optional[Union[float, torch.Tensor]] = None,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
) -> torch.Tensor:
    """Draw one token per row from `logits` (B, V) -> (B,).

    Every setting is a number for all rows or a (B,) tensor, one per row. temperature 0 means
    greedy for that row; a top_k of 0 or >= V, top_p 1 and min_p 0 disable that filter. Rows draw
    with their own `generators` (None: torch's global generator), so a seeded row gets the same
    tokens whatever else is in the batch.
    """
    B, V = logits.shape
    logits = logits.float()
    temperature = _per_row(temperature, B, logits.device)
    greedy = temperature == 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    x = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if top_k is not None:
        k = _per_row(top_k, B, logits.device).long()
        active = (k > 0) & (k < V)
        if bool(active.any()):
            k_max = int(k[active].max())
            kth = x.topk(k_max, dim=-1).values.gather(1, (k.clamp(1, k_max) - 1)[:, None])
            kth = torch.where(active[:, None], kth, float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None:
        p = _per_row(top_p, B, logits.device)
        if bool((p < 1).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest head whose mass reaches top_p: drop a token once the mass
            # before it already does.
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p[:, None]
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    if min_p is not None:
        m = _per_row(min_p, B, logits.device)
        if bool((m > 0).any()):
            floor = m[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the Gumbel-max trick without a log),
    # and unlike torch.multinomial it takes a generator per row.
    noise = torch.empty_like(probs)
    for row in range(B):
        noise[row].exponential_(generator=generators[row] if generators else None)
    choice = (probs / noise).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), choice)


def _per_row(value, B: int, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.full((B,), float(value), device=device)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """transformers' rule: logits of `seen` tokens (B, V bool) are divided by the row's `penalty`
    (B,) when positive, multiplied when negative."""
    penalty = penalty[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


class Sampler:
    """The per-row sampling settings of a batch, as tensors, plus each row's generator."""

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device) -> None:
        self.params = list(params)
        self.all_greedy = all(p.greedy for p in params)
        t = lambda values: torch.tensor(values, device=device)  # noqa: E731
        self.temperature = t([p.temperature for p in params]).float()
        self.top_k = t([p.top_k or 0 for p in params]) if any(p.top_k for p in params) else None
        self.top_p = (
            t([p.top_p for p in params]).float() if any(p.top_p < 1 for p in params) else None
        )
        self.min_p = (
            t([p.min_p for p in params]).float() if any(p.min_p > 0 for p in params) else None
        )
        self.penalty = (
            t([p.repetition_penalty for p in params]).float()
            if any(p.repetition_penalty != 1 for p in params)
            else None
        )
        self.generators = [
            None if p.seed is None else torch.Generator(device).manual_seed(p.seed) for p in params
        ]
        self.seen = (
            torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
            if self.penalty is not None
            else None
        )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) tokens."""
        if self.penalty is not None:
            logits = apply_repetition_penalty(logits.float(), self.seen, self.penalty)
        if self.all_greedy:
            return logits.argmax(-1)
        return sample(logits, self.temperature, self.top_k, self.top_p, self.min_p, self.generators)

    def observe(self, tokens: torch.Tensor) -> None:
        """Remember tokens (B, T) for the repetition penalty (prompt, then each new token)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens, True)


# --------------------------------------------------------------------------------------------
# The model calls


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


def check_prompt_length(n_tokens: int, context: int, what: str = "the prompt") -> None:
    """A UserError naming both lengths when `n_tokens` leaves no room to generate."""
    if n_tokens == 0:
        raise UserError(f"{what} is empty: there is nothing to continue")
    if n_tokens >= context:
        raise UserError(
            f"{what} is {n_tokens} tokens but the model's context is {context} tokens; "
            f"shorten it to at most {context - 1} tokens to leave room for the reply"
        )


# --------------------------------------------------------------------------------------------
# Text


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


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Completion:
    """One row's result: filled in as it streams, final once `finish_reason` is set.

    finish_reason: "stop" (end-of-sequence, a stop token or a stop string), "length"
    (max_new_tokens or the context ran out) or "cancelled" (the caller stopped early).
    """

    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    time_to_first_token: Optional[float] = None  # seconds from the call to the first token
    seconds: float = 0.0  # from the call to the end

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class BatchStream:
    """Iterate to advance every row one token: yields one text piece per row ('' if none).

    `completions` holds each row's `Completion`. `cancel(row)` ends a row now (a client that
    went away); `close()` ends them all. Rows that are done cost nothing but a slot in the batch.
    """

    def __init__(
        self,
        generator: Generator,
        prompts: list[list[int]],
        params: list[SamplingParams],
        texts: Optional[list[TextStream]],
    ) -> None:
        self.completions = [Completion(prompt_tokens=len(p)) for p in prompts]
        self.texts = texts
        self._start = time.perf_counter()
        self._tokens = generator._token_steps(prompts, params, self)
        self._ended: set[int] = set()

    def __iter__(self) -> Iterator[list[str]]:
        return self

    def __next__(self) -> list[str]:
        try:
            step = next(self._tokens)
        except StopIteration:
            self._finish_all()
            raise
        pieces = []
        now = time.perf_counter() - self._start
        for row, token in enumerate(step):
            c = self.completions[row]
            if token is None:
                pieces.append(self._end(row) if c.finish_reason is not None else "")
                continue
            if c.time_to_first_token is None:
                c.time_to_first_token = now
            c.token_ids.append(token)
            piece = ""
            if self.texts is not None:
                piece = self.texts[row].add(token)
                c.text = self.texts[row].text
                if self.texts[row].stopped:
                    c.finish_reason = "stop"
            if c.finish_reason is not None:
                piece += self._end(row)
            pieces.append(piece)
        return pieces

    def _end(self, row: int) -> str:
        """Close a row once: flush its held-back text, stop its clock."""
        c = self.completions[row]
        if row in self._ended:
            return ""
        self._ended.add(row)
        c.seconds = time.perf_counter() - self._start
        piece = self.texts[row].finish() if self.texts is not None else ""
        if self.texts is not None:
            c.text = self.texts[row].text
        return piece

    def row_done(self, row: int) -> bool:
        return self.completions[row].finish_reason is not None

    def finish(self, row: int, reason: str) -> None:
        c = self.completions[row]
        if c.finish_reason is None:
            c.finish_reason = reason

    def cancel(self, row: int) -> None:
        self.finish(row, "cancelled")

    def close(self) -> None:
        for row in range(len(self.completions)):
            self.cancel(row)
        self._tokens.close()
        self._finish_all()

    def _finish_all(self) -> None:
        for row in range(len(self.completions)):
            self.finish(row, "cancelled")
            self._end(row)


class Stream:
    """One prompt's text pieces as they are generated; `completion` has the totals."""

    def __init__(self, batch: BatchStream) -> None:
        self.batch = batch
        self.completion = batch.completions[0]

    def __iter__(self) -> Iterator[str]:
        try:
            for (piece,) in self.batch:
                if piece:
                    yield piece
        finally:
            self.batch.close()  # also when the caller stops early or is interrupted

    def close(self) -> None:
        self.batch.close()


# --------------------------------------------------------------------------------------------
# The engine


class Generator:
    """A model (and optionally its tokenizer) ready to generate.

    Owns the KV cache, sized to what each call needs (powers of two from 256 up to the model's
    context, so a compiled decode step is compiled a few times at most). For one prompt it
    reuses the cache for the longest start the prompt shares with the previous call: a chat
    re-feeds only the new turn.

    compile: compile `decode_step` with `torch.compile` (inductor with weight freezing: the
    weights must not change while this generator is in use). Pays off for long outputs; the
    first call takes some seconds to compile, and so does the first call that needs a longer
    cache (attention reads the whole cache, so a cache sized to the need beats one graph for
    the whole context).
    """

    def __init__(
        self, model: GPT, tokenizer: Optional[Tokenizer] = None, *, compile: bool = False
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self._decode = decode_step
        self.compiled, self._compile_checked = compile, False
        if compile:
            self._decode = torch.compile(
                decode_step, fullgraph=True, dynamic=False, options={"freezing": True}
            )
        self._cache = None  # the cache this generator set (someone else may replace it)
        self._cache_shape: Optional[tuple[int, int]] = None  # (batch, length)
        self._cached: list[int] = []  # row 0's tokens whose keys/values are in the cache

    @property
    def context(self) -> int:
        return self.model.max_seq_length

    # ---- tokens ----------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("this model has no tokenizer: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def stop_ids(self, params: SamplingParams) -> set[int]:
        """Token ids that end a row: the tokenizer's end-of-sequence ids, the row's stop token
        ids, and stop strings that are a single special token (a chat template's end of turn
        never shows up in the decoded text, so it has to be caught as a token)."""
        ids = set(params.stop_token_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.eos_ids)
            for s in params.stop:
                encoded = self.tokenizer.encode(s, bos=False)
                if len(encoded) == 1 and self.tokenizer.decode(encoded, True) == "":
                    ids.add(encoded[0])
        return ids

    def _ensure_cache(self, batch: int, length: int) -> None:
        length = min(max(256, 1 << (length - 1).bit_length()), self.context)
        cache = self.model.blocks[0].attn.kv_cache
        if self._cache_shape is not None and cache is self._cache:
            have_b, have_len = self._cache_shape
            # A compiled step would recompile for another batch size: give it its own cache.
            same_b = have_b == batch or (have_b > batch and not self.compiled)
            if same_b and have_len >= length:
                return
        self.model.set_kv_cache(batch, length, device=self.device)
        self._cache = self.model.blocks[0].attn.kv_cache
        self._cache_shape, self._cached = (batch, length), []

    def _token_steps(
        self, prompts: list[list[int]], params: list[SamplingParams], out: BatchStream
    ) -> Iterator[list[Optional[int]]]:
        """Yield, per step, the new token of each row (None once a row is done). Rows are
        finished through `out` (by this loop for stop tokens and length, by the caller for stop
        strings or cancellation)."""
        B, model = len(prompts), self.model
        lengths = [len(p) for p in prompts]
        budget = [min(p.max_new_tokens, self.context - n) for p, n in zip(params, lengths)]
        stops = [self.stop_ids(p) for p in params]
        with torch.inference_mode():
            self._ensure_cache(B, max(n + m for n, m in zip(lengths, budget)))
            sampler = Sampler(params, model.config.vocab_size, self.device)
            T = max(lengths)
            start = 0
            if B == 1:  # reuse what the cache already holds of this prompt
                start = _common_prefix(self._cached, prompts[0], limit=lengths[0] - 1)
            self._cached = self._cached[:start] if B == 1 else []
            idx = torch.zeros(B, T - start, dtype=torch.long)
            for row, p in enumerate(prompts):
                idx[row, : len(p) - start] = torch.tensor(p[start:], dtype=torch.long)
            idx = idx.to(self.device)
            if sampler.seen is not None:
                for row, p in enumerate(prompts):
                    sampler.seen[row, torch.tensor(p, device=self.device)] = True
            last = torch.tensor(lengths, device=self.device) - 1 - start
            logits = prefill(model, idx, torch.arange(start, T, device=self.device), last)
            if B == 1:
                self._cached = list(prompts[0])
            tokens = sampler(logits)
            generated = [0] * B
            if B == 1:
                pos = torch.tensor([lengths[0]], device=self.device)
            while True:
                ids = tokens.tolist()
                step: list[Optional[int]] = []
                for row, token in enumerate(ids):
                    if out.row_done(row):
                        step.append(None)
                    elif token in stops[row]:
                        out.finish(row, "stop")
                        step.append(None)
                    else:
                        generated[row] += 1
                        if generated[row] >= budget[row]:
                            out.finish(row, "length")
                        step.append(token)
                yield step
                if all(out.row_done(row) for row in range(B)):
                    return
                if B == 1:
                    pos.fill_(lengths[0] + generated[0] - 1)
                    input_pos = pos
                else:  # each row at its own position; finished rows idle in place
                    input_pos = torch.tensor(
                        [[n + max(g, 1) - 1] for n, g in zip(lengths, generated)],
                        device=self.device,
                    )
                token_in = tokens.view(B, 1)
                sampler.observe(token_in)
                if self.compiled and not self._compile_checked:
                    logits = self._first_compiled_step(token_in, input_pos)
                else:
                    logits = self._decode(model, token_in, input_pos)
                if B == 1:
                    self._cached.append(ids[0])
                tokens = sampler(logits)

    def _first_compiled_step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        try:
            logits = self._decode(self.model, token, input_pos)
        except Exception as e:  # inductor needs a working C++ compiler (or Triton on GPU)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--compile failed ({reason}); run without --compile") from e
        self._compile_checked = True
        return logits

    # ---- public calls ----------------------------------------------------------------------

    def stream_batch(
        self,
        prompts: Sequence[Prompt],
        params: Union[SamplingParams, Sequence[SamplingParams]] = GREEDY,
    ) -> BatchStream:
        """Start generating for several prompts at once; iterate the result for text pieces.

        `params` is one setting for all rows or one per row. Without a tokenizer the pieces are
        empty and only `completions[i].token_ids` fill."""
        ids = [self.encode(p) for p in prompts]
        if isinstance(params, SamplingParams):
            params = [params] * len(ids)
        params = list(params)
        if len(params) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(params)} sampling settings")
        for i, p in enumerate(ids):
            what = "the prompt" if len(ids) == 1 else f"prompt {i + 1}"
            check_prompt_length(len(p), self.context, what)
        texts = None
        if self.tokenizer is not None:
            texts = [TextStream(self.tokenizer, p, s.stop) for p, s in zip(ids, params)]
        return BatchStream(self, ids, params, texts)

    def stream(self, prompt: Prompt, params: SamplingParams = GREEDY) -> Stream:
        """Text pieces for one prompt as they are generated."""
        return Stream(self.stream_batch([prompt], [params]))

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        params: Union[SamplingParams, Sequence[SamplingParams]] = GREEDY,
    ) -> list[Completion]:
        batch = self.stream_batch(prompts, params)
        for _ in batch:
            pass
        return batch.completions

    def generate(self, prompt: Prompt, params: SamplingParams = GREEDY) -> Completion:
        return self.generate_batch([prompt], [params])[0]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# Device and precision, for the verbs


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' (CUDA if there is one, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but this machine has no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def resolve_precision(precision: Optional[str], device: torch.device) -> torch.dtype:
    """A precision name -> dtype. None: bf16 on a GPU that supports it, else float32."""
    if precision is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    key = precision.lower().removesuffix("-mixed").removesuffix("-true")
    for name, dtype in PRECISIONS.items():
        if name.removesuffix("-true") == key:
            return dtype
    raise UserError(f"unknown precision {precision!r} (choose from 32-true, bf16-true, 16-true)")


__all__ = [
    "BatchStream",
    "Completion",
    "GREEDY",
    "Generator",
    "SamplingParams",
    "Stream",
    "TextStream",
    "check_prompt_length",
    "decode_step",
    "fast_decode_layout",
    "prefill",
    "replace",
    "resolve_device",
    "resolve_precision",
    "sample",
]


def format_stats(completion: Completion) -> str:
    """LitGPT's timing line."""
    return (
        f"Time for inference: {completion.seconds:.2f} sec total, "
        f"{completion.tokens_per_second:.2f} tokens/sec, {completion.completion_tokens} tokens"
    )


def unescape(text: str) -> str:
    """`\\n` and `\\t` typed on a command line as newline and tab (`\\\\` is a backslash)."""
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
