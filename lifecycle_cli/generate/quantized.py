"""Weight-only quantized inference (`--quantize int8|int4`): the linear layers' weights packed at
load time for PyTorch's own int8/int4 matmul kernels; the checkpoint on disk is untouched.

Not `lifecycle_cli/quantize.py`, which holds QLoRA's NF4 base weights for training.

    int8  symmetric, one scale per output channel: w = q * s, q in [-127, 127]
    int4  asymmetric, per group of GROUP_SIZE inputs: w = (q - 8) * s + z, q in [0, 15]

What is quantized: every linear layer of the transformer blocks (a mixture's router stays
as it is) and the output head, which is int8 in both modes: its error goes straight into the
logits, and at 4 bits it costs a small model most of int4's perplexity. A head tied to the
input embedding is quantized as its own matrix: the embedding (a lookup, one row read per token)
stays in full precision, and so do the norms, the biases and the attention sinks.

The kernels return bfloat16, whose resolution at a logit of 30 is 1/8: enough to swap the two
most likely tokens at every few dozenth position of a greedy continuation. So the head's
`EXACT_TOP` highest outputs of each row are recomputed from the same int8 weights in the
model's dtype (a few rows of the matrix; the rest of the distribution keeps bfloat16 logits).

Kernels: `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` on CPU (whose
vectorized paths take bfloat16 activations only: the product is computed on activations
rounded to bfloat16 and returned in the model's dtype), `aten._weight_int4pack_mm` on CUDA
(bfloat16 too). A layer whose shape the int4 kernels do not take stays in full precision.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from lifecycle_cli.generate.options import check_quantize

log = logging.getLogger("llmcycle.generate")

GROUP_SIZE = 32  # int4: inputs per scale and zero point
EXACT_TOP = 32  # the output head's outputs per row recomputed in the model's dtype
INNER_K_TILES = 8  # the CUDA int4 layout (K must be a multiple of 16 * this)


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight (N, K) and one float scale per output channel.

    exact_top: recompute the highest `exact_top` outputs of each row in the input's dtype (the
    output head: see the module's docstring)."""

    def __init__(self, linear: nn.Linear, exact_top: int = 0) -> None:
        super().__init__()
        self.exact_top = exact_top
        w = linear.weight.detach().float()
        dtype = _kernel_dtype(w.device, linear.weight.dtype)
        # Rounded to the kernel's dtype first: the weights are rounded to the grid it multiplies.
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale)
        self.bias = _bias(linear)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)
        if x.device.type == "cuda" and not _cuda_int8_kernel():
            y = torch.nn.functional.linear(x2, self.weight.to(x2.dtype)) * self.scale
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
        y = y.to(dtype)
        if self.exact_top and dtype != x2.dtype:
            y = self._exact_top(x.reshape(-1, self.in_features), y)
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _exact_top(self, x: torch.Tensor, y: torch.Tensor, rows: int = 256) -> torch.Tensor:
        k = min(self.exact_top, self.out_features)
        for i in range(0, x.size(0), rows):  # bounded memory: (rows, k, K) weights at a time
            top = y[i : i + rows].topk(k, dim=-1).indices
            w = self.weight[top].to(x.dtype) * self.scale[top].to(x.dtype)[..., None]
            exact = torch.einsum("mk,mrk->mr", x[i : i + rows], w)
            y[i : i + rows].scatter_(-1, top, exact)
        return y


class Int4Linear(nn.Module):
    """`nn.Linear` with a 4-bit weight packed for the int4 kernels, a scale and a zero point per
    group of `group_size` inputs of each output channel."""

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        N, K = w.shape
        groups = w.view(N, K // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        dtype = _kernel_dtype(w.device, linear.weight.dtype)
        # The kernels compute (q - 8) * scale + zero. Scale and zero are rounded to the kernel's
        # dtype first and the weights rounded to the grid they define (rounding them after
        # would shift every weight of a group by the zero point's rounding error).
        scale = ((high - low) / 15).clamp(min=1e-12).to(dtype).float()
        zero = (low + 8 * scale).to(dtype).float()
        q = torch.round((groups - zero) / scale + 8).clamp(0, 15).to(torch.int32).view(N, K)
        # (K / group_size, N, 2): the layout the kernels read
        scales_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(dtype)
        if w.device.type == "cuda":
            packed_bytes = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
        self.in_features, self.out_features, self.group_size = K, N, group_size
        self.register_buffer("weight", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = _bias(linear)

    @staticmethod
    def fits(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
        N, K = linear.out_features, linear.in_features
        if linear.weight.device.type == "cuda":
            return N % 16 == 0 and K % (16 * INNER_K_TILES) == 0 and K % group_size == 0
        return N % 16 == 0 and K % group_size == 0

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by (N, K), as float32."""
        eye = torch.eye(self.in_features, device=self.weight.device, dtype=self.scales_zeros.dtype)
        return self._mm(eye).float().t().contiguous()

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(
                x2, self.weight, self.group_size, self.scales_zeros
            )
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.weight, self.group_size, self.scales_zeros
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        y = self._mm(x.reshape(-1, self.in_features).to(self.scales_zeros.dtype))
        y = y.to(dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_for_inference(model: nn.Module, quantize: str) -> tuple[int, int]:
    """Replace the model's linear layers (see the module's docstring) by quantized ones, in
    place; (bytes of weights before, after). Logged, as the verbs report it at load."""
    check_quantize(quantize)
    before = weight_bytes(model)
    skipped = 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and (name.startswith("blocks.") or name == "lm_head")
        and not name.endswith(".gate")  # a mixture's router picks experts: kept exact
    ]
    for name, linear in targets:
        if name == "lm_head":
            new = Int8Linear(linear, exact_top=EXACT_TOP)
        elif quantize == "int8":
            new = Int8Linear(linear)
        elif Int4Linear.fits(linear):
            new = Int4Linear(linear)
        else:
            skipped += 1
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    after = weight_bytes(model)
    note = f", {skipped} layers kept (shape)" if skipped else ""
    log.info(
        "weights %.1f MB -> %.1f MB (%s: the blocks' linear layers; the output head int8; "
        "embeddings and norms in full precision%s)",
        before / 1e6,
        after / 1e6,
        quantize,
        note,
    )
    return before, after


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and persistent buffers (a tied matrix counted once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + [
        b for name, b in model.named_buffers() if not name.split(".")[-1].startswith("rope_")
    ]
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _bias(linear: nn.Linear) -> Optional[nn.Parameter]:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)


def _kernel_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The activations' dtype the kernels are fast (or only work) with."""
    if device.type == "cuda" or device.type == "cpu":
        return torch.bfloat16
    return dtype


_CUDA_INT8: list[bool] = []


def _cuda_int8_kernel() -> bool:
    """Whether this build has a CUDA `_weight_int8pack_mm` (else: int8 dequantized per call)."""
    if not _CUDA_INT8:
        try:
            x = torch.zeros(1, 32, device="cuda", dtype=torch.bfloat16)
            w = torch.zeros(32, 32, device="cuda", dtype=torch.int8)
            s = torch.ones(32, device="cuda", dtype=torch.bfloat16)
            torch.ops.aten._weight_int8pack_mm(x, w, s)
            _CUDA_INT8.append(True)
        except (RuntimeError, NotImplementedError):
            _CUDA_INT8.append(False)
    return _CUDA_INT8[0]
