"""Device and precision names, for the verbs."""

from __future__ import annotations

from typing import Optional

import torch

from lifecycle_cli.errors import UserError

# Precision names, Lightning style, with the plain dtype names as aliases.
PRECISIONS: dict[str, torch.dtype] = {
    "32-true": torch.float32,
    "32": torch.float32,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "16-true": torch.float16,
    "16": torch.float16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' (CUDA if there is one, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but this machine has no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def resolve_precision(precision: Optional[str], device: torch.device) -> torch.dtype:
    """A precision name -> dtype. None: bf16 on a GPU that supports it, else float32."""
    if precision is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    key = precision.lower().removesuffix("-mixed").removesuffix("-true")
    for name, dtype in PRECISIONS.items():
        if name.removesuffix("-true") == key:
            return dtype
    raise UserError(f"unknown precision {precision!r} (choose from 32-true, bf16-true, 16-true)")
