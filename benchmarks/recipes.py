"""Finetune recipes on tasks they were not tuned on: each recipe x base x synthetic task, one
`llmcycle finetune` run each (a fresh process), and a table of what they reached.

    python -m benchmarks.recipes --bases out/pretrain/tiny/final            # every held-out task
    python -m benchmarks.recipes --recipes synthetic-lora --tasks reverse,date --bases A,B
    python -m benchmarks.recipes --bases A -- --train.lr 0.001             # flags for every run
    python -m benchmarks.recipes --bases A --tasks reverse,sort,upper,add --mix   # one run of 4

Not part of `python -m benchmarks` (minutes per run). Exact match is on the run's own validation
prompts (`exact_match_samples` of them), greedy, before training and for final/ (the best
evaluation when the recipe stops early). CPU time is the run's process's user + system time
(`os.wait4`), so it stays honest when other processes share the cores; `--jobs 2` runs two at a
time (each with `--threads` torch threads).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "config_hub" / "finetune"
DEFAULT_RECIPES = ("synthetic-lora", "synthetic-full")


@dataclass
class Result:
    recipe: str
    base: str
    task: str
    before: float
    after: float
    best_step: int
    steps: int
    max_steps: int
    wall_s: float
    cpu_s: float
    tokens_per_s: float
    out_dir: str
    rc: int


def exact_matches(metrics: list[dict]) -> list[tuple[int, float]]:
    """(step, exact match) of every evaluation in a metrics.csv, in order."""
    return [(int(r["step"]), float(r["exact_match"])) for r in metrics if r.get("exact_match")]


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def chosen(metrics: list[dict], rule) -> tuple[int, float]:
    """(step, exact match) of the evaluation final/ holds: the best by the early-stopping metric
    (the earliest of ties, as `train/early_stopping.py` keeps), else the last."""
    evals = [r for r in metrics if r.get("exact_match")]
    if not evals:
        return 0, float("nan")
    pick = evals[-1]
    if rule:
        sign = 1.0 if rule == "val_loss" else -1.0
        pick = min(evals, key=lambda r: (sign * float(r[rule]), int(r["step"])))
    return int(pick["step"]), float(pick["exact_match"])


def summarise(recipe, base, task, out_dir: Path, wall, cpu, rc) -> Result:
    metrics = read_csv(out_dir / "metrics.csv")
    em = exact_matches(metrics)
    before = em[0][1] if em and em[0][0] == 0 else float("nan")
    hp = read_yaml(out_dir / "hparams.yaml")
    train = hp.get("train") or {}
    best_step, after = chosen(metrics, train.get("early_stopping"))
    trained = [r for r in metrics if r.get("train_loss")]
    steps = int(trained[-1]["step"]) if trained else 0
    rates = [float(r["tokens_per_sec"]) for r in trained if r.get("tokens_per_sec")]
    rate = sum(rates) / len(rates) if rates else 0.0
    max_steps = int(train.get("max_steps") or steps)
    return Result(
        recipe, base, task, before, after, best_step, steps, max_steps, wall, cpu, rate,
        str(out_dir), rc,
    )  # fmt: skip


def read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def launch(recipe: str, base: Path, task: str, out_dir: Path, threads: int, extra: list[str]):
    cmd = [
        sys.executable, "-m", "lifecycle_cli", "finetune", str(base),
        "--config", str(RECIPES / f"{recipe}.yaml"), "--data.synthetic", task,
        "--out_dir", str(out_dir), *extra,
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = open(out_dir / "run.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, log, time.perf_counter()


def base_name(base: Path) -> str:
    """'base60' for /work/runs/base60/final."""
    return base.parent.name if base.name == "final" else base.name


def table(results: list[Result]) -> str:
    lines = [
        "| recipe | base | task | exact match before -> after | best step / steps | wall | "
        "CPU time | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        failed = "" if r.rc == 0 else f" (exit {r.rc})"
        lines.append(
            f"| {r.recipe} | {r.base} | {r.task} | {r.before:.2f} -> {r.after:.3f}{failed} | "
            f"{r.best_step} / {r.steps} | {r.wall_s / 60:.1f} min | {r.cpu_s / 60:.1f} min | "
            f"{r.tokens_per_s:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__)
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    parser.add_argument("--bases", required=True, help="comma-separated checkpoint folders")
    parser.add_argument("--tasks", default="held_out", help="synthetic tasks (or a group)")
    parser.add_argument("--mix", action="store_true", help="the tasks together, in one run")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "recipes")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores)")
    parser.add_argument("extra", nargs="*", help="flags for every run, after --")
    args = parser.parse_args(argv)

    from lifecycle_cli.data.synthetic import parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.mix:
        tasks = [",".join(tasks)]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [
        (recipe, Path(base), task)
        for recipe in args.recipes.split(",")
        for base in args.bases.split(",")
        for task in tasks
    ]
    results: list[Result] = []
    running: dict[int, tuple] = {}
    print(f"{len(todo)} runs, {args.jobs} at a time, {threads} thread(s) each", flush=True)
    while todo or running:
        while todo and len(running) < args.jobs:
            recipe, base, task = todo.pop(0)
            out_dir = args.out / recipe / base_name(base) / task
            proc, log, start = launch(recipe, base, task, out_dir, threads, args.extra)
            running[proc.pid] = (recipe, base, task, out_dir, proc, log, start)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        recipe, base, task, out_dir, proc, log, start = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        wall, cpu = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
        result = summarise(recipe, base_name(base), task, out_dir, wall, cpu, proc.returncode)
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
    order = {(r.recipe, r.base, r.task): r for r in results}
    results = [order[k] for k in sorted(order, key=lambda k: (k[0], k[1], tasks.index(k[2])))]
    text = table(results)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.rc == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
