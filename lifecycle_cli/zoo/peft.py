"""A LoRA run's adapters in PEFT's format, for the `convert to_hf` export of its base.

PEFT adapts Hugging Face modules (`q_proj`, `gate_up_proj`, `c_attn`, ...); ours adapt our
fused layers part by part. The family's weight rules, which say how our weights become HF
tensors, also say how the adapters do: an adapter changes its layer's weight by B A, so the HF
tensor's change is the rule applied to B (rows moved, split or stacked like the weight's), with
A unchanged. Each HF module keeps only the rank columns that reach it: `q_proj` gets the query
part's rank r, a fused `qkv_proj` the ranks of every adapted part (its own `rank_pattern`, with
an `alpha_pattern` that keeps the scale alpha / r). An adapted token embedding becomes PEFT's
`lora_embedding_A/B`; when the output head shares it (tie_embeddings), the head gets the same
adapter as a LoRA of its own, so both stay equal to our merged model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from lifecycle_cli.checkpoint import atomic_dir, load_config
from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo import family_for

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def export_peft(run: Path | str, out_dir: Path | str) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for a LoRA run's adapters."""
    import torch
    from safetensors.torch import save_file

    from lifecycle_cli.lora import _adapted, find_adapter, inject_lora, read_lora
    from lifecycle_cli.model import GPT

    file, final = find_adapter(run)
    if final is None:
        raise UserError(f"{file.parent}: no final/ folder beside {file.name} (an unfinished run?)")
    config = load_config(final)
    if config.hf_model_type is None:
        raise UserError(f"{final}: no hf_model_type, so there is no Hugging Face model to adapt")
    args, tensors = read_lora(file)
    with torch.device("meta"):
        model = GPT(config)
    inject_lora(model, args)
    modules = {}  # our adapted layer -> (parts, A, B)
    for name, module in _adapted(model).items():
        if not hasattr(module, "lora_A"):
            continue  # a head tied to the embedding: handled with it
        rows = getattr(module, "out_features", None)
        parts = getattr(module, "parts", None)
        modules[name] = (parts, tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], rows)

    out_tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    names, head = _hf_module_names(config)
    embedding = modules.pop("wte", None)
    if embedding is not None:
        _, a, b, _ = embedding
        hf = _hf_module("wte", config)
        out_tensors[f"{PREFIX}{hf}.lora_embedding_A"] = b.T.contiguous()
        out_tensors[f"{PREFIX}{hf}.lora_embedding_B"] = a.T.contiguous()
        ranks[hf] = args.r
        if config.tie_embeddings:  # the head reads the same (adapted) matrix
            out_tensors[f"{PREFIX}{head}.lora_A.weight"] = a.contiguous()
            out_tensors[f"{PREFIX}{head}.lora_B.weight"] = b.contiguous()
            ranks[head] = args.r
    fan_in_fan_out = False
    for hf, a, b, kind in _linear_adapters(modules, config, head):
        fan_in_fan_out |= kind == "transpose"
        out_tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        out_tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
        ranks[hf] = a.shape[0]

    unknown = sorted(set(ranks) - names)
    if unknown:  # transformers names (or fuses) this model's modules otherwise
        raise UserError(
            f"to_peft: transformers' {config.hf_model_type} model has no module {unknown[0]} "
            "for PEFT to adapt; adapt other layers (e.g. --lora.mlp false)"
        )

    def alpha(rank: int) -> float:  # keeps PEFT's scale equal to ours at this rank
        ratio = rank / args.r
        return args.alpha * (math.sqrt(ratio) if args.rslora else ratio)

    odd = {name: rank for name, rank in ranks.items() if rank != args.r}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": args.r,
        "lora_alpha": args.alpha,
        "lora_dropout": args.dropout,
        "use_rslora": args.rslora,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(n): rank for n, rank in odd.items()},
        "alpha_pattern": {re.escape(n): alpha(rank) for n, rank in odd.items()},
        "inference_mode": True,
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        save_file(out_tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)


