"""Learning-rate schedule: linear warm-up, then cosine, linear or constant to min_lr."""

from __future__ import annotations

import math

from lifecycle_cli.train.args import TrainArgs


def lr_at(step: int, max_steps: int, args: TrainArgs) -> float:
    """The learning rate for optimizer step `step` (0-based) of `max_steps`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    decay_steps = max(1, max_steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / decay_steps)
    if args.lr_schedule == "linear":
        ratio = 1 - progress
    else:
        ratio = 0.5 * (1 + math.cos(math.pi * progress))
    return args.min_lr + (args.lr - args.min_lr) * ratio
