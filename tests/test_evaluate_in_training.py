"""`--eval.tasks`: finetune and align run evaluate's tasks at every evaluation, logged as
metrics.csv columns with the numbers `llmcycle evaluate` gives, without changing the training."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from eval_fixtures import lm_eval_tasks, tiny_llama
from in_process import llmcycle_here

from lifecycle_cli.commands.evaluate import evaluate
from lifecycle_cli.data.preferences import synthetic_pairs
from lifecycle_cli.evaluate.args import LmEvalArgs
from lifecycle_cli.train.logs import read_metrics


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("train-eval") / "ckpt")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def evaluated(checkpoint: Path, tasks: str, out: Path, **kw) -> dict[tuple[str, str], float]:
    evaluate(checkpoint, tasks, out_dir=out, device="cpu", **kw)
    rows = json.loads((out / "results.json").read_text())["results"]
    return {(r["task"], r["metric"]): r["value"] for r in rows}


def test_finetune_logs_evaluate_tasks_at_every_evaluation(ckpt, tmp_path, capsys):
    text = tmp_path / "val.txt"
    text.write_text(topics["if"][:1500])
    out = tmp_path / "out"
    assert llmcycle_here(*[
        "finetune", str(ckpt), "--method", "full", "--data.synthetic", "reverse",
        "--data.synthetic_train_size", "32", "--data.synthetic_val_size", "8",
        "--prompt_style", "plain", "--train.max_steps", "2", "--train.global_batch_size", "8",
        "--train.micro_batch_size", "8", "--train.lr", "1e-3", "--eval.interval", "1",
        "--exact_match_samples", "8", "--eval.tasks", f"synthetic:reverse,perplexity:{text}",
        "--eval.limit", "8", "--out_dir", str(out),
    ]) == 0  # fmt: skip
    rows = [r for r in read_metrics(out / "metrics.csv") if r["val_loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:  # evaluate's synthetic task is finetune's own exact match
        assert r["synthetic-reverse/exact_match"] == r["exact_match"]
    assert rows[0]["perplexity-val/token_nll"] != rows[1]["perplexity-val/token_nll"]
    said = capsys.readouterr().err
    assert f"perplexity-val/perplexity {float(rows[1]['perplexity-val/perplexity']):.4f}" in said

    theirs = evaluated(out / "final", f"perplexity:{text}", tmp_path / "eval")
    for metric in ("token_nll", "perplexity", "bits_per_byte"):
        mine = float(rows[-1][f"perplexity-val/{metric}"])
        assert mine == pytest.approx(theirs[(f"perplexity:{text}", metric)], rel=1e-5)


def test_align_runs_lm_eval_tasks_without_changing_what_it_trains(ckpt, tmp_path):
    """lm-eval seeds every generator when it runs; the LoRA dropout of the next steps must not
    notice."""
    train, _ = synthetic_pairs("reverse", 12, 1, seed=1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")})
                             + "\n" for p in train))  # fmt: skip
    tasks = lm_eval_tasks(tmp_path / "tasks")
    common = [
        "align", str(ckpt), "--data.path", str(pairs), "--data.val_path", str(pairs),
        "--prompt_style", "plain", "--train.max_steps", "2", "--train.global_batch_size", "4",
        "--train.micro_batch_size", "4", "--train.epochs", "null", "--train.lr", "1e-2",
        "--eval.interval", "1", "--eval.max_iters", "1", "--preference_samples", "4",
    ]  # fmt: skip
    plain, measured = tmp_path / "plain", tmp_path / "measured"
    assert llmcycle_here(*common, "--out_dir", str(plain)) == 0
    assert llmcycle_here(*common, "--eval.tasks", "lm_eval:tiny_mc", "--eval.include_path",
                         tasks, "--out_dir", measured) == 0  # fmt: skip
    rows = read_metrics(measured / "metrics.csv")

    def trained(rows: list[dict]) -> list[tuple]:
        return [(r["step"], r["train_loss"], r["grad_norm"], r["val_loss"]) for r in rows]

    assert trained(rows) == trained(read_metrics(plain / "metrics.csv"))  # LoRA dropout 0.05
    evals = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [1, 2]
    theirs = evaluated(measured / "final", "lm_eval:tiny_mc", tmp_path / "eval",
                       lm_eval=LmEvalArgs(include_path=tasks))  # fmt: skip
    for metric in ("acc", "acc_norm"):
        assert float(evals[-1][f"lm_eval-tiny_mc/{metric}"]) == theirs[("lm_eval:tiny_mc", metric)]
