"""`lm_eval:` tasks through our LM equal lm-eval's own `hf` model on the folder that
`convert to_hf` exports (a local multiple-choice task and a generate_until task, no download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from eval_fixtures import lm_eval_tasks, tiny_llama

from lifecycle_cli.commands.evaluate import evaluate
from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.args import LmEvalArgs


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_lm_eval_numbers_equal_lm_evals_hf_model_on_the_exported_folder(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lifecycle_cli.zoo.convert import export_hf

    ckpt = tiny_llama(tmp_path / "ckpt")
    export_hf(ckpt, tmp_path / "hf")
    tasks = lm_eval_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    evaluate(ckpt, "lm_eval:tiny_mc,tiny_gen", out_dir=out, batch_size=4,
             lm_eval=LmEvalArgs(include_path=tasks), device="cpu")  # fmt: skip
    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32", "device": "cpu"},
        tasks=["tiny_mc", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    ours = json.loads((out / "results.json").read_text())["results"]
    values = {(r["task"], r["metric"]): r for r in ours}
    for task, metric in (("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("tiny_gen", "exact_match")):
        row = values[(f"lm_eval:{task}", metric)]
        assert row["value"] == pytest.approx(theirs["results"][task][f"{metric},none"])
        assert row["stderr"] == pytest.approx(theirs["results"][task][f"{metric}_stderr,none"])
    for task in ("tiny_mc", "tiny_gen"):
        rows = [json.loads(x) for x in (out / f"lm_eval-{task}" / "samples.jsonl").open()]
        by_doc = {r["doc_id"]: r for r in rows}
        assert len(rows) == len(theirs["samples"][task])
        for s in theirs["samples"][task]:
            mine = by_doc[s["doc_id"]]["resps"]
            if task == "tiny_gen":  # the same generated text
                assert mine == s["resps"]
            else:  # the same log-likelihood per choice
                for (a,), (b,) in zip(mine, s["resps"]):
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]


def test_lm_eval_refuses_unknown_tasks_and_missing_folders(tmp_path):
    ckpt = tmp_path / "ckpt"  # refused before any checkpoint is read
    with pytest.raises(UserError, match="unknown task 'no_such_task'"):
        evaluate(ckpt, "lm_eval:no_such_task", lm_eval=LmEvalArgs(include_path=tmp_path))
    with pytest.raises(UserError, match="include_path: .* is not a folder"):
        evaluate(ckpt, "lm_eval:x", lm_eval=LmEvalArgs(include_path=tmp_path / "none"))


def test_without_lm_eval_installed_one_line_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError) as err:
        evaluate(Path(tmp_path), "lm_eval:arc_easy")
    assert "pip install 'llmcycle[eval]'" in str(err.value)
