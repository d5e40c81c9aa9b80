"""`perplexity:FILE_OR_FOLDER`: how well a model predicts text.

Each document is encoded and preceded by the tokenizer's bos token (else its eos), so that
every text token is predicted. Windows of at most the model's context slide over it `--stride`
tokens at a time (default: the whole context, i.e. disjoint windows); each window scores only
its last `stride` tokens, so every token is predicted once, with at least context - stride
tokens before it. Reported: mean token NLL (nats), perplexity (exp of it) and bits per byte
(the total NLL over the UTF-8 bytes of the text, in bits: comparable across tokenizers).
"""

from __future__ import annotations

import math

from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.loglik import score
from lifecycle_cli.evaluate.records import read_texts
from lifecycle_cli.evaluate.results import Metric, TaskResult


def check(args: list[str], settings, n_checkpoints: int) -> None:
    if settings.stride is not None and settings.stride < 1:
        raise UserError(f"--stride must be at least 1, got {settings.stride}")
    for arg in args:
        read_texts(arg)  # a missing or unreadable file fails before the model loads


def windows(ids: list[int], context: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, ids to score) requests covering ids[1:] once (ids[0] is the prefix)."""
    requests = []
    for start in range(1, len(ids), stride):
        end = min(start + stride, len(ids))
        requests.append((ids[max(0, end - 1 - context) : start], ids[start:end]))
    return requests


def run(ctx, args: list[str]) -> list[TaskResult]:
    tokenizer, model = ctx.tokenizer, ctx.model
    context = model.max_seq_length
    stride = min(ctx.settings.stride or context, context)
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        raise UserError(f"{ctx.checkpoint_dir}: perplexity needs a bos or eos token to start on")
    out = []
    for arg in args:
        docs = ctx.limited(read_texts(arg))
        requests, owner = [], []
        encoded = []
        for d, (_, text) in enumerate(docs):
            ids = [prefix, *tokenizer.encode(text, bos=False)]
            encoded.append(ids)
            for r in windows(ids, context, stride):
                requests.append(r)
                owner.append(d)
        bar = ctx.progress(f"perplexity:{arg}", len(requests))
        scored = score(model, requests, ctx.settings.batch_size, bar)
        nll = [0.0] * len(docs)
        for d, s in zip(owner, scored):
            nll[d] -= s.logprob
        samples = []
        for (name, text), ids, doc_nll in zip(docs, encoded, nll):
            n_tokens = len(ids) - 1
            samples.append(
                {
                    "document": name,
                    "tokens": n_tokens,
                    "bytes": len(text.encode("utf-8")),
                    "nll": doc_nll,
                    "token_nll": doc_nll / max(1, n_tokens),
                }
            )
        tokens = sum(s["tokens"] for s in samples)
        total_bytes = sum(s["bytes"] for s in samples)
        total = sum(nll)
        token_nll = total / max(1, tokens)
        metrics = [
            Metric("token_nll", token_nll),
            Metric("perplexity", math.exp(token_nll)),
            Metric("bits_per_byte", total / math.log(2) / max(1, total_bytes)),
        ]
        out.append(TaskResult(f"perplexity:{arg}", len(docs), metrics, samples))
    return out
