"""What a task returns, and how results are written: `results.json`, each task's
`samples.jsonl`, and the printed table (a column per checkpoint)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class Metric:
    name: str
    value: float
    stderr: Optional[float] = None  # standard error of the mean, where it is defined


@dataclass
class TaskResult:
    task: str
    n: int  # examples scored
    metrics: list[Metric]
    samples: list[dict] = field(default_factory=list)  # one row per example

    def metric(self, name: str) -> float:
        return next(m.value for m in self.metrics if m.name == name)


def mean_stderr(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """The mean and its standard error (sample standard deviation / sqrt(n), as lm-eval)."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def folder_name(task: str) -> str:
    """A task name as a folder name: 'multiple_choice:data/mc.jsonl' -> 'multiple_choice-mc'."""
    kind, _, arg = task.partition(":")
    stem = Path(arg).stem if ("/" in arg or "." in arg) else arg
    return safe_name(f"{kind}-{stem}")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


def labels(checkpoints: Sequence[Path]) -> list[str]:
    """Short distinct names for checkpoint folders: the shortest path tails that differ."""
    parts = [Path(os.path.abspath(c)).parts for c in checkpoints]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{n}" for i, n in enumerate(names)]


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def write_samples(path: Path, samples: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def result_rows(names: Sequence[str], per_checkpoint: Sequence[Sequence[TaskResult]]) -> list:
    """The flat rows of results.json: one per checkpoint, task and metric."""
    rows = []
    for name, results in zip(names, per_checkpoint):
        for r in results:
            for m in r.metrics:
                rows.append(
                    {
                        "checkpoint": name,
                        "task": r.task,
                        "metric": m.name,
                        "value": m.value,
                        "stderr": m.stderr,
                        "n": r.n,
                    }
                )
    return rows


def _cell(m: Optional[Metric]) -> str:
    if m is None:
        return "-"
    if math.isnan(m.value):
        return "nan"
    text = f"{m.value:.4f}" if abs(m.value) < 1e4 else f"{m.value:.4g}"
    return text + (f" ± {m.stderr:.4f}" if m.stderr is not None else "")


def format_table(columns: Sequence[str], per_checkpoint: Sequence[Sequence[TaskResult]]) -> str:
    """Rows task/metric/n, one value column per checkpoint."""
    keys: list[tuple[str, str]] = []
    found: dict[tuple[int, str, str], Metric] = {}
    counts: dict[str, int] = {}
    for c, results in enumerate(per_checkpoint):
        for r in results:
            counts.setdefault(r.task, r.n)
            for m in r.metrics:
                if (r.task, m.name) not in keys:
                    keys.append((r.task, m.name))
                found[(c, r.task, m.name)] = m
    header = ["task", "metric", "n", *columns]
    body = [
        [task, metric, str(counts[task])]
        + [_cell(found.get((c, task, metric))) for c in range(len(columns))]
        for task, metric in keys
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return " | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in body)])
