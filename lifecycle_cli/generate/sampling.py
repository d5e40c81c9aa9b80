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
    tokens whatever else is in the batch. Settings given as numbers are decided here without
    reading the device.

    A row with a top_k draws among its k most likely tokens only (the same distribution as
    cutting the others; k random numbers instead of V: at a vocabulary of 50,000 drawing them
    is most of a small model's decode step).
    """
    logits = logits.float()
    B, V = logits.shape
    if not isinstance(temperature, torch.Tensor) and not isinstance(top_k, torch.Tensor):
        if temperature == 0:
            return logits.argmax(-1)
        if top_k is not None and 0 < top_k < V:
            return _sample_top_k(logits, top_k, [top_k] * B, temperature, top_p, min_p, generators)
        return draw(probabilities(logits, temperature, None, top_p, min_p), generators)
    temperature = _per_row(temperature, B, logits.device)
    greedy = temperature == 0
    tokens = logits.argmax(-1)
    if bool(greedy.all()):
        return tokens
    k = _per_row(top_k if isinstance(top_k, torch.Tensor) else top_k or 0, B, logits.device)
    k = k.long()
    limited = (k > 0) & (k < V)
    # Rows with and without a top_k apart: a row's draw depends on its own settings only.
    for subset, cut in ((~greedy & limited, True), (~greedy & ~limited, False)):
        rows = subset.nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        gens = None if generators is None else [generators[r] for r in rows.tolist()]
        t, p, m = (_rows(v, rows) for v in (temperature, top_p, min_p))
        if cut:
            widths = k[rows].tolist()
            tokens[rows] = _sample_top_k(logits[rows], max(widths), widths, t, p, m, gens)
        else:
            tokens[rows] = draw(probabilities(logits[rows], t, None, p, m), gens)
    return tokens


def _sample_top_k(logits, k: int, widths: list[int], temperature, top_p, min_p, generators):
    """Draw among the `widths[row]` (<= k) most likely tokens of each row."""
    values, index = logits.topk(k, dim=-1)
    if any(w < k for w in widths):
        width = torch.tensor(widths, device=logits.device)[:, None]
        beyond = torch.arange(k, device=logits.device) >= width
        values = values.masked_fill(beyond, float("-inf"))
    probs = probabilities(values, temperature, None, top_p, min_p)
    return index.gather(1, draw(probs, generators, widths)[:, None])[:, 0]


def probabilities(
    logits: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 1.0,
    top_k: Optional[Union[int, torch.Tensor]] = None,
    top_p: Optional[Union[float, torch.Tensor]] = None,
    min_p: Optional[Union[float, torch.Tensor]] = None,
    *,
    k_max: Optional[int] = None,
) -> torch.Tensor:
    """The distribution (B, V) that `sample` draws from at temperature > 0: the logits scaled
    by `temperature`, cut by top_k, top_p and min_p (as `sample` takes them), normalised."""
    B, V = logits.shape
    if isinstance(temperature, torch.Tensor):
        temperature = temperature[:, None]
    x = logits.float() / temperature
    if top_k is not None:
        if isinstance(top_k, torch.Tensor):
            k = top_k.to(logits.device).long()
            active = (k > 0) & (k < V)
            if k_max is None:
                k_max = int(k[active].max()) if bool(active.any()) else 0
            if k_max:
                kth = x.topk(k_max, dim=-1).values.gather(1, (k.clamp(1, k_max) - 1)[:, None])
                kth = torch.where(active[:, None], kth, float("-inf"))
                x = x.masked_fill(x < kth, float("-inf"))
        elif 0 < top_k < V:
            kth = x.topk(top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and (isinstance(top_p, torch.Tensor) or top_p < 1):
        p = _per_row(top_p, B, logits.device)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest head whose mass reaches top_p: drop a token once the mass
        # before it already does.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p[:, None]
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    if min_p is not None and (isinstance(min_p, torch.Tensor) or min_p > 0):
        m = _per_row(min_p, B, logits.device)
        floor = m[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    if (top_p is not None) or (min_p is not None):
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(
    probs: torch.Tensor,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    widths: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """One token per row of `probs` (B, V, not necessarily normalised) -> (B,); `widths`: only
    the first widths[row] entries of a row can be drawn (the rest are 0)."""
    # Inverse CDF: one uniform number per row, from the row's own generator (torch.multinomial
    # takes one generator for the batch), against the running sum of its probabilities. One
    # number per row, not one per token as the Gumbel-max trick needs: at a vocabulary of
    # thousands drawing those was most of a batched sampling step.
    B, V = probs.shape
    if widths is not None and max(widths) < V:
        probs = probs[:, : max(widths)]
    kw = {"device": probs.device, "dtype": torch.float64}
    if generators is None or not any(generators):
        u = torch.rand(B, **kw)
    else:
        u = torch.cat([torch.rand(1, generator=generators[row], **kw) for row in range(B)])
    cdf = probs.double().cumsum(-1)
    # u < 1, so u * total < total: the first index whose running sum passes it has mass > 0.
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return index.clamp_(max=probs.size(1) - 1)


def _per_row(value, B: int, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.full((B,), float(value), device=device)


def _rows(value, rows: torch.Tensor):
    """A setting (a number, None or a per-row tensor) for the rows `rows`."""
    return value[rows.to(value.device)] if isinstance(value, torch.Tensor) else value


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
        return self.draw(logits, slots).tolist()

    def draw(self, logits: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """The next tokens of `slots` (len(slots),) on the device: decided from the settings
        this side, so nothing waits for the device until the caller reads the tokens."""
        ps = [self.params[s] for s in slots]
        gens = [self.generators[s] for s in slots]
        penalised = [p is not None and p.repetition_penalty != 1 for p in ps]
        one = ps[0]
        if one is not None and all(p == one for p in ps):  # one setting for every row
            if any(penalised):
                index = torch.tensor(slots, device=self.device)
                logits = apply_repetition_penalty(
                    logits.float(), self.seen[index], self.penalty[index]
                )
            if one.greedy:
                return logits.argmax(-1)
            return sample(logits, one.temperature, one.top_k, one.top_p, one.min_p, gens)
        index = torch.tensor(slots, device=self.device)
        if any(penalised):
            logits = apply_repetition_penalty(logits.float(), self.seen[index], self.penalty[index])
        ks = [p.top_k for p in ps if p is not None and p.top_k and p.top_k < self.vocab_size]
        return sample(
            logits,
            self.temperature[index],
            self.top_k[index] if ks else None,
            self.top_p[index] if any(p is not None and p.top_p < 1 for p in ps) else None,
            self.min_p[index] if any(p is not None and p.min_p > 0 for p in ps) else None,
            gens,
        )

    def observe(self, slot: int, token: int) -> None:
        """Remember a slot's new token for its repetition penalty."""
        params = self.params[slot]
        if params is not None and params.repetition_penalty != 1:
            self.seen[slot, token] = True
