"""Training speed against LitGPT 0.5.13: steady-state ms per optimizer step and tokens/s of the
same 2.2M-parameter pythia-14m-shaped model (6 x 128, vocabulary 4,096, untied head), the same
weights and batches, micro batch 8 x 256 tokens, float32, on this CPU.

- llmcycle: the real training session (`train.session.run_session` with the pretraining task,
  `--compile` or not: the path `llmcycle pretrain` takes, its loop, guards, logging and
  metrics.csv), log every step (the default).
- LitGPT: `litgpt pretrain`'s step copied from its pretrain.py (0.5.13): `torch.compile(model)`
  then `fabric.setup`, AdamW as `instantiate_torch_optimizer` builds it on CPU (torch defaults,
  not fused), `chunked_cross_entropy`, `fabric.clip_gradients(max_norm=1.0)`, the running-mean
  loss read back and the throughput monitor updated every step (its default `log_interval` 1).
  Run in LitGPT's own venv (`$LITGPT_VENV`, see benchmarks/decode.py).

Every side is a worker process that trains the steps it is asked for and reports the wall time
of each whole iteration; the sides take turns (interleaved rounds) after a warm-up that
compiles, and the medians are reported. Both start from the same weights and see the same
batches, so their first losses agree (printed as a check).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.decode import LITGPT, LITGPT_VENV, litgpt_state_dict
from benchmarks.harness import Row, venv_python

REPO = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("TRAIN_THREADS", "2"))
BATCH, SEQ, VOCAB = 8, 256, 4096
WARMUP, ROUNDS, STEPS = 8, 5, 12  # steps: compile + settle; then ROUNDS x STEPS per side
BLOCKS = 512  # distinct (SEQ + 1)-token blocks, cycled through in order

# Runs in LitGPT's venv: argv = weights, tokens, threads, compile (0/1). Trains the steps asked
# for on stdin (one number a line) with pretrain.py's step; prints one JSON line per request.
LITGPT_WORKER = r"""
import json, sys, time
import lightning as L, torch
from lightning.fabric.utilities.throughput import ThroughputMonitor
from torchmetrics.aggregation import RunningMean
from litgpt.model import GPT, Config
from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer

weights, tokens, threads, compiled = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
torch.set_num_threads(threads)
fabric = L.Fabric(devices=1, strategy="auto", precision="32-true")
fabric.launch()
config = Config.from_name("pythia-14m", vocab_size=4096, padded_vocab_size=4096)
with fabric.init_module(empty_init=True):
    model = GPT(config)
model.load_state_dict(torch.load(weights, weights_only=True))
data = torch.load(tokens, weights_only=True)
model.max_seq_length = data.size(1) - 1
if compiled:
    model = torch.compile(model)
model = fabric.setup(model)
fused = fabric.device.type == "cuda"
optimizer = instantiate_torch_optimizer("AdamW", model.parameters(), fused=fused)
optimizer = fabric.setup_optimizers(optimizer)
running_loss = RunningMean(window=1, sync_on_compute=False).to(fabric.device)
throughput = ThroughputMonitor(fabric, window_size=5)
batch_size, iter_num, total_t0 = 8, 0, time.perf_counter()
for line in sys.stdin:
    times, losses = [], []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        rows = torch.arange(iter_num * batch_size, (iter_num + 1) * batch_size) % data.size(0)
        train_data = fabric.to_device(data[rows])
        iter_num += 1
        input_ids = train_data[:, 0 : model.max_seq_length].contiguous().long()
        targets = train_data[:, 1 : (model.max_seq_length + 1)].contiguous().long()
        with fabric.no_backward_sync(model, enabled=False):
            logits = model(input_ids)
            loss = chunked_cross_entropy(logits, targets)
            fabric.backward(loss / 1)
        running_loss.update(loss.detach())
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = running_loss.compute().item()
        t1 = time.perf_counter()
        throughput.update(time=t1 - total_t0, batches=iter_num, samples=iter_num * batch_size,
                          lengths=iter_num * batch_size * model.max_seq_length)
        throughput.compute()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    print(json.dumps({"times": times, "losses": losses}), flush=True)
