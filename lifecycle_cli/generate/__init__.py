"""The one decoder: a continuous-batching KV-cache engine, sampling options and text streams.

    engine.py     Engine: slots of one static KV cache, prefill, decode steps, events
    generator.py  Generator: the engine for a batch of prompts at a time; Completion, streams
    options.py    SamplingParams (checked once), prompt-length check; no torch
    sampling.py   sample, probabilities, draw, repetition penalty, Sampler (per-slot settings)
    quantized.py  --quantize int8|int4: weight-only quantized linear layers for inference
    speculative.py  Drafter, verify: speculative decoding with a draft model
    text.py       TextStream: tokens -> text pieces (whole UTF-8 characters, stop strings)
    device.py     resolve_device, resolve_precision

Names load on first use, so `from lifecycle_cli.generate.options import SamplingParams` (or this
package's `SamplingParams`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Engine": "engine",
    "cache_length": "engine",
    "decode_step": "engine",
    "fast_decode_layout": "engine",
    "prefill": "engine",
    "BatchStream": "generator",
    "Completion": "generator",
    "Generator": "generator",
    "Stream": "generator",
    "format_stats": "generator",
    "GREEDY": "options",
    "SamplingError": "options",
    "SamplingParams": "options",
    "check_prompt_length": "options",
    "cli_stops": "options",
    "unescape": "options",
    "Sampler": "sampling",
    "apply_repetition_penalty": "sampling",
    "draw": "sampling",
    "probabilities": "sampling",
    "sample": "sampling",
    "quantize_for_inference": "quantized",
    "Drafter": "speculative",
    "TextStream": "text",
    "PRECISIONS": "device",
    "resolve_device": "device",
    "resolve_precision": "device",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
