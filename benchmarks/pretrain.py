"""Pretraining throughput: tokens/s and MFU of the training step (forward, backward, fused
AdamW) for ~1M, ~10M and ~50M-parameter Llama-style models at sequence length 256, eager and
with torch.compile. MFU is against this device's peak as `train.throughput` measures it."""

from __future__ import annotations

import time

import torch

from benchmarks.harness import Row
from lifecycle_cli.config import Config
from lifecycle_cli.model import GPT
from lifecycle_cli.objectives import next_token_loss
from lifecycle_cli.train.fabric import make_optimizer
from lifecycle_cli.train.throughput import flops_per_token, n_params, peak_flops

SEQ = 256
SIZES = {  # name: (n_layer, n_embd, n_head, micro batch)
    "~1M": (4, 128, 4, 8),
    "~10M": (6, 384, 6, 4),
    "~50M": (8, 704, 11, 2),
}
STEPS = 4


def model_config(n_layer: int, n_embd: int, n_head: int) -> Config:
    return Config(
        name=f"bench-{n_layer}x{n_embd}", block_size=SEQ, vocab_size=4096, n_layer=n_layer,
        n_embd=n_embd, n_head=n_head, intermediate_size=int(8 / 3 * n_embd) // 64 * 64 + 64,
        norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True,
    )  # fmt: skip


def tokens_per_sec(config: Config, batch_size: int, compile: bool) -> float:
    torch.manual_seed(0)
    model = GPT(config)
    step_model = torch.compile(model) if compile else model
    optimizer = make_optimizer(model, 3e-4, 0.1, (0.9, 0.95), fused=True)
    batch = torch.randint(0, config.vocab_size, (batch_size, SEQ + 1))

    def step() -> None:
        next_token_loss(step_model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (and compilation)
    step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return STEPS * batch_size * SEQ / (time.perf_counter() - start)


def run() -> list[Row]:
    torch.set_num_threads(2)
    peak = peak_flops("cpu", "32-true")
    rows = [Row("pretrain: device peak (fp32 matmul probe)", round(peak / 1e9, 1), "GFLOP/s",
                {"device": "cpu", "threads": torch.get_num_threads()})]  # fmt: skip
    for name, (n_layer, n_embd, n_head, batch_size) in SIZES.items():
        config = model_config(n_layer, n_embd, n_head)
        for compile in (False, True):
            rate = tokens_per_sec(config, batch_size, compile)
            mfu = rate * flops_per_token(config, SEQ) / peak
            setup = {
                "params": n_params(config, non_embedding=False), "n_layer": n_layer,
                "n_embd": n_embd, "seq_length": SEQ, "micro_batch": batch_size, "device": "cpu",
                "dtype": "float32", "threads": torch.get_num_threads(), "compile": compile,
            }  # fmt: skip
            label = f"pretrain {name}{' compiled' if compile else ''}"
            rows.append(Row(f"{label}: tokens/s", round(rate, 1), "tokens/s", setup))
            rows.append(Row(f"{label}: MFU", round(100 * mfu, 1), "%", setup))
    return rows
