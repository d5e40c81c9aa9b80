"""`GPT`: the one decoder-only transformer. Every behaviour is chosen by a `Config` field.

Parameter names (what checkpoints store):
    wte, wpe?, blocks.N.{norm_1?, attn.{qkv, proj, q_norm?, k_norm?, sinks?},
    post_attention_norm?, norm_2?, mlp.{fc, proj | fc_1, fc_2, proj | gate,
    experts.E.{fc_1, fc_2, proj}}, post_mlp_norm?}, ln_f, lm_head
`attn.qkv` holds the queries, keys and values stacked in that order along its output dimension.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lifecycle_cli.config import Config
from lifecycle_cli.linear import Linear
from lifecycle_cli.mlp import MoE, make_mlp, router_loss  # noqa: F401 (router_loss: API)
from lifecycle_cli.objectives import linear_cross_entropy
from lifecycle_cli.rope import apply_rope, rope_tables


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Derived from the config, so not saved; float32 whatever the model's dtype. "local"
        # tables only with a separate RoPE base for the sliding-window layers.
        self.rope_kinds = sorted({k for i in range(config.n_layer) if (k := config.rope_kind(i))})
        for kind in self.rope_kinds:
            self.register_buffer(f"rope_{kind}_cos", None, persistent=False)
            self.register_buffer(f"rope_{kind}_sin", None, persistent=False)
        self.max_seq_length = config.block_size
        self.reset_parameters()

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """The longest sequence this model will see; sizes the RoPE tables."""
        if value > self.config.block_size:
            raise ValueError(
                f"max_seq_length {value} exceeds the model's context of {self.config.block_size}"
            )
        self._max_seq_length = value
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables, e.g. after materialising a model built on `meta`."""
        device = self.wte.weight.device
        for kind in self.rope_kinds:
            cos = sin = None
            if device.type != "meta":
                cos, sin = rope_tables(self.config, self._max_seq_length, device, kind)
            setattr(self, f"rope_{kind}_cos", cos)
            setattr(self, f"rope_{kind}_sin", sin)

    def reset_parameters(self) -> None:
        """GPT-2 style initialisation, residual projections scaled down by depth."""
        if self.wte.weight.device.type == "meta":
            return
        std = 0.02
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(".proj") else 1
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, Attention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        *,
        logits_at: Optional[torch.Tensor] = None,
        logits_where: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        positions: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size).

        Without `input_pos` this is a full causal pass over positions 0..T-1. With `input_pos`
        keys and values go into the KV cache set by `set_kv_cache`, and the tokens attend to
        everything cached before them. `input_pos` holds the positions of the T tokens: shape (T,)
        when every row is at the same place, or (B, T) to give each row its own positions
        (batched decoding of prompts of different lengths: a row never sees cache slots past its
        own position, so what a shorter row left there is never read).

        `logits_at` (B,) picks one index along T per row: the result is then (B, 1, vocab_size),
        only those positions go through the head (prefill needs just the last prompt token).
        `logits_where` (B, T) bool gives the logits of the True positions only, as (N, vocab_size)
        in row-major order: finetuning scores the response tokens and skips the head (and its
        B x T x vocab_size logits) everywhere else.
        `targets` (B, T) token ids: the mean cross-entropy of the logits against them instead
        (float32; see `loss`).

        A full pass (no `input_pos`) may pack several sequences into one row: `positions`
        (B, T) gives each token its position and `mask` (B, T, T) bool which tokens it sees
        (itself included) instead of the causal rule; the sliding window still applies, by
        position. GRPO's update puts a prompt once in a row with several of its completions.
        """
        T = idx.size(1)
        masks = None
        if input_pos is None:
            if positions is not None:
                pos = positions
                if int(pos.max()) >= self._max_seq_length:
                    raise ValueError(
                        f"position {int(pos.max())} exceeds max_seq_length {self._max_seq_length}"
                    )
            elif T > self._max_seq_length:
                raise ValueError(
                    f"sequence of {T} tokens exceeds max_seq_length {self._max_seq_length}"
                )
            else:
                pos = torch.arange(T, device=idx.device)
            if mask is not None:
                windows = {block.attn.window for block in self.blocks}
                masks = {w: packed_mask(mask, pos, w) for w in windows}
        else:
            pos = input_pos
            cache = self.blocks[0].attn.kv_cache
            if cache is None:
                raise RuntimeError("input_pos given but no KV cache: call set_kv_cache first")
            # Checked on CPU only: on a GPU reading the position back would stall every step
            # (the engine never asks past the cache it reserved).
            check = pos.device.type == "cpu" and not torch.compiler.is_compiling()
            if check and int(pos.max()) >= cache.length:
                raise ValueError(
                    f"position {int(pos.max())} is past the KV cache length {cache.length}"
                )
            # Built once per call, shared by the layers: with and without the sliding window.
            windows = {block.attn.window for block in self.blocks}
            masks = {w: attention_mask(pos, cache.positions, w) for w in windows}
        x = self.wte(idx)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        if self.config.position_embedding == "learned":
            x = x + self.wpe(pos)
        ropes = {}
        for kind in self.rope_kinds:
            cos = getattr(self, f"rope_{kind}_cos")[pos].to(x.dtype)
            sin = getattr(self, f"rope_{kind}_sin")[pos].to(x.dtype)
            if pos.dim() == 2:  # (B, T, n) -> (B, 1, T, n), broadcast over the heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            ropes[kind] = (cos, sin)
        for block in self.blocks:
            x = block(x, ropes.get(block.attn.rope_kind), input_pos, masks)
        if logits_at is not None:
            x = x[torch.arange(x.size(0), device=x.device), logits_at].unsqueeze(1)
        elif logits_where is not None:
            x = x[logits_where]
        x = self.ln_f(x)
        if return_hidden:  # (B, T, n_embd), for a task head such as a classifier's
            return x
        if targets is not None:
            return self.loss(x, targets)
        return self.head(x)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head's logits of `hidden` (..., n_embd) against `targets`.

        Training a plain float32 head, the head and the loss run fused in chunks of rows
        (`linear_cross_entropy`, eager or compiled alike, so both give the same numbers): the
        (tokens x vocab_size) logits never exist whole and their gradient is taken while a
        chunk is still in cache, which on a CPU takes 40% off the head plus the loss (10%
        compiled, against inductor's fusion of the plain form).
        """
        hidden, targets = hidden.flatten(0, -2), targets.flatten()
        head = self.lm_head
        fused = (
            torch.is_grad_enabled()
            and type(head) is Linear
            and head.bias is None
            and self.config.final_logit_softcapping is None
            and type(head.weight) is nn.Parameter  # not a DTensor shard
            and hidden.dtype == head.weight.dtype == torch.float32
            and not torch.is_autocast_enabled(hidden.device.type)
        )
        if fused:
            return linear_cross_entropy(hidden, head.weight, targets)
        return F.cross_entropy(self.head(hidden).float(), targets)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (`return_hidden=True`) -> logits: what forward ends with, for
        callers that need logits at a few positions only."""
        logits = self.lm_head(hidden)
        if self.config.final_logit_softcapping is not None:
            logits = softcap(logits, self.config.final_logit_softcapping)
        return logits

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Preallocate a static KV cache for incremental decoding (empty)."""
        max_seq_length = max_seq_length or self._max_seq_length
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                self.config, batch_size, max_seq_length, device, dtype, block.attn.n_kv
            )

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def kv_cache(self) -> Optional[KVCache]:
        """The first layer's KV cache (who set the cache can tell it is still theirs)."""
        return self.blocks[0].attn.kv_cache

    @property
    def kv_cache_shape(self) -> Optional[tuple[int, int]]:
        """(rows, positions) of the KV cache; None without one."""
        cache = self.blocks[0].attn.kv_cache
        return None if cache is None else (cache.batch_size, cache.max_len)

    def resize_kv_cache(self, batch_size: int, max_seq_length: int) -> None:
        """Give the KV cache this shape, keeping the keys and values it holds (new if none)."""
        if self.kv_cache_shape is None:
            self.set_kv_cache(batch_size, max_seq_length)
            return
        for block in self.blocks:
            block.attn.kv_cache = block.attn.kv_cache.resized(
                self.config, batch_size, max_seq_length
            )

    @contextmanager
    def kv_cache_window(self, first: int, end: int, length: int) -> Iterator[None]:
        """Let calls inside see only rows first..end-1 and the first `length` positions of the
        KV cache (attention reads the whole window: a batch decodes faster reading only the
        positions in use); what they write lands in those rows."""
        caches = [block.attn.kv_cache for block in self.blocks]
        for cache in caches:
            cache.rows, cache.length = slice(first, end), min(length, cache.max_len)
        try:
            yield
        finally:
            for cache in caches:
                cache.rows, cache.length = slice(0, cache.batch_size), cache.max_len

    @contextmanager
    def kv_cache_rows(
        self, rows: torch.Tensor, length: int, source: Optional[torch.Tensor] = None
    ) -> Iterator[None]:
        """Let calls inside write to a fresh cache of len(rows) rows and `length` positions;
        afterwards it is copied into rows `rows` of the KV cache (a prefill of new requests
        into free slots that need not be next to each other). `source`: row i of the KV cache
        gets row source[i] of the fresh cache, which then has max(source) + 1 rows (prompts
        shared by several slots are prefilled once)."""
        caches = [block.attn.kv_cache for block in self.blocks]
        n = len(rows) if source is None else int(source.max()) + 1
        scratch = [
            KVCache(self.config, n, length, c.k.device, c.k.dtype, c.k.size(1)) for c in caches
        ]
        for block, cache in zip(self.blocks, scratch):
            block.attn.kv_cache = cache
        try:
            yield
        finally:
            for block, cache in zip(self.blocks, caches):
                block.attn.kv_cache = cache
        for cache, filled in zip(caches, scratch):
            cache.copy_rows(rows, filled, source)


