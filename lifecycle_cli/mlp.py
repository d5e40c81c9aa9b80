"""The feed-forward half of a block: GELU MLP, gated MLP (SwiGLU / GeGLU) or a mixture of
experts, and the router losses a mixture adds to the training objective."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lifecycle_cli.config import Config
from lifecycle_cli.linear import Linear


class GeluMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU: proj(act(fc_1(x)) * fc_2(x)); fc_1 is the gate."""

    def __init__(self, config: Config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.fc_1 = Linear(config.n_embd, size, bias=config.bias)
        self.fc_2 = Linear(config.n_embd, size, bias=config.bias)
        self.proj = Linear(size, config.n_embd, bias=config.bias)
        self.geglu = config.mlp == "geglu"
        self.approximate = config.gelu_approximate
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc_1(x), self.fc_2(x)
        if self.limit is not None:  # GPT-OSS
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit) + 1
            return self.proj(gate * torch.sigmoid(self.alpha * gate) * up)
        gate = F.gelu(gate, approximate=self.approximate) if self.geglu else F.silu(gate)
        return self.proj(gate * up)


class MoE(nn.Module):
    """Mixture of gated experts: each token goes to its top-k experts, weighted by the router.

    Routing is batched: the (token, expert) pairs are sorted by expert once, each expert runs
    on its contiguous share, and one scatter puts the results back (no per-expert index_add).
    A forward pass in training mode keeps the router statistics that `router_loss` and
    `expert_load` read.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate = Linear(config.n_embd, config.n_expert, bias=config.router_bias)
        size = config.expert_intermediate_size
        self.experts = nn.ModuleList(GatedMLP(config, size) for _ in range(config.n_expert))
        self.k, self.norm_topk = config.n_expert_per_token, config.moe_norm_topk
        self.aux_coef, self.z_coef = config.router_aux_loss_coef, config.router_z_loss_coef
        self.stats: Optional[RouterStats] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts))
        self.stats = RouterStats(logits, probs, counts) if self.training else None
        # Every (token, slot) pair sorted by expert: each expert runs on one contiguous slice.
        order = chosen.flatten().argsort(stable=True)
        pieces = x.index_select(0, order // self.k).split(counts.tolist())  # one host sync
        # Every expert runs, on no tokens too: its gradient is then zero, not None, so sharded
        # ranks (FSDP2 reduce-scatter, tensor-parallel all-reduce) agree on what they exchange.
        out = torch.cat([e(p) for e, p in zip(self.experts, pieces)])
        out = torch.zeros_like(out).index_copy(0, order, out)  # back to (token, slot) order
        y = (out.view(-1, self.k, shape[-1]) * weights[..., None]).sum(dim=1)
        return y.view(shape)


class RouterStats:
    """What one MoE layer's router did in the last training forward pass."""

    def __init__(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
        self.n_tokens = probs.size(0)
        self.prob_sum = probs.sum(dim=0)  # (E,), carries the router's gradient
        self.counts = counts.float()  # (E,) (token, expert) assignments
        self.z_sum = torch.logsumexp(logits.float(), dim=-1).pow(2).sum()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The router losses of the last training forward pass, weighted by their coefficients:
    None for a model without experts (or with both coefficients 0).

    Load balancing as Switch Transformer (and transformers' `load_balancing_loss_func`):
    n_expert * sum_e f_e * P_e, where f_e is the share of assignments expert e received and P_e
    its mean router probability, both over the tokens of every MoE layer. z-loss: the mean
    squared log-sum-exp of the router logits.
    """
    layers = [m for m in moe_layers(model) if m.stats is not None]
    if not layers or not (layers[0].aux_coef or layers[0].z_coef):
        return None
    n = sum(m.stats.n_tokens for m in layers)
    f = sum(m.stats.counts for m in layers) / n
    p = sum(m.stats.prob_sum for m in layers) / n
    aux = len(layers[0].experts) * (f * p).sum()
    z = sum(m.stats.z_sum for m in layers) / n
    return layers[0].aux_coef * aux + layers[0].z_coef * z


def expert_load(model: nn.Module) -> Optional[tuple[float, float]]:
    """(share of experts that got any token, the busiest expert's load over the mean load),
    over the MoE layers of the last training forward pass; None without experts."""
    layers = [m for m in moe_layers(model) if m.stats is not None]
    if not layers:
        return None
    counts = torch.stack([m.stats.counts for m in layers])  # (layers, E)
    used = (counts > 0).float().mean().item()
    busiest = (counts.max(dim=1).values / counts.mean(dim=1)).max().item()
    return used, busiest


def make_mlp(config: Config, layer: int) -> nn.Module:
    if config.is_moe(layer):
        return MoE(config)
    if config.mlp in ("gelu",):
        return GeluMLP(config)
    return GatedMLP(config)
