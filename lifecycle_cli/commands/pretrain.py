"""`llmcycle pretrain`: teach a model language on plain text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lifecycle_cli.config import Config
from lifecycle_cli.curate.plan import PlanArgs
from lifecycle_cli.data.args import TextData
from lifecycle_cli.train.args import (
    Devices,
    EvalArgs,
    LoggerName,
    Resume,
    StrategyName,
    TrainArgs,
    with_run_flags_help,
)
from lifecycle_cli.train.tasks.pretrain import TokenizerArgs


@with_run_flags_help
def pretrain(
    model_name: Optional[str] = None,
    model_config: Optional[Config] = None,
    out_dir: Path = Path("out/pretrain"),
    tokenizer_dir: Optional[Path] = None,
    tokenizer: TokenizerArgs = TokenizerArgs(),
    data: TextData = TextData(),
    initial_checkpoint_dir: Optional[Path] = None,
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    resume: Resume = False,
    devices: Devices = 1,
    num_nodes: int = 1,
    strategy: StrategyName = "auto",
    precision: Optional[str] = None,
    logger: LoggerName = "csv",
    seed: int = 42,
    compile: bool = False,
    activation_checkpointing: bool = False,
    fp8: bool = False,
    tensor_parallel: int = 1,
    dry_run: bool = False,
    plan: PlanArgs = PlanArgs(),
) -> None:
    """Pretrain a model on text, from scratch or continuing from a checkpoint.

    Args:
        model_name: A named architecture (`llmcycle download list`), trained from scratch.
        model_config: The architecture as fields (e.g. in a --config YAML), trained from scratch.
        out_dir: Where step-NNNNNN/ checkpoints, final/, metrics.csv, hparams.yaml and loss.png
            go.
        tokenizer_dir: A folder with tokenizer.json to use (default: train a BPE on the data).
        tokenizer: The BPE trained when there is no tokenizer_dir.
        data: The training text (default: text that ships with Python).
        initial_checkpoint_dir: Continue pretraining this checkpoint (its architecture, weights
            and tokenizer).
        train: Optimisation and duration.
        eval: Validation during training (with --eval.tasks, evaluate's tasks too).
        dry_run: Print the plan (parameters, FLOPs, Chinchilla sizes, memory per precision,
            time and cost) and stop: no data is read and nothing is written.
        plan: The hardware --dry_run plans for.
    """
    if dry_run:
        from lifecycle_cli.curate.dry_run import pretrain_plan

        pretrain_plan(
            model_name, model_config, initial_checkpoint_dir, tokenizer_dir,
            tokenizer.vocab_size, train, plan, devices, num_nodes, precision, tensor_parallel,
        )  # fmt: skip
        return
    flags = dict(locals())
    from lifecycle_cli.train.session import RunFlags, run_session
    from lifecycle_cli.train.tasks.pretrain import PretrainTask

    task = PretrainTask(
        model_name, model_config, initial_checkpoint_dir, tokenizer_dir, tokenizer, data, out_dir,
        train,
    )  # fmt: skip
    run_session(task, out_dir, train, eval, RunFlags.pick(flags), flags)
