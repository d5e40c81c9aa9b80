"""`llmcycle finetune`: teach a checkpoint a task or to follow instructions."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from lifecycle_cli.data.args import InstructData
from lifecycle_cli.errors import UserError
from lifecycle_cli.train.args import EvalArgs, LoRAArgs, TrainArgs


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
    resume: Union[bool, Literal["auto"], Path] = False,
    devices: Union[int, str] = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    precision: Optional[str] = None,
    logger: Literal["csv", "tensorboard"] = "csv",
    seed: int = 42,
) -> None:
    """Finetune a checkpoint on instructions (Alpaca or chat JSON/JSONL), synthetic tasks, or
    labelled texts (classification: CSV/TSV/JSONL with text and label).

    Args:
        checkpoint_dir: The checkpoint folder to start from.
        out_dir: Where step folders, final/ (a plain checkpoint; LoRA merged, with
            lora.safetensors beside), metrics.csv and loss.png go.
        data: The examples.
        method: full (every weight), lora (low-rank adapters), qlora (4-bit base, CUDA only).
        lora: LoRA rank, scale, dropout and which layers get adapters.
        prompt_style: How prompts are formatted: alpaca, chatml, llama3, ..., chat_template
            (default: the checkpoint's prompt_style.yaml, else its chat template, else alpaca).
        train: Optimisation and duration.
        eval: Validation during training.
        trainable_blocks: Train only the last K blocks and the head(s), the rest frozen
            (--method full; e.g. a classifier on top of a pretrained model).
        exact_match_samples: Validation examples answered greedily to measure exact match
            (synthetic tasks only; 0 turns it off).
        max_new_tokens: Longest answer generated for exact match.
        resume: `auto` continues from the newest step folder in out_dir; a path, from that one.
        devices: Devices (processes on CPU) per node.
        num_nodes: Machines.
        strategy: auto, ddp or fsdp.
        precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-mixed on a capable
            GPU, else 32-true).
        logger: csv or tensorboard.
        seed: Seed for the data order, dropout and the validation split.
    """
    from lifecycle_cli.checkpoint import (
        check_checkpoint_dir,
        load_config,
        load_model,
        load_weights,
    )
    from lifecycle_cli.data.instruct import detect_format, load_examples
    from lifecycle_cli.lora import adapted_model, inject_lora, merge_lora, save_lora
    from lifecycle_cli.model import GPT
    from lifecycle_cli.quantize import dequantize_blocks, quantize_blocks
    from lifecycle_cli.tokenizer import Tokenizer
    from lifecycle_cli.train.fabric import is_sharded, make_optimizer, setup_fabric, unwrap
    from lifecycle_cli.train.loop import Run, fit
    from lifecycle_cli.train.state import (
        Progress,
        find_resume,
        full_state_dict,
        load_step,
        write_final,
    )
    from lifecycle_cli.train.throughput import flops_per_token

    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    config = load_config(checkpoint_dir)
    if trainable_blocks is not None and not 0 < trainable_blocks <= config.n_layer:
        raise UserError(f"--trainable_blocks must be between 1 and {config.n_layer}")
    if trainable_blocks is not None and method != "full":
        raise UserError("--trainable_blocks applies to --method full")
    tokenizer = Tokenizer(checkpoint_dir)
    seq_length = train.seq_length(config.block_size)
    classify = data.synthetic is None and detect_format(data) == "classification"
    train_examples, val_examples = load_examples(data)
    if classify:
        task = ClassificationTask(train_examples, val_examples, tokenizer, seq_length, seed)
    else:
        style = choose_style(prompt_style, checkpoint_dir, tokenizer)
        task = InstructionTask(
            train_examples, val_examples, tokenizer, style, seq_length, data, seed
        )

    resume_from = find_resume(resume, out_dir)
    fabric = setup_fabric(devices, num_nodes, strategy, precision)
    train.validate(fabric.world_size)
    if method == "qlora":
        check_qlora(fabric)
    if classify and is_sharded(fabric):
        raise UserError("classification finetuning supports --strategy auto or ddp, not fsdp")
    fabric.seed_everything(seed, verbose=False)

    if method == "qlora":  # unpacked in CPU memory; only the packed weights reach the GPU
        gpt = load_model(checkpoint_dir, device="cpu", dtype=param_dtype(fabric)).train()
    else:
        with fabric.init_module():
            gpt = GPT(config)
        load_weights(gpt, checkpoint_dir)
    gpt.max_seq_length = seq_length
    if method in ("lora", "qlora"):
        inject_lora(gpt, lora)
    if method == "qlora":
        quantize_blocks(gpt, fabric.device)
    model = task.model(gpt)
    if trainable_blocks is not None:
        freeze_all_but_last(model, gpt, trainable_blocks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = fabric.setup(model)
    fused = not is_sharded(fabric) and fabric.device.type in ("cpu", "cuda")
    betas = (train.beta1, train.beta2)
    optimizer = make_optimizer(model, train.lr, train.weight_decay, betas, fused)
    optimizer = fabric.setup_optimizers(optimizer)
    progress = load_step(fabric, resume_from, model, optimizer) if resume_from else Progress()

    max_steps = train.total_steps(len(task.train_data), seq_length)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        fabric.print(
            f"{method} finetuning ({task.describe()}): {trainable:,} trainable parameters; "
            f"{len(task.train_data):,} training / {len(task.val_data):,} validation examples "
            f"({task.train_data.n_truncated} truncated to {seq_length} tokens); "
            f"{max_steps} steps of {train.global_batch_size}"
        )

    extra_eval, extra_metrics = task.extra_eval(exact_match_samples, max_new_tokens)
    run = Run(
        objective=task.objective,
        train_data=task.train_data,
        val_data=task.val_data,
        train=train,
        eval=eval,
        out_dir=out_dir,
        max_steps=max_steps,
        flops_per_token=flops_per_token(config, seq_length),
        tokenizer_dir=checkpoint_dir,
        logger=logger,
        extra_eval=extra_eval,
        extra_metrics=extra_metrics,
    )
    progress = fit(fabric, model, optimizer, run, progress)
    if progress.step < max_steps:
        raise SystemExit(130)
    if method == "qlora":  # the adapters merge into the base they were trained against
        dequantize_blocks(gpt)
    # `gpt` is the module Fabric wraps (or a classifier's body: its LM head untouched, the class
    # head saved beside it by task.finish).
    state = full_state_dict(fabric, gpt)  # every rank
    if fabric.global_rank == 0:
        if method in ("lora", "qlora"):
            adapted = adapted_model(config, lora, state)
            size = save_lora(adapted, out_dir / "lora.safetensors", lora)
            fabric.print(f"Saved LoRA adapters: {out_dir / 'lora.safetensors'} ({size:,} bytes)")
            merge_lora(adapted)
            state = adapted.state_dict()
        final = out_dir / "final"
        write_final(final, config, state, checkpoint_dir)
        task.finish(unwrap(model), final, fabric.print)
        fabric.print(f"Saved {final}")
    fabric.barrier()


class InstructionTask:
    """Next-token loss on the responses; exact match by generation for synthetic tasks."""

    def __init__(self, train_examples, val_examples, tokenizer, style, seq_length, data, seed):
        from lifecycle_cli.data.instruct import SFTDataset
        from lifecycle_cli.objectives import masked_sft_loss

        self.tokenizer, self.style, self.synthetic = tokenizer, style, data.synthetic
        self.train_data = SFTDataset(
            train_examples, tokenizer, style, seq_length, data.mask_prompt, seed
        )
        self.val_data = SFTDataset(
            val_examples, tokenizer, style, seq_length, data.mask_prompt, seed
        )
        self.objective = masked_sft_loss

    def describe(self) -> str:
        return f"prompt style {self.style.name!r}"

    def model(self, gpt):
        return gpt

    def extra_eval(self, samples: int, max_new_tokens: int):
        if not self.synthetic or samples <= 0:
            return None, ()
        from lifecycle_cli.train.fabric import unwrap

        items = self.val_data.eval_items()[:samples]

        def measure(model) -> dict[str, float]:
            return {
                "exact_match": exact_match(unwrap(model), self.tokenizer, items, max_new_tokens)
            }

        return measure, ("exact_match",)

    def finish(self, model, final: Path, say) -> None:
        from lifecycle_cli.prompts import save_prompt_style

        save_prompt_style(self.style, final)


class ClassificationTask:
    """A class head on the last real token; accuracy and a confusion table on validation."""

    def __init__(self, train_examples, val_examples, tokenizer, seq_length, seed):
        from lifecycle_cli.classifier import classification_loss
        from lifecycle_cli.data.classify import ClassificationDataset

        pairs = lambda examples: [(e["text"], e["label"]) for e in examples]  # noqa: E731
        self.train_data = ClassificationDataset(
            pairs(train_examples), tokenizer, None, seq_length, seed
        )
        self.labels = self.train_data.labels
        self.val_data = ClassificationDataset(
            pairs(val_examples), tokenizer, self.labels, seq_length, seed
        )
        self.objective = classification_loss

    def describe(self) -> str:
        return f"classification into {len(self.labels)} classes: {', '.join(self.labels)}"

    def model(self, gpt):
        from lifecycle_cli.classifier import Classifier

        return Classifier(gpt, self.labels)

    def extra_eval(self, samples: int, max_new_tokens: int):
        from lifecycle_cli.classifier import confusion
        from lifecycle_cli.train.fabric import unwrap

        def measure(model) -> dict[str, float]:
            table = confusion(unwrap(model), self.val_data)
            return {"accuracy": float(table.diag().sum() / table.sum())}

        return measure, ("accuracy",)

    def finish(self, model, final: Path, say) -> None:
        from lifecycle_cli.classifier import confusion, format_confusion

        model.save_head(final)
        table = confusion(model, self.val_data)
        say(f"Validation accuracy {float(table.diag().sum() / table.sum()):.4f}")
        say(format_confusion(table, self.labels))


def freeze_all_but_last(model, gpt, k: int) -> None:
    """Train only the last `k` blocks, the final norm and the output head(s)."""
    model.requires_grad_(False)
    head = model.head if hasattr(model, "head") else gpt.lm_head  # a classifier's, or the LM's
    for module in (*gpt.blocks[len(gpt.blocks) - k :], gpt.ln_f, head):
        module.requires_grad_(True)


def param_dtype(fabric):
    """The dtype Fabric's precision gives parameters (`--precision`)."""
    import torch

    true_half = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
    return true_half.get(str(fabric.strategy.precision.precision), torch.float32)


