"""Lightning Fabric set-up: devices, strategies (DDP, FSDP2, FSDP2 x tensor parallel),
precision, the optimizer.

The model knows nothing of parallelism; `parallelize` applies tensor parallelism and FSDP2 from
outside, the torchtitan way, through Fabric's ModelParallelStrategy (which also runs on CPU with
gloo) and its 2-D device mesh (data_parallel, tensor_parallel).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn as nn

from lifecycle_cli.errors import UserError
from lifecycle_cli.model import GPT

Strategy = Literal["auto", "ddp", "fsdp"]
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")


def choose_precision(precision: Optional[str], accelerator: str) -> str:
    """The Fabric precision to train in: given (and possible here), or the device's default."""
    if precision is None:
        bf16 = accelerator == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16-mixed" if bf16 else "32-true"
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "16-mixed" and accelerator != "cuda":
        # Fabric would quietly switch to bf16-mixed on CPU.
        raise UserError(
            "--precision 16-mixed needs a CUDA GPU (float16 autocast with a gradient scaler); "
            "on CPU use 32-true, bf16-mixed or bf16-true"
        )
    return precision


def check_fp8(accelerator: str) -> None:
    """--fp8 (torchao float8 training) needs an H100-class GPU and torchao."""
    if accelerator != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        found = torch.cuda.get_device_name() if accelerator == "cuda" else "no CUDA GPU"
        raise UserError(
            f"--fp8 needs an H100-class GPU (CUDA compute capability 8.9 or newer); found {found}"
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise UserError("--fp8 needs torchao: pip install torchao") from None


def to_float8(model: GPT) -> GPT:
    """Train the blocks' linear layers in float8 (dynamic scaling, torchao); the embedding,
    lm_head and layers whose sizes are not multiples of 16 stay in higher precision."""
    from torchao.float8 import convert_to_float8_training

    def chosen(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or not fqn.startswith("blocks."):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return convert_to_float8_training(model, module_filter_fn=chosen)


def mixed_precision_policy(precision: str):
    """FSDP2's policy: compute in the half dtype of a mixed mode, keep fp32 master weights and
    reduce gradients in fp32 (None: FSDP2's default, the parameters' own dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if half is None:
        return None
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)


def setup_fabric(
    devices: Union[int, str],
    num_nodes: int,
    strategy: Strategy,
    precision: Optional[str],
    activation_checkpointing: bool = False,
    fp8: bool = False,
    tensor_parallel: int = 1,
):
    """A launched Fabric. On CPU `devices` is the number of processes (gloo)."""
    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy

    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    precision = choose_precision(precision, accelerator)
    if fp8:
        check_fp8(accelerator)
    tp = tensor_parallel
    if tp < 1:
        raise UserError(f"--tensor_parallel {tp} must be at least 1")
    if tp > 1 and strategy not in ("auto", "fsdp"):
        raise UserError(
            f"--tensor_parallel applies to --strategy fsdp (FSDP2 x tensor parallel), "
            f"not --strategy {strategy}"
        )
    if strategy == "fsdp" or tp > 1:
        n = devices if isinstance(devices, int) else torch.cuda.device_count() or 1
        world = n * num_nodes
        if world % tp:
            raise UserError(
                f"--tensor_parallel {tp} does not divide the {world} device(s) "
                f"(--devices {devices} x --num_nodes {num_nodes})"
            )
        policy = mixed_precision_policy(precision)
        chosen = ModelParallelStrategy(
            parallelize_fn=lambda model, mesh: parallelize(
                model, mesh, activation_checkpointing, policy
            ),
            data_parallel_size=world // tp,
            tensor_parallel_size=tp,
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


def parallelize(
    model: GPT, device_mesh, activation_checkpointing: bool = False, policy=None
) -> GPT:
    """Tensor parallelism over the mesh's tensor-parallel ranks (if more than one), then FSDP2:
    shard each Block, then the rest of the model, over the data-parallel mesh (in `policy`'s
    mixed precision, if any)."""
    from torch.distributed.fsdp import fully_shard

    if device_mesh["tensor_parallel"].size() > 1:
        from lifecycle_cli.train.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, device_mesh["tensor_parallel"])
    mesh = device_mesh["data_parallel"]
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    kwargs = {} if policy is None else {"mp_policy": policy}
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def data_parallel(fabric) -> tuple[int, int]:
    """(this rank's data-parallel index, the data-parallel size): the ranks of one
    tensor-parallel group read the same batches."""
    if is_sharded(fabric):
        mesh = fabric.strategy.device_mesh["data_parallel"]
        return mesh.get_local_rank(), mesh.size()
    return fabric.global_rank, fabric.world_size


def tensor_parallel_size(fabric) -> int:
    return fabric.strategy.device_mesh["tensor_parallel"].size() if is_sharded(fabric) else 1


def clip_gradients(fabric, model, optimizer, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm (math.inf: only measure it); return the norm before clipping.

    Under tensor parallelism some gradients are DTensors on the 2-D mesh (the sharded
    linears) and the rest on the data-parallel mesh only, which torch's `clip_grad_norm_`
    cannot stack: each mesh's norm is reduced on its own, then they are combined.
    """
    if tensor_parallel_size(fabric) == 1:
        norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    fabric.strategy.precision.unscale_gradients(optimizer)
    groups: dict = {}
    for param in model.parameters():
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(mesh, []).append(param)
    squares = []
    for params in groups.values():
        norm = get_total_norm([p.grad for p in params], error_if_nonfinite=False)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt()
    for params in groups.values():
        clip_grads_with_norm_(params, max_norm, total)
    return total


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
