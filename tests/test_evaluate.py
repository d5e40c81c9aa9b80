"""`llmcycle evaluate`: log-likelihoods equal transformers', perplexity, multiple choice,
exact match (agreeing with finetune's), results files, several checkpoints, bad task files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from eval_fixtures import MC, tiny_llama, write_jsonl
from served import assert_one_line_exit_2, llmcycle

from lifecycle_cli.api import LLM
from lifecycle_cli.commands.evaluate import evaluate
from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.args import JudgeArgs
from lifecycle_cli.evaluate.loglik import score
from lifecycle_cli.evaluate.perplexity import windows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("eval") / "ckpt")


def results(out_dir: Path) -> dict[tuple[str, str, str], dict]:
    data = json.loads((out_dir / "results.json").read_text())
    return {(r["checkpoint"], r["task"], r["metric"]): r for r in data["results"]}


def samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_likelihoods_equal_transformers_on_the_exported_folder(ckpt, tmp_path):
    import transformers

    from lifecycle_cli.zoo.convert import export_hf

    export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    llm = LLM.load(ckpt)
    tok = llm.tokenizer
    texts = [("The return", " statement"), ("A", " class is made of"), ("x = 1\n" * 9, "y")]
    requests = [(tok.encode(c), tok.encode(k, bos=False)) for c, k in texts]
    ours = score(llm.model, requests, batch_size=3)  # rows of 3 lengths in one padded batch
    for (ctx, cont), got in zip(requests, ours):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
        picked = logprobs[len(ctx) - 1 :].gather(-1, torch.tensor(cont)[:, None])
        assert abs(got.logprob - picked.sum().item()) <= 1e-4
        assert got.greedy == bool((logprobs[len(ctx) - 1 :].argmax(-1) == torch.tensor(cont)).all())
        assert got.n_tokens == len(cont)


def test_sliding_windows_predict_every_token_once_with_the_context_asked():
    ids = list(range(100))
    for context, stride in ((16, 16), (16, 4), (32, 7)):
        reqs = windows(ids, context, stride)
        scored = [t for _, cont in reqs for t in cont]
        assert scored == ids[1:]
        for ctx, cont in reqs:
            assert len(ctx) + len(cont) - 1 <= context  # the model input fits
            assert ctx + cont == ids[ids.index(ctx[0]) : ids.index(cont[-1]) + 1]
        # each window's first scored token sees as much as fits: context - scored + 1 tokens
        for ctx, cont in reqs:
            assert len(ctx) == min(ids.index(cont[0]), context - len(cont) + 1)


def test_perplexity_multiple_choice_and_results_files(ckpt, tmp_path, capsys):
    text = "def f(x):\n    return x + 1\n" * 30
    (tmp_path / "doc.txt").write_text(text)
    write_jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "out"
    evaluate(ckpt, f"perplexity:{tmp_path / 'doc.txt'},multiple_choice:{tmp_path / 'mc.jsonl'}",
             out_dir=out, stride=32, batch_size=4)  # fmt: skip
    table = capsys.readouterr().out
    assert "perplexity" in table and "acc_norm" in table
    r = results(out)
    name = "ckpt"
    ppl = {m: r[(name, f"perplexity:{tmp_path / 'doc.txt'}", m)]["value"]
           for m in ("token_nll", "perplexity", "bits_per_byte")}  # fmt: skip
    # the same NLL from the model directly, window by window
    llm = LLM.load(ckpt)
    ids = [llm.tokenizer.eos_id, *llm.tokenizer.encode(text, bos=False)]
    total = -sum(s.logprob for s in score(llm.model, windows(ids, 128, 32)))
    assert ppl["token_nll"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["token_nll"]), rel=1e-6)
    assert ppl["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text), rel=1e-5)
    mc = samples(out / "multiple_choice-mc" / "samples.jsonl")
    assert len(mc) == len(MC)
    for row, record in zip(mc, MC):
        assert row["prompt"] == f"Question: {record['question']}\nAnswer:"
        best = max(range(len(row["loglikelihoods"])), key=row["loglikelihoods"].__getitem__)
        assert row["acc"] == float(best == record["answer"])
        per_byte = [
            ll / len(f" {c}".encode()) for ll, c in zip(row["loglikelihoods"], row["choices"])
        ]
        best_norm = max(range(len(per_byte)), key=per_byte.__getitem__)
        assert row["acc_norm"] == float(best_norm == record["answer"])
    acc = r[(name, f"multiple_choice:{tmp_path / 'mc.jsonl'}", "acc")]
    assert acc["value"] == pytest.approx(sum(row["acc"] for row in mc) / len(mc))
    assert acc["n"] == len(MC) and acc["stderr"] is not None
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["stride"] == 32 and settings["batch_size"] == 4


def test_few_shot_examples_come_from_the_dev_split(ckpt, tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", MC[:2])
    write_jsonl(tmp_path / "dev.jsonl", MC[2:])
    out = tmp_path / "out"
    evaluate(ckpt, f"multiple_choice:{tmp_path / 'mc.jsonl'}", out_dir=out, num_fewshot=2,
             dev_path=tmp_path / "dev.jsonl")  # fmt: skip
    for row in samples(out / "multiple_choice-mc" / "samples.jsonl"):
        shots = row["prompt"].split("\n\n")[:-1]
        assert len(shots) == 2
        assert all(any(r["question"] in s for r in MC[2:]) for s in shots)


def test_synthetic_exact_match_uses_finetunes_examples_prompts_and_measure(ckpt, tmp_path):
    from lifecycle_cli.data.args import InstructData
    from lifecycle_cli.data.instruct import SFTDataset, load_examples
    from lifecycle_cli.train.tasks.sft import choose_style
    from lifecycle_cli.train.tasks.sft import exact_match as finetune_exact_match

    out = tmp_path / "out"
    evaluate(ckpt, "synthetic:reverse,add", out_dir=out, limit=6, max_new_tokens=8)
    llm = LLM.load(ckpt)
    style = choose_style(None, ckpt, llm.tokenizer)
    _, val = load_examples(InstructData(synthetic="reverse,add"))
    data = SFTDataset(val, llm.tokenizer, style, 128)
    items = data.eval_items()
    r = results(out)
    for task in ("reverse", "add"):
        rows = samples(out / f"synthetic-{task}" / "samples.jsonl")
        ours = [(style.encode(llm.tokenizer, row["prompt"]), row["target"]) for row in rows]
        theirs = [item for item, ex in zip(items, val) if ex["task"] == task][:6]
        assert ours == theirs  # the same examples, formatted and encoded alike
        expected = finetune_exact_match(llm.model, llm.tokenizer, theirs, 8, style.stop)
        assert r[("ckpt", f"synthetic:{task}", "exact_match")]["value"] == expected


def test_exact_match_scores_the_models_own_answer_as_right(ckpt, tmp_path):
    llm = LLM.load(ckpt)
    prompts = ["The return", "A class", "Exceptions"]
    said = llm.generate(prompts, prompt_style="alpaca", max_new_tokens=6, temperature=0)
    records = [{"prompt": p, "answer": a} for p, a in zip(prompts[:2], said[:2])]
    records.append({"prompt": prompts[2], "answer": said[2] + " surely not"})
    write_jsonl(tmp_path / "em.jsonl", records)
    out = tmp_path / "out"
    evaluate(ckpt, f"exact_match:{tmp_path / 'em.jsonl'}", out_dir=out, max_new_tokens=6)
    rows = samples(out / "exact_match-em" / "samples.jsonl")
    assert [row["exact_match"] for row in rows] == [1.0, 1.0, 0.0]
    assert [row["output"] for row in rows] == said


def test_several_checkpoints_side_by_side(ckpt, tmp_path):
    other = tiny_llama(tmp_path / "other", seed=1)
    text = tmp_path / "doc.txt"
    text.write_text("for i in range(10):\n    print(i)\n" * 5)
    proc = llmcycle("evaluate", ckpt, other, "--tasks", f"perplexity:{text}",
                    "--out_dir", tmp_path / "out")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert "ckpt" in header and "other" in header
    r = results(tmp_path / "out")
    a = r[("ckpt", f"perplexity:{text}", "perplexity")]["value"]
    b = r[("other", f"perplexity:{text}", "perplexity")]["value"]
    assert a != b
    assert (tmp_path / "out" / "other" / "perplexity-doc" / "samples.jsonl").is_file()


BAD = [
    ("mc.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q"\n',
     "multiple_choice", ":2: not valid JSON"),
    ("mc.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 5}\n', "multiple_choice",
     ':1: field "answer"'),
    ("mc.jsonl", '\n{"question": "q", "choices": "ab", "answer": 0}\n', "multiple_choice",
     ':2: field "choices"'),
    ("em.jsonl", '{"prompt": "p", "answer": "a"}\n[1, 2]\n', "exact_match",
     ":2: expected a JSON object"),
    ("em.jsonl", '{"prompt": "", "answer": "a"}\n', "exact_match", ':1: field "prompt"'),
    ("j.jsonl", '{"instruction": 3}\n', "judge", ':1: field "instruction"'),
]  # fmt: skip


@pytest.mark.parametrize("name,content,kind,message", BAD)
def test_a_malformed_task_file_is_named_with_its_line(ckpt, tmp_path, name, content, kind, message):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        evaluate(ckpt, f"{kind}:{path}", out_dir=out, judge=JudgeArgs(url="http://127.0.0.1:9"))
    assert str(path) + message in str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists()  # refused before anything is written


def test_bad_task_lists_and_files_exit_2_on_one_line(ckpt, tmp_path):
    (tmp_path / "mc.jsonl").write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    proc = llmcycle("evaluate", ckpt, "--tasks", f"multiple_choice:{tmp_path / 'mc.jsonl'}")
    assert_one_line_exit_2(proc, "mc.jsonl:1", "choices")
    for tasks, words in (("hellaswag", ["unknown task", "KIND:ARG"]),
                         ("perplexity", ["needs a text file"]),
                         ("synthetic:nope", ["unknown synthetic task"])):  # fmt: skip
        with pytest.raises(UserError) as err:
            evaluate(ckpt, tasks)
        assert all(w in str(err.value) for w in words), err.value


PROBE = """
import sys
if sys.argv[1] == "no-lm-eval":
    sys.modules["lm_eval"] = None  # as if lm-evaluation-harness were not installed
from lifecycle_cli.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "lightning", "transformers"})
print("HEAVY", heavy)
sys.exit(code)
"""


def probe(*args: str):
    import subprocess
    import sys

    cmd = [sys.executable, "-c", PROBE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_help_without_torch_and_lm_eval_missing_is_one_line_exit_2(tmp_path):
    proc = probe("-", "evaluate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    for flag in ("--tasks", "--limit", "--num_fewshot", "--judge.url", "--lm_eval.include_path"):
        assert flag in proc.stdout
    proc = probe("no-lm-eval", "evaluate", str(tmp_path), "--tasks", "lm_eval:arc_easy")
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "error: lm_eval tasks need lm-evaluation-harness: pip install 'llmcycle[eval]'\n"
    )


def test_contamination_of_a_corpus_names_the_planted_examples(ckpt, tmp_path, capsys):
    questions = [
        {"prompt": f"In which year did the {w} expedition reach the northern coast of the island",
         "answer": str(1800 + i)}
        for i, w in enumerate(["first", "second", "third", "fourth", "fifth", "sixth"])
    ]  # fmt: skip
    write_jsonl(tmp_path / "qa.jsonl", questions)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "clean.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    # Two examples copied, in other words' company, into the training text.
    planted = f"notes: {questions[1]['prompt']} {questions[1]['answer']}. More text follows.\n"
    planted += f"also {questions[4]['prompt'].lower()}? {questions[4]['answer']}\n"
    (corpus / "web.txt").write_text(planted)
    out = tmp_path / "out"
    evaluate(ckpt, f"exact_match:{tmp_path / 'qa.jsonl'}", out_dir=out, max_new_tokens=4,
             contamination_of=[corpus])  # fmt: skip
    printed = capsys.readouterr().out
    assert "2 of 6 examples (33.3%)" in printed
    (row,) = json.loads((out / "results.json").read_text())["contamination"]
    assert (row["task"], row["examples"], row["contaminated"]) == (
        f"exact_match:{tmp_path / 'qa.jsonl'}",
        6,
        2,
    )
    evaluate(ckpt, f"exact_match:{tmp_path / 'qa.jsonl'}", max_new_tokens=4,
             contamination_of=[corpus / "clean.txt"])  # fmt: skip
    assert "0 of 6 examples (0.0%)" in capsys.readouterr().out


def test_preference_ranks_pairs_as_align_scores_them(ckpt, tmp_path):
    from lifecycle_cli.data.preferences import load_pairs
    from lifecycle_cli.evaluate.preference import score_pairs
    from lifecycle_cli.prompts import resolve_style

    pairs = [
        {"prompt": f"say {w}", "chosen": w, "rejected": w[::-1] + "x"}
        for w in ("hello", "world", "stone", "river", "cloud")
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "out"
    evaluate(ckpt, f"preference:{tmp_path / 'pairs.jsonl'}", out_dir=out, ref_checkpoint=ckpt)
    r = results(out)
    task = f"preference:{tmp_path / 'pairs.jsonl'}"
    llm = LLM.load(ckpt)
    expected, _ = score_pairs(
        llm.model, llm.tokenizer, load_pairs(tmp_path / "pairs.jsonl"),
        prompt_style=resolve_style(ckpt, llm.tokenizer),
    )  # fmt: skip
    assert r[("ckpt", task, "accuracy")]["value"] == expected["accuracy"]
    assert r[("ckpt", task, "accuracy")]["n"] == 5
    # The reference is the model itself: no margin is positive.
    assert r[("ckpt", task, "reward_accuracy")]["value"] == 0.0
    rows = samples(out / "preference-pairs" / "samples.jsonl")
    assert len(rows) == 5
