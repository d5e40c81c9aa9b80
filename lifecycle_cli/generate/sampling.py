"""Turning logits into tokens: `sample` (per-row temperature, top-k, top-p, min-p, generators),
the repetition penalty, and `Sampler`, which holds every slot's settings as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lifecycle_cli.generate.options import SamplingParams


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
    """The sampling settings of every slot of a batch, as tensors indexed by slot, plus each
    slot's generator and (with a repetition penalty) the tokens it has seen.

    `assign(slot, params, prompt)` when a request takes a slot, `release(slot)` when it leaves;
    `__call__(logits, slots)` draws the next token of those slots.
    """

    def __init__(self, slots: int, vocab_size: int, device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.params: list[Optional[SamplingParams]] = [None] * slots
        self.temperature = torch.zeros(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.min_p = torch.zeros(slots, device=device)
        self.penalty = torch.ones(slots, device=device)
        self.generators: list[Optional[torch.Generator]] = [None] * slots
        self.seen: Optional[torch.Tensor] = None  # (slots, V) bool, once a row needs it

    def assign(self, slot: int, params: SamplingParams, prompt: Sequence[int]) -> None:
        self.params[slot] = params
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k or 0
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.penalty[slot] = params.repetition_penalty
        self.generators[slot] = (
            None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        )
        if params.repetition_penalty != 1:
            if self.seen is None:
                self.seen = torch.zeros(
                    len(self.params), self.vocab_size, dtype=torch.bool, device=self.device
                )
            self.seen[slot] = False
            self.seen[slot, torch.tensor(list(prompt), device=self.device)] = True

    def release(self, slot: int) -> None:
        self.params[slot] = None
        self.generators[slot] = None

    def __call__(self, logits: torch.Tensor, slots: list[int]) -> list[int]:
        """(len(slots), V) logits of those slots -> their next tokens."""
        ps = [self.params[s] for s in slots]
        if all(p is None or p.greedy for p in ps) and not any(
            p is not None and p.repetition_penalty != 1 for p in ps
        ):
            return logits.argmax(-1).tolist()
        index = torch.tensor(slots, device=self.device)
        if any(p is not None and p.repetition_penalty != 1 for p in ps):
            logits = apply_repetition_penalty(logits.float(), self.seen[index], self.penalty[index])
        tokens = sample(
            logits,
            self.temperature[index],
            self.top_k[index] if any(p is not None and p.top_k for p in ps) else None,
            self.top_p[index] if any(p is not None and p.top_p < 1 for p in ps) else None,
            self.min_p[index] if any(p is not None and p.min_p > 0 for p in ps) else None,
            [self.generators[s] for s in slots],
        ).tolist()
        return tokens

    def observe(self, slot: int, token: int) -> None:
        """Remember a slot's new token for its repetition penalty."""
        params = self.params[slot]
        if params is not None and params.repetition_penalty != 1:
            self.seen[slot, token] = True
