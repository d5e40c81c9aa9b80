"""Background step checkpoints (`--train.async_checkpoint`): the training step's time while a
save is being written, against the step time without one and a synchronous save's time, for a
~50M-parameter Llama-style model (weights + AdamW state ~600 MB) on one CPU process."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Row
from benchmarks.pretrain import SEQ, model_config
from lifecycle_cli.model import GPT
from lifecycle_cli.objectives import next_token_loss
from lifecycle_cli.train.fabric import make_optimizer
from lifecycle_cli.train.state import BackgroundSave, Progress, save_step


def run() -> list[Row]:
    import lightning as L

    fabric = L.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    config = model_config(8, 704, 11)
    model = fabric.setup(GPT(config))
    optimizer = fabric.setup_optimizers(make_optimizer(model, 3e-4, 0.1, (0.9, 0.95), True))
    batch = torch.randint(0, config.vocab_size, (1, SEQ + 1))

    def step() -> float:
        start = time.perf_counter()
        fabric.backward(next_token_loss(model, batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up (and the optimizer state)
    plain, during, sync_saves, blocking = [], [], [], []
    saver = BackgroundSave()
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(3):  # interleaved: plain steps, a synchronous save, a background one
            plain += [step() for _ in range(4)]
            start = time.perf_counter()
            save_step(fabric, Path(tmp) / f"sync-{trial}", model, optimizer, Progress(), None)
            sync_saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            saver.start(fabric, Path(tmp) / f"async-{trial}", model, optimizer, Progress(), None)
            blocking.append(time.perf_counter() - start)
            while not saver.done():
                during.append(step())
            saver.wait(fabric)
    saver.close()
    cfg = dict(model=config.name, params=sum(p.numel() for p in model.parameters()), seq=SEQ,
               batch=1, device="cpu", dtype="float32", threads=torch.get_num_threads(),
               note="shared machine; interleaved trials")  # fmt: skip
    step_ms, during_ms = statistics.median(plain) * 1e3, statistics.median(during) * 1e3
    return [
        Row("train step, no save (median)", round(step_ms, 1), "ms", cfg),
        Row(
            "train step during a background save (median)",
            round(during_ms, 1),
            "ms",
            {**cfg, "steps_overlapped": len(during)},
        ),  # fmt: skip
        Row(
            "background save: time training waits (median)",
            round(statistics.median(blocking), 3),
            "s",
            cfg,
        ),  # fmt: skip
        Row("synchronous step save (median)", round(statistics.median(sync_saves), 3), "s", cfg),
    ]