"""


def model_config():
    """pythia-14m with a 4,096-token vocabulary (LitGPT's padded_vocab_size 4096 alike)."""
    import dataclasses

    from lifecycle_cli.zoo import named_config

    return dataclasses.replace(named_config("pythia-14m"), vocab_size=VOCAB, block_size=SEQ)


def bench_task(weights: Path, tokens: Path, out_dir: Path, reply):
    """The pretraining task on fixed token blocks (LitGPT's side reads the same): no tokenizer or
    text pipeline. The loop calls its `step_metrics` after every logged step: there it times
    the iterations and, between rounds, reports them and waits for the next request."""
    import time

    import torch

    from lifecycle_cli.data.args import TextData
    from lifecycle_cli.objectives import next_token_loss
    from lifecycle_cli.train.tasks.pretrain import PretrainTask, TokenizerArgs

    class Task(PretrainTask):
        def configure(self, fabric):
            self._tokenizer_dir = out_dir
            return self.config

        def data(self, seq_length: int, seed: int):
            blocks = torch.load(tokens, weights_only=True)
            return Blocks(blocks), Blocks(blocks[:BATCH])

        def model(self, fabric, seq_length: int):
            model = super().model(fabric, seq_length)
            model.load_state_dict(torch.load(weights, weights_only=True))
            return model

        def describe(self, trainable: int, seq_length: int) -> list[str]:
            self.times, self.losses = [], []
            self.wait()
            return []

        def recorded(self, model, batch):  # next_token_loss, its last value kept
            loss = next_token_loss(model, batch)
            self.loss = loss.detach()
            return loss

        def step_metrics(self):
            self.times.append(time.perf_counter() - self.last)
            self.losses.append(self.loss.item())  # read back by the loop already
            if len(self.times) == self.wanted:
                reply({"times": self.times, "losses": self.losses})
                self.times, self.losses = [], []
                self.wait()
            self.last = time.perf_counter()
            return {}, ""

        def wait(self) -> None:
            line = sys.stdin.readline()
            if not line.strip():
                raise SystemExit(0)
            self.wanted, self.last = int(line), time.perf_counter()

        def finish(self, fabric, model, final: Path) -> None:
            pass

    task = Task(None, model_config(), None, None, TokenizerArgs(), TextData(), out_dir)
    task.objective = task.recorded
    return task


class Blocks:
    """Token blocks (N, SEQ + 1) as the loop's TrainData: sample i is block i mod N."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def get(self, indices):
        import torch

        return self.blocks[torch.as_tensor(list(indices)) % len(self.blocks)]


def ours_worker(weights: str, tokens: str, compile: str) -> None:
    """llmcycle's side, in its own process: the pretraining session, paused between rounds."""
    import torch

    from lifecycle_cli.train.args import EvalArgs, TrainArgs
    from lifecycle_cli.train.session import RunFlags, run_session

    torch.set_num_threads(THREADS)
    out = os.fdopen(os.dup(1), "w")  # replies; the run's own output goes to stderr
    os.dup2(2, 1)

    def reply(payload) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    train = TrainArgs(
        global_batch_size=BATCH, micro_batch_size=BATCH, max_seq_length=SEQ, max_steps=1 << 30,
        save_interval=None, log_interval=1,
    )  # fmt: skip
    evaluation = EvalArgs(interval=None, final_validation=False)
    flags = RunFlags(compile=compile == "1", precision="32-true")
    with tempfile.TemporaryDirectory() as tmp:
        task = bench_task(Path(weights), Path(tokens), Path(tmp), reply)
        run_session(task, Path(tmp), train, evaluation, flags, {})


class Worker:
    """One side in its own process; `steps(n)` trains n steps and returns their figures."""

    def __init__(self, cmd: list[str], env: dict, log: Path) -> None:
        self.log = log  # the worker's own output (progress bar, warnings)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(THREADS), **env},
        )  # fmt: skip

    def steps(self, n: int) -> dict:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"a benchmark worker exited {self.proc.wait()}:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def run() -> list[Row]:
    import torch

    from lifecycle_cli.model import GPT

    torch.manual_seed(0)
    model = GPT(model_config())
    blocks = torch.randint(0, VOCAB, (BLOCKS, SEQ + 1))
    with tempfile.TemporaryDirectory() as tmp:
        ours, lit = Path(tmp) / "ours.pt", Path(tmp) / "lit.pt"
        torch.save(model.state_dict(), ours)
        torch.save(litgpt_state_dict(model), lit)
        torch.save(blocks, Path(tmp) / "blocks.pt")
        (Path(tmp) / "litgpt_worker.py").write_text(LITGPT_WORKER)
        tokens = str(Path(tmp) / "blocks.pt")
        lit_python = str(venv_python(LITGPT_VENV, LITGPT))
        lit_args = [str(Path(tmp) / "litgpt_worker.py"), str(lit), tokens, str(THREADS)]
        ours_args = [sys.executable, "-m", "benchmarks.train_vs_litgpt", str(ours), tokens]
        here = {"PYTHONPATH": str(REPO)}
        logs = [Path(tmp) / f"worker-{i}.log" for i in range(3)]
        sides = {
            "llmcycle": Worker([*ours_args, "0"], here, logs[0]),
            "llmcycle --compile": Worker([*ours_args, "1"], here, logs[1]),
            "LitGPT 0.5.13 (compiled)": Worker(
                [lit_python, *lit_args, "1"], {"PYTHONPATH": ""}, logs[2]
            ),
        }
        try:
            first = {name: side.steps(WARMUP)["losses"][0] for name, side in sides.items()}
            times = {name: [] for name in sides}
            for _ in range(ROUNDS):
                for name, side in sides.items():
                    times[name] += side.steps(STEPS)["times"]
        finally:
            for side in sides.values():
                side.close()
    lit_ms = 1e3 * statistics.median(times["LitGPT 0.5.13 (compiled)"])
    base = {
        "model": "pythia-14m-shaped, vocab 4096",
        "params": sum(p.numel() for p in model.parameters()),
        "micro_batch": BATCH, "seq": SEQ, "dtype": "float32", "threads": THREADS,
        "rounds": ROUNDS, "steps_per_round": STEPS, "warmup_steps": WARMUP,
    }  # fmt: skip
    rows = []
    print(f"{'side':<26} {'ms/step':>8} {'tokens/s':>9} {'x LitGPT':>8} {'first loss':>10}")
    for name, t in times.items():
        ms = 1e3 * statistics.median(t)
        rate = BATCH * SEQ / (ms / 1e3)
        ratio = lit_ms / ms
        print(f"{name:<26} {ms:8.1f} {rate:9.0f} {ratio:8.2f} {first[name]:10.4f}")
        cfg = {**base, "ms_per_step": round(ms, 1), "x_litgpt": round(ratio, 2),
               "first_loss": round(first[name], 4)}  # fmt: skip
        rows.append(Row(f"train vs LitGPT: {name}", round(rate), "tokens/s", cfg))
    return rows


if __name__ == "__main__":  # llmcycle's worker (see `run`)
    ours_worker(*sys.argv[1:])
