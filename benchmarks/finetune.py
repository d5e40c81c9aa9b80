"""Finetuning: tokens/s and peak memory of full finetuning vs LoRA vs QLoRA (r=8 on queries and
values; QLoRA's block weights packed to 4-bit NF4) on a ~25M-parameter Llama-style model (random
init), sequence 256, micro batch 4, fused AdamW (Adam for QLoRA's adapters alike).

On CPU: float32, 2 threads, peak RSS (/proc/self/status VmHWM: the interpreter, the model,
gradients, optimizer state and activations). QLoRA there is bitsandbytes' CPU fallback, which
unpacks each weight for its matmul, and its peak includes the float32 model it was packed from;
`weights` (the parameters' bytes as they sit in memory, packed ones packed) shows the packing.
On CUDA: bfloat16 and torch.cuda.max_memory_allocated.
Each method runs in a fresh process, so its peak is its own.
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
METHODS = ("full", "lora", "qlora")


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
    from lifecycle_cli.quantize import quantize_blocks
    from lifecycle_cli.train.fabric import make_optimizer

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = Config(
        name="bench-llama-25m", block_size=SEQ, norm="rmsnorm", mlp="swiglu", bias=False,
        tie_embeddings=True, **SHAPE,
    )  # fmt: skip
    with torch.device(device):
        model = GPT(config).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    trainable = params
    if method == "qlora":  # packed first; the adapters then wrap the packed layers
        quantize_blocks(model)
    if method in ("lora", "qlora"):
        trainable = inject_lora(model, LoRAArgs(r=8, alpha=16, query=True, value=True))
    model.train()
    optimizer = make_optimizer(model, 1e-4, 0.0, (0.9, 0.95), fused=True)
    batch = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), device=device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> None:
        next_token_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates gradients and optimizer state
    sync()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM")
    return {
        "tokens_per_s": STEPS * BATCH * SEQ / seconds,
        "peak_mb": peak,
        "weights_mb": weights,
        "params": params,
        "trainable": trainable,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
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
            "micro_batch": BATCH, "optimizer": "AdamW fused", "device": result["device"],
            "dtype": result["dtype"], "threads": result["torch_threads"], "steps": STEPS,
        }  # fmt: skip
        if method != "full":
            setup["lora"] = "r=8 alpha=16 query+value" + (", NF4 base" if method == "qlora" else "")
        label = f"finetune {method}"
        peak = "peak CUDA memory" if result["device"] == "cuda" else "peak RSS"
        rows += [
            Row(f"{label}: tokens/s", round(result["tokens_per_s"], 1), "tokens/s", setup),
            Row(f"{label}: {peak}", round(result["peak_mb"], 1), "MB", setup),
            Row(f"{label}: weights", round(result["weights_mb"], 1), "MB", setup),
            Row(f"{label}: trainable params", result["trainable"], "params", setup),
        ]
    return rows


if __name__ == "__main__":  # one configuration, in its own process (see `run`)
    print(json.dumps(measure(sys.argv[1])))
