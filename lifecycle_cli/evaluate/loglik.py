"""Log-likelihood scoring: the one batched pass over our GPT behind every scored task
(perplexity windows, multiple-choice options, lm-eval's `loglikelihood` requests).

A request is (context ids, continuation ids). Requests are sorted longest first and run in
right-padded batches: with causal attention a row never sees the padding after it, so no mask
is needed. The result of each is the sum of the continuation tokens' log-probabilities and
whether greedy decoding would have produced the continuation (every token the argmax).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    from lifecycle_cli.model import GPT

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


class Scored(NamedTuple):
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    greedy: bool  # every continuation token is the most likely one
    n_tokens: int  # continuation tokens scored


def window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[int]:
    """The model input for a request: context + continuation without its last token, keeping
    the last `max_length` tokens (lm-eval's left truncation)."""
    if not continuation:
        raise ValueError("a continuation to score has no tokens")
    if len(continuation) > max_length:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context "
            f"of {max_length}"
        )
    full = [*context, *continuation]
    return full[-(max_length + 1) :][:-1]


@torch.inference_mode()
def score(
    model: GPT,
    requests: Sequence[Request],
    batch_size: int = 8,
    progress: Optional[Callable[[int], None]] = None,
) -> list[Scored]:
    """Score every request (see the module docstring), `batch_size` rows per forward pass.
    `progress(n)` is called after each batch with the number of requests it held."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_length = model.max_seq_length
    device = next(model.parameters()).device
    inputs = [window(ctx, cont, max_length) for ctx, cont in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    out: list[Optional[Scored]] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(inputs[rows[0]])
        idx = torch.zeros((len(rows), width), dtype=torch.long)
        for b, i in enumerate(rows):
            idx[b, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        # Logits only where continuations are scored, a row at a time: a whole batch of
        # them (8 x 2,048 x a 49k vocabulary) would be gigabytes.
        hidden = model(idx.to(device), return_hidden=True)
        for b, i in enumerate(rows):
            cont = torch.tensor(list(requests[i][1]), dtype=torch.long, device=device)
            end = len(inputs[i])
            logits = model.head(hidden[b, end - len(cont) : end])
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, cont[:, None])[:, 0]
            greedy = bool((logprobs.argmax(-1) == cont).all())
            out[i] = Scored(float(picked.sum()), greedy, len(cont))
        if progress is not None:
            progress(len(rows))
    return out  # type: ignore[return-value]
