"""GRPO seconds per step: llmcycle's `align --objective grpo` against TRL's `GRPOTrainer` on
the same steps.

    python -m benchmarks.grpo --checkpoint out/finetune/max-short/final

Both sides train the same weights (the checkpoint, and its `llmcycle convert to_hf` export for
TRL) on the same prompts (the synthetic `max` task's instructions, plain: the text as given)
with the same step: PROMPTS prompts x G completions sampled at temperature 1 (no top-k/top-p),
at most NEW_TOKENS new tokens each, reward exact match against the answer, advantages
standardised within each group, one update per rollout (num_iterations 1, so no old-policy
pass), no KL term (TRL's beta 0: no reference model), clip 0.2, loss averaged over the
completion tokens (TRL's loss_type "dapo"), AdamW, fp32, no vLLM, the same thread count. TRL
runs in a venv of its own (`$TRL_VENV`, default ~/.cache/llmcycle/trl-<version>, created on
first use with torch==2.13.0 and TRL from the package index).

Seconds per step: the median wall time of one optimizer step, rollout included (TRL: between a
callback's `on_step_end` calls; llmcycle: metrics.csv's tokens over tokens_per_sec, logged every
step), the first WARMUP steps left out. The two sides alternate ROUNDS times, so load from
other jobs falls on both.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import venv_python

REPO = Path(__file__).resolve().parents[1]
TRL = "trl==1.16.0"
TRL_VENV = Path(
    os.environ.get("TRL_VENV", Path.home() / ".cache" / "llmcycle" / TRL.replace("==", "-"))
)
PROMPTS, G, NEW_TOKENS, SEQ = 16, 16, 3, 64
STEPS, WARMUP, ROUNDS = 8, 2, 2  # WARMUP: the first steps, left out
LR, SEED = 2e-4, 0

# Runs in TRL's venv: argv = hf_dir, prompts.jsonl, steps, out.json. Prints nothing it needs.
TRL_WORKER = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

hf_dir, prompts, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
P, G, NEW, LR, SEED = (int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), float(sys.argv[8]),
                       int(sys.argv[9]))
records = [json.loads(line) for line in open(prompts)]
data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in records])
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)

def exact_match(completions, answer, **kwargs):
    return [float(c.split() == a.split()) for c, a in zip(completions, answer)]

class Clock(TrainerCallback):
    start, ends, lengths = None, [], []
    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            self.lengths.append(logs["completions/mean_length"])

config = GRPOConfig(
    output_dir=out + ".trainer", per_device_train_batch_size=P * G, num_generations=G,
    gradient_accumulation_steps=1, max_completion_length=NEW, temperature=1.0, top_p=1.0,
    top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
    learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_vllm=False,
    bf16=False, fp16=False, use_cpu=True, seed=SEED, dataloader_num_workers=0,
    disable_tqdm=True, log_completions=False,
)
clock = Clock()
trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=data,
                      processing_class=tokenizer, callbacks=[clock])
trainer.train()
json.dump({"start": clock.start, "ends": clock.ends, "lengths": clock.lengths,
           "threads": torch.get_num_threads()}, open(out, "w"))
"""


def per_step(seconds: list[float]) -> float:
    return statistics.median(seconds[WARMUP:])


def write_prompts(path: Path, n: int) -> None:
    from lifecycle_cli.data.synthetic import make_examples

    train, _ = make_examples("max", n, 0, SEED)
    with path.open("w", encoding="utf-8") as f:
        for ex in train:
            f.write(json.dumps({"prompt": ex["instruction"], "answer": ex["output"]}) + "\n")


def env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}  # fmt: skip


