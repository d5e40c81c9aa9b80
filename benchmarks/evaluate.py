"""Log-likelihood requests/s of `evaluate`'s lm-eval LM (our GPT, `evaluate/loglik.py`) against
lm-eval's own `hf` model on the folder `convert to_hf` exports from the same checkpoint.

The model is the tiny pretraining recipe's shape (config_hub/pretrain/tiny.yaml: 4 layers,
192 wide, 4,096-token BPE, context 256; random weights, float32, CPU). The requests look like a
multiple-choice benchmark's: 64 questions of 80-200 tokens, 4 choices of 2-8 tokens each (256
requests), batch size 16 for both. Each side runs the same requests twice and keeps the faster
time; `max_abs_diff` is the largest difference between the two sides' log-likelihoods.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

from benchmarks.harness import Row

QUESTIONS, CHOICES, BATCH = 64, 4, 16


def requests(seed: int = 0) -> list[tuple[str, str]]:
    words = " ".join(topics.values()).split()
    rng = random.Random(seed)
    out = []
    for _ in range(QUESTIONS):
        start = rng.randrange(len(words) - 400)
        context = " ".join(words[start : start + rng.randint(60, 150)])
        for _ in range(CHOICES):
            at = rng.randrange(len(words) - 10)
            out.append((context, " " + " ".join(words[at : at + rng.randint(1, 5)])))
    return out


def timed(lm, instances) -> tuple[float, list[float]]:
    best, values = float("inf"), []
    for _ in range(2):
        start = time.perf_counter()
        values = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
        best = min(best, time.perf_counter() - start)
    return best, values


def run() -> list[Row]:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.config import Config
    from lifecycle_cli.evaluate.args import Settings
    from lifecycle_cli.evaluate.harness import make_lm
    from lifecycle_cli.evaluate.runner import Context
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import train_bpe
    from lifecycle_cli.zoo.convert import export_hf

    reqs = requests()
    instances = [
        Instance("loglikelihood", {}, args, i, ("bench", i, 1)) for i, args in enumerate(reqs)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_bpe(None, 4096, tmp / "tok", texts=["\n".join(topics.values())])
        config = Config(
            name="tiny", block_size=256, vocab_size=4096, n_layer=4, n_embd=192, n_head=6,
            n_query_groups=2, intermediate_size=512, norm="rmsnorm", mlp="swiglu", bias=False,
            tie_embeddings=True, hf_model_type="llama",
        )  # fmt: skip
        torch.manual_seed(0)
        save_checkpoint(tmp / "ckpt", GPT(config), tokenizer_dir=tmp / "tok")
        export_hf(tmp / "ckpt", tmp / "hf")
        ctx = Context(tmp / "ckpt", Settings(batch_size=BATCH), "cpu", "32-true")
        ctx.progress = lambda desc, total: None
        ours_s, ours = timed(make_lm(ctx), instances)
        hf = HFLM(pretrained=str(tmp / "hf"), dtype="float32", device="cpu", batch_size=BATCH)
        hf_s, theirs = timed(hf, instances)
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    base = {
        "model": "tiny (4x192, vocab 4096)", "requests": len(reqs), "batch_size": BATCH,
        "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "max_abs_diff": float(f"{diff:.2g}"),
    }  # fmt: skip
    return [
        Row("evaluate loglikelihood: llmcycle LM", round(len(reqs) / ours_s, 1), "req/s", base),
        Row("evaluate loglikelihood: lm-eval hf", round(len(reqs) / hf_s, 1), "req/s", base),
    ]
