"""One training session: everything between a verb's parsed flags and its final save, in one order.

A verb builds a `Task` (what to learn: data, objective, how the model is wrapped, extra metrics,
what final/ holds) and hands it to `run_session`, which owns the rest: resume lookup, Fabric,
seeding, tokenizing (rank 0 first, then the others from its cache), building the model under
Fabric's `init_module`, `--compile`, the optimizer, restoring a step folder, `hparams.yaml`, the
loop, the exit code of an interrupted run, and asking the task to write final/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from lifecycle_cli.errors import UserError
from lifecycle_cli.train.args import (
    Devices,
    EvalArgs,
    LoggerName,
    Resume,
    StrategyName,
    TrainArgs,
)

if TYPE_CHECKING:
    import torch

    from lifecycle_cli.config import Config
    from lifecycle_cli.train.data import Batch, TrainData


@dataclass
class RunFlags:
    """The run flags every training verb takes (help: `train.args.RUN_FLAGS_HELP`)."""

    resume: Resume = False
    devices: Devices = 1
    num_nodes: int = 1
    strategy: StrategyName = "auto"
    precision: Optional[str] = None
    logger: LoggerName = "csv"
    seed: int = 42
    compile: bool = False
    activation_checkpointing: bool = False
    fp8: bool = False
    tensor_parallel: int = 1

    @classmethod
    def pick(cls, flags: dict[str, Any]) -> RunFlags:
        """The run flags out of a verb's `locals()`."""
        return cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls)})


class Task(Protocol):
    """What a training verb asks the session to run. Methods are called in this order."""

    objective: Callable[[torch.nn.Module, Batch], torch.Tensor]
    extra_metrics: tuple[str, ...]  # names of extra_eval's figures (columns of metrics.csv)
    tokenizer: Any  # ready after `configure`; --eval.tasks' prompts are encoded with it
    style: Any  # the prompt style --eval.tasks formats prompts with (None: the tokenizer's)

    def check(self, fabric) -> None:
        """Refuse what this task cannot do on the launched devices (UserError)."""

    def configure(self, fabric) -> Config:
        """Ready the tokenizer (every rank) and return the architecture trained."""

    @property
    def tokenizer_dir(self) -> Path:
        """The folder whose tokenizer files go into every step folder and final/."""

    def data(self, seq_length: int, seed: int) -> tuple[TrainData, TrainData]:
        """(training, validation) data; rank 0 calls it first, the others after a barrier."""

    def model(self, fabric, seq_length: int) -> torch.nn.Module:
        """The module to train: built, weights loaded, wrapped (LoRA, a head) and frozen where
        it should be; not yet set up by Fabric."""

    def describe(self, trainable: int, seq_length: int) -> list[str]:
        """Lines printed on rank 0 before training."""

    def extra_eval(self) -> Optional[Callable[[torch.nn.Module], dict[str, float]]]:
        """Extra figures measured at every evaluation (exact match, accuracy), or None."""

    # Optional: `step_metrics() -> (figures, progress text)` of the steps since its last call,
    # logged with each train_loss (columns named in extra_metrics).

    def finish(self, fabric, model: torch.nn.Module, final: Path) -> None:
        """Write final/ (all ranks call this: sharded weights are gathered collectively)."""