def run_ours(checkpoint: Path, prompts: Path, out: Path, steps: int, threads: int) -> dict:
    cmd = [
        sys.executable, "-m", "lifecycle_cli", "align", str(checkpoint), "--objective", "grpo",
        "--method", "full", "--prompt_style", "plain", "--reward", "exact_match",
        "--data.path", str(prompts), "--data.val_path", str(prompts),
        "--group_size", str(G), "--max_new_tokens", str(NEW_TOKENS), "--temperature", "1.0",
        "--top_p", "1.0", "--num_iterations", "1", "--kl_coef", "0", "--clip_eps", "0.2",
        "--train.global_batch_size", str(PROMPTS), "--train.micro_batch_size", str(PROMPTS),
        "--train.max_seq_length", str(SEQ), "--train.epochs", "null",
        "--train.max_steps", str(steps), "--train.lr", str(LR), "--train.min_lr", str(LR),
        "--train.warmup_steps", "0", "--train.weight_decay", "0", "--train.save_interval",
        "null", "--eval.interval", str(steps + 1), "--eval.initial_validation", "false",
        "--exact_match_samples", "0", "--precision", "32-true", "--seed", str(SEED),
        "--out_dir", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env=env(threads))
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("tokens_per_sec")]
    # logged every step: tokens/s over the step's wall time, rollout included
    seconds, done = [], 0
    for r in rows:
        seconds.append((int(r["tokens"]) - done) / float(r["tokens_per_sec"]))
        done = int(r["tokens"])
    lengths = [float(r["completion_length"]) for r in rows]
    return {"sec": per_step(seconds), "length": statistics.mean(lengths)}


def run_trl(hf_dir: Path, prompts: Path, out: Path, steps: int, threads: int) -> dict:
    worker = out.parent / "trl_worker.py"
    worker.write_text(TRL_WORKER)
    args = [str(hf_dir), str(prompts), str(steps), str(out), str(PROMPTS), str(G),
            str(NEW_TOKENS), str(LR), str(SEED)]  # fmt: skip
    python = venv_python(TRL_VENV, TRL)
    subprocess.run([str(python), str(worker), *args], check=True, env=env(threads),
                   capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    ends = result["ends"]
    return {
        "sec": per_step([b - a for a, b in zip([result["start"], *ends], ends)]),
        "length": statistics.mean(result["lengths"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.grpo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="an llmcycle checkpoint")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--keep", type=Path, help="work here and keep the runs (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        hf_dir, prompts = tmp / "hf", tmp / "prompts.jsonl"
        subprocess.run(
            [sys.executable, "-m", "lifecycle_cli", "convert", "to_hf", str(args.checkpoint),
             str(hf_dir)], check=True, capture_output=True, env=env(args.threads),
        )  # fmt: skip
        write_prompts(prompts, PROMPTS * args.steps)
        venv_python(TRL_VENV, TRL)
        times: dict[str, list[dict]] = {"llmcycle": [], "TRL": []}
        for r in range(args.rounds):
            start = time.perf_counter()
            times["llmcycle"].append(
                run_ours(args.checkpoint, prompts, tmp / f"ours{r}", args.steps, args.threads)
            )
            times["TRL"].append(
                run_trl(hf_dir, prompts, tmp / f"trl{r}.json", args.steps, args.threads)
            )
            print(f"round {r + 1}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"GRPO step: {PROMPTS} prompts x {G} completions, <= {NEW_TOKENS} new tokens, fp32, "
          f"{args.threads} thread(s), {args.steps} steps ({WARMUP} warm-up), {args.rounds} "
          "rounds alternating")  # fmt: skip
    print(f"{'round':6} {'llmcycle s/step':>16} {'TRL s/step':>11} {'ratio':>6}")
    ratios = []
    for r, (ours, trl) in enumerate(zip(times["llmcycle"], times["TRL"])):
        ratios.append(trl["sec"] / ours["sec"])
        print(f"{r + 1:<6} {ours['sec']:16.3f} {trl['sec']:11.3f} {ratios[-1]:6.2f}")
    lengths = {k: statistics.mean(x["length"] for x in v) for k, v in times.items()}
    print(f"completion tokens: llmcycle {lengths['llmcycle']:.2f}, TRL {lengths['TRL']:.2f}")
    print(f"llmcycle is {statistics.median(ratios):.2f}x TRL's speed (median over rounds)")


if __name__ == "__main__":
    main()
