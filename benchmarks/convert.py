"""Checkpoint conversion: wall time and peak memory of `llmcycle download --from_dir` on a
multi-shard Hugging Face checkpoint of ~270M parameters (Llama-shaped, float32, random values,
written here with safetensors: no download).

Peak memory is the child process's peak RSS (`wait4`'s ru_maxrss), which counts memory-mapped
file pages it touched. The baseline is the same command on a tiny model of the same family: the
interpreter plus every import the conversion needs. The target: peak RSS under twice the largest
input shard plus that baseline.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Row

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 200 * 1024**2
LLAMA = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=1024,
    intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
    max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
    torch_dtype="float32",
)  # fmt: skip
TINY = {**LLAMA, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Hugging Face Llama checkpoint with config `c`."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (d, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, d),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
        }
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    return shapes


def write_hf_checkpoint(out_dir: Path, config: dict, shard_bytes: int) -> dict:
    """A random-valued Hugging Face folder, sharded like `save_pretrained`; returns its stats."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in llama_shapes(config).items():
        tensor = torch.empty(shape).uniform_(-0.02, 0.02, generator=generator)
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map, n = {}, len(shards)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    del shards
    total = sum(t.stat().st_size for t in out_dir.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    params = sum(math.prod(s) for s in llama_shapes(config).values())
    largest = max(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    largest_tensor = max(math.prod(s) for s in llama_shapes(config).values()) * 4
    return {
        "params": params,
        "shards": n,
        "bytes": total,
        "largest_shard": largest,
        "largest_tensor": largest_tensor,
    }


# Runs argv[1:] and prints its wall time and peak RSS. Measuring from this small, freshly started
# process matters: a child's ru_maxrss also counts the memory of the process it was forked from.
PROBE = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "wall": wall,
                  "maxrss": usage.ru_maxrss * 1024}))
"""


def measure(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `cmd` in a fresh process; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *cmd], cwd=cwd, capture_output=True, text=True
    )
    result = json.loads(proc.stdout) if proc.returncode == 0 else {"code": proc.returncode}
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result['code']}:\n{proc.stderr[-2000:]}")
    return result["wall"], result["maxrss"]  # ru_maxrss is in KiB on Linux


def run() -> list[Row]:
    cli = [sys.executable, "-m", "lifecycle_cli", "download"]
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        root = Path(tmp)
        # Written by a child process, so that this one stays small (see PROBE).
        make = (
            "import json, sys; from pathlib import Path; "
            "from benchmarks.convert import SHARD_BYTES, write_hf_checkpoint; "
            "print(json.dumps(write_hf_checkpoint(Path(sys.argv[1]), json.loads(sys.argv[2]), "
            "SHARD_BYTES)))"
        )
        for name, config in (("hf-tiny", TINY), ("hf", LLAMA)):
            proc = subprocess.run(
                [sys.executable, "-c", make, str(root / name), json.dumps(config)],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            )
        stats = json.loads(proc.stdout)
        startup, baseline = measure([*cli, "bench/tiny", "--from_dir", "hf-tiny"], root)
        wall, peak = measure([*cli, "bench/llama", "--from_dir", "hf"], root)
        out_shards = sorted((root / "checkpoints" / "bench" / "llama").glob("*.safetensors"))
        largest_out = max(p.stat().st_size for p in out_shards)
    mb = 1024**2
    shard = stats["largest_shard"]
    config = {
        "model": "Llama-shaped, float32 in and out",
        "params": stats["params"],
        "input_shards": stats["shards"],
        "input_MB": round(stats["bytes"] / mb),
        "largest_input_shard_MB": round(shard / mb),
        "largest_tensor_MB": round(stats["largest_tensor"] / mb),
        "output_shards": len(out_shards),
        "largest_output_shard_MB": round(largest_out / mb),
        "command": "llmcycle download bench/llama --from_dir hf",
    }
    work = wall - startup
    return [
        Row("convert: download --from_dir (wall)", round(wall, 2), "s", config),
        Row("convert: wall minus start-up (tiny model)", round(work, 2), "s", config),
        Row(
            "convert: throughput without start-up",
            round(stats["bytes"] / mb / work),
            "MB/s",
            config,
        ),
        Row("convert: peak RSS", round(peak / mb), "MB", config),
        Row("convert: baseline RSS (interpreter + imports)", round(baseline / mb), "MB", config),
        Row("convert: peak RSS / largest shard", round(peak / shard, 2), "x", config),
        Row(
            "convert: (peak RSS - baseline) / largest shard",
            round((peak - baseline) / shard, 2),
            "x",
            {**config, "target": "< 2", "met": peak < 2 * shard + baseline},
        ),
    ]