def _hf_module(ours: str, config: Config) -> str:
    """The HF module our `ours` layer's weight becomes, under a copy rule."""
    for rule in family_for(config.hf_model_type).weight_rules(config):
        for template, hf in zip(rule.ours, rule.hf):
            if template == f"{ours}.weight":
                return hf.removesuffix(".weight")
    raise UserError(f"no Hugging Face module for {ours} in a {config.hf_model_type} model")


def _hf_module_names(config: Config) -> tuple[set[str], str]:
    """The module names of transformers' model for `config` (built on the meta device) and the
    name of its output head: PEFT adapts modules by these names, which are not always the
    weights' names in the files (transformers 5 calls GPT-NeoX's `embed_out` `lm_head`)."""
    import torch
    import transformers

    from lifecycle_cli.zoo.convert import ARCHITECTURES

    fields = family_for(config.hf_model_type).config_to_hf(config)
    fields = {k: v for k, v in fields.items() if k != "model_type"}
    # Ids of no token (some families default to ones outside a small vocabulary).
    fields.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_config = transformers.AutoConfig.for_model(config.hf_model_type, **fields)
    hf_config.architectures = [ARCHITECTURES[config.hf_model_type]]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    head = model.get_output_embeddings()
    names = {name for name, _ in model.named_modules()}
    return names, next(name for name, module in model.named_modules() if module is head)


def _linear_adapters(modules: dict[str, tuple], config: Config, head: str):
    """(HF module, A, B, rule kind) for every HF linear module our adapters reach (`head`:
    transformers' name of the output head)."""
    import torch

    from lifecycle_cli.zoo.convert import transform

    rules = family_for(config.hf_model_type).weight_rules(config)
    groups: dict[tuple, dict[int, str]] = {}  # (rule, layer indices) -> {slot: our layer}
    for name in modules:
        found = next(
            (
                (rule, match.groups(), slot)
                for rule in rules
                for slot, template in enumerate(rule.ours)
                if (match := rule.pattern(template).match(f"{name}.weight"))
            ),
            None,
        )
        if found is None:
            raise UserError(f"to_peft: no Hugging Face weight for the adapted layer {name}")
        rule, indices, slot = found
        if rule.kind.startswith(("experts", "mxfp4")):
            raise UserError(
                f"to_peft: {name} is a mixture-of-experts layer stored fused in Hugging Face "
                "format, which PEFT's LoRA cannot adapt per expert; train without --lora.mlp"
            )
        groups.setdefault((rule, indices), {})[slot] = name
    for (rule, indices), members in groups.items():
        # One stacked A over every member's parts; each member's B padded to all its rows and
        # to the stacked rank, and a mask of where it can be nonzero.
        a_parts, bs, masks, col = [], [], [], 0
        total = sum(modules[n][1].shape[0] for n in members.values())
        for slot in range(len(rule.ours)):
            name = members.get(slot)
            if name is None:
                raise UserError(f"to_peft: {rule.ours[slot].format(*indices)} has no adapter")
            parts, a, b, rows = modules[name]
            full = torch.zeros(rows, total, dtype=b.dtype)
            mask = torch.zeros(rows, total, dtype=torch.bool)
            r = a.shape[0] // len(parts)
            done = 0
            for start, size in parts:
                full[start : start + size, col : col + r] = b[done : done + size]
                mask[start : start + size, col : col + r] = True
                done, col = done + size, col + r
            a_parts.append(a)
            bs.append(full)
            masks.append(mask)
        a_all = torch.cat(a_parts)
        kind = "copy" if rule.kind == "transpose" else rule.kind  # Conv1D: PEFT's fan_in_fan_out
        hf_bs = transform(kind, bs, config, False)
        hf_masks = transform(kind, [m.to(torch.uint8) for m in masks], config, False)
        for template, b, mask in zip(rule.hf, hf_bs, hf_masks):
            cols = mask.bool().any(0).nonzero().flatten()
            if len(cols):  # a module no adapted part reaches (k_proj, say) gets no adapter
                hf = template.format(*indices).removesuffix(".weight")
                hf = head if rule.ours == ("lm_head.weight",) else hf
                yield hf, a_all[cols], b[:, cols], rule.kind
