"""`llmcycle pretrain`: it learns, resumes exactly, scales to DDP/FSDP, refuses bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lifecycle_cli import LLM
from lifecycle_cli.checkpoint import iter_tensors, weight_files
from lifecycle_cli.train.logs import read_metrics

TINY = dict(
    name="test-tiny", block_size=64, n_layer=2, n_embd=128, n_head=4, n_query_groups=2,
    intermediate_size=256, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True,
    hf_model_type="llama",
)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~460K characters of English and code in a few .txt files, plus a .jsonl."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    docs = list(topics.values())
    for i in range(4):
        (folder / f"part{i}.txt").write_text("\n\n".join(docs[i::5]))
    with (folder / "extra.jsonl").open("w") as f:
        for doc in docs[4::5]:
            f.write(json.dumps({"text": doc}) + "\n")
    return folder


def write_config(path: Path, corpus: Path, out_dir: Path, **train) -> Path:
    config = {
        "model_config": TINY,
        "out_dir": str(out_dir),
        "tokenizer": {"vocab_size": 512},
        "data": {"path": [str(corpus)], "cache_dir": str(out_dir.parent / "cache")},
        "train": {
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "max_seq_length": 64,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "save_interval": None,
            **train,
        },  # fmt: skip
        "eval": {"interval": None, "max_iters": 4},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def llmcycle(*args, cwd: Path, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lifecycle_cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def losses(out_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train_loss"]) for r in read_metrics(out_dir / "metrics.csv")
            if r["train_loss"]}  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(weight_files(folder)))


def test_pretraining_beats_the_unigram_baseline_and_leaves_a_usable_folder(corpus, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml", corpus, out, max_steps=80, save_interval=20, keep_last=2,
        global_batch_size=16, micro_batch_size=16,
    )  # fmt: skip
    proc = llmcycle("pretrain", "--config", str(cfg), "--eval.interval", "40", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    baseline = float(proc.stdout.split("validation loss ")[1].split()[0])
    rows = read_metrics(out / "metrics.csv")
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 2  # at step 40 and at the end
    assert val[-1] < val[0] < baseline - 0.1, (val, baseline)
    assert "tok/s" in proc.stderr  # the progress bar
    assert (out / "loss.png").stat().st_size > 1000
    assert yaml.safe_load((out / "hparams.yaml").read_text())["train"]["max_steps"] == 80
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000060", "step-000080"]

    llm = LLM.load(out / "final")
    ids = llm.tokenizer.encode("The return statement")
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), llm.config.vocab_size)


def test_resume_after_sigkill_continues_exactly(corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = dict(max_steps=12, save_interval=6, keep_last=None)
    cfg_a = write_config(tmp_path / "a.yaml", corpus, straight, **args)
    assert llmcycle("pretrain", "--config", str(cfg_a), cwd=tmp_path).returncode == 0

    cfg_b = write_config(tmp_path / "b.yaml", corpus, killed, **args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lifecycle_cli", "pretrain", "--config", str(cfg_b)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "step-000006").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    resumed = llmcycle("pretrain", "--config", str(cfg_b), "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 6" in resumed.stdout
    assert losses(killed) == losses(straight)
    assert len(losses(straight)) == 12
    a, b = weights(straight / "final"), weights(killed / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_and_fsdp_match_one_process_and_fsdp_resumes(corpus, tmp_path):
    args = dict(max_steps=6, save_interval=3, keep_last=None)
    runs = {}
    for name, flags in {
        "single": [],
        "ddp": ["--devices", "2", "--strategy", "ddp"],
        "fsdp": ["--devices", "2", "--strategy", "fsdp"],
    }.items():
        cfg = write_config(tmp_path / f"{name}.yaml", corpus, tmp_path / name, **args)
        proc = llmcycle("pretrain", "--config", str(cfg), *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    assert len(runs["single"]) == 6
    for name in ("ddp", "fsdp"):
        for step, loss in runs["single"].items():
            assert abs(runs[name][step] - loss) < 1e-5, (name, step, runs[name][step], loss)

    # FSDP writes sharded step checkpoints; final/ is consolidated into plain safetensors.
    assert list((tmp_path / "fsdp" / "step-000003" / "train_state").glob("*.distcp"))
    single, fsdp = weights(tmp_path / "single" / "final"), weights(tmp_path / "fsdp" / "final")
    assert all(torch.allclose(single[k], fsdp[k], atol=1e-5) for k in single)

    cfg = write_config(tmp_path / "again.yaml", corpus, tmp_path / "fsdp", **args)
    step3 = str(tmp_path / "fsdp" / "step-000003")
    (tmp_path / "fsdp" / "metrics.csv").unlink()
    proc = llmcycle(
        "pretrain", "--config", str(cfg), "--devices", "2", "--strategy", "fsdp",
        "--resume", step3, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = losses(tmp_path / "fsdp")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert abs(resumed[step] - runs["fsdp"][step]) < 1e-6


@pytest.mark.parametrize(
    "setup, flags, message",
    [
        ("empty", [], "empty"),
        ("badjson", [], "bad.jsonl:2"),
        ("ok", ["--train.max_seq_length", "128"], "exceeds the model's context"),
        ("ok", ["--train.global_batch_size", "6"], "not a multiple of --train.micro_batch_size"),
        ("missing", [], "missing.txt"),
    ],
)
def test_bad_input_is_one_line_exit_2(setup, flags, message, corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    if setup == "empty":
        (data / "empty.txt").write_text("")
    elif setup == "badjson":
        (data / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    elif setup == "ok":
        data = corpus
    else:
        data = data / "missing.txt"
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "out", max_steps=2)
    proc = llmcycle("pretrain", "--config", str(cfg), *flags, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
