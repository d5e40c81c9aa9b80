"""Run task specs on checkpoints: load each checkpoint once, run its tasks, then write
results.json, each task's samples.jsonl and print one table with a column per checkpoint.

A task kind is a function `run(ctx, args) -> list[TaskResult]` in a module of this package
(args: the spec arguments of consecutive tasks of that kind, so lm-eval gets its tasks in one
call); optionally, beside it, `check(args, settings, n_checkpoints)` that refuses bad input
before any model loads, and `finish(per_checkpoint, settings)` for what compares checkpoints
(pairwise judging).
"""

from __future__ import annotations

import importlib
import random
import sys
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from lifecycle_cli.evaluate.args import Settings
from lifecycle_cli.evaluate.results import (
    TaskResult,
    folder_name,
    format_table,
    labels,
    result_rows,
    safe_name,
    write_json_atomic,
    write_samples,
)
from lifecycle_cli.evaluate.spec import TaskSpec

# kind -> (module, name of its run function; `check`/`finish` carry the same suffix)
KINDS = {
    "perplexity": ("perplexity", "run"),
    "multiple_choice": ("multiple_choice", "run"),
    "exact_match": ("exact_match", "run"),
    "synthetic": ("exact_match", "run_synthetic"),
    "preference": ("preference_task", "run"),
    "judge": ("judge", "run"),
    "lm_eval": ("harness", "run"),
}


def task_function(kind: str, role: str = "run") -> Optional[Callable[..., Any]]:
    """The `role` function ('run', 'check' or 'finish') of a task kind, None if it has none."""
    module, run_name = KINDS[kind]
    mod = importlib.import_module(f"lifecycle_cli.evaluate.{module}")
    return getattr(mod, run_name.replace("run", role, 1), None)


class Context:
    """One model and the run's settings, as the tasks see them: a loaded checkpoint
    (`Context.load`), or the model a training run is training (`--eval.tasks`)."""

    def __init__(
        self, checkpoint_dir: Path, settings: Settings, model, tokenizer, style=None,
        show_progress: bool = True,
    ) -> None:  # fmt: skip
        self.checkpoint_dir = Path(checkpoint_dir)
        self.settings = settings
        self.model, self.tokenizer = model, tokenizer
        self.show_progress = show_progress
        if style is not None:  # else the checkpoint's, on first use
            self.style = style

    @classmethod
    def load(
        cls, checkpoint_dir: Path, settings: Settings, device: str, precision, quantize=None
    ) -> Context:
        from lifecycle_cli.api import load_for_inference

        llm = load_for_inference(checkpoint_dir, device, precision, quantize)
        llm.model.eval()
        return cls(checkpoint_dir, settings, llm.model, llm.tokenizer)

    @cached_property
    def style(self):
        """The prompt style finetune trained with: --prompt_style, else the checkpoint's saved
        style or its chat template, else alpaca (see train/tasks/sft.choose_style)."""
        from lifecycle_cli.train.tasks.sft import choose_style

        return choose_style(self.settings.prompt_style, self.checkpoint_dir, self.tokenizer)

    def rng(self, task: str) -> random.Random:
        seed = 42 if self.settings.seed is None else self.settings.seed
        return random.Random(f"{seed}/{task}")

    def progress(self, desc: str, total: int) -> Callable[[int], None]:
        """A bar on stderr; call the result with how many items were done."""
        from tqdm.auto import tqdm

        if not self.show_progress:
            return lambda n: None

        bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False, delay=0.5)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance

    def limited(self, items: Sequence) -> list:
        limit = self.settings.limit
        return list(items if limit is None else items[:limit])


def groups(specs: Sequence[TaskSpec]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        if out and out[-1][0] == spec.kind:
            out[-1][1].append(spec.arg)
        else:
            out.append((spec.kind, [spec.arg]))
    return out


def check_before_loading(specs: Sequence[TaskSpec], settings: Settings, n_checkpoints: int):
    """What can be refused before a model loads (missing extras, files, flags)."""
    for kind, args in groups(specs):
        check = task_function(kind, "check")
        if check is not None:
            check(args, settings, n_checkpoints)


def run(
    checkpoints: Sequence[Path],
    specs: Sequence[TaskSpec],
    settings: Settings,
    out_dir: Optional[Path],
    device: str = "auto",
    precision: Optional[str] = None,
    say: Callable[[str], None] = print,
    quantize: Optional[str] = None,
) -> list[list[TaskResult]]:
    """Evaluate every checkpoint on every task; the results per checkpoint."""
    import torch

    check_before_loading(specs, settings, len(checkpoints))
    names = labels(checkpoints)
    per_checkpoint: list[list[TaskResult]] = []
    for checkpoint in checkpoints:
        torch.manual_seed(42 if settings.seed is None else settings.seed)
        ctx = Context.load(checkpoint, settings, device, precision, quantize)
        results: list[TaskResult] = []
        for kind, args in groups(specs):
            results += task_function(kind)(ctx, args)
        per_checkpoint.append(results)
        del ctx
    for kind, _ in groups(specs):
        finish = task_function(kind, "finish")
        if finish is not None:
            finish(per_checkpoint, settings)
    contamination = None
    if settings.contamination_of:
        contamination = contamination_report(per_checkpoint[0], settings)
        say(format_contamination(contamination, settings))
    if out_dir is not None:
        out_dir = Path(out_dir)
        for name, results in zip(names, per_checkpoint):
            base = out_dir if len(checkpoints) == 1 else out_dir / safe_name(name)
            for r in results:
                write_samples(base / folder_name(r.task) / "samples.jsonl", r.samples)
        write_json_atomic(
            out_dir / "results.json",
            {
                "checkpoints": [str(c) for c in checkpoints],
                "labels": names,
                "tasks": [s.name for s in specs],
                "settings": settings.as_dict(),
                "results": result_rows(names, per_checkpoint),
                **({"contamination": contamination} if contamination is not None else {}),
            },
        )
    say(format_table(names, per_checkpoint))
    if out_dir is not None:
        say(f"Results in {Path(out_dir) / 'results.json'}")
    return per_checkpoint


TEXT_FIELDS = ("prompt", "question", "instruction", "target", "reference", "chosen")


def example_text(sample: dict) -> str:
    """The words of one evaluation example as its samples.jsonl row holds them (the prompt and
    the expected answer; an lm-eval row's document fields)."""
    doc = sample.get("doc")
    values = doc.values() if isinstance(doc, dict) else (sample.get(k) for k in TEXT_FIELDS)
    return " ".join(v for v in values if isinstance(v, str))


def contamination_report(results: Sequence[TaskResult], settings: Settings) -> list[dict]:
    """Per task, how many of its examples share a long n-gram with the --contamination_of
    corpus (tasks without example texts, such as perplexity, are left out)."""
    from lifecycle_cli.curate.contamination import report

    texts = {r.task: [example_text(s) for s in r.samples] for r in results}
    texts = {task: t for task, t in texts.items() if any(t)}
    paths = [str(p) for p in settings.contamination_of or []]
    return report(texts, paths, settings.contamination_n)


def format_contamination(rows: list[dict], settings: Settings) -> str:
    corpus = ", ".join(str(p) for p in settings.contamination_of or [])
    lines = [f"Contamination ({settings.contamination_n}-gram overlap with {corpus}):"]
    for r in rows:
        lines.append(
            f"  {r['task']}: {r['contaminated']} of {r['examples']} examples "
            f"({r['share']:.1%})"
            + (f", {r['too_short']} too short to check" if r.get("too_short") else "")
        )
    return "\n".join(lines)
