"""Model families: named configurations and the Hugging Face bridge for each.

A family module holds NAME, MODEL_TYPES (the Hugging Face `model_type`s it reads), CONFIGS
(named configurations mirroring published models), `config_from_hf`, `config_to_hf` and
`weight_rules`. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from types import ModuleType
from typing import Any

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo import (
    gemma,
    gpt2,
    gpt_neox,
    gpt_oss,
    llama,
    mistral,
    olmo,
    phi3,
    qwen,
    smollm,
)

FAMILIES: tuple[ModuleType, ...] = (
    gpt2, gpt_neox, llama, mistral, qwen, gemma, phi3, olmo, smollm, gpt_oss,
)  # fmt: skip


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.MODEL_TYPES]


def family_for(model_type: str | None) -> ModuleType:
    """The family that reads and writes Hugging Face checkpoints of `model_type`."""
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    raise UserError(
        f"model_type {model_type!r} is not supported "
        f"(supported: {', '.join(supported_model_types())})"
    )


def named_config(name: str, **overrides: Any) -> Config:
    """The configuration of a named model (matched case-insensitively, with or without org),
    with `overrides` replacing some of its fields; `llmcycle download list` shows the names."""
    wanted = name.rsplit("/", 1)[-1].lower()
    configs = {c["name"].lower(): c for family in FAMILIES for c in family.CONFIGS}
    if wanted not in configs:
        close = difflib.get_close_matches(wanted, configs, n=3)
        hint = f" (did you mean {', '.join(configs[c]['name'] for c in close)}?)" if close else ""
        raise UserError(
            f"unknown model name {name!r}{hint}; `llmcycle download list` shows the named models"
        )
    return Config.from_dict({**configs[wanted], **overrides}, source=f"model {name!r}")


def model_table() -> list[tuple[str, str, list[str]]]:
    """(family, Hugging Face model_types, named models) for `llmcycle download list`."""
    return [(f.NAME, ", ".join(f.MODEL_TYPES), [c["name"] for c in f.CONFIGS]) for f in FAMILIES]
