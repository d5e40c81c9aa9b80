"""Lightning Fabric set-up: devices, strategies (DDP, FSDP2), precision, the optimizer.

The model knows nothing of parallelism; `parallelize` applies FSDP2 from outside, the torchtitan
way, through Fabric's ModelParallelStrategy (which also runs on CPU with gloo).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn as nn

from lifecycle_cli.errors import UserError
from lifecycle_cli.model import GPT

Strategy = Literal["auto", "ddp", "fsdp"]


def setup_fabric(
    devices: Union[int, str],
    num_nodes: int,
    strategy: Strategy,
    precision: Optional[str],
    activation_checkpointing: bool = False,
):
    """A launched Fabric. On CPU `devices` is the number of processes (gloo)."""
    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy

    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if precision is None:
        bf16 = accelerator == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 else "32-true"
    if strategy == "fsdp":
        n = devices if isinstance(devices, int) else torch.cuda.device_count() or 1
        chosen = ModelParallelStrategy(
            parallelize_fn=lambda model, mesh: parallelize(model, mesh, activation_checkpointing),
            data_parallel_size=n * num_nodes,
            tensor_parallel_size=1,
        )
    elif strategy in ("auto", "ddp"):
        n = devices if isinstance(devices, int) else 1
        chosen = "ddp" if strategy == "ddp" or n * num_nodes > 1 else "auto"
    else:
        raise UserError(f"--strategy {strategy!r} is not one of auto, ddp, fsdp")
    try:
        fabric = L.Fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=chosen,
            precision=precision,
        )
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot set up --devices/--strategy/--precision: {e}") from None
    fabric.launch()
    return fabric


def parallelize(model: GPT, device_mesh, activation_checkpointing: bool = False) -> GPT:
    """FSDP2: shard each Block, then the rest of the model, over the data-parallel mesh."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(fabric) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, fused: bool):
    """AdamW; no weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name.endswith(("wte.weight", "wpe.weight"))
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kind)


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside Fabric's and compile's wrappers."""
    module = getattr(module, "module", module)  # _FabricModule
    module = getattr(module, "_orig_mod", module)  # torch.compile
    return getattr(module, "module", module)  # DDP
