"""Decoding speed at batch 1: tokens/s after the first token, and time to first token.

Two random-init Pythia-shaped models (vocab 50304): pythia-14m itself and a ~100M one. Each is
decoded greedily by our `Generator` (the batching engine at batch 1, static KV cache; eager,
then `--compile`), by the same `Generator` with the output head in its stored (row-major)
layout, by a loop without a KV cache (the whole sequence through the model per token) and by
`transformers`' `generate` on the same weights exported with `convert to_hf`. For reference on
this 2-core CPU (issue 6): `litgpt generate` ~105 tokens/s and transformers ~85 tokens/s on
pythia-14m.

Every run first waits (up to 2 minutes) for the CPUs to be idle; a row's
`runs_on_busy_cpus` counts the runs that could not, whose figures may be low.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.harness import Row

PROMPT_TOKENS = 128
NEW_TOKENS = 128
NO_CACHE_TOKENS = 32  # the uncached loop is slow: fewer tokens, same per-token figure
THREADS = 2
# On a shared 2-core machine any other busy process stalls both OpenMP threads (a 2-thread
# decode step then runs several times slower): each run waits for the CPUs to be idle, and the
# best of a few runs is reported.
REPEATS = 3
IDLE_WAIT_S = 120.0
NOT_IDLE = [0]  # runs that started without the CPUs going idle first (reported per row)


def wait_for_idle(max_wait: float = IDLE_WAIT_S, busy_limit: float = 0.15) -> bool:
    """Wait until the CPUs were at most `busy_limit` busy over the last second (Linux
    /proc/stat); False if that did not happen within `max_wait` seconds."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            total0, idle0 = sample()
            time.sleep(1.0)
            total1, idle1 = sample()
            if total1 > total0 and 1 - (idle1 - idle0) / (total1 - total0) <= busy_limit:
                return True
        NOT_IDLE[0] += 1
        return False
    except OSError:  # not Linux: measure as things are
        return True


def configs():
    from lifecycle_cli.zoo import named_config

    yield named_config("pythia-14m")
    # ~103M parameters: 8 layers of width 640 and the 2 x 32M-parameter embedding and head.
    shape = dict(n_layer=8, n_embd=640, n_head=10, intermediate_size=2560)
    yield named_config("pythia-14m", name="pythia-100m-shaped", **shape)


def ours(model, prompt: list[int], n: int, compile: bool = False, repeats: int = REPEATS):
    """(decode tokens/s, time to first token in s, seconds of the warm-up call): the best of
    `repeats` runs after a warm-up (which compiles)."""
    from lifecycle_cli.generate import Generator, SamplingParams

    gen = Generator(model, compile=compile)
    params = SamplingParams(max_new_tokens=n, temperature=0.0, top_k=None)
    runs = []
    for i in range(repeats + 1):
        if i:
            wait_for_idle()
        gen.engine.forget()  # no prefix reuse between runs: each one prefills the whole prompt
        done = gen.generate(prompt, params)
        assert done.completion_tokens == n
        runs.append(done)
    warmup, runs = runs[0], runs[1:]
    rate = max((c.completion_tokens - 1) / (c.seconds - c.time_to_first_token) for c in runs)
    return rate, min(c.time_to_first_token for c in runs), warmup.seconds


def no_cache(model, prompt: list[int], n: int, repeats: int = REPEATS):
    """The whole sequence through the model for every new token."""
    import torch

    best = (0.0, float("inf"))
    for _ in range(repeats):
        wait_for_idle()
        idx = torch.tensor([prompt])
        with torch.inference_mode():
            start = time.perf_counter()
            first = None
            for _ in range(n):
                idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
                first = first or time.perf_counter() - start
            total = time.perf_counter() - start
        best = (max(best[0], (n - 1) / (total - first)), min(best[1], first))
    return best


def transformers_generate(hf_dir: Path, prompt: list[int], n: int, repeats: int = REPEATS):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    idx = torch.tensor([prompt])

    def timed(new: int) -> float:
        wait_for_idle()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                idx, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
            )
        assert out.size(1) == len(prompt) + new
        return time.perf_counter() - start

    timed(4)  # warm-up
    first = min(timed(1) for _ in range(repeats))
    total = min(timed(n) for _ in range(repeats))
    return (n - 1) / (total - first), first


def run() -> list[Row]:
    import torch

    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.generate import fast_decode_layout
    from lifecycle_cli.model import GPT
    from lifecycle_cli.zoo.convert import export_hf

    torch.set_num_threads(THREADS)
    rows: list[Row] = []
    for config in configs():
        torch.manual_seed(0)
        model = GPT(config).eval()
        params = sum(p.numel() for p in model.parameters())
        prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
        base = {
            "model": config.name, "params_M": round(params / 1e6, 1), "vocab": config.vocab_size,
            "prompt_tokens": PROMPT_TOKENS, "batch": 1, "device": "cpu", "dtype": "float32",
            "threads": THREADS, "greedy": True,
        }  # fmt: skip

        def add(variant: str, rate: float, ttft: float, new_tokens: int, base=base, **extra):
            config = {**base, "new_tokens": new_tokens, **extra, "runs_on_busy_cpus": NOT_IDLE[0]}
            NOT_IDLE[0] = 0
            rows.append(
                Row(f"decode: {config['model']}, {variant}", round(rate, 1), "tokens/s", config)
            )
            rows.append(
                Row(f"ttft: {config['model']}, {variant}", round(ttft * 1e3, 1), "ms", config)
            )

        add("no KV cache", *no_cache(model, prompt, NO_CACHE_TOKENS), NO_CACHE_TOKENS)
        rate, ttft, _ = ours(model, prompt, NEW_TOKENS)
        add("KV cache, row-major head", rate, ttft, NEW_TOKENS)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "ckpt", model)
            export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf")
            rate, ttft = transformers_generate(Path(tmp) / "hf", prompt, NEW_TOKENS)
        add("transformers generate", rate, ttft, NEW_TOKENS, transformers=_version("transformers"))
        fast_decode_layout(model)
        rate, ttft, _ = ours(model, prompt, NEW_TOKENS)
        add("KV cache", rate, ttft, NEW_TOKENS)
        rate, ttft, first_call = ours(model, prompt, NEW_TOKENS, compile=True)
        add("KV cache, --compile", rate, ttft, NEW_TOKENS, first_call_s=round(first_call, 1))
        del model
    return rows


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)