def check_qlora(fabric) -> None:
    """QLoRA's 4-bit kernels are bitsandbytes' CUDA ones; one GPU (no DDP/FSDP of packed
    weights yet)."""
    from lifecycle_cli.quantize import require_bitsandbytes

    if fabric.device.type != "cuda":
        raise UserError(
            f"--method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels), this run is on "
            f"{fabric.device.type}; use --method lora"
        )
    if fabric.world_size > 1:
        raise UserError("--method qlora runs on one GPU: use --devices 1 (or --method lora)")
    require_bitsandbytes()


def choose_style(name, checkpoint_dir, tokenizer):
    """--prompt_style, else the checkpoint's saved style or chat template, else alpaca."""
    from lifecycle_cli.prompts import get_style, read_style_file

    if name is None:
        name = read_style_file(checkpoint_dir)
    if name is None:
        name = "chat_template" if tokenizer.chat_template else "alpaca"
    return get_style(name, tokenizer)


def exact_match(model, tokenizer, items, max_new_tokens: int) -> float:
    """Share of validation items whose greedy answer equals the expected one."""
    from lifecycle_cli.data.synthetic import exact_match as same
    from lifecycle_cli.generate import Generator, SamplingParams

    generator = Generator(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    answers = []
    for start in range(0, len(items), 32):
        answers += generator.generate_batch([ids for ids, _ in items[start : start + 32]], params)
    model.clear_kv_cache()
    hits = sum(same(a.text, expected) for a, (_, expected) in zip(answers, items))
    return hits / max(1, len(items))
