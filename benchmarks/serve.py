"""Serving: request latency (p50, p95) and output tokens/s at concurrency 1, 8 and 32, with
batching on (`--max_batch_size 32`) and off (`--max_batch_size 1`, one request at a time, as
`litgpt serve` does).

A random-init ~10M-parameter Llama-style model (the `pretrain` benchmark's ~10M shape, vocab
4096) behind `llmcycle serve` on 127.0.0.1. Closed-loop clients (one thread each, keep-alive
connections) send non-streaming `/v1/completions` requests: a 32-token prompt, greedy, and
`max_tokens` 64 with `ignore_eos`, so every request generates exactly 64 tokens. Clients, HTTP
server and engine share this machine's CPU, as they would on a laptop. Each level runs `REPEATS`
times and the run with the most tokens/s is kept (its latencies with it): on a shared 2-core
machine another busy process can stall a whole run, and the best run is the one measured without
it (as in `decode.py`).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from pydoc_data.topics import topics

from benchmarks.harness import Row

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 32
MAX_TOKENS = 64
CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 8, 8: 32, 32: 96}  # per level: enough for a p95, short enough to run in minutes
MODES = {"batching on": 32, "batching off": 1}  # --max_batch_size
REPEATS = 2


def make_checkpoint(folder: Path):
    """The ~10M model and a 4096-token BPE, saved as a checkpoint folder; (folder, params)."""
    import torch

    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.config import Config
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import train_bpe

    tok = train_bpe(None, 4096, folder / "tok", texts=["\n".join(topics.values())])
    config = Config(
        name="bench-6x384", block_size=512, vocab_size=tok.vocab_size, n_layer=6, n_embd=384,
        n_head=6, intermediate_size=1088, norm="rmsnorm", mlp="swiglu", bias=False,
        tie_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    save_checkpoint(folder / "ckpt", model, tokenizer_dir=folder / "tok")
    return folder / "ckpt", sum(p.numel() for p in model.parameters()), config


class Server:
    def __init__(self, checkpoint: Path, max_batch_size: int, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "lifecycle_cli", "serve", str(checkpoint), "--port",
               str(self.port), "--max_batch_size", str(max_batch_size)]  # fmt: skip
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server did not start:\n{log.read_text()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def load(port: int, prompts: list[list[int]], concurrency: int, n: int):
    """`n` requests from `concurrency` closed-loop clients: (latencies in s, output tokens,
    wall seconds)."""
    latencies, tokens, lock = [], [], threading.Lock()
    next_index = iter(range(n))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": MAX_TOKENS,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            start = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            out = json.loads(response.read())
            took = time.perf_counter() - start
            assert response.status == 200, out
            with lock:
                latencies.append(took)
                tokens.append(out["usage"]["completion_tokens"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, sum(tokens), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run() -> list[Row]:
    from lifecycle_cli.tokenizer import Tokenizer

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, params, model_config = make_checkpoint(Path(tmp))
        tok = Tokenizer(checkpoint)
        ids = tok.encode("\n".join(topics.values())[:200_000])
        prompts = [ids[i * PROMPT_TOKENS : (i + 1) * PROMPT_TOKENS] for i in range(64)]
        base = {
            "model": model_config.name, "params_M": round(params / 1e6, 1),
            "vocab": model_config.vocab_size,
            "prompt_tokens": PROMPT_TOKENS, "max_tokens": MAX_TOKENS, "greedy": True,
            "route": "/v1/completions", "device": "cpu", "dtype": "float32",
            "cpus": os.cpu_count(),
        }  # fmt: skip
        rate_at: dict[tuple[str, int], float] = {}
        for mode, max_batch_size in MODES.items():
            server = Server(checkpoint, max_batch_size, Path(tmp) / f"{max_batch_size}.log")
            try:
                load(server.port, prompts, 2, 4)  # warm-up: caches, first calls
                for c in CONCURRENCY:
                    runs = [load(server.port, prompts, c, REQUESTS[c]) for _ in range(REPEATS)]
                    latencies, tokens, wall = max(runs, key=lambda run: run[1] / run[2])
                    assert tokens == MAX_TOKENS * REQUESTS[c]
                    rate_at[mode, c] = tokens / wall
                    config = {**base, "max_batch_size": max_batch_size, "concurrency": c,
                              "requests": REQUESTS[c], "best_of": REPEATS}  # fmt: skip
                    name = f"serve: {mode}, concurrency {c}"
                    rows += [
                        Row(f"{name}, output", round(tokens / wall, 1), "tokens/s", config),
                        Row(f"{name}, latency p50",
                            round(statistics.median(latencies) * 1e3, 1), "ms", config),
                        Row(f"{name}, latency p95",
                            round(percentile(latencies, 95) * 1e3, 1), "ms", config),
                    ]  # fmt: skip
            finally:
                server.stop()
        for mode, max_batch_size in MODES.items():
            ratio = rate_at[mode, 32] / rate_at[mode, 1]
            config = {**base, "max_batch_size": max_batch_size, "target": ">= 6 with batching"}
            rows.append(
                Row(
                    f"serve: {mode}, tokens/s at concurrency 32 / at 1",
                    round(ratio, 2),
                    "x",
                    config,
                )  # fmt: skip
            )
    return rows
