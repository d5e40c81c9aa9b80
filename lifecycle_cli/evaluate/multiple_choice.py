"""`multiple_choice:FILE.jsonl`: records {"question", "choices": [...], "answer"} (the answer
is the index of the right choice, or its text). Each choice is scored as the continuation
" <choice>" of "Question: <question>\\nAnswer:" by the sum of its tokens' log-probabilities:
`acc` takes the likeliest choice, `acc_norm` the likeliest per byte of the choice (as lm-eval).

`--num_fewshot K` puts K solved examples before each question, drawn (seeded) from `--dev_path`
or, without one, from the other records of the same file.
"""

from __future__ import annotations

from lifecycle_cli.evaluate.loglik import score
from lifecycle_cli.evaluate.records import read_jsonl, text_field
from lifecycle_cli.evaluate.results import Metric, TaskResult, mean_stderr


def parse_record(record: dict) -> dict:
    question = text_field(record, "question")
    choices = record.get("choices")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise ValueError('field "choices" must be a list of at least two non-empty strings')
    answer = record.get("answer")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(
            f'field "answer" must be the index (0-{len(choices) - 1}) or the text of a choice, '
            f"got {answer!r}"
        )
    return {"question": question, "choices": choices, "answer": answer}


def check(args: list[str], settings, n_checkpoints: int) -> None:
    for arg in args:
        read_jsonl(arg, parse_record)
    if settings.dev_path is not None:
        read_jsonl(settings.dev_path, parse_record)


def question(record: dict) -> str:
    return f"Question: {record['question']}\nAnswer:"


def shots(record: dict, pool: list[dict], k: int, rng) -> str:
    others = [r for r in pool if r is not record and r["question"] != record["question"]]
    chosen = rng.sample(others, min(k, len(others)))
    return "".join(f"{question(r)} {r['choices'][r['answer']]}\n\n" for r in chosen)


def run(ctx, args: list[str]) -> list[TaskResult]:
    s = ctx.settings
    k = s.num_fewshot or 0
    out = []
    for arg in args:
        name = f"multiple_choice:{arg}"
        records = read_jsonl(arg, parse_record)
        pool = read_jsonl(s.dev_path, parse_record) if s.dev_path is not None else records
        records = ctx.limited(records)
        rng = ctx.rng(name)
        contexts = [shots(r, pool, k, rng) + question(r) if k else question(r) for r in records]
        requests, where = [], []
        for i, (r, context) in enumerate(zip(records, contexts)):
            ctx_ids = ctx.tokenizer.encode(context)
            for c in r["choices"]:
                requests.append((ctx_ids, ctx.tokenizer.encode(f" {c}", bos=False)))
                where.append(i)
        scored = score(ctx.model, requests, s.batch_size, ctx.progress(name, len(requests)))
        per: list[list[float]] = [[] for _ in records]
        for i, sc in zip(where, scored):
            per[i].append(sc.logprob)
        acc, acc_norm, samples = [], [], []
        for r, context, lls in zip(records, contexts, per):
            norm = [ll / len(f" {c}".encode()) for ll, c in zip(lls, r["choices"])]
            pick = max(range(len(lls)), key=lls.__getitem__)
            pick_norm = max(range(len(norm)), key=norm.__getitem__)
            acc.append(float(pick == r["answer"]))
            acc_norm.append(float(pick_norm == r["answer"]))
            samples.append(
                {
                    "prompt": context,
                    "choices": r["choices"],
                    "target": r["answer"],
                    "loglikelihoods": lls,
                    "prediction": pick,
                    "acc": acc[-1],
                    "acc_norm": acc_norm[-1],
                }
            )
        metrics = [Metric("acc", *mean_stderr(acc)), Metric("acc_norm", *mean_stderr(acc_norm))]
        out.append(TaskResult(name, len(records), metrics, samples))
    return out
