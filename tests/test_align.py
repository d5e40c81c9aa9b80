"""`llmcycle align`: preference tuning on the one training session — it learns, every objective
runs with LoRA, the LoRA reference is the base itself, resume is exact, DDP/FSDP equal one
process, final/ is a plain checkpoint, bad input is one line."""

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
from in_process import llmcycle_here

from lifecycle_cli.checkpoint import iter_tensors, weight_files
from lifecycle_cli.cli import main
from lifecycle_cli.lora import LoRAArgs, adapters_disabled, inject_lora
from lifecycle_cli.train.logs import read_metrics


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """16 string pairs and 8 chat pairs in one JSONL file."""
    from lifecycle_cli.data.preferences import synthetic_pairs

    train, _ = synthetic_pairs("reverse,add", 12, 1, seed=1)
    records = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in train[:16]]
    for p in train[16:]:
        user = [{"role": "user", "content": p["prompt"]}]
        records.append({"prompt": user, "chosen": p["chosen"], "rejected": p["rejected"]})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(weight_files(folder)))


def losses(out: Path, key: str = "train_loss") -> dict[int, str]:
    return {int(r["step"]): r[key] for r in read_metrics(out / "metrics.csv") if r[key]}


SYNTHETIC = [
    "--data.synthetic", "max", "--data.synthetic_train_size", "400", "--data.synthetic_val_size",
    "64", "--prompt_style", "plain", "--train.epochs", "null", "--train.global_batch_size", "16",
    "--train.micro_batch_size", "16", "--train.lr", "1e-2", "--lora.embedding", "true",
    "--beta", "0.5", "--exact_match_samples", "8", "--max_new_tokens", "3",
]  # fmt: skip


