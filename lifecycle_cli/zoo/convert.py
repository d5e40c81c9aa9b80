"""Hugging Face folders <-> checkpoint folders, streamed tensor by tensor.

Tensors are read one at a time with plain reads (not memory-mapped, so the pages of an input
shard already converted are not held), and output shards are no larger than the largest input
shard. Peak memory stays near one shard plus the tensors a fused weight is waiting for, however
large the model (`python -m benchmarks convert` measures it).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lifecycle_cli.checkpoint import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    atomic_dir,
    copy_side_files,
    load_config,
    weight_files,
)
from lifecycle_cli.config import CONFIG_FILE, Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.zoo import family_for
from lifecycle_cli.zoo.hf import Rule

if TYPE_CHECKING:
    import torch

# Buffers some checkpoints store that a model recomputes (causal masks, RoPE frequencies).
IGNORED_HF = re.compile(
    r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|"
    r"\.attention\.masked_bias)$"
)

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}

DTYPES = ("float32", "float16", "bfloat16")


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{hf_dir} has no config.json: not a Hugging Face model folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return values


def config_from_hf(hf_config: dict[str, Any], name: str = "") -> Config:
    """Our Config for a Hugging Face config.json, chosen by its `model_type`."""
    family = family_for(hf_config.get("model_type"))
    return Config.from_dict({**family.config_from_hf(hf_config), "name": name}, "config.json")


def convert_hf_checkpoint(
    hf_dir: Path | str,
    out_dir: Path | str,
    dtype: Optional[str] = None,
    name: str = "",
    max_shard_bytes: Optional[int] = None,
) -> Config:
    """Convert a Hugging Face model folder into a checkpoint folder at `out_dir`.

    Output shards hold at most `max_shard_bytes` (default: the size of the largest input file,
    capped at DEFAULT_SHARD_BYTES). A bar on stderr shows the progress.
    """
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    config = config_from_hf(hf_config, name or hf_dir.name)
    family = family_for(config.hf_model_type)
    target = torch_dtype(dtype)
    files = hf_weight_files(hf_dir)
    tensors = iter_hf_tensors(hf_dir)
    if hasattr(family, "canonical_hf_name"):
        # None: a tensor the family does not convert (Gemma 3's vision tower)
        named = ((family.canonical_hf_name(n), t) for n, t in tensors)
        tensors = ((n, t) for n, t in named if n is not None)
    with atomic_dir(out_dir) as tmp, progress_bar(files, f"Converting {config.name}") as bar:
        write_converted(
            tmp,
            config,
            counted(tensors, bar),
            target,
            max_shard_bytes or shard_bytes_like(files),
            hf_dir,
        )
        copy_side_files(hf_dir, tmp)
    return config


def write_converted(
    folder: Path,
    config: Config,
    hf_tensors: Iterable[tuple[str, torch.Tensor]],
    target: Optional[torch.dtype],
    max_shard_bytes: int,
    source: Path,
) -> None:
    """Write `config` and the weights of `hf_tensors` (Hugging Face names and layout) into
    `folder` as a checkpoint's; `source` names the input in errors."""
    rules = family_for(config.hf_model_type).weight_rules(config)
    config.save(folder / CONFIG_FILE)
    writer = ShardWriter(folder, max_shard_bytes)
    written = set()
    for key, tensor in remap(hf_tensors, rules, config, to_ours=True):
        if tensor.is_floating_point() and target is not None:
            tensor = tensor.to(target)
        writer.add(key, tensor)
        written.add(key)
    missing = expected_names(config) - written
    if missing:
        raise UserError(f"{source}: weights missing for {', '.join(sorted(missing)[:3])}")
    writer.close()