class Block(nn.Module):
    """One transformer layer.

    Sequential residual (most families), the optional norms in brackets (Gemma 2 has all four,
    OLMo 2 only the post-norms):

        x ─┬─[norm_1]─ attn ─[post_attention_norm]─ + ─┬─[norm_2]─ mlp ─[post_mlp_norm]─ + ─>
           └───────────────────────────────────────────┘└───────────────────────────────────┘

    Parallel residual (GPT-NeoX), both branches read the block's input:

        x ─┬─ norm_1 ─ attn ─┐
           ├─ norm_2 ─ mlp ──┼─ + ─>
           └─────────────────┘
    """

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.config = config
        pre = make_norm if config.pre_norm else lambda config, size: nn.Identity()
        self.norm_1 = pre(config, config.n_embd)
        self.attn = Attention(config, layer)
        if config.post_attention_norm:
            self.post_attention_norm = make_norm(config, config.n_embd)
        self.norm_2 = pre(config, config.n_embd)
        self.mlp = make_mlp(config, layer)
        if config.post_mlp_norm:
            self.post_mlp_norm = make_norm(config, config.n_embd)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        input_pos: Optional[torch.Tensor],
        masks: Optional[dict[Optional[int], torch.Tensor]] = None,
    ) -> torch.Tensor:
        a = self.attn(self.norm_1(x), rope, input_pos, masks)
        if self.config.post_attention_norm:
            a = self.post_attention_norm(a)
        if self.config.parallel_residual:
            return x + a + self.mlp(self.norm_2(x))
        x = x + a
        m = self.mlp(self.norm_2(x))
        if self.config.post_mlp_norm:
            m = self.post_mlp_norm(m)
        return x + m


