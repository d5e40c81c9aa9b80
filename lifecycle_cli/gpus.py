"""Datasheet dense peak TFLOP/s of known GPUs: (bf16/fp16 tensor cores, tf32 for float32).

One table for MFU during training (`train.throughput`) and for `--dry_run` plans
(`curate.plan`); no torch import, so planning stays light.
"""

from __future__ import annotations

from typing import Optional

PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250.0, 1100.0),
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),
    "H800": (989.4, 494.7),
    "A100": (312.0, 156.0),
    "A10G": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
    "4090": (165.2, 82.6),
    "MI300X": (1307.4, 653.7),
}


def peak_of(device_name: str, half: bool) -> Optional[float]:
    """FLOP/s of the first table entry named in `device_name` ("NVIDIA H100 80GB HBM3"), or
    None for a GPU not in the table."""
    name = device_name.upper()
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if half else fp32) * 1e12
    return None
