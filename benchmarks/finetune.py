"""Finetuning: tokens/s and peak memory of full finetuning vs LoRA (r=8 on queries and values)
on a ~25M-parameter Llama-style model (random init), sequence 256, micro batch 4, fused AdamW,
float32, 2 threads.

Each method runs in a fresh process, so its peak RSS (/proc/self/status VmHWM: the interpreter,
the model, gradients, optimizer state and activations) is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import Row

REPO = Path(__file__).resolve().parents[1]
SEQ, BATCH, STEPS, THREADS = 256, 4, 3, 2
SHAPE = dict(n_layer=7, n_embd=512, n_head=8, intermediate_size=1408, vocab_size=4096)
METHODS = ("full", "lora")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(method: str) -> dict:
    """Train a few steps with `method` in this process; its figures."""
    import torch

    from lifecycle_cli.config import Config
    from lifecycle_cli.lora import LoRAArgs, inject_lora
    from lifecycle_cli.model import GPT
    from lifecycle_cli.objectives import next_token_loss
    from lifecycle_cli.train.fabric import make_optimizer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = Config(
        name="bench-llama-25m", block_size=SEQ, norm="rmsnorm", mlp="swiglu", bias=False,
        tie_embeddings=True, **SHAPE,
    )  # fmt: skip
    model = GPT(config)
    params = sum(p.numel() for p in model.parameters())
    if method == "lora":
        trainable = inject_lora(model, LoRAArgs(r=8, alpha=16, query=True, value=True))
    else:
        trainable = params
    model.train()
    optimizer = make_optimizer(model, 1e-4, 0.0, (0.9, 0.95), fused=True)
    batch = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1))
    rss_model = rss_mb("VmRSS")

    def step() -> None:
        next_token_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates gradients and optimizer state
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": STEPS * BATCH * SEQ / seconds,
        "peak_rss_mb": rss_mb("VmHWM"),
        "rss_after_model_mb": rss_model,
        "params": params,
        "trainable": trainable,
        "torch_threads": torch.get_num_threads(),
    }


def run() -> list[Row]:
    rows = []
    for method in METHODS:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.finetune", method],
            cwd=REPO, check=True, capture_output=True, text=True,
        )  # fmt: skip
        result = json.loads(proc.stdout.splitlines()[-1])
        setup = {
            "method": method, "params": result["params"], **SHAPE, "seq_length": SEQ,
            "micro_batch": BATCH, "optimizer": "AdamW fused", "device": "cpu",
            "dtype": "float32", "threads": result["torch_threads"], "steps": STEPS,
            "rss_after_model_mb": round(result["rss_after_model_mb"], 1),
        }  # fmt: skip
        if method == "lora":
            setup["lora"] = "r=8 alpha=16 query+value"
        label = f"finetune {method}"
        rows += [
            Row(f"{label}: tokens/s", round(result["tokens_per_s"], 1), "tokens/s", setup),
            Row(f"{label}: peak RSS", round(result["peak_rss_mb"], 1), "MB", setup),
            Row(f"{label}: trainable params", result["trainable"], "params", setup),
        ]
    return rows


if __name__ == "__main__":  # one configuration, in its own process (see `run`)
    print(json.dumps(measure(sys.argv[1])))