def test_dpo_with_lora_raises_held_out_preference_accuracy_and_leaves_a_plain_checkpoint(
    base, tmp_path, capsys
):
    out = tmp_path / "out"
    args = ["--train.max_steps", "60", "--eval.interval", "30", "--eval.initial_validation",
            "true", "--out_dir", str(out)]  # fmt: skip
    assert llmcycle_here("align", base, *SYNTHETIC, *args) == 0
    said = capsys.readouterr()
    assert "reference: the same weights with the adapters off" in said.out
    rows = [r for r in read_metrics(out / "metrics.csv") if r["val_loss"]]
    assert [int(r["step"]) for r in rows] == [0, 30, 60]
    first, last = rows[0], rows[-1]
    assert float(first["reward_accuracy"]) == 0.0  # the policy is the reference: no margin
    assert float(last["reward_accuracy"]) >= 0.7, last  # on prompts it never trained on
    assert float(last["margin"]) > 0.5 and float(last["train_margin"]) > 0.5
    assert float(last["rewards_chosen"]) - float(last["rewards_rejected"]) == pytest.approx(
        float(last["margin"]), abs=1e-4
    )
    assert float(last["val_loss"]) < float(first["val_loss"])
    assert "exact_match" in last and f"reward_accuracy {float(last['reward_accuracy']):.4f}" in (
        said.err
    )
    assert (out / "preferences.png").stat().st_size > 0 and (out / "loss.png").is_file()

    # final/: a plain checkpoint (adapters merged) that convert to_hf exports for transformers.
    final = weights(out / "final")
    assert not any("lora" in k for k in final) and (out / "lora.safetensors").is_file()
    assert (out / "final" / "prompt_style.yaml").read_text().strip() == "name: plain"
    from transformers import AutoModelForCausalLM

    from lifecycle_cli.commands.convert import to_hf

    to_hf(out / "final", out_dir=tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    from lifecycle_cli import LLM

    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        ours = LLM.load(out / "final").model(ids)
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_every_objective_trains_with_lora(objective, base, pairs, tmp_path):
    """Validation on the training pairs themselves: full batches at a small lr, so the loss
    must fall."""
    out = tmp_path / objective
    assert llmcycle_here(*[
        "align", str(base), "--data.path", str(pairs), "--data.val_path", str(pairs),
        "--objective", objective, "--prompt_style", "chatml", "--train.max_steps", "5",
        "--train.global_batch_size", "24", "--train.micro_batch_size", "12", "--train.epochs",
        "null", "--train.lr", "3e-3", "--train.warmup_steps", "0", "--eval.interval", "5",
        "--eval.initial_validation", "true", "--lora.embedding", "true", "--out_dir", str(out),
    ]) == 0  # fmt: skip
    val = losses(out, "val_loss")
    assert float(val[5]) < float(val[0]), val
    rows = [r for r in read_metrics(out / "metrics.csv") if r["val_loss"]]
    assert float(rows[-1]["margin"]) > float(rows[0]["margin"])
    assert ("reward_accuracy" in rows[0]) == (objective in ("dpo", "ipo"))


def test_the_lora_reference_is_the_base_with_adapters_off(base):
    """No second copy: switching the (trained, nonzero) adapters off gives the base's logits."""
    from lifecycle_cli.checkpoint import load_model

    plain = load_model(base)
    adapted = load_model(base)
    inject_lora(adapted, LoRAArgs(r=4, embedding=True, mlp=True, dropout=0.0))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(adapted(ids), plain(ids))
        with adapters_disabled(adapted):
            torch.testing.assert_close(adapted(ids), plain(ids))
        assert not torch.allclose(adapted(ids), plain(ids))  # back on after the block


def llmcycle(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lifecycle_cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


RESUMABLE = [
    "--train.max_steps", "8", "--train.save_interval", "4", "--eval.interval", "100",
    "--train.lr", "3e-3", "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
    "--train.epochs", "null", "--lora.dropout", "0.1", "--lora.embedding", "true",
    "--prompt_style", "chatml",
]  # fmt: skip


@pytest.mark.parametrize(
    "flags", [["--method", "lora"], ["--method", "full", "--precompute_ref", "true"]],
    ids=["lora", "full-precomputed"],
)  # fmt: skip
def test_resume_after_sigkill_continues_exactly(flags, base, pairs, tmp_path, capsys):
    args = ["align", str(base), "--data.path", str(pairs), *RESUMABLE, *flags]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lifecycle_cli", *args, "--out_dir", str(killed)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 900
    while not (killed / "step-000004").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    assert llmcycle_here(*args, "--out_dir", straight) == 0
    if "--precompute_ref" in flags:
        computed = (killed / "reference_logps.safetensors").stat().st_mtime_ns

    capsys.readouterr()
    assert llmcycle_here(*args, "--out_dir", killed, "--resume", "auto") == 0
    said = capsys.readouterr().out
    assert "resuming at step 4" in said
    if "--precompute_ref" in flags:  # reused, not computed again
        assert "Reference log-probs: reusing" in said
        assert "Computing reference" not in said
        assert (killed / "reference_logps.safetensors").stat().st_mtime_ns == computed
    assert losses(killed) == losses(straight) and len(losses(straight)) == 8
    a, b = weights(straight / "final"), weights(killed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_and_fsdp_equal_one_process(base, pairs, tmp_path):
    flags = [
        "--data.path", str(pairs), "--train.max_steps", "3", "--train.global_batch_size", "8",
        "--train.micro_batch_size", "4", "--train.epochs", "null", "--train.lr", "3e-3",
        "--eval.interval", "100", "--preference_samples", "8", "--lora.dropout", "0",
        "--lora.embedding", "true", "--prompt_style", "chatml",
    ]  # fmt: skip
    runs = {
        "single": [],
        "ddp": ["--devices", "2", "--strategy", "ddp"],
        "fsdp": ["--devices", "2", "--strategy", "fsdp"],
    }
    for name, extra in runs.items():
        args = ["align", str(base), *flags, *extra, "--out_dir", str(tmp_path / name)]
        if name == "single":
            assert llmcycle_here(*args) == 0
        else:  # Fabric starts the other rank by running the command again
            proc = llmcycle(*args, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr[-3000:]
    one = losses(tmp_path / "single")
    single = weights(tmp_path / "single" / "final")
    val = losses(tmp_path / "single", "reward_accuracy")
    for name in ("ddp", "fsdp"):
        assert losses(tmp_path / name, "reward_accuracy") == val  # score_pairs on every rank
        many = losses(tmp_path / name)
        assert many.keys() == one.keys()
        for step in one:
            assert float(many[step]) == pytest.approx(float(one[step]), abs=1e-6)
        final = weights(tmp_path / name / "final")
        assert final.keys() == single.keys()
        for key, tensor in single.items():
            torch.testing.assert_close(final[key], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--objective", "dpo", "--gamma", "1"], "--gamma does not apply to --objective dpo"),
        (
            ["--objective", "simpo", "--precompute_ref", "true"],
            "--precompute_ref: --objective simpo uses no reference model",
        ),  # fmt: skip
        (["--objective", "orpo", "--beta", "0.2"], "--beta does not apply to --objective orpo"),
        (["--train.max_seq_length", "8"], ":1: the prompt alone is"),
        (["--ref_checkpoint", "nowhere"], "nowhere"),
    ],
)
def test_bad_input_is_one_line_exit_2(flags, message, base, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["align", str(base), "--data.path", str(pairs), "--prompt_style", "chatml",
                 "--train.max_steps", "1", "--out_dir", str(out), *flags])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not (out / "final").exists()
