"""Speculative decoding: a draft model proposes `k` tokens one by one, the target model scores
them all in one forward pass, and the standard acceptance rule keeps a prefix of them plus one
token of the target's own (Leviathan et al. 2023; Chen et al. 2023).

The rule: draft token d_i, drawn from the draft's distribution q_i, is kept with probability
min(1, p_i(d_i) / q_i(d_i)) (p_i: the target's distribution at that position); at the first
token refused, the next token is drawn from max(0, p_i - q_i), renormalised; when all k are
kept, one more is drawn from p_k. Every token then has the target's distribution. Greedy rows
keep the drafts that equal the target's argmax and add the target's argmax after them: exactly
the target's greedy output, in fewer target passes.

`Drafter` holds the draft model and its own one-row KV cache (allocated through the model's
cache API); the engine (engine.py) asks it for proposals when one row is decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch

from lifecycle_cli.errors import UserError
from lifecycle_cli.generate.engine import _common_prefix
from lifecycle_cli.generate.options import SamplingParams
from lifecycle_cli.generate.sampling import draw, probabilities

if TYPE_CHECKING:
    from lifecycle_cli.model import GPT


def target_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a row samples from (temperature > 0) for each row of `logits`."""
    return probabilities(logits, params.temperature, params.top_k, params.top_p, params.min_p)


def verify(
    drafts: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The acceptance rule for `drafts` (k,) drawn from `draft_probs` (k, V; None for greedy)
    given the target's logits at the k + 1 positions (k + 1, V): a tensor [n, token], n the
    drafts kept and `token` the target's next one after them (on the device: one read for the
    caller)."""
    k = drafts.size(0)
    if params.greedy:
        best = target_logits.argmax(-1)
        n = (best[:k] == drafts).int().cumprod(0).sum()
        return torch.stack([n, best[n]])
    p = target_probabilities(target_logits, params)
    rows = torch.arange(k, device=drafts.device)
    u = torch.rand(k, generator=generator, device=drafts.device)
    kept = u * draft_probs[rows, drafts] < p[rows, drafts]  # u < p / q, without dividing by 0
    n = kept.int().cumprod(0).sum()
    residual = torch.cat([(p[:k] - draft_probs).clamp_min(0), p[k:]])
    choices = draw(residual, [generator] * (k + 1))
    return torch.stack([n, choices[n]])


class Drafter:
    """A draft model (the target's tokenizer) with its own one-row KV cache."""

    def __init__(self, draft: GPT, target: GPT, k: int) -> None:
        if k < 1:
            raise UserError(f"--draft_tokens must be at least 1, got {k}")
        if draft.config.vocab_size != target.config.vocab_size:
            raise UserError(
                f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from "
                f"the model's ({target.config.vocab_size}): a draft needs the same tokenizer"
            )
        self.model, self.k = draft, k
        self.device = next(draft.parameters()).device
        self.cached: list[int] = []  # the tokens whose keys and values its cache holds
        self._cache = None

    @property
    def context(self) -> int:
        return self.model.max_seq_length

    def reserve(self, length: int) -> None:
        length = min(length, self.context)
        model = self.model
        if self._cache is None or model.kv_cache is not self._cache or self._cache.max_len < length:
            model.set_kv_cache(1, length, device=self.device)
            self._cache, self.cached = model.kv_cache, []

    def propose(
        self,
        seq: Sequence[int],
        k: int,
        params: SamplingParams,
        generator: Optional[torch.Generator],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`k` tokens to follow `seq` (whose last token the cache does not hold yet) and the
        distributions they were drawn from ((k, V); None for greedy), on the device."""
        start = _common_prefix(self.cached, seq, len(seq) - 1)
        feed = torch.tensor([list(seq[start:])], dtype=torch.long, device=self.device)
        positions = torch.arange(start, len(seq), device=self.device)
        last = torch.tensor([feed.size(1) - 1], device=self.device)
        logits = self.model(feed, input_pos=positions, logits_at=last)[:, 0]
        tokens, dists = [], []
        for i in range(k):
            if params.greedy:
                token = logits.argmax(-1)
            else:
                q = target_probabilities(logits, params)
                token = draw(q, [generator])
                dists.append(q[0])
            tokens.append(token)
            if i + 1 < k:
                pos = torch.tensor([len(seq) + i], device=self.device)
                logits = self.model(token.view(1, 1), input_pos=pos)[:, -1]
        return torch.cat(tokens), (torch.stack(dists) if dists else None)

    def kept(self, seq: Sequence[int], drafts: Sequence[int], k: int) -> None:
        """After verifying `k` proposals: the cache holds `seq` and those of the kept `drafts`
        it was fed (it never sees the last proposal)."""
        self.cached = list(seq) + list(drafts[: k - 1])
