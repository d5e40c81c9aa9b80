"""Rotary position embeddings: the cos/sin tables (plain, linear, Llama 3 and YaRN scaled) and
their application to queries and keys."""

from __future__ import annotations

import math

import torch

from lifecycle_cli.config import Config


def rope_tables(
    config: Config, seq_len: int, device, kind: str = "global"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, rope_n_elem), float32, halves repeated (rotate-half RoPE).

    `kind` "local" is the table of the sliding-window layers when `rope_local_base` is set:
    that base, unscaled.
    """
    n = config.rope_n_elem
    local = kind == "local"
    base = config.rope_local_base if local else config.rope_base
    inv_freq = 1.0 / (base ** (torch.arange(0, n, 2, device=device, dtype=torch.float32) / n))
    scaling = {} if local else config.rope_scaling or {}
    attention_factor = 1.0
    if scaling.get("type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("type") == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    elif scaling.get("type") == "yarn":
        inv_freq, attention_factor = yarn_inv_freq(inv_freq, base, n, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent RoPE scaling: long wavelengths slowed by `factor`."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_seq_len"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def yarn_inv_freq(inv_freq: torch.Tensor, base: float, dim: int, s: dict):
    """YaRN (arXiv 2309.00071): frequencies between `beta_slow` and `beta_fast` rotations over
    the original context blend from interpolated (divided by `factor`) to unchanged; cos and sin
    are scaled by the attention factor (default 0.1 ln(factor) + 1)."""
    factor, old_len = s["factor"], s["original_max_seq_len"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast", 32.0)), correction_dim(s.get("beta_slow", 1.0))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) /
            (high - low)).clamp(0, 1)  # fmt: skip
    blended = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention = s.get("attention_factor")
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return blended, attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) dims of each head; the rest pass through (partial RoPE)."""
    n = cos.size(-1)
    rot, rest = x[..., :n], x[..., n:]
    x1, x2 = rot[..., : n // 2], rot[..., n // 2 :]
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.size(-1) else rotated
