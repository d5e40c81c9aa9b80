"""Prompts for reinforcement learning (`align --objective grpo`): a JSON/JSONL file of records
with a "prompt" string (and whatever else a reward reads: "answer" for exact match, any field a
reward function wants), or the synthetic tasks' instructions with their answers.

Every record keeps its fields and gains "where" (FILE:LINE, or "synthetic prompt N (task)"),
which errors of a reward computed on it name.
"""

from __future__ import annotations

from pathlib import Path

from lifecycle_cli.data.args import PreferenceData
from lifecycle_cli.errors import UserError


def load_prompt_file(path: Path | str) -> list[dict]:
    from lifecycle_cli.data.records import read_json_records

    out = []
    for where, record in read_json_records(Path(path)):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{where}: expected a record with a "prompt" string')
        if "answer" in record and not isinstance(record["answer"], str):
            raise UserError(f'{where}: "answer" must be a string, got {record["answer"]!r:.40}')
        out.append({**record, "where": where})
    if not out:
        raise UserError(f"{path} holds no prompts")
    return out


def load_prompts(data: PreferenceData) -> tuple[list[dict], list[dict]]:
    """(train, validation) prompt records of --data.*: a file (validation from --data.val_path
    or a seeded --data.val_fraction of it) or synthetic tasks (finetune's split)."""
    if data.synthetic:
        from lifecycle_cli.data.synthetic import make_examples

        if data.path is not None or data.val_path is not None:
            raise UserError("give either --data.path or --data.synthetic, not both")
        train, val = make_examples(
            data.synthetic, data.synthetic_train_size, data.synthetic_val_size, data.seed
        )

        def records(examples: list[dict], part: str) -> list[dict]:
            return [
                {"prompt": ex["instruction"], "answer": ex["output"], "task": ex["task"],
                 "where": f"synthetic {part} prompt {i + 1} ({ex['task']})"}
                for i, ex in enumerate(examples)
            ]  # fmt: skip

        return records(train, "training"), records(val, "validation")
    if data.path is None:
        raise UserError("no data: give --data.path FILE or --data.synthetic TASKS")
    prompts = load_prompt_file(data.path)
    if data.val_path is not None:
        return prompts, load_prompt_file(data.val_path)
    from lifecycle_cli.data.instruct import split_examples

    return split_examples(prompts, data.val_fraction, data.seed, str(data.path))
