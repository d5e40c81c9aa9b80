"""Exact match by greedy generation: `exact_match:FILE.jsonl` (records {"prompt", "answer"}) and
`synthetic:NAME` (a built-in synthetic task's validation examples, no file).

Prompts are formatted as finetune formats them (the checkpoint's prompt style; see
`Context.style`), answers generated greedily by the one decoder, 32 prompts at a time, up to
`--max_new_tokens` (default 32) and the style's stop strings, and compared after normalising
whitespace (`data.synthetic.exact_match`). `answer_rate` is also what finetune measures on its
validation examples, so both report the same number for the same model and examples.

`synthetic:NAME` takes the validation examples finetune holds out for that task with the same
seed (`--seed`, default 42 as finetune's --data.seed) and size (`--limit`, default finetune's
100): NAME is a task (reverse, add, ...), `all`, or a task set of
`data.synthetic` (e.g. tuning, held_out) where it defines one.
"""

from __future__ import annotations

from collections.abc import Sequence

from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.records import read_jsonl, text_field
from lifecycle_cli.evaluate.results import Metric, TaskResult, mean_stderr

BATCH = 32  # prompts generated together (finetune's exact match always used 32)
MAX_NEW_TOKENS = 32
SYNTHETIC_SIZE = 100  # finetune's --exact_match_samples


def seed_of(settings) -> int:
    return 42 if settings.seed is None else settings.seed  # finetune's --data.seed


def generate_answers(
    model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop=(), progress=None
) -> list[str]:
    """Greedy answers to prompt ids, `BATCH` at a time, through the one decoder."""
    from lifecycle_cli.generate import Generator, SamplingParams

    generator = Generator(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop))
    answers: list[str] = []
    for start in range(0, len(prompts), BATCH):
        batch = [list(p) for p in prompts[start : start + BATCH]]
        answers += [c.text for c in generator.generate_batch(batch, params)]
        if progress is not None:
            progress(len(batch))
    model.clear_kv_cache()
    return answers


def answer_rate(
    model, tokenizer, items: Sequence[tuple[Sequence[int], str]], max_new_tokens: int, stop=()
) -> float:
    """Share of (prompt ids, expected answer) items whose greedy answer equals the answer
    (finetune's exact-match metric)."""
    from lifecycle_cli.data.synthetic import exact_match

    answers = generate_answers(model, tokenizer, [ids for ids, _ in items], max_new_tokens, stop)
    hits = sum(exact_match(a, expected) for a, (_, expected) in zip(answers, items))
    return hits / max(1, len(items))


def synthetic_names(arg: str) -> list[str]:
    from lifecycle_cli.data import synthetic

    named_set = getattr(synthetic, arg.strip().upper(), None)
    if arg.strip().lower() not in ("all",) and isinstance(named_set, (tuple, list, frozenset)):
        return list(named_set)
    return synthetic.parse_tasks(arg)


def synthetic_records(arg: str, settings) -> list[dict]:
    """Finetune's validation examples of the synthetic task(s) `arg`, tasks taken in turn."""
    from lifecycle_cli.data.synthetic import make_examples

    n = settings.limit if settings.limit is not None else SYNTHETIC_SIZE
    names = synthetic_names(arg)
    _, val = make_examples(names, 0, -(-n // len(names)), seed_of(settings))
    return val[:n]


def parse_record(record: dict) -> dict:
    prompt, answer = text_field(record, "prompt"), record.get("answer")
    if not isinstance(answer, str):
        raise ValueError(f'field "answer" must be a string, got {answer!r:.40}')
    return {"instruction": prompt, "input": "", "output": answer}


def check_max_new_tokens(settings) -> None:
    if settings.max_new_tokens is not None and settings.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {settings.max_new_tokens}")


def check(args: list[str], settings, n_checkpoints: int) -> None:
    check_max_new_tokens(settings)
    for arg in args:
        read_jsonl(arg, parse_record)


def check_synthetic(args: list[str], settings, n_checkpoints: int) -> None:
    check_max_new_tokens(settings)
    for arg in args:
        synthetic_names(arg)


def run(ctx, args: list[str]) -> list[TaskResult]:
    return [score_records(ctx, f"exact_match:{a}", ctx.limited(read_jsonl(a, parse_record)))
            for a in args]  # fmt: skip


def run_synthetic(ctx, args: list[str]) -> list[TaskResult]:
    return [score_records(ctx, f"synthetic:{a}", synthetic_records(a, ctx.settings)) for a in args]


def score_records(ctx, name: str, records: list[dict]) -> TaskResult:
    from lifecycle_cli.data.instruct import prompt_and_reply
    from lifecycle_cli.data.synthetic import exact_match

    style = ctx.style
    texts, answers = [], []
    for r in records:
        prompt, _, answer = prompt_and_reply(style, r)
        texts.append(prompt)
        answers.append(answer)
    prompts = [style.encode(ctx.tokenizer, t) for t in texts]
    outputs = generate_answers(
        ctx.model,
        ctx.tokenizer,
        prompts,
        ctx.settings.max_new_tokens or MAX_NEW_TOKENS,
        style.stop,
        ctx.progress(name, len(prompts)),
    )
    hits = [float(exact_match(o, a)) for o, a in zip(outputs, answers)]
    samples = [
        {"prompt": p, "target": a, "output": o, "exact_match": h, **_task(r)}
        for p, a, o, h, r in zip(texts, answers, outputs, hits, records)
    ]
    return TaskResult(name, len(records), [Metric("exact_match", *mean_stderr(hits))], samples)


def _task(record: dict) -> dict:
    return {"task": record["task"]} if "task" in record else {}
