"""Batches read ahead: the next step's micro-batches are read in a background thread while this
step computes, pinned on CUDA so the copy to the device (`non_blocking`, as Fabric does it for
pinned tensors) overlaps too.

A batch is a pure function of its sample indices (`TrainData.get`), so reading it early changes
no batch: runs stay deterministic and resume exactly.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lifecycle_cli.train.data import Batch, TrainData


class Prefetcher:
    """`get(start)` is `data.get(range(start, start + size))`, read ahead when `plan`ned."""

    def __init__(self, data: TrainData, size: int, pin: bool) -> None:
        self.data, self.size, self.pin = data, size, pin
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llmcycle-prefetch")
        self.planned: dict[int, Future] = {}

    def read(self, start: int) -> Batch:
        batch = self.data.get(range(start, start + self.size))
        return pinned(batch) if self.pin else batch

    def plan(self, starts) -> None:
        """Start reading these micro-batches (a rollback's change of plan drops the old ones)."""
        self.planned = {s: self.pool.submit(self.read, s) for s in starts}

    def get(self, start: int) -> Batch:
        future = self.planned.pop(start, None)
        return future.result() if future is not None else self.read(start)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def pinned(batch: Batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