def run_session(
    task: Task, out_dir: Path, train: TrainArgs, eval: EvalArgs, run: RunFlags, hparams: dict
) -> None:
    """Train `task` to the end (or to a SIGINT/SIGTERM: exit 130 after saving a step folder)."""
    import torch

    from lifecycle_cli.lora import has_lora
    from lifecycle_cli.train.early_stopping import EarlyStopping
    from lifecycle_cli.train.fabric import (
        data_parallel,
        is_sharded,
        make_optimizer,
        setup_fabric,
        to_float8,
    )
    from lifecycle_cli.train.logs import check_logger
    from lifecycle_cli.train.loop import Run, fit
    from lifecycle_cli.train.state import Progress, find_resume, load_step
    from lifecycle_cli.train.tensor_parallel import check_tensor_parallel
    from lifecycle_cli.train.throughput import flops_per_token

    if run.activation_checkpointing and run.strategy != "fsdp":
        raise UserError("--activation_checkpointing applies to --strategy fsdp")
    check_logger(run.logger)
    rule = EarlyStopping.of(
        train.early_stopping, train.patience, task.extra_metrics, out_dir, train.min_delta
    )
    tasks = None
    if eval.tasks is not None:  # a bad task list or file is refused before anything starts
        from lifecycle_cli.evaluate.during_training import TrainingTasks

        tasks = TrainingTasks(eval.tasks, eval.limit, eval.include_path)
    for flag in ("limit", "include_path"):
        if eval.tasks is None and getattr(eval, flag) is not None:
            raise UserError(f"--eval.{flag} applies to --eval.tasks")
    resume_from = find_resume(run.resume, out_dir)
    fabric = setup_fabric(
        run.devices, run.num_nodes, run.strategy, run.precision, run.activation_checkpointing,
        run.fp8, run.tensor_parallel,
    )  # fmt: skip
    dp_size = data_parallel(fabric)[1]
    train.validate(dp_size)
    task.check(fabric)
    fabric.seed_everything(run.seed, verbose=False)

    config = task.configure(fabric)
    check_tensor_parallel(config, run.tensor_parallel)
    seq_length = train.seq_length(config.block_size)
    # Rank 0 tokenizes (and caches); the others then read what it wrote.
    if fabric.global_rank == 0:
        train_data, val_data = task.data(seq_length, run.seed)
    fabric.barrier()
    if fabric.global_rank != 0:
        train_data, val_data = task.data(seq_length, run.seed)

    model = task.model(fabric, seq_length)
    if run.tensor_parallel > 1 and has_lora(model):
        raise UserError("--tensor_parallel does not shard LoRA adapters yet; use --strategy fsdp")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if run.fp8:
        model = to_float8(model)
    if run.compile:
        require_compiler(fabric.device)
        model = torch.compile(model)
    model = fabric.setup(model)
    fused = not is_sharded(fabric) and fabric.device.type in ("cpu", "cuda")
    betas = (train.beta1, train.beta2)
    optimizer = make_optimizer(model, train.lr, train.weight_decay, betas, fused)
    optimizer = fabric.setup_optimizers(optimizer)
    progress = load_step(fabric, resume_from, model, optimizer) if resume_from else Progress()

    max_steps = train.total_steps(len(train_data), seq_length)
    if fabric.global_rank == 0:
        import yaml

        out_dir.mkdir(parents=True, exist_ok=True)
        flags = {k: to_yaml(v) for k, v in hparams.items()}
        (out_dir / "hparams.yaml").write_text(yaml.safe_dump(flags, sort_keys=False))
        for line in task.describe(trainable, seq_length):
            fabric.print(line)
        fabric.print(
            f"Training {max_steps} steps x {train.global_batch_size} samples on "
            f"{fabric.world_size} device(s)"
            + (
                f" ({dp_size} data-parallel x {run.tensor_parallel} tensor-parallel)"
                if run.tensor_parallel > 1
                else ""
            )
            + (f", resuming at step {progress.step} from {resume_from}" if resume_from else "")
        )

    extra_eval = task.extra_eval()
    if tasks is not None:
        extra_eval = tasks.after(extra_eval, fabric, task.tokenizer, task.style, task.tokenizer_dir)
    loop = Run(
        objective=task.objective,
        train_data=train_data,
        val_data=val_data,
        train=train,
        eval=eval,
        out_dir=out_dir,
        max_steps=max_steps,
        flops_per_token=flops_per_token(config, seq_length),
        tokenizer_dir=task.tokenizer_dir,
        logger=run.logger,
        extra_eval=extra_eval,
        extra_metrics=task.extra_metrics,
        early_stopping=rule,
        step_metrics=getattr(task, "step_metrics", None),
    )
    progress = fit(fabric, model, optimizer, loop, progress)
    if progress.step < max_steps and not loop.stopped_early:
        raise SystemExit(130)
    task.finish(fabric, model, out_dir / "final")
    fabric.print(f"Saved {out_dir / 'final'}")
    fabric.barrier()


def to_yaml(value):
    """Flags as plain YAML values for hparams.yaml."""
    if dataclasses.is_dataclass(value):
        return {k: to_yaml(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_yaml(v) for v in value]
    if isinstance(value, dict):  # e.g. --data.mix: name -> {path, weight}
        return {k: to_yaml(v) for k, v in value.items()}
    return value


def require_compiler(device: torch.device) -> None:
    """One clear error before a training run's first step where torch.compile cannot build
    its CPU kernels (without it: inductor's traceback in the middle of that step; decoding
    catches its own first compiled step instead). GPUs build through Triton."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise UserError(
            "--compile on a CPU needs a C++ compiler (g++ or clang++, or one named by $CXX) and "
            "none was found: install one (e.g. apt install g++) or drop --compile"
        ) from None