class Attention(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.config = config
        self.n_head, self.n_kv, self.hs = config.n_head, config.n_query_groups, config.head_size
        qkv_out = (self.n_head + 2 * self.n_kv) * self.hs
        self.qkv = Linear(config.n_embd, qkv_out, bias=config.attn_bias)
        self.proj = Linear(self.n_head * self.hs, config.n_embd, bias=config.bias)
        if config.qk_norm:
            q_size, k_size = self.hs, self.hs
            if config.qk_norm_scope == "all":
                q_size, k_size = self.n_head * self.hs, self.n_kv * self.hs
            self.q_norm = RMSNorm(q_size, config.norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(k_size, config.norm_eps, config.norm_unit_offset)
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.attention_sinks else None
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.rope_kind = config.rope_kind(layer)
        self.scale = config.attention_scale or 1 / math.sqrt(self.hs)
        self.kv_cache: Optional[KVCache] = None

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        input_pos: Optional[torch.Tensor],
        masks: Optional[dict[Optional[int], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """`masks` (from `GPT.forward`, keyed by sliding window) saves rebuilding the KV-cache
        attention mask in every layer; without it the mask is built here."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            (self.n_head * self.hs, self.n_kv * self.hs, self.n_kv * self.hs), dim=-1
        )
        if self.config.qk_norm and self.config.qk_norm_scope == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hs).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)
        if self.config.qk_norm and self.config.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        if input_pos is None and masks is not None:  # packed sequences (`GPT.forward`)
            mask = masks[self.window]
        elif input_pos is None:
            mask = None  # causal over the T tokens
            if self.window is not None:
                pos = torch.arange(T, device=x.device)
                mask = attention_mask(pos, pos, self.window)
        else:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call set_kv_cache first")
            k, v = self.kv_cache.update(input_pos, k, v)
            if masks is not None:
                mask = masks[self.window]
            else:
                mask = attention_mask(input_pos, self.kv_cache.positions, self.window)
        y = self.attend(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))

    def attend(self, q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Scaled dot-product attention; `mask` None means causal over equal-length q and k."""
        softcapping = self.config.attention_logit_softcapping
        gqa = self.n_kv != self.n_head
        if softcapping is None and self.sinks is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=gqa
            )
        if mask is None:
            pos = torch.arange(q.size(2), device=q.device)
            mask = attention_mask(pos, pos)
        if gqa:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if softcapping is not None:
            scores = softcap(scores, softcapping)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        if self.sinks is None:
            return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        # The sink is one more softmax entry per head, with no value: it only takes weight away.
        sinks = self.sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1, dtype=torch.float32)
        return probs[..., :-1].to(q.dtype) @ v


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int] = None
) -> torch.Tensor:
    """True where a query at `q_pos` may see a key at `k_pos`: causal, and within `window`.

    (T, S) for q_pos of shape (T,); (B, 1, T, S) for per-row positions (B, T).
    """
    mask = k_pos <= q_pos[..., None]
    if window is not None:
        mask = mask & (k_pos > q_pos[..., None] - window)
    return mask if q_pos.dim() == 1 else mask.unsqueeze(1)


