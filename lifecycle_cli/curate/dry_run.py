"""`--dry_run` of the training verbs: the architecture and flags of a run -> its printed plan.

No data is read, no weights are loaded and nothing is written: a plan needs only the
architecture (a named model, `--model_config`, or a checkpoint's `model_config.yaml`), the
tokenizer's vocabulary size and the `--train.*` and run flags.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from lifecycle_cli.config import CONFIG_FILE, Config
from lifecycle_cli.curate.plan import Plan, PlanArgs, make_plan
from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    from lifecycle_cli.lora import LoRAArgs
    from lifecycle_cli.train.args import TrainArgs


def planned_tokens(train: TrainArgs, seq_length: int) -> tuple[Optional[float], str]:
    """Training tokens the flags ask for (None: they do not say without reading the data)."""
    limits = []
    if train.max_tokens:
        limits.append((train.max_tokens, "--train.max_tokens"))
    if train.max_steps:
        steps = train.max_steps * train.global_batch_size * seq_length
        limits.append((steps, "--train.max_steps x global batch x sequence length"))
    if not limits:
        return None, ""
    return min(limits)


def device_count(devices: Union[int, str], num_nodes: int) -> int:
    try:
        return max(1, int(devices)) * num_nodes
    except ValueError:  # "auto": unknown without looking at the machine
        return num_nodes


def pretrain_plan(
    model_name: Optional[str],
    model_config: Optional[Config],
    initial_checkpoint_dir: Optional[Path],
    tokenizer_dir: Optional[Path],
    vocab_size: int,
    train: TrainArgs,
    plan: PlanArgs,
    devices: Union[int, str],
    num_nodes: int,
    precision: Optional[str],
    tensor_parallel: int = 1,
) -> Plan:
    """The plan of a `pretrain` run, with the vocabulary it would train: the initial
    checkpoint's, the given tokenizer's, or the BPE of `--tokenizer.vocab_size` it would train
    (rounded up to a multiple of 64, as the run does)."""
    if sum(x is not None for x in (model_name, model_config, initial_checkpoint_dir)) != 1:
        raise UserError(
            "give exactly one of: a model name, --model_config, --initial_checkpoint_dir"
        )
    notes = []
    if initial_checkpoint_dir is not None:
        from lifecycle_cli.checkpoint import load_config

        config = load_config(initial_checkpoint_dir)
    else:
        if model_name is not None:
            from lifecycle_cli.zoo import named_config

            config = named_config(model_name)
        else:
            config = model_config
        if tokenizer_dir is not None:
            from lifecycle_cli.tokenizer import Tokenizer

            vocab_size = Tokenizer(tokenizer_dir).vocab_size
            why = f"the tokenizer in {tokenizer_dir}"
        else:
            why = "the BPE the run trains (--tokenizer.vocab_size)"
        padded = 64 * math.ceil(vocab_size / 64)
        if padded != config.vocab_size:
            notes.append(
                f"Note: vocab {padded} is {why}; {config.name or 'the config'} has "
                f"{config.vocab_size} (--tokenizer_dir or --tokenizer.vocab_size set it)"
            )
        config = _replace(config, vocab_size=padded)
    return _plan(
        config, train, plan, devices, num_nodes, precision, "full", None, notes,
        tensor_parallel=tensor_parallel,
    )  # fmt: skip


def finetune_plan(
    checkpoint_dir: Path,
    method: str,
    lora: LoRAArgs,
    train: TrainArgs,
    plan: PlanArgs,
    devices: Union[int, str],
    num_nodes: int,
    precision: Optional[str],
) -> Plan:
    """The plan of a `finetune` run of a checkpoint folder, or of a named model (no folder
    needed to plan)."""
    config = _checkpoint_config(checkpoint_dir)
    return _plan(config, train, plan, devices, num_nodes, precision, method, lora, [], False)


def align_plan(
    checkpoint_dir: Path,
    method: str,
    lora: LoRAArgs,
    train: TrainArgs,
    plan: PlanArgs,
    devices: Union[int, str],
    num_nodes: int,
    precision: Optional[str],
    objective: str,
    ref_checkpoint: Optional[Path],
    precompute_ref: bool,
) -> Plan:
    """The plan of an `align` run: each pair is two sequences (chosen and rejected) through the
    model, so a micro batch of pairs is twice as many sequences; DPO and IPO also run the
    reference model forward, which is a second copy of the weights in memory for full training
    or another --ref_checkpoint (LoRA's reference is the base with its adapters off), unless
    --precompute_ref scores the pairs once before training."""
    config = _checkpoint_config(checkpoint_dir)
    reference = objective in ("dpo", "ipo")
    copy = reference and (method == "full" or ref_checkpoint is not None) and not precompute_ref
    pairs = dataclasses.replace(
        train,
        micro_batch_size=2 * train.micro_batch_size,
        global_batch_size=2 * train.global_batch_size,
    )
    notes = [
        f"Note: {train.micro_batch_size} pairs per micro batch are "
        f"{pairs.micro_batch_size} sequences (chosen and rejected)"
    ]
    return _plan(
        config, pairs, plan, devices, num_nodes, precision, method, lora, notes, False,
        reference=reference, reference_copy=copy,
    )  # fmt: skip


def _checkpoint_config(checkpoint_dir: Path) -> Config:
    folder = Path(checkpoint_dir)
    if (folder / CONFIG_FILE).is_file():
        config = Config.from_file(folder / CONFIG_FILE)
    elif folder.exists():
        raise UserError(f"{folder} is not a checkpoint folder: no {CONFIG_FILE}")
    else:
        from lifecycle_cli.zoo import named_config

        try:
            config = named_config(str(checkpoint_dir))
        except UserError:
            raise UserError(
                f"checkpoint folder {folder} does not exist (nor is it a named model, which "
                "--dry_run can also plan)"
            ) from None
    return config


def _replace(config: Config, **fields) -> Config:
    return dataclasses.replace(config, **fields)


def _plan(
    config, train, plan, devices, num_nodes, precision, method, lora, notes, pretraining=True,
    reference=False, reference_copy=False, tensor_parallel=1,
) -> Plan:  # fmt: skip
    seq_length = train.seq_length(config.block_size)
    tokens, source = planned_tokens(train, seq_length)
    if tokens is None and train.epochs:
        notes.append(
            "Note: --train.epochs needs the data to count tokens; give --train.max_steps or "
            "--train.max_tokens to plan a given run"
        )
    result = make_plan(
        config, plan, seq_length=seq_length, micro_batch=train.micro_batch_size,
        tokens=tokens, tokens_from=source, precision=precision,
        devices=device_count(devices, num_nodes), method=method, lora=lora,
        reference=reference, reference_copy=reference_copy, tensor_parallel=tensor_parallel,
    )  # fmt: skip
    result.notes += notes
    result.pretraining = pretraining
    for line in result.lines():
        print(line)
    return result
