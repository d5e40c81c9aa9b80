"""What every task that starts from a checkpoint shares: loading it, training it in full, with
LoRA adapters or with QLoRA (a 4-bit packed base under the adapters), freezing all but the last
blocks, and writing final/ as a plain checkpoint (adapters merged, lora.safetensors beside).

A subclass supplies the data, the objective, how the GPT is wrapped for the objective (`wrap`:
a class head, or the GPT itself), its extra metrics and what else final/ holds (`save_extra`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from lifecycle_cli.errors import UserError
from lifecycle_cli.lora import LoRAArgs

Method = Literal["full", "lora", "qlora"]


class CheckpointTask:
    """Base of the finetuning tasks; see the module docstring."""

    extra_metrics: tuple[str, ...] = ()
    style = None  # the prompt style (SFT, preference); None: the checkpoint's

    def __init__(
        self,
        checkpoint_dir: Path,
        method: Method,
        lora: LoRAArgs,
        trainable_blocks: Optional[int] = None,
    ) -> None:
        from lifecycle_cli.checkpoint import load_config
        from lifecycle_cli.tokenizer import Tokenizer

        self.checkpoint_dir, self.method, self.lora = checkpoint_dir, method, lora
        self.config = load_config(checkpoint_dir)
        n_layer = self.config.n_layer
        if trainable_blocks is not None and not 0 < trainable_blocks <= n_layer:
            raise UserError(f"--trainable_blocks must be between 1 and {n_layer}")
        if trainable_blocks is not None and method != "full":
            raise UserError("--trainable_blocks applies to --method full")
        self.trainable_blocks = trainable_blocks
        self.tokenizer = Tokenizer(checkpoint_dir)

    @property
    def tokenizer_dir(self) -> Path:
        return self.checkpoint_dir

    def check(self, fabric) -> None:
        if self.method == "qlora":
            check_qlora(fabric)

    def configure(self, fabric):
        return self.config

    def model(self, fabric, seq_length: int):
        from lifecycle_cli.checkpoint import load_model, load_weights
        from lifecycle_cli.lora import inject_lora
        from lifecycle_cli.model import GPT
        from lifecycle_cli.quantize import quantize_blocks

        if self.method == "qlora":  # unpacked in CPU memory; only the packed weights reach the GPU
            gpt = load_model(self.checkpoint_dir, device="cpu", dtype=param_dtype(fabric))
            gpt.train()
            quantize_blocks(gpt, fabric.device)
        else:
            with fabric.init_module():
                gpt = GPT(self.config)
            load_weights(gpt, self.checkpoint_dir)
        gpt.max_seq_length = seq_length
        if self.method in ("lora", "qlora"):
            inject_lora(gpt, self.lora)
        self.gpt = gpt  # the module Fabric wraps (or a classifier's body)
        model = self.wrap(gpt)
        if self.trainable_blocks is not None:
            freeze_all_but_last(model, gpt, self.trainable_blocks)
        return model

    def wrap(self, gpt):
        """The module the objective calls: the GPT itself unless a subclass adds a head."""
        return gpt

    def summary(self, trainable: int, seq_length: int, what: str) -> str:
        train, val = self.train_data, self.val_data
        return (
            f"{self.method} finetuning ({what}): {trainable:,} trainable parameters; "
            f"{len(train):,} training / {len(val):,} validation examples "
            f"({train.n_truncated} truncated to {seq_length} tokens)"
        )

    def extra_eval(self):
        return None

    def finish(self, fabric, model, final: Path) -> None:
        """final/: the trained GPT (LoRA merged into the base it was trained against) as a plain
        checkpoint, lora.safetensors beside it, and whatever the subclass saves."""
        from lifecycle_cli.lora import LORA_FILE, adapted_model, merge_lora, save_lora
        from lifecycle_cli.quantize import dequantize_blocks
        from lifecycle_cli.train.fabric import unwrap
        from lifecycle_cli.train.state import full_state_dict, write_final

        if self.method == "qlora":
            dequantize_blocks(self.gpt)
        state = full_state_dict(fabric, self.gpt)  # every rank: gathered from the shards
        if fabric.global_rank == 0:
            if self.method in ("lora", "qlora"):
                adapter_file = final.parent / LORA_FILE
                adapted = adapted_model(self.config, self.lora, state)
                size = save_lora(adapted, adapter_file, self.lora)
                fabric.print(f"Saved LoRA adapters: {adapter_file} ({size:,} bytes)")
                merge_lora(adapted)
                state = adapted.state_dict()
            write_final(final, self.config, state, self.checkpoint_dir)
            self.save_extra(unwrap(model), final, fabric.print)
        fabric.barrier()

    def save_extra(self, model, final: Path, say) -> None:
        """Files beside the weights in final/ (a prompt style, a class head)."""


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