def packed_mask(
    mask: torch.Tensor, positions: torch.Tensor, window: Optional[int] = None
) -> torch.Tensor:
    """(B, T, T) which-token-sees-which of packed rows, cut to the sliding `window` by the
    tokens' `positions` (B, T) -> (B, 1, T, T), broadcast over the heads."""
    if window is not None:
        mask = mask & (positions[:, None, :] > positions[:, :, None] - window)
    return mask.unsqueeze(1)


class KVCache:
    """Static, preallocated keys and values of one layer: (B, n_query_groups, max_len, hs).

    Attention reads the cache's *window*: rows `first..end-1` and positions `0..length-1`
    (all of it unless `GPT.kv_cache_window` narrows it) and masks what a query may not see, so
    shapes do not change from one decoding step to the next (one graph for `torch.compile`).
    A plain object, not a module: no state_dict entry, and the window is set twice per decoding
    step for every layer (cheap on a plain object, not on a module).
    """

    def __init__(
        self, config: Config, batch_size: int, max_len: int, device, dtype,
        n_kv: Optional[int] = None,
    ) -> None:  # fmt: skip
        """`n_kv`: the key/value heads this rank holds (tensor parallel: a share of them)."""
        shape = (batch_size, n_kv or config.n_query_groups, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.all_positions = torch.arange(max_len, device=device)
        self.max_len = max_len
        self.rows, self.length = slice(0, batch_size), max_len

    @property
    def batch_size(self) -> int:
        return self.k.size(0)

    @property
    def positions(self) -> torch.Tensor:
        return self.all_positions[: self.length]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write the new keys/values at `input_pos` ((T,), or (B, T) per row) into the first B
        rows of the window; return those rows of the window."""
        B = k.size(0)
        rows = slice(self.rows.start, self.rows.start + B)
        cache_k, cache_v = self.k[rows, :, : self.length], self.v[rows, :, : self.length]
        if input_pos.dim() == 1:
            cache_k.index_copy_(2, input_pos, k)
            cache_v.index_copy_(2, input_pos, v)
        else:
            index = input_pos[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))
            cache_k.scatter_(2, index, k)
            cache_v.scatter_(2, index, v)
        return cache_k, cache_v

    def resized(self, config: Config, batch_size: int, max_len: int) -> KVCache:
        """A new cache of this shape holding what this one holds (rows and positions that fit)."""
        new = KVCache(config, batch_size, max_len, self.k.device, self.k.dtype, self.k.size(1))
        b, n = min(batch_size, self.batch_size), min(max_len, self.max_len)
        new.k[:b, :, :n].copy_(self.k[:b, :, :n])
        new.v[:b, :, :n].copy_(self.v[:b, :, :n])
        return new

    def copy_rows(
        self, rows: torch.Tensor, source: KVCache, index: Optional[torch.Tensor] = None
    ) -> None:
        """Rows `rows` (first positions) := all rows of `source`, in order (`index`: rows
        `index` of `source`)."""
        n = source.max_len
        k, v = (source.k, source.v) if index is None else (source.k[index], source.v[index])
        self.k[:, :, :n].index_copy_(0, rows, k)
        self.v[:, :, :n].index_copy_(0, rows, v)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps, self.unit_offset = eps, unit_offset
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = (1 + self.weight.float()) if self.unit_offset else self.weight.float()
        return (x * weight).to(dtype)


def make_norm(config: Config, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(size, config.norm_eps, config.norm_unit_offset)
    return nn.LayerNorm(size, eps=config.norm_eps)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap
