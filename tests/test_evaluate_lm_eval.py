"""`lm_eval:` tasks through our LM equal lm-eval's own `hf` model on the folder that
`convert to_hf` exports (a local multiple-choice task and a generate_until task, no download),
and so do rolling log-likelihoods and chat-templated prompts (raw unless asked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from eval_fixtures import GEN, lm_eval_tasks, tiny_llama

from lifecycle_cli.commands.evaluate import evaluate
from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.args import LmEvalArgs

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint with a ChatML chat template, the folder `convert to_hf` makes of it)."""
    from lifecycle_cli.zoo.convert import export_hf

    folder = tmp_path_factory.mktemp("lm-eval")
    ckpt = tiny_llama(folder / "ckpt")
    (ckpt / "chat_template.jinja").write_text(CHATML)
    export_hf(ckpt, folder / "hf")
    return ckpt, folder / "hf"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return lm_eval_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


def manager(tasks: Path):
    """The TaskManager our runs build for --lm_eval.include_path `tasks` (indexing every task
    lm-eval ships takes seconds: lm-eval's own runs here share it)."""
    from lifecycle_cli.evaluate.harness import _manager

    return _manager((str(tasks.resolve()),))


def samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").open()]


def hf_lm(folder: Path):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_lm_eval_numbers_equal_lm_evals_hf_model_on_the_exported_folder(exported, tasks, tmp_path):
    """Raw prompts (no --apply_chat_template), though the checkpoint has a chat template."""
    from lm_eval import simple_evaluate

    ckpt, hf = exported
    out = tmp_path / "out"
    evaluate(ckpt, "lm_eval:tiny_mc,tiny_gen", out_dir=out, batch_size=4,
             lm_eval=LmEvalArgs(include_path=tasks), device="cpu")  # fmt: skip
    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf), "dtype": "float32", "device": "cpu"},
        tasks=["tiny_mc", "tiny_gen"],
        task_manager=manager(tasks),
        log_samples=True,
    )
    ours = json.loads((out / "results.json").read_text())["results"]
    values = {(r["task"], r["metric"]): r for r in ours}
    for task, metric in (("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("tiny_gen", "exact_match")):
        row = values[(f"lm_eval:{task}", metric)]
        assert row["value"] == pytest.approx(theirs["results"][task][f"{metric},none"])
        assert row["stderr"] == pytest.approx(theirs["results"][task][f"{metric}_stderr,none"])
    for task in ("tiny_mc", "tiny_gen"):
        rows = samples(out / f"lm_eval-{task}")
        by_doc = {r["doc_id"]: r for r in rows}
        assert len(rows) == len(theirs["samples"][task])
        for s in theirs["samples"][task]:
            mine = by_doc[s["doc_id"]]["resps"]
            if task == "tiny_gen":  # the same generated text, from the raw prompt
                assert by_doc[s["doc_id"]]["arguments"][0][0] == GEN[s["doc_id"]]["prompt"]
                assert mine == s["resps"]
            else:  # the same log-likelihood per choice
                for (a,), (b,) in zip(mine, s["resps"]):
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]


def test_rolling_log_likelihoods_equal_lm_evals_hf_model(exported):
    """Texts shorter and several times longer than the context of 128 tokens."""
    from pydoc_data.topics import topics

    from lm_eval.api.instance import Instance

    from lifecycle_cli.api import LLM
    from lifecycle_cli.evaluate.args import Settings
    from lifecycle_cli.evaluate.harness import make_lm
    from lifecycle_cli.evaluate.runner import Context

    ckpt, hf = exported
    texts = [
        "def f(x):\n    return x",
        topics["if"][:700],
        (topics["while"] + topics["for"])[:3000],
    ]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    llm = LLM.load(ckpt)
    ours = make_lm(Context(ckpt, Settings(batch_size=2), llm.model.eval(), llm.tokenizer))
    assert len(llm.tokenizer.encode(texts[2])) > 3 * ours.max_length
    theirs = hf_lm(hf).loglikelihood_rolling(requests)
    assert ours.loglikelihood_rolling(requests) == pytest.approx(theirs, rel=1e-5, abs=1e-4)


def test_apply_chat_template_prompts_equal_lm_evals_hf_model_and_transformers(
    exported, tasks, tmp_path
):
    from lm_eval import simple_evaluate
    from transformers import AutoTokenizer

    ckpt, hf = exported
    out = tmp_path / "out"
    evaluate(ckpt, "lm_eval:tiny_gen", out_dir=out, apply_chat_template=True,
             lm_eval=LmEvalArgs(include_path=tasks), device="cpu")  # fmt: skip
    rows = sorted(samples(out / "lm_eval-tiny_gen"), key=lambda r: r["doc_id"])
    contexts = [r["arguments"][0][0] for r in rows]
    template = AutoTokenizer.from_pretrained(hf)
    assert contexts == [
        template.apply_chat_template([{"role": "user", "content": g["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)
        for g in GEN
    ]  # fmt: skip
    assert contexts[0].startswith("<|im_start|>user\n")
    theirs = simple_evaluate(
        model=hf_lm(hf), tasks=["tiny_gen"], task_manager=manager(tasks),
        apply_chat_template=True, log_samples=True,
    )  # fmt: skip
    theirs_rows = sorted(theirs["samples"]["tiny_gen"], key=lambda r: r["doc_id"])
    assert [s["arguments"][0][0] for s in theirs_rows] == contexts
    assert [s["resps"] for s in theirs_rows] == [r["resps"] for r in rows]


def test_lm_eval_refuses_unknown_tasks_and_missing_folders(tasks, tmp_path):
    ckpt = tmp_path / "ckpt"  # refused before any checkpoint is read
    with pytest.raises(UserError, match="unknown task 'no_such_task'"):
        evaluate(ckpt, "lm_eval:no_such_task", lm_eval=LmEvalArgs(include_path=tasks))
    with pytest.raises(UserError, match="include_path: .* is not a folder"):
        evaluate(ckpt, "lm_eval:x", lm_eval=LmEvalArgs(include_path=tmp_path / "none"))


def test_without_lm_eval_installed_one_line_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError) as err:
        evaluate(Path(tmp_path), "lm_eval:arc_easy")
    assert "pip install 'llmcycle[eval]'" in str(err.value)
