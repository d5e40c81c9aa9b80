"""`llmcycle finetune`: teach a checkpoint a task or to follow instructions."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from lifecycle_cli.curate.plan import PlanArgs
from lifecycle_cli.data.args import InstructData
from lifecycle_cli.lora import LoRAArgs
from lifecycle_cli.train.args import (
    Devices,
    EvalArgs,
    LoggerName,
    Resume,
    StrategyName,
    TrainArgs,
    with_run_flags_help,
)


@with_run_flags_help
def finetune(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune"),
    data: InstructData = InstructData(),
    method: Literal["full", "lora", "qlora"] = "lora",
    lora: LoRAArgs = LoRAArgs(),
    prompt_style: Optional[str] = None,
    train: TrainArgs = TrainArgs(
        global_batch_size=16,
        micro_batch_size=4,
        epochs=1,
        lr=2e-4,
        min_lr=0.0,
        warmup_steps=10,
        weight_decay=0.0,
        save_interval=None,
    ),  # fmt: skip
    eval: EvalArgs = EvalArgs(interval=100, max_iters=20),
    trainable_blocks: Optional[int] = None,
    exact_match_samples: int = 100,
    max_new_tokens: int = 32,
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
    """Finetune a checkpoint on instructions (Alpaca or chat JSON/JSONL), synthetic tasks, or
    labelled texts (classification: CSV/TSV/JSONL with text and label).

    Args:
        checkpoint_dir: The checkpoint folder to start from.
        out_dir: Where step folders, final/ (a plain checkpoint; LoRA merged, with
            lora.safetensors beside), metrics.csv, hparams.yaml and loss.png go.
        data: The examples.
        method: full (every weight), lora (low-rank adapters), qlora (4-bit base, CUDA only).
        lora: LoRA rank, scale, dropout and which layers get adapters.
        prompt_style: How prompts are formatted: alpaca, chatml, llama3, ..., chat_template
            (default: the checkpoint's prompt_style.yaml, else its chat template, else alpaca).
        train: Optimisation and duration.
        eval: Validation during training (with --eval.tasks, evaluate's tasks too).
        trainable_blocks: Train only the last K blocks and the head(s), the rest frozen
            (--method full; e.g. a classifier on top of a pretrained model).
        exact_match_samples: Validation examples answered greedily to measure exact match
            (synthetic tasks only; 0 turns it off).
        max_new_tokens: Longest answer generated for exact match.
        dry_run: Print the plan (parameters, FLOPs, memory per precision with the LoRA/QLoRA
            base frozen, time and cost) and stop; checkpoint_dir may then be a named model.
        plan: The hardware --dry_run plans for.
    """
    if dry_run:
        from lifecycle_cli.curate.dry_run import finetune_plan

        finetune_plan(checkpoint_dir, method, lora, train, plan, devices, num_nodes, precision)
        return
    flags = dict(locals())
    from lifecycle_cli.checkpoint import check_checkpoint_dir
    from lifecycle_cli.data.instruct import detect_format
    from lifecycle_cli.errors import UserError
    from lifecycle_cli.train.session import RunFlags, run_session
    from lifecycle_cli.train.tasks.classify import ClassifyTask
    from lifecycle_cli.train.tasks.sft import SFTTask

    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    if data.synthetic is None and detect_format(data) == "classification":
        if eval.tasks is not None:
            raise UserError(
                "--eval.tasks: a classifier is trained here (measured by its accuracy); "
                "evaluate's tasks need a language model"
            )
        task = ClassifyTask(checkpoint_dir, data, method, lora, trainable_blocks)
    else:
        task = SFTTask(
            checkpoint_dir, data, method, lora, prompt_style, trainable_blocks,
            exact_match_samples, max_new_tokens,
        )  # fmt: skip
    run_session(task, out_dir, train, eval, RunFlags.pick(flags), flags)
