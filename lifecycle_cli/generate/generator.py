"""`Generator`: the engine for a batch of prompts at a time (a library call, `generate`, `chat`,
finetune's exact match), with text streams and per-row results.

    gen = Generator(model, tokenizer)
    for piece in gen.stream("Once upon a time", SamplingParams(max_new_tokens=32)):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

from lifecycle_cli.errors import UserError
from lifecycle_cli.generate.engine import Engine
from lifecycle_cli.generate.options import GREEDY, SamplingParams

if TYPE_CHECKING:
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]


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
    drafted: int = 0  # speculative decoding: tokens the draft model proposed
    accepted: int = 0  # ... and the model kept

    @property
    def acceptance_rate(self) -> Optional[float]:
        """The share of draft tokens kept (None without speculative decoding)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def format_stats(completion: Completion) -> str:
    """LitGPT's timing line (and the draft's acceptance rate, if a draft model proposed)."""
    line = (
        f"Time for inference: {completion.seconds:.2f} sec total, "
        f"{completion.tokens_per_second:.2f} tokens/sec, {completion.completion_tokens} tokens"
    )
    if completion.acceptance_rate is not None:
        line += (
            f", draft acceptance {completion.acceptance_rate:.0%} "
            f"({completion.accepted}/{completion.drafted})"
        )
    return line


class BatchStream:
    """Iterate to advance every row one token: yields one text piece per row ('' if none).

    `completions` holds each row's `Completion`. `cancel(row)` ends a row now; `close()` ends
    them all. A row that is done leaves the batch.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
        self.engine = engine
        self.completions = [Completion(prompt_tokens=len(p)) for p in prompts]
        self._start = time.perf_counter()
        try:
            for row, (ids, p) in enumerate(zip(prompts, params)):
                what = "the prompt" if len(prompts) == 1 else f"prompt {row + 1}"
                engine.submit(row, ids, p, stream=True, what=what)
        except BaseException:  # a prompt too long: none of them runs
            for row in range(len(prompts)):
                engine.cancel(row)
            raise

    def __iter__(self) -> Iterator[list[str]]:
        return self

    def __next__(self) -> list[str]:
        if all(c.finish_reason is not None for c in self.completions):
            raise StopIteration
        pieces = [""] * len(self.completions)
        try:
            events = self.engine.step()
        except BaseException:
            self.close()
            raise
        now = time.perf_counter()
        for row, kind, payload in events:
            c = self.completions[row]
            if kind == "piece":
                pieces[row] += payload
                c.text += payload
            elif kind == "done":
                c.token_ids = list(payload["token_ids"])
                c.finish_reason = payload["finish_reason"]
                c.time_to_first_token = payload["first_token_at"] - self._start
                c.seconds = now - self._start
                c.drafted, c.accepted = payload["drafted"], payload["accepted"]
            else:  # engines built with raise_errors report no errors as events
                raise RuntimeError(payload["message"])
        return pieces

    def cancel(self, row: int) -> None:
        c = self.completions[row]
        if c.finish_reason is not None:
            return
        tokens = self.engine.cancel(row)
        c.finish_reason = "cancelled"
        c.seconds = time.perf_counter() - self._start
        if tokens is not None:
            c.token_ids = list(tokens)

    def close(self) -> None:
        for row in range(len(self.completions)):
            self.cancel(row)


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


class Generator:
    """A model (and optionally its tokenizer) ready to generate: the `Engine`, a batch of
    prompts at a time.

    Keeps the engine and its KV cache between calls, sized to what each call needs (powers of
    two from 256 up to the model's context); a prompt that starts like the previous one (a
    chat's next turn) prefills only the rest.

    compile: compile the decoding step with `torch.compile` (the weights must not change while
    this generator is in use). Pays off for long outputs; the first call takes some seconds to
    compile, and so does the first call that needs a longer cache or another batch size.
    draft, draft_tokens: speculative decoding for one prompt at a time: `draft` (a smaller or
    quantized model with the same tokenizer) proposes `draft_tokens` tokens per step.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Optional[Tokenizer] = None,
        *,
        compile: bool = False,
        draft: Optional[GPT] = None,
        draft_tokens: int = 4,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        drafter = None
        if draft is not None:
            from lifecycle_cli.generate.speculative import Drafter

            drafter = Drafter(draft, model, draft_tokens)
        self.engine = Engine(
            model, tokenizer, 1, compile=compile, raise_errors=True, drafter=drafter
        )
        self._open: Optional[BatchStream] = None

    @property
    def context(self) -> int:
        return self.model.max_seq_length

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("this model has no tokenizer: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

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
        if self._open is not None:  # one stream at a time: an unfinished one is dropped
            self._open.close()
        engine = self.engine
        slots = len(engine.slots)
        if len(ids) > slots or (engine.compiled and len(ids) != slots):
            engine.resize(len(ids))  # a compiled step keeps one batch size per cache
        self._open = BatchStream(engine, ids, params)
        return self._open

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
