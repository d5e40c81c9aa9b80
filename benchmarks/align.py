"""Alignment: peak memory of DPO with LoRA (the reference is the same weights with the adapters
off: one copy of the base) against full DPO (a trained copy and a frozen reference: two), and
the whole SFT -> align pipeline on synthetic tasks.

Memory (`python -m benchmarks align`): the `align` session itself, a few DPO steps on synthetic
pairs, on a ~25M-parameter Llama-style model (random init), sequence 64, micro batch 8 pairs
(16 sequences), each method in a fresh process. `weights` counts every distinct tensor of the
trained model and of the reference; `base copies` is that over the size of one model. On CPU:
float32, peak RSS (VmHWM); on CUDA: bfloat16 and torch.cuda.max_memory_allocated.

Pipeline (`python -m benchmarks.align pipeline --base DIR`): finetune the base with a finetune
recipe, align the result with an align recipe on pairs of the same tasks, and print preference
accuracy and exact match before and after alignment (held-out prompts), and the wall and CPU
time of each stage:

    python -m benchmarks.align pipeline --base out/pretrain/tiny/final --tasks held_out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Row

REPO = Path(__file__).resolve().parents[1]
SEQ, PAIRS, STEPS, THREADS = 64, 8, 3, 2
SHAPE = dict(n_layer=7, n_embd=512, n_head=8, intermediate_size=1408)
METHODS = ("full", "lora")


def measure(method: str) -> dict:
    """A few DPO steps with `method` through the align session, in this process."""
    import torch

    from benchmarks.finetune import rss_mb
    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.config import Config
    from lifecycle_cli.data.args import PreferenceData
    from lifecycle_cli.lora import LoRAArgs
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import train_bpe
    from lifecycle_cli.train.args import EvalArgs, TrainArgs
    from lifecycle_cli.train.session import RunFlags, run_session
    from lifecycle_cli.train.tasks.preference import PreferenceObjective, PreferenceTask

    torch.set_num_threads(THREADS)
    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="bench-align-"))
    from pydoc_data.topics import topics

    tok = train_bpe(None, 4096, tmp / "tok", texts=list(topics.values()))
    config = Config(
        name="bench-llama-25m", block_size=SEQ, norm="rmsnorm", mlp="swiglu", bias=False,
        tie_embeddings=True, vocab_size=tok.vocab_size, **SHAPE,
    )  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(tmp / "base", GPT(config), tokenizer_dir=tmp / "tok")
    base_mb = sum(p.numel() * 4 for p in GPT(config).parameters()) / 2**20
    data = PreferenceData(synthetic="reverse,add", synthetic_train_size=64, synthetic_val_size=8)
    lora = LoRAArgs(r=8, alpha=16, query=True, value=True)
    task = PreferenceTask(
        tmp / "base", data, method, lora, PreferenceObjective("dpo"), tmp / "out",
        prompt_style="plain", preference_samples=8, exact_match_samples=0,
    )  # fmt: skip
    train = TrainArgs(global_batch_size=PAIRS, micro_batch_size=PAIRS, max_steps=STEPS,
                      lr=1e-4, save_interval=None)  # fmt: skip
    evaluate = EvalArgs(interval=None, final_validation=False)
    precision = "bf16-true" if cuda else "32-true"
    start = time.perf_counter()
    run_session(task, tmp / "out", train, evaluate, RunFlags(precision=precision), {})
    seconds = time.perf_counter() - start
    held = {}
    for module in (task.gpt, task.reference):
        for t in [] if module is None else [*module.parameters(), *module.buffers()]:
            held[t.data_ptr()] = t.numel() * t.element_size()
    weights_mb = sum(held.values()) / 2**20
    scale = 0.5 if cuda else 1.0  # bfloat16 halves one copy
    return {
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM"),
        "weights_mb": weights_mb,
        "base_copies": weights_mb / (base_mb * scale),
        "seconds": seconds,
        "device": "cuda" if cuda else "cpu",
        "dtype": "bfloat16" if cuda else "float32",
        "threads": torch.get_num_threads(),
    }


def run() -> list[Row]:
    rows = []
    for method in METHODS:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.align", "memory", method],
            cwd=REPO, check=True, capture_output=True, text=True,
        )  # fmt: skip
        result = json.loads(proc.stdout.splitlines()[-1])
        setup = {
            "method": method, **SHAPE, "seq_length": SEQ, "micro_batch_pairs": PAIRS,
            "steps": STEPS, "objective": "dpo", "device": result["device"],
            "dtype": result["dtype"], "threads": result["threads"],
        }  # fmt: skip
        if method == "lora":
            setup["lora"] = "r=8 alpha=16 query+value; reference = adapters off"
        else:
            setup["reference"] = "frozen copy"
        label = f"align dpo {method}"
        peak = "peak CUDA memory" if result["device"] == "cuda" else "peak RSS"
        rows += [
            Row(f"{label}: {peak}", round(result["peak_mb"], 1), "MB", setup),
            Row(f"{label}: weights held", round(result["weights_mb"], 1), "MB", setup),
            Row(f"{label}: base copies", round(result["base_copies"], 2), "copies", setup),
        ]
    return rows


def stage(args: list[str]) -> tuple[float, float]:
    """Run one `llmcycle` command (output shown); its (wall, CPU) time in seconds."""
    import resource

    def cpu() -> float:
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        return used.ru_utime + used.ru_stime

    print("$ llmcycle " + " ".join(args), flush=True)
    start, start_cpu = time.perf_counter(), cpu()
    subprocess.run([sys.executable, "-m", "lifecycle_cli", *args], cwd=REPO, check=True)
    return time.perf_counter() - start, cpu() - start_cpu


def pipeline(argv: list[str]) -> None:
    """SFT -> align -> before/after (see the module docstring)."""
    from lifecycle_cli.train.logs import read_metrics

    parser = argparse.ArgumentParser(prog="python -m benchmarks.align pipeline")
    parser.add_argument("--base", type=Path, required=True, help="the pretrained checkpoint")
    parser.add_argument("--tasks", default=None, help="synthetic tasks for both stages "
                        "(e.g. held_out; default: each recipe's own)")  # fmt: skip
    parser.add_argument("--sft", default="config_hub/finetune/synthetic-lora.yaml")
    parser.add_argument("--align", default="config_hub/align/synthetic-dpo.yaml")
    parser.add_argument("--out", type=Path, default=Path("out/bench-align"))
    parser.add_argument("--sft_flags", default="", help="extra finetune flags, one string")
    parser.add_argument("--align_flags", default="", help="extra align flags, one string")
    args = parser.parse_args(argv)
    tasks = ["--data.synthetic", args.tasks] if args.tasks else []
    sft_out, align_out = args.out.resolve() / "sft", args.out.resolve() / "align"
    sft_s, sft_cpu = stage(["finetune", str(args.base.resolve()), "--config", args.sft, *tasks,
                   "--out_dir", str(sft_out), *args.sft_flags.split()])  # fmt: skip
    align_s, align_cpu = stage(["align", str(sft_out / "final"), "--config", args.align, *tasks,
                     "--eval.initial_validation", "true", "--out_dir", str(align_out),
                     *args.align_flags.split()])  # fmt: skip
    rows = [r for r in read_metrics(align_out / "metrics.csv") if r["val_loss"]]
    before, after = rows[0], rows[-1]
    keys = ("accuracy", "reward_accuracy", "margin", "exact_match")
    report = {
        "tasks": args.tasks or "recipes' own",
        "before": {k: float(before[k]) for k in keys if before.get(k)},
        "after": {k: float(after[k]) for k in keys if after.get(k)},
        "sft_seconds": round(sft_s, 1),
        "align_seconds": round(align_s, 1),
        "sft_cpu_seconds": round(sft_cpu, 1),
        "align_cpu_seconds": round(align_cpu, 1),
    }
    print(f"\n{'':<16}{'before':>10}{'after':>10}")
    for k in keys:
        if k in report["before"]:
            print(f"{k:<16}{report['before'][k]:>10.4f}{report['after'][k]:>10.4f}")
    print(f"wall time: finetune {sft_s:.0f} s, align {align_s:.0f} s; CPU time: finetune "
          f"{sft_cpu:.0f} s, align {align_cpu:.0f} s")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory"]:  # one configuration, in its own process (see `run`)
        print(json.dumps(measure(sys.argv[2])))
    elif sys.argv[1:2] == ["pipeline"]:
        pipeline(sys.argv[2:])
    else:
        sys.exit("usage: python -m benchmarks.align memory full|lora | pipeline --base DIR ...")
