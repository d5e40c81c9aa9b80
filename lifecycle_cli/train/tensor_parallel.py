"""Tensor parallelism, applied to a `GPT` from outside (the torchtitan way).

Per block: queries, keys and values and the MLP's fc/gate/up layers column-wise, the attention
output and the MLP's down projection row-wise (one all-reduce after attention, one after the
MLP). Norms, embeddings, the router and the head are replicated over the tensor-parallel ranks.
An MoE's experts are sharded like a dense MLP, each one over all tensor-parallel ranks (every
rank routes the same tokens, so they agree on which experts run).

`attn.qkv` stacks queries, keys and values along its output dimension; a column-wise shard of
the stack would mix them, so under tensor parallelism it becomes three linears
(`attn.qkv.{q,k,v}`), each sharded by heads. `merge_qkv` puts a full state dict back into the
checkpoint layout.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.mlp import GatedMLP, GeluMLP, MoE


def check_tensor_parallel(config: Config, tp: int) -> None:
    """Refuse an architecture whose heads or MLP do not split evenly over `tp` ranks."""
    if tp == 1:
        return
    sizes = {
        "n_head": config.n_head,
        "n_query_groups (key/value heads)": config.n_query_groups,
        "intermediate_size": config.intermediate_size,
    }
    if config.mlp == "moe":
        sizes["expert_intermediate_size"] = config.expert_intermediate_size
    for name, size in sizes.items():
        if size % tp:
            raise UserError(
                f"--tensor_parallel {tp}: the model's {name} {size} does not divide by {tp}; "
                "choose a --tensor_parallel that divides it"
            )
    if config.qk_norm and config.qk_norm_scope == "all":
        raise UserError(
            f"--tensor_parallel {tp}: query/key norms over all heads (qk_norm_scope all) need "
            "every head on one rank; train this model without --tensor_parallel"
        )
    if config.attention_sinks:
        raise UserError(
            f"--tensor_parallel {tp}: attention sinks are not sharded yet; train this model "
            "without --tensor_parallel"
        )


class SplitQKV(nn.Module):
    """`attn.qkv` as three linears; forward returns their outputs stacked as `qkv`'s are."""

    def __init__(self, qkv: nn.Linear, sizes: tuple[int, int, int]) -> None:
        super().__init__()
        bias = qkv.bias is not None
        like = dict(device=qkv.weight.device, dtype=qkv.weight.dtype)
        self.q, self.k, self.v = (nn.Linear(qkv.in_features, n, bias=bias, **like) for n in sizes)
        with torch.no_grad():
            for linear, w in zip((self.q, self.k, self.v), qkv.weight.split(sizes)):
                linear.weight.copy_(w)
            if bias:
                for linear, b in zip((self.q, self.k, self.v), qkv.bias.split(sizes)):
                    linear.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.q(x), self.k(x), self.v(x)), dim=-1)


def mlp_plan(mlp: nn.Module, prefix: str) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(mlp, GeluMLP):
        return {f"{prefix}.fc": ColwiseParallel(), f"{prefix}.proj": RowwiseParallel()}
    if isinstance(mlp, GatedMLP):
        return {
            f"{prefix}.fc_1": ColwiseParallel(),
            f"{prefix}.fc_2": ColwiseParallel(),
            f"{prefix}.proj": RowwiseParallel(),
        }
    if isinstance(mlp, MoE):
        plan = {}
        for e, expert in enumerate(mlp.experts):
            plan |= mlp_plan(expert, f"{prefix}.experts.{e}")
        return plan
    raise TypeError(f"no tensor-parallel plan for {type(mlp).__name__}")


def apply_tensor_parallel(model: nn.Module, mesh) -> None:
    """Shard every block of `model` (a GPT) over the 1-D tensor-parallel `mesh`."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    # DTensor warns on every 2-D norm and gather that it takes one collective per mesh
    # dimension; correct, and at this size nothing to act on.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    tp = mesh.size()
    for block in model.blocks:
        attn = block.attn
        sizes = (attn.n_head * attn.hs, attn.n_kv * attn.hs, attn.n_kv * attn.hs)
        attn.qkv = SplitQKV(attn.qkv, sizes)
        plan = {f"attn.qkv.{name}": ColwiseParallel() for name in "qkv"}
        plan["attn.proj"] = RowwiseParallel()
        parallelize_module(block, mesh, plan | mlp_plan(block.mlp, "mlp"))
        # Each rank now holds its share of the heads.
        attn.n_head, attn.n_kv = attn.n_head // tp, attn.n_kv // tp


def merge_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict of a tensor-parallel model in the checkpoint layout (`attn.qkv`)."""
    merged = {}
    for name, tensor in state_dict.items():
        head, _, leaf = name.rpartition(".")  # leaf: weight or bias
        if head.endswith(".qkv.q"):
            stem = head[: -len(".q")]
            parts = [state_dict[f"{stem}.{p}.{leaf}"] for p in "qkv"]
            merged[f"{stem}.{leaf}"] = torch.cat(parts)
        elif not head.endswith((".qkv.k", ".qkv.v")):
            merged[name] = tensor
    return merged
