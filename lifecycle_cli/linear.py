"""`Linear`: nn.Linear whose training matmuls run in oneDNN on CPU.

PyTorch multiplies float32 matrices on CPU with MKL's sgemm, which on AMD processors runs its
AVX2 code; oneDNN (shipped in the same wheel, `torch.ops.mkldnn`) uses AVX-512 where the CPU
has it. For the shapes of a small model's training step (thousands of tokens x a few hundred
features) it is 1.3-2.3x faster on this 2-core EPYC (`benchmarks/train_vs_litgpt.py`; same
float32 arithmetic, only the summation order differs). So in float32 training on CPU the
forward and both backward matmuls of every `Linear` go through oneDNN; anything else (no
gradient, a GPU, autocast, half precision, sharded DTensor weights) is `F.linear` as before.
Parameters, names and state dicts are nn.Linear's.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ONEDNN = (
    os.environ.get("LLMCYCLE_ONEDNN", "1") != "0"  # 0: PyTorch's own matmul (for comparisons)
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


@torch.library.custom_op("llmcycle::onednn_linear", mutates_args=())
def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN (x (..., in), weight (out, in), any strides). A custom
    op, so torch.compile calls it as it is (inductor lowers oneDNN's own op only for frozen
    inference weights)."""
    if x.numel() == 0 or x.size(-1) == 0:  # an expert no token chose: oneDNN refuses it
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.size(0)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad2d, x2d = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:  # grad @ weight
        grad_x = onednn_linear(grad2d, weight.t(), None).view(x.shape)
    if ctx.needs_input_grad[1]:  # grad.T @ x
        grad_weight = onednn_linear(grad2d.t(), x2d.t(), None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad2d.sum(0)
    return grad_x, grad_weight, grad_bias


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a float32 CPU training matmul of `x` by this plain (unsharded) weight goes to
    oneDNN."""
    return (
        ONEDNN
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and type(weight) is nn.Parameter
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


def matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D float32 CPU tensors: oneDNN where available, else torch.mm."""
    if ONEDNN and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32:
        return onednn_linear(a, b, None)
    return a @ b.t()


class Linear(nn.Linear):
    """nn.Linear; float32 training on CPU multiplies through oneDNN (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(x, self.weight):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
