"""`llmcycle pretrain`: teach a model language on plain text."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from lifecycle_cli.config import Config
from lifecycle_cli.data.args import TextData
from lifecycle_cli.errors import UserError
from lifecycle_cli.train.args import EvalArgs, TrainArgs


@dataclass
class TokenizerArgs:
    """The tokenizer trained for a from-scratch run (no --tokenizer_dir)."""

    vocab_size: int = 4096
    """Vocabulary size of the byte-level BPE trained on the training files."""


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
    resume: Union[bool, Literal["auto"], Path] = False,
    devices: Union[int, str] = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    precision: Optional[str] = None,
    logger: Literal["csv", "tensorboard"] = "csv",
    seed: int = 42,
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> None:
    """Pretrain a model on text, from scratch or continuing from a checkpoint.

    Args:
        model_name: A named architecture (`llmcycle download list`), trained from scratch.
        model_config: The architecture as fields (e.g. in a --config YAML), trained from scratch.
        out_dir: Where step-NNNNNN/ checkpoints, final/, metrics.csv and loss.png go.
        tokenizer_dir: A folder with tokenizer.json to use (default: train a BPE on the data).
        tokenizer: The BPE trained when there is no tokenizer_dir.
        data: The training text (default: text that ships with Python).
        initial_checkpoint_dir: Continue pretraining this checkpoint (its architecture, weights
            and tokenizer).
        train: Optimisation and duration.
        eval: Validation during training.
        resume: `auto` continues from the newest step folder in out_dir (or starts fresh if there
            is none); a path continues from that step folder.
        devices: Devices (processes on CPU) per node.
        num_nodes: Machines; launch one process per node the way Fabric/torchrun does.
        strategy: auto (one device or DDP), ddp, or fsdp (FSDP2, sharded).
        precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-mixed on a GPU that
            supports it, else 32-true).
        logger: csv (metrics.csv) or tensorboard (also out_dir/tensorboard/).
        seed: Seed for initialisation and data order.
        compile: Compile the model with torch.compile.
        activation_checkpointing: Recompute each block's activations in backward (FSDP only).
    """
    hparams = {k: to_yaml(v) for k, v in locals().items()}
    import torch

    from lifecycle_cli.checkpoint import load_config, load_weights
    from lifecycle_cli.data.text import prepare
    from lifecycle_cli.model import GPT
    from lifecycle_cli.objectives import next_token_loss
    from lifecycle_cli.train.fabric import is_sharded, make_optimizer, setup_fabric
    from lifecycle_cli.train.loop import Run, fit
    from lifecycle_cli.train.state import Progress, find_resume, load_step, save_final
    from lifecycle_cli.train.throughput import flops_per_token, n_params

    config = choose_config(model_name, model_config, initial_checkpoint_dir, load_config)
    if activation_checkpointing and strategy != "fsdp":
        raise UserError("--activation_checkpointing applies to --strategy fsdp")
    resume_from = find_resume(resume, out_dir)
    fabric = setup_fabric(devices, num_nodes, strategy, precision, activation_checkpointing)
    train.validate(fabric.world_size)
    fabric.seed_everything(seed, verbose=False)

    tok, tok_dir = get_tokenizer(
        fabric, tokenizer_dir, initial_checkpoint_dir, data, tokenizer, out_dir
    )
    if initial_checkpoint_dir is None:
        config = dataclasses.replace(config, vocab_size=64 * math.ceil(tok.vocab_size / 64))
    elif tok.vocab_size > config.vocab_size:
        raise UserError(
            f"tokenizer of {tok.vocab_size} tokens does not fit the model's vocab of "
            f"{config.vocab_size} ({initial_checkpoint_dir})"
        )
    seq_length = train.seq_length(config.block_size)

    # Rank 0 tokenizes; the others then find the cache.
    if fabric.global_rank == 0:
        train_data, val_data = prepare(data, tok, seq_length, seed)
    fabric.barrier()
    if fabric.global_rank != 0:
        train_data, val_data = prepare(data, tok, seq_length, seed)

    with fabric.init_module():
        model = GPT(config)
    model.max_seq_length = seq_length
    if initial_checkpoint_dir is not None:
        load_weights(model, initial_checkpoint_dir)
    if compile:
        model = torch.compile(model)
    model = fabric.setup(model)
    fused = not is_sharded(fabric) and fabric.device.type in ("cpu", "cuda")
    optimizer = make_optimizer(
        model, train.lr, train.weight_decay, (train.beta1, train.beta2), fused
    )
    optimizer = fabric.setup_optimizers(optimizer)
    progress = load_step(fabric, resume_from, model, optimizer) if resume_from else Progress()

    max_steps = train.total_steps(len(train_data), seq_length)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
        fabric.print(
            f"Model: {n_params(config, non_embedding=False):,} parameters "
            f"({config.n_layer} layers, {config.n_embd} wide, vocab {config.vocab_size}); "
            f"{len(train_data):,} training blocks of {seq_length} tokens, "
            f"{len(val_data):,} validation blocks"
        )
        fabric.print(
            f"Unigram baseline (token frequencies only): validation loss "
            f"{val_data.unigram_loss(train_data):.4f}"
        )
        fabric.print(
            f"Training {max_steps} steps x {train.global_batch_size} samples on "
            f"{fabric.world_size} device(s)"
            + (f", resuming at step {progress.step} from {resume_from}" if resume_from else "")
        )

    run = Run(
        objective=next_token_loss,
        train_data=train_data,
        val_data=val_data,
        train=train,
        eval=eval,
        out_dir=out_dir,
        max_steps=max_steps,
        flops_per_token=flops_per_token(config, seq_length),
        tokenizer_dir=tok_dir,
        logger=logger,
    )
    progress = fit(fabric, model, optimizer, run, progress)
    if progress.step < max_steps:
        raise SystemExit(130)
    save_final(fabric, out_dir / "final", model, tok_dir)
    fabric.print(f"Saved {out_dir / 'final'}")


def choose_config(model_name, model_config, initial_checkpoint_dir, load_config) -> Config:
    given = [x is not None for x in (model_name, model_config, initial_checkpoint_dir)]
    if sum(given) != 1:
        raise UserError(
            "give exactly one of: a model name, --model_config, --initial_checkpoint_dir"
        )
    if model_name is not None:
        from lifecycle_cli.zoo import named_config

        return named_config(model_name)
    if model_config is not None:
        return model_config
    return load_config(initial_checkpoint_dir)


def get_tokenizer(fabric, tokenizer_dir, initial_checkpoint_dir, data, args, out_dir):
    """(Tokenizer, folder holding its files): given, from the initial checkpoint, or trained."""
    from lifecycle_cli.data.text import iter_texts, resolve_files
    from lifecycle_cli.tokenizer import Tokenizer, train_bpe

    folder = tokenizer_dir or initial_checkpoint_dir
    if folder is not None:
        return Tokenizer(folder), Path(folder)
    folder = out_dir / "tokenizer"
    if fabric.global_rank == 0 and not (folder / "tokenizer.json").is_file():
        files = resolve_files(data.path)
        fabric.print(f"Training a {args.vocab_size}-token BPE tokenizer on {len(files)} file(s)")
        train_bpe(None, args.vocab_size, folder, texts=iter_texts(files))
    fabric.barrier()
    return Tokenizer(folder), folder


def to_yaml(value):
    """Flags as plain YAML values for hparams.yaml."""
    if dataclasses.is_dataclass(value):
        return {k: to_yaml(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_yaml(v) for v in value]
    return value