def export_hf(
    checkpoint_dir: Path | str, out_dir: Path | str, max_shard_bytes: Optional[int] = None
) -> Path:
    """Write a checkpoint folder as a folder `transformers.AutoModelForCausalLM` loads.

    Output shards hold at most `max_shard_bytes` (default: like the checkpoint's own shards).
    """
    from lifecycle_cli.tokenizer import Tokenizer

    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    if config.hf_model_type is None:
        raise UserError(
            f"{checkpoint_dir / CONFIG_FILE}: no hf_model_type, so there is no Hugging Face "
            "architecture to export to"
        )
    family = family_for(config.hf_model_type)
    files = weight_files(checkpoint_dir)
    rules = family.weight_rules(config)
    with atomic_dir(out_dir) as tmp, progress_bar(files, f"Exporting {checkpoint_dir.name}") as bar:
        writer = ShardWriter(tmp, max_shard_bytes or shard_bytes_like(files))
        dtype = None
        for key, tensor in remap(counted(read_safetensors(files), bar), rules, config, False):
            dtype = dtype or tensor.dtype
            writer.add(key, tensor)
        writer.close()
        hf_config = {
            "architectures": [ARCHITECTURES[config.hf_model_type]],
            **family.config_to_hf(config),
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        # Explicit, even when unknown: some families default to ids outside a small vocab.
        special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if (checkpoint_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer(checkpoint_dir)
            special = dict(
                bos_token_id=tokenizer.bos_id,
                eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id,
            )
        hf_config.update(special)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        copy_side_files(checkpoint_dir, tmp)
    return Path(out_dir)


def remap(
    tensors: Iterable[tuple[str, torch.Tensor]], rules: list[Rule], config: Config, to_ours: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename and reshape tensors by `rules`, yielding each output as soon as its inputs are in.

    Unknown names are an error (not silently dropped), except buffers in IGNORED_HF.
    """
    src, dst = ("hf", "ours") if to_ours else ("ours", "hf")
    patterns = [(r, slot, r.pattern(n)) for r in rules for slot, n in enumerate(getattr(r, src))]
    waiting: dict[tuple[Rule, tuple[str, ...]], list] = {}
    for name, tensor in tensors:
        found = next(((r, s, m) for r, s, p in patterns if (m := p.match(name))), None)
        if found is None:
            if to_ours and (IGNORED_HF.search(name) or tied_head(name, config)):
                continue
            raise UserError(f"unexpected tensor {name!r} for a {config.hf_model_type} model")
        r, slot, match = found
        key = (r, match.groups())
        parts = waiting.setdefault(key, [None] * len(getattr(r, src)))
        parts[slot] = tensor
        if all(p is not None for p in parts):
            del waiting[key]
            outputs = transform(r.kind, parts, config, to_ours)
            for template, out in zip(getattr(r, dst), outputs):
                yield template.format(*match.groups()), out
    if waiting:
        (r, groups), parts = next(iter(waiting.items()))
        absent = [n.format(*groups) for n, p in zip(getattr(r, src), parts) if p is None]
        raise UserError(f"incomplete checkpoint: {', '.join(absent)} not found")


def transform(kind: str, parts: list, config: Config, to_ours: bool) -> list:
    import torch

    hs, nh, nkv = config.head_size, config.n_head, config.n_query_groups
    if kind == "copy":
        return parts
    if kind == "transpose":
        return [parts[0].T.contiguous()]
    if kind == "qkv":
        return (
            [torch.cat(parts)] if to_ours else list(parts[0].split((nh * hs, nkv * hs, nkv * hs)))
        )
    if kind == "halves":
        return list(parts[0].chunk(2)) if to_ours else [torch.cat(parts)]
    if kind == "neox_qkv":
        t = parts[0]
        rest = t.shape[1:]
        if to_ours:
            return [t.view(nh, 3, hs, *rest).transpose(0, 1).reshape(3 * nh * hs, *rest)]
        return [t.view(3, nh, hs, *rest).transpose(0, 1).reshape(3 * nh * hs, *rest)]
    if kind.startswith(("experts", "mxfp4")):
        return expert_transform(kind, parts, to_ours)
    raise ValueError(f"unknown rule kind {kind!r}")


def expert_transform(kind: str, parts: list, to_ours: bool):
    """Fused per-layer expert tensors (GPT-OSS) <-> one tensor per expert.

    experts_gate_up  hf (E, H, 2I) weights or (E, 2I) biases, gate and up interleaved along the
                     last dimension <-> ours fc_1 of every expert, then fc_2 of every expert
    experts_down     hf (E, I, H) <-> ours proj.weight (H, I) of every expert
    experts          hf (E, ...) <-> ours one slice per expert
    mxfp4_*          hf (blocks, scales) -> the same as experts_gate_up / experts_down, each
                     expert dequantized on its own (a generator: one expert in memory at a time)
    """
    import torch

    if kind.startswith("mxfp4"):
        blocks, scales = parts
        per_expert = (dequantize_mxfp4(b, s) for b, s in zip(blocks, scales))  # (rows, cols)
        if kind == "mxfp4_down":
            return per_expert
        gate = (w[::2].contiguous() for w in per_expert)
        up = (dequantize_mxfp4(b, s)[1::2].contiguous() for b, s in zip(blocks, scales))
        return (t for half in (gate, up) for t in half)
    if to_ours:
        t = parts[0]
        if kind == "experts_gate_up":
            halves = (t[..., ::2], t[..., 1::2])
            return [(h[e].T if t.dim() == 3 else h[e]).contiguous() for h in halves for e in
                    range(t.size(0))]  # fmt: skip
        if kind == "experts_down":
            return [w.T.contiguous() for w in t]
        return [w.clone() for w in t]
    if kind == "experts_gate_up":
        n = len(parts) // 2
        gate, up = torch.stack(parts[:n]), torch.stack(parts[n:])
        if gate.dim() == 3:  # (E, I, H) -> (E, H, I)
            gate, up = gate.transpose(1, 2), up.transpose(1, 2)
        return [torch.stack((gate, up), dim=-1).flatten(-2).contiguous()]
    if kind == "experts_down":
        return [torch.stack(parts).transpose(1, 2).contiguous()]
    return [torch.stack(parts)]


# The 16 values of an FP4 (E2M1) code; the byte's low nibble holds the first of two values.
FP4_VALUES = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 (OCP microscaling): `blocks` (rows, G, 16) uint8 hold 32 FP4 values per group,
    `scales` (rows, G) uint8 a power-of-two exponent per group (biased by 127). -> (rows, G*32)
    bfloat16 (exact: every value is an FP4 value times a power of two)."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.bfloat16)
    blocks = blocks.to(torch.uint8)
    out = torch.empty(*blocks.shape[:-1], blocks.size(-1) * 2, dtype=torch.bfloat16)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out.float(), scales.to(torch.int32)[..., None] - 127).to(torch.bfloat16)
    return out.flatten(-2)


def tied_head(name: str, config: Config) -> bool:
    """Tied checkpoints sometimes also store the (identical) output head."""
    return config.tie_embeddings and name in ("lm_head.weight", "embed_out.weight")


def expected_names(config: Config) -> set[str]:
    import torch

    from lifecycle_cli.model import GPT

    with torch.device("meta"):
        names = set(GPT(config).state_dict())
    return names - {"lm_head.weight"} if config.tie_embeddings else names


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: safetensors, else `pytorch_model*.bin`."""
    files = weight_files(hf_dir) or sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{hf_dir} has no *.safetensors or pytorch_model*.bin weights")
    return files


def iter_hf_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a Hugging Face folder: safetensors, else `.bin` loaded with weights_only."""
    files = hf_weight_files(hf_dir)
    if files[0].suffix == ".safetensors":
        yield from read_safetensors(files)
        return
    import torch

    for path in files:
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def read_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from safetensors files in file order, each tensor read into its own memory.

    Plain reads rather than a memory map: a map keeps every page already read resident (and
    counted as this process's memory) until the whole file is closed.
    """
    import torch

    for path in files:
        with open(path, "rb", buffering=0) as f:
            header, base = safetensors_header(path, f)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                dtype = getattr(torch, SAFETENSORS_DTYPES.get(info["dtype"], ""), None)
                if dtype is None:
                    raise UserError(
                        f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}"
                    )
                tensor = torch.empty(info["shape"], dtype=dtype)
                if tensor.numel() * tensor.element_size() != end - start:
                    raise UserError(f"{path}: tensor {name!r} has the wrong size; file corrupt?")
                f.seek(base + start)
                view = (
                    memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if end > start else b""
                )
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise UserError(f"{path} is truncated (in tensor {name!r})")
                    done += n
                yield name, tensor


def safetensors_header(path: Path, f) -> tuple[dict[str, Any], int]:
    """(tensor entries of the header, offset where the data starts) of an open safetensors file."""
    not_safetensors = UserError(f"{path} is not a valid safetensors file")
    size = int.from_bytes(f.read(8), "little")
    if not 0 < size <= min(100 * 1024**2, Path(path).stat().st_size - 8):
        raise not_safetensors
    try:
        header = json.loads(f.read(size))
    except (ValueError, UnicodeDecodeError):
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    header.pop("__metadata__", None)
    for info in header.values():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
            raise not_safetensors
        offsets = info["data_offsets"]
        if not isinstance(offsets, list) or [type(o) for o in offsets] != [int, int]:
            raise not_safetensors
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    actual = Path(path).stat().st_size
    if actual < 8 + size + end:
        raise UserError(
            f"{path} is truncated ({actual} bytes of {8 + size + end}); download, convert or "
            "save it again"
        )
    return header, 8 + size


def shard_bytes_like(files: list[Path]) -> int:
    """An output shard size no larger than the largest input file (nor DEFAULT_SHARD_BYTES)."""
    return min(DEFAULT_SHARD_BYTES, max(p.stat().st_size for p in files))


def data_bytes(path: Path) -> int:
    """The bytes of tensor data in a weight file (for a pickle: its size)."""
    if path.suffix != ".safetensors":
        return path.stat().st_size
    with open(path, "rb") as f:
        _, base = safetensors_header(path, f)
    return path.stat().st_size - base


@contextmanager
def progress_bar(files: list[Path], desc: str) -> Iterator[Any]:
    """A bar over the bytes of `files`, on stderr; erased if the block fails, so that the error
    stays the last line."""
    from tqdm.auto import tqdm

    total = sum(data_bytes(p) for p in files)
    bar = tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
    )
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def counted(tensors: Iterable[tuple[str, torch.Tensor]], bar: Any) -> Iterator[tuple[str, Any]]:
    """`tensors`, advancing `bar` by the bytes of each."""
    for name, tensor in tensors:
        yield name, tensor
        bar.update(tensor.numel() * tensor.element_size())


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)
