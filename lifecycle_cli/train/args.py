"""Training flags (`--train.*`, `--eval.*`), shared by every verb that trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from lifecycle_cli.errors import UserError


@dataclass
class TrainArgs:
    """How long and how to optimise."""

    global_batch_size: int = 64
    """Samples per optimizer step, over all devices (reached by gradient accumulation)."""
    micro_batch_size: int = 4
    """Samples per forward/backward pass on one device."""
    max_seq_length: Optional[int] = None
    """Tokens per sample (default: the model's context length)."""
    max_tokens: Optional[int] = None
    """Stop after this many training tokens."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (with max_tokens: whichever comes first)."""
    epochs: Optional[int] = None
    """Stop after this many passes over the training data (finetuning)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    max_norm: Optional[float] = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    save_interval: Optional[int] = 1000
    """Write a resumable step-NNNNNN/ checkpoint every N steps (None: only final/)."""
    keep_last: Optional[int] = 2
    """How many step checkpoints to keep (None: all)."""
    log_interval: int = 1
    """Log training loss every N steps."""
    early_stopping: Optional[str] = None
    """Stop when this validation figure (val_loss, or the task's exact_match or accuracy) has
    not improved for `patience` evaluations; final/ is then the best evaluation's model."""
    patience: int = 3
    """Evaluations without improvement before --train.early_stopping stops the run."""
    min_delta: float = 0.0
    """How much --train.early_stopping's figure must beat the best by to count as an
    improvement (a new best model and a fresh patience): a validation loss that only creeps
    down by less than that then stops the run."""
    spike_rollback: Optional[int] = None
    """After this many consecutive steps whose loss exceeds spike_factor x its running mean,
    reload the newest step folder saved before them and skip their batches (None: never)."""
    spike_factor: float = 2.0
    """A step's loss above this times the mean of the last steps' losses is a spike."""
    async_checkpoint: bool = False
    """Write step folders in the background while training continues."""

    def validate(self, world_size: int) -> None:
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            raise UserError(
                f"--train.global_batch_size {self.global_batch_size} is not a multiple of "
                f"--train.micro_batch_size {self.micro_batch_size} x {world_size} device(s)"
            )
        if not (self.max_tokens or self.max_steps or self.epochs):
            raise UserError("set --train.max_tokens, --train.max_steps or --train.epochs")
        for name in ("global_batch_size", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--train.{name} must be at least 1")
        if self.spike_rollback is not None and self.spike_rollback < 1:
            raise UserError("--train.spike_rollback must be at least 1 (or None: never)")
        if not self.spike_factor > 1:
            raise UserError(f"--train.spike_factor {self.spike_factor} must be above 1")

    def accumulation(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * world_size)

    def seq_length(self, block_size: int) -> int:
        """Tokens per sample: --train.max_seq_length, at most the model's context."""
        length = self.max_seq_length or block_size
        if length > block_size:
            raise UserError(
                f"--train.max_seq_length {length} exceeds the model's context "
                f"(block_size {block_size})"
            )
        return length

    def total_steps(self, n_samples: int, seq_length: int) -> int:
        """Optimizer steps: the first of max_steps, max_tokens and epochs to be reached."""
        limits = [self.max_steps] if self.max_steps else []
        if self.max_tokens:
            limits.append(max(1, self.max_tokens // (self.global_batch_size * seq_length)))
        if self.epochs:
            limits.append(max(1, math.ceil(self.epochs * n_samples / self.global_batch_size)))
        return min(limits)


@dataclass
class EvalArgs:
    """When and how much to evaluate on held-out data."""

    interval: Optional[int] = 100
    """Evaluate every N optimizer steps (None: only at the end)."""
    max_iters: Optional[int] = 50
    """Batches per evaluation (None: the whole validation set)."""
    initial_validation: bool = False
    """Evaluate once before training."""
    final_validation: bool = True
    """Evaluate once after training."""
    tasks: Optional[str] = None
    """Tasks of `llmcycle evaluate` (its --tasks list, e.g. `synthetic:reverse,perplexity:
    val.txt,lm_eval:arc_easy`) run at every evaluation; each metric becomes a metrics.csv
    column <task>/<metric>."""
    limit: Optional[int] = None
    """At most this many examples per --eval.tasks task (evaluate's --limit)."""
    include_path: Union[Path, list[Path], None] = None
    """Folders of extra lm-eval task YAML files for lm_eval: tasks (evaluate's
    --lm_eval.include_path)."""


# The run flags every training verb has, spelled once: their types here, their help below.
Resume = Union[bool, Literal["auto"], Path]
Devices = Union[int, str]
StrategyName = Literal["auto", "ddp", "fsdp"]
LoggerName = Literal["csv", "tensorboard", "wandb", "mlflow"]

RUN_FLAGS_HELP = """
        resume: `auto` continues from the newest step folder in out_dir (or starts fresh if there
            is none); a path continues from that step folder.
        devices: Devices (processes on CPU) per node.
        num_nodes: Machines; launch one process per node the way Fabric/torchrun does.
        strategy: auto (one device or DDP), ddp, or fsdp (FSDP2, sharded).
        tensor_parallel: Shard each block's attention heads and MLP over this many devices
            (FSDP2 over the data-parallel rest: devices x num_nodes = data x tensor parallel).
        precision: 32-true, bf16-mixed, bf16-true, 16-mixed (CUDA only) (default: bf16-mixed on
            a GPU that supports it, else 32-true). The mixed modes keep fp32 weights, optimizer
            state and (FSDP) gradient reductions.
        logger: Where metrics go besides out_dir/metrics.csv: csv (nowhere else), tensorboard
            (out_dir/tensorboard/), wandb (offline in out_dir/wandb/ unless WANDB_MODE=online)
            or mlflow (MLFLOW_TRACKING_URI, default out_dir/mlruns/).
        seed: Seed for initialisation, data order, dropout and the validation split.
        compile: Compile the model with torch.compile.
        activation_checkpointing: Recompute each block's activations in backward (FSDP only).
        fp8: Train the blocks' linear layers in float8 (torchao; H100-class GPUs only).
"""


def with_run_flags_help(verb):
    """Append the run flags' help to a training verb's docstring (its `Args:` section ends it),
    so every training verb describes them in the same words. jsonargparse reads the result."""
    verb.__doc__ = verb.__doc__.rstrip() + RUN_FLAGS_HELP
    return verb
