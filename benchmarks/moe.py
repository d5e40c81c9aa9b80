"""Mixture-of-experts training throughput: tokens/s of the training step (forward with the
router loss, backward, fused AdamW) for a tiny MoE (8 experts, top-2) next to a dense SwiGLU
model with the same active parameter count (its MLP as wide as two experts), at sequence
length 256, eager. The two are measured in turns, ROUNDS times, and each keeps its best round:
on a shared machine that is the figure least disturbed by other work."""

from __future__ import annotations

import time

import torch

from benchmarks.harness import Row
from lifecycle_cli.config import Config
from lifecycle_cli.mlp import router_loss
from lifecycle_cli.model import GPT
from lifecycle_cli.objectives import next_token_loss
from lifecycle_cli.train.fabric import make_optimizer
from lifecycle_cli.train.throughput import n_params

SEQ, BATCH, STEPS, ROUNDS = 256, 8, 3, 3
N_EXPERT, TOP_K, EXPERT_SIZE = 8, 2, 256


def configs() -> dict[str, Config]:
    common = dict(
        block_size=SEQ, vocab_size=4096, n_layer=4, n_embd=128, n_head=4, norm="rmsnorm",
        bias=False, tie_embeddings=True,
    )  # fmt: skip
    return {
        "MoE 8x top-2": Config(
            name="bench-moe",
            mlp="moe",
            n_expert=N_EXPERT,
            n_expert_per_token=TOP_K,
            intermediate_size=EXPERT_SIZE,
            router_aux_loss_coef=0.01,
            **common,
        ),  # fmt: skip
        "dense, same active params": Config(
            name="bench-dense", mlp="swiglu", intermediate_size=TOP_K * EXPERT_SIZE, **common
        ),
    }


def tokens_per_sec(config: Config) -> float:
    torch.manual_seed(0)
    model = GPT(config).train()
    optimizer = make_optimizer(model, 3e-4, 0.1, (0.9, 0.95), fused=True)
    batch = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1))

    def step() -> None:
        loss = next_token_loss(model, batch)
        router = router_loss(model)
        (loss if router is None else loss + router).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return STEPS * BATCH * SEQ / (time.perf_counter() - start)


def active_params(config: Config) -> int:
    total = n_params(config, non_embedding=False)
    if config.mlp == "moe":
        expert = 3 * config.n_embd * config.expert_intermediate_size
        total -= config.n_layer * expert * (config.n_expert - config.n_expert_per_token)
    return total


def run() -> list[Row]:
    torch.set_num_threads(2)
    rows, best = [], {}
    for _ in range(ROUNDS):
        for label, config in configs().items():
            best[label] = max(best.get(label, 0.0), tokens_per_sec(config))
    for label, config in configs().items():
        setup = {
            "params": n_params(config, non_embedding=False), "active_params": active_params(config),
            "n_layer": config.n_layer, "n_embd": config.n_embd, "seq_length": SEQ,
            "micro_batch": BATCH, "device": "cpu", "dtype": "float32",
            "threads": torch.get_num_threads(),
        }  # fmt: skip
        rows.append(Row(f"train {label}: tokens/s", round(best[label], 1), "tokens/s",
                        setup))  # fmt: skip
    return rows
