"""Tokens per second and model FLOPs utilisation (MFU) against the device's peak."""

from __future__ import annotations

import functools
import time
from collections import deque

import torch

from lifecycle_cli.config import Config
from lifecycle_cli.gpus import peak_of


def n_params(config: Config, non_embedding: bool = True) -> int:
    with torch.device("meta"):
        from lifecycle_cli.model import GPT

        model = GPT(config)
    total = sum(p.numel() for p in model.parameters())
    if non_embedding:
        total -= model.wte.weight.numel()
        if config.position_embedding == "learned":
            total -= model.wpe.weight.numel()
    return total


def flops_per_token(config: Config, seq_length: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores.

    The lm_head counts as a weight even when tied; active experts only for MoE.
    """
    n = n_params(config) + (config.vocab_size * config.n_embd if config.tie_embeddings else 0)
    if config.mlp == "moe":
        expert = 3 * config.n_embd * config.expert_intermediate_size
        sparse = sum(config.is_moe(i) for i in range(config.n_layer))
        n -= sparse * expert * (config.n_expert - config.n_expert_per_token)
    attention = 6 * config.n_layer * config.n_head * config.head_size * seq_length
    return 6 * n + attention


@functools.cache
def peak_flops(device_type: str, precision: str) -> float:
    """Peak FLOP/s of one device: a table for known GPUs, a matmul probe otherwise."""
    half = "bf16" in precision or "16" in precision
    if device_type == "cuda":
        known = peak_of(torch.cuda.get_device_name(), half)
        if known is not None:
            return known
    return matmul_probe(device_type, torch.bfloat16 if half else torch.float32)


def matmul_probe(device_type: str, dtype: torch.dtype, size: int = 1024, trials: int = 10) -> float:
    """Measured FLOP/s of square matmuls on this device with the current thread count.

    The best of a few short trials, so a busy moment does not pass for the peak. On CPU the
    matmul is the one training's linear layers use (`linear.matmul_t`: oneDNN in float32),
    so the MFU is against what this machine can do that way.
    """
    from lifecycle_cli.linear import matmul_t

    # A generator of its own: the global one drives dropout, and a resumed run must find it
    # exactly as the step folder saved it.
    rng = torch.Generator(device=device_type).manual_seed(0)
    a = torch.randn(size, size, device=device_type, dtype=dtype, generator=rng)
    b = torch.randn(size, size, device=device_type, dtype=dtype, generator=rng)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    matmul_t(a, b)  # warm-up
    best, reps = 0.0, 4 if device_type == "cpu" else 50
    for _ in range(trials):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            matmul_t(a, b)
        sync()
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - start))
    return best


class Throughput:
    """Tokens/s and MFU over the last `window` training steps.

    Time spent evaluating or saving is left out: call `resume()` after it.
    """

    def __init__(self, flops_per_token: float, peak: float, world_size: int, window: int = 20):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.steps: deque[tuple[float, int]] = deque(maxlen=window)
        self.last = time.perf_counter()

    def step(self, tokens: int) -> None:
        now = time.perf_counter()
        self.steps.append((now - self.last, tokens))
        self.last = now

    def resume(self) -> None:
        self.last = time.perf_counter()

    def measure(self) -> tuple[float, float]:
        """(tokens per second over all devices, MFU)."""
        seconds = sum(s for s, _ in self.steps)
        rate = sum(t for _, t in self.steps) / seconds if seconds > 0 else 0.0
        return rate, rate * self.flops_per_token / (self.peak * self.world_size)
