"""`llmcycle pretrain`: it learns, resumes exactly, scales to DDP/FSDP, refuses bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from in_process import llmcycle_here

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


PROBE = Path(__file__).parent / "verb_probe.py"


def probe(*args, cwd: Path, **env) -> subprocess.CompletedProcess:
    """`llmcycle` through tests/verb_probe.py (block-forward counts, a compile backend)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, str(PROBE), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def block_forwards(stdout: str) -> int:
    return int(stdout.split("block forwards: ")[1].split()[0])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    assert re.search(r"[\d,]+ tok/s MFU \d+\.\d%", proc.stderr)  # the progress bar
    trained = [r for r in rows if r["train_loss"]]
    assert len(trained) == 80
    # MFU: achieved FLOP/s over the measured matmul peak; well above 0, at most 100%.
    assert all(float(r["tokens_per_sec"]) > 0 for r in trained)
    assert all(0.001 < float(r["mfu"]) <= 1.0 for r in trained), [r["mfu"] for r in trained]
    assert (out / "loss.png").stat().st_size > 1000
    assert yaml.safe_load((out / "hparams.yaml").read_text())["train"]["max_steps"] == 80
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000060", "step-000080"]

    llm = LLM.load(out / "final")
    ids = llm.tokenizer.encode("The return statement")
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), llm.config.vocab_size)


STRAIGHT = dict(max_steps=12, save_interval=6, keep_last=None)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """An uninterrupted 12-step run (warm-up 2, then cosine from 3e-3 to 3e-4)."""
    folder = tmp_path_factory.mktemp("straight")
    cfg = write_config(folder / "a.yaml", corpus, folder / "out", **STRAIGHT)
    assert llmcycle_here("pretrain", "--config", cfg) == 0
    return folder / "out"


def start(cfg: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lifecycle_cli", "pretrain", "--config", str(cfg)],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for(condition, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not condition() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    assert len(losses(a)) == 12
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_sigkill_continues_exactly(corpus, straight, tmp_path, capsys):
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.yaml", corpus, killed, **STRAIGHT)
    proc = start(cfg, tmp_path)
    wait_for(lambda: (killed / "step-000006").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    before = {r["step"]: r for r in read_metrics(killed / "metrics.csv") if int(r["step"]) <= 6}

    assert llmcycle_here("pretrain", "--config", cfg, "--resume", "auto") == 0
    assert "resuming at step 6" in capsys.readouterr().out
    # The second run trained steps 7-12 only: the rows of steps 1-6 are the first run's (their
    # tokens/s are of that run; a run that started over would have written its own).
    rows = read_metrics(killed / "metrics.csv")
    assert [r for r in rows if int(r["step"]) <= 6] == list(before.values())
    assert sorted({int(r["step"]) for r in rows}) == list(range(1, 13))
    assert_same_run(straight, killed)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_step_folder_that_resumes_exactly(sig, corpus, straight, tmp_path, capsys):
    out = tmp_path / "stopped"
    cfg = write_config(tmp_path / "c.yaml", corpus, out, max_steps=12)  # no scheduled saves
    proc = start(cfg, tmp_path)
    wait_for(lambda: len(read_metrics(out / "metrics.csv")) >= 1, proc)
    proc.send_signal(sig)
    assert proc.wait() == 130  # stopped, not finished
    assert not (out / "final").exists()
    saved = [p.name for p in out.glob("step-*")]
    assert len(saved) == 1, saved  # written at the stop
    step = int(saved[0][5:])

    assert llmcycle_here("pretrain", "--config", cfg, "--resume", "auto") == 0
    assert f"resuming at step {step} from" in capsys.readouterr().out
    assert_same_run(straight, out)


def test_lr_warms_up_then_follows_a_cosine(straight):
    """lr of optimizer step s (logged at step s + 1): linear warm-up over 2 steps to 3e-3, then
    a half cosine over the remaining 10 steps towards min_lr 3e-4."""
    logged = {int(r["step"]): float(r["lr"]) for r in read_metrics(straight / "metrics.csv")
              if r["lr"]}  # fmt: skip
    expected = {}
    for s in range(12):
        if s < 2:
            expected[s + 1] = 3e-3 * (s + 1) / 2
        else:
            expected[s + 1] = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * (s - 2) / 10))
    assert logged == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_the_fused_head_and_loss_give_the_plain_loss_and_gradients(tied):
    """Training in float32, the model's loss runs the head and the cross-entropy fused in chunks
    of rows (more rows than one chunk here); loss and every gradient equal the plain logits ->
    F.cross_entropy computation's."""
    import dataclasses

    import torch.nn.functional as F

    from lifecycle_cli.config import Config
    from lifecycle_cli.model import GPT
    from lifecycle_cli.objectives import LOSS_CHUNK, next_token_loss

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(Config(**TINY), tie_embeddings=tied))
    batch = torch.randint(0, model.config.vocab_size, (2 * LOSS_CHUNK // 64 + 1, 65))
    fused = next_token_loss(model, batch)
    fused.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(batch[:, :-1])
    plain = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)


def test_linear_layers_train_through_onednn_with_f_linear_values_and_gradients():
    """On CPU a float32 training Linear multiplies through oneDNN (forward and both backward
    matmuls, also compiled); it gives F.linear's output and gradients, and without gradients
    it is F.linear itself."""
    import torch.nn.functional as F

    from lifecycle_cli.linear import ONEDNN, Linear, use_onednn

    torch.manual_seed(0)
    layer = Linear(48, 80)
    x = torch.randn(3, 7, 48, requires_grad=True)
    assert use_onednn(x, layer.weight) == ONEDNN
    with torch.no_grad():
        assert not use_onednn(x, layer.weight)
    for forward in (layer, torch.compile(layer)):
        out = forward(x)
        out.square().sum().backward()
        grads = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
        for t in (x, layer.weight, layer.bias):
            t.grad = None
        expected = F.linear(x, layer.weight, layer.bias)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for got, t in zip(grads, (x, layer.weight, layer.bias)):
            torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-5)
            t.grad = None


def test_continued_pretraining_starts_from_the_initial_checkpoint(corpus, straight, tmp_path):
    out = tmp_path / "more"
    cfg = write_config(tmp_path / "c.yaml", corpus, out, max_steps=2)
    config = yaml.safe_load(cfg.read_text())
    del config["model_config"], config["tokenizer"]
    cfg.write_text(yaml.safe_dump(config))
    assert llmcycle_here("pretrain", "--config", cfg, "--initial_checkpoint_dir",
                         straight / "final") == 0  # fmt: skip
    # Its first loss is where the initial run ended, far below a fresh model's.
    first, initial = losses(out)[1], losses(straight)
    assert abs(first - initial[12]) < 0.25 and first < initial[1] - 0.5, (first, initial)
    assert not (out / "tokenizer").exists()  # the checkpoint's tokenizer, not a new one
    same = ("tokenizer.json", "model_config.yaml")
    assert all((out / "final" / f).read_bytes() == (straight / "final" / f).read_bytes()
               for f in same)  # fmt: skip


def test_two_torchrun_nodes_match_one_process(corpus, straight, tmp_path):
    """`--num_nodes 2` started by torchrun as two one-process "nodes" on 127.0.0.1."""
    out = tmp_path / "nodes"
    cfg = write_config(tmp_path / "n.yaml", corpus, out, **STRAIGHT)
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "lifecycle_cli",
                "pretrain",
                "--config",
                str(cfg),
                "--num_nodes",
                "2",
                "--devices",
                "1",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 device(s)" in outputs[0]
    single = losses(straight)
    assert sorted(losses(out)) == sorted(single)
    for step, loss in single.items():
        assert abs(losses(out)[step] - loss) < 1e-5, (step, losses(out)[step], loss)
    a, b = weights(straight / "final"), weights(out / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_ddp_and_fsdp_match_one_process_and_fsdp_resumes(corpus, tmp_path, monkeypatch, capsys):
    from verb_probe import compile_with

    args = dict(max_steps=6, save_interval=3, keep_last=None)
    runs, procs = {}, {}
    two = ["--devices", "2"]
    for name, (flags, env) in {
        "single": ([], {}),
        "ddp": ([*two, "--strategy", "ddp"], {}),
        "fsdp": ([*two, "--strategy", "fsdp"], {"PROBE_COUNT_BLOCKS": "1"}),
        "fsdp_ac": (
            [*two, "--strategy", "fsdp", "--activation_checkpointing", "true"],
            {"PROBE_COUNT_BLOCKS": "1"},
        ),
        # dynamo + AOT autograd: what --compile runs, without inductor's minutes of C++ build
        "compiled": (["--compile", "true"], {}),
    }.items():
        cfg = write_config(tmp_path / f"{name}.yaml", corpus, tmp_path / name, **args)
        if name == "single":
            assert llmcycle_here("pretrain", "--config", cfg) == 0
        elif name == "compiled":  # in this process, as verb_probe.py would patch it
            with monkeypatch.context() as patch:
                patch.setattr(torch, "compile", compile_with("aot_eager"))
                assert llmcycle_here("pretrain", "--config", cfg, *flags) == 0
            torch._dynamo.reset()
            procs[name] = capsys.readouterr().out
        else:  # Fabric starts the other rank by running the probe script again
            proc = probe("pretrain", "--config", str(cfg), *flags, cwd=tmp_path, **env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            procs[name] = proc.stdout
        runs[name] = losses(tmp_path / name)
    assert len(runs["single"]) == 6
    for name in ("ddp", "fsdp", "fsdp_ac", "compiled"):
        for step, loss in runs["single"].items():
            assert abs(runs[name][step] - loss) < 1e-5, (name, step, runs[name][step], loss)
    # Activation checkpointing recomputes each training forward of a block once in backward:
    # 6 steps x 1 micro-batch per rank x 2 blocks (measured: 20 forwards without, 32 with).
    assert block_forwards(procs["fsdp_ac"]) - block_forwards(procs["fsdp"]) == 6 * 1 * 2
    assert "compiled: GPT" in procs["compiled"]

    # FSDP writes sharded step checkpoints; final/ is consolidated into plain safetensors.
    assert list((tmp_path / "fsdp" / "step-000003" / "train_state").glob("*.distcp"))
    single = weights(tmp_path / "single" / "final")
    for name in ("ddp", "fsdp", "fsdp_ac", "compiled"):
        other = weights(tmp_path / name / "final")
        assert other.keys() == single.keys(), name
        assert all(torch.allclose(single[k], other[k], atol=1e-5) for k in single), name
    # A compiled run's step folders hold the plain model's names, like any checkpoint folder.
    step = weights(tmp_path / "compiled" / "step-000003")
    assert step.keys() == weights(tmp_path / "single" / "step-000003").keys()

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
        ("ok", ["--activation_checkpointing", "true"], "applies to --strategy fsdp"),
    ],
)
def test_bad_input_is_one_line_exit_2(setup, flags, message, corpus, tmp_path, capsys):
    """In this process; the bad JSON line also as a user's shell sees it."""
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
    if setup == "badjson":
        proc = llmcycle("pretrain", "--config", str(cfg), *flags, cwd=tmp_path)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = llmcycle_here("pretrain", "--config", cfg, *flags), capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
