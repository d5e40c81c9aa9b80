"""The model's whole life on a laptop CPU, ending in one report: `make demo` runs this.

pretrain a tiny model on text that ships with Python -> LoRA-finetune it on the held-out
synthetic tasks (no recipe was tuned on them) -> align it with DPO on preference pairs of the same
tasks -> evaluate every stage on the same held-out sets (perplexity on text none of them trained
on, exact match per task, preference accuracy) -> out/demo/report.md, report.html and a table
in the terminal, then the commands to chat with and serve the result.

    python scripts/demo.py [--fast] [--out_dir out/demo]      (DEMO_FAST=1 is --fast)

`--fast` runs the same stages with a few steps each (about two minutes; `make test` runs it):
the numbers then show only that every stage ran.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = "held_out"  # rotate, flip, sub, lookup
HELD_OUT_TEXT = ROOT / "README.md"  # no stage trains on it


@dataclass
class Stage:
    name: str
    argv: list[str]
    run_dir: Path
    seconds: float = 0.0
    tokens_per_sec: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return shlex.join(["llmcycle", *self.argv])


def llmcycle(argv: list[str]) -> float:
    """Run one verb as a user would (its output on the terminal); its wall time in seconds."""
    print(f"\n$ {shlex.join(['llmcycle', *argv])}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lifecycle_cli", *argv], check=True, cwd=ROOT)
    return time.perf_counter() - start


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def median_tokens_per_sec(run_dir: Path) -> float | None:
    values = [float(r["tokens_per_sec"]) for r in read_csv(run_dir / "metrics.csv")
              if r.get("tokens_per_sec")]  # fmt: skip
    return statistics.median(values[len(values) // 4 :]) if values else None  # past warm-up


def column(run_dir: Path, key: str) -> list[float]:
    return [float(r[key]) for r in read_csv(run_dir / "metrics.csv") if r.get(key)]


def stages(out: Path, fast: bool) -> list[Stage]:
    pre, sft, dpo = out / "pretrain", out / "finetune", out / "align"
    quick = {
        "pretrain": ["--train.max_steps", "12", "--train.global_batch_size", "8",
                     "--train.micro_batch_size", "8", "--train.warmup_steps", "2",
                     "--eval.interval", "6", "--eval.max_iters", "2",
                     "--train.save_interval", "null"],
        "finetune": ["--train.max_steps", "40", "--eval.interval", "20",
                     "--data.synthetic_train_size", "100", "--data.synthetic_val_size", "10",
                     "--exact_match_samples", "8"],
        "align": ["--train.max_steps", "10", "--eval.interval", "5",
                  "--data.synthetic_train_size", "64", "--data.synthetic_val_size", "10",
                  "--preference_samples", "8", "--exact_match_samples", "8"],
    } if fast else {"pretrain": [], "finetune": [], "align": []}  # fmt: skip
    return [
        Stage("pretrain", ["pretrain", "--config", "config_hub/pretrain/tiny.yaml",
                           "--out_dir", str(pre), "--eval.initial_validation", "true",
                           *quick["pretrain"]], pre),
        Stage("finetune", ["finetune", str(pre / "final"), "--config",
                           "config_hub/finetune/synthetic-lora.yaml", "--data.synthetic", TASKS,
                           "--out_dir", str(sft), *quick["finetune"]], sft),
        Stage("align", ["align", str(sft / "final"), "--config",
                        "config_hub/align/synthetic-dpo.yaml", "--data.synthetic", TASKS,
                        "--out_dir", str(dpo), *quick["align"]], dpo),
    ]  # fmt: skip


def write_preference_pairs(path: Path, fast: bool) -> None:
    """The validation pairs align holds out (same seed and split), as a file evaluate reads."""
    from lifecycle_cli.data.preferences import synthetic_pairs

    _, val = synthetic_pairs(TASKS, 64 if fast else 1000, 10 if fast else 50)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in val:
            f.write(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n")


def evaluation(out: Path, checkpoints: list[Path], fast: bool) -> Stage:
    pairs = out / "data" / "preference_val.jsonl"
    write_preference_pairs(pairs, fast)
    from lifecycle_cli.data.synthetic import HELD_OUT

    tasks = f"perplexity:{HELD_OUT_TEXT.name},synthetic:{','.join(HELD_OUT)},preference:{pairs}"
    argv = ["evaluate", *map(str, checkpoints), "--tasks", tasks, "--out_dir",
            str(out / "evaluate"), "--limit", "8" if fast else "100",
            "--max_new_tokens", "20", "--prompt_style", "plain"]  # fmt: skip
    return Stage("evaluate", argv, out / "evaluate")


# ---------------------------------------------------------------------------------------------
# The report


def metric_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows (task, metric) x columns (one per checkpoint) of evaluate's results.json."""
    labels = results["labels"]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in results["results"]:
        if r["metric"] in ("pairs", "truncated"):  # counts, not measurements
            continue
        value = f"{r['value']:.4f}" if abs(r["value"]) < 1000 else f"{r['value']:,.0f}"
        if r.get("stderr") is not None:
            value += f" ± {r['stderr']:.3f}"
        kind, _, arg = r["task"].partition(":")
        task = f"{kind}:{Path(arg).name}" if "/" in arg else r["task"]
        cells.setdefault((task, r["metric"]), {})[r["checkpoint"]] = value
    header = ["task", "metric", *STAGE_NAMES[: len(labels)]]
    rows = [[t, m, *(c.get(label, "") for label in labels)] for (t, m), c in cells.items()]
    return header, rows


STAGE_NAMES = ["pretrained", "finetuned (LoRA)", "aligned (DPO)"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("\n", "⏎").replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + " --- |" * len(header), *map(line, rows)])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])  # fmt: skip


def stage_rows(done: list[Stage]) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "wall time", "tokens/s", "what it did"]
    rows = [[s.name, f"{s.seconds:.0f} s",
             f"{s.tokens_per_sec:,.0f}" if s.tokens_per_sec else "", "; ".join(s.notes)]
            for s in done]  # fmt: skip
    return header, rows


def describe_training(stage: Stage) -> None:
    stage.tokens_per_sec = median_tokens_per_sec(stage.run_dir)
    val = column(stage.run_dir, "val_loss")
    if len(val) >= 2:
        stage.notes.append(f"validation loss {val[0]:.3f} -> {val[-1]:.3f}")
    for key, label in (("exact_match", "exact match"), ("reward_accuracy", "reward accuracy"),
                       ("accuracy", "preference accuracy")):  # fmt: skip
        values = column(stage.run_dir, key)
        if len(values) >= 2:
            stage.notes.append(f"{label} {values[0]:.3f} -> {values[-1]:.3f}")


def samples(eval_dir: Path, labels: list[str], per_task: int = 2) -> list[dict]:
    """A few of each checkpoint's answers to the same held-out prompts."""
    from lifecycle_cli.evaluate.results import safe_name

    rows: dict[str, dict] = {}
    for label, stage in zip(labels, STAGE_NAMES):
        for path in sorted(eval_dir.glob(f"{safe_name(label)}/synthetic*/samples.jsonl")):
            seen: dict[str, int] = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                s = json.loads(line)
                task = s.get("task") or s["prompt"].split(":")[0]
                if seen.get(task, 0) >= per_task:
                    continue
                seen[task] = seen.get(task, 0) + 1
                row = rows.setdefault(s["prompt"], {"prompt": s["prompt"], "target": s["target"]})
                row[stage] = s["output"]
    return list(rows.values())


def image_tag(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<img alt="{html.escape(png.name)}" src="data:image/png;base64,{data}" width="480">'


def write_report(out: Path, done: list[Stage], results: dict, fast: bool) -> str:
    header, rows = metric_table(results)
    s_header, s_rows = stage_rows(done)
    examples = samples(out / "evaluate", results["labels"])
    plots = [p for s in done for p in sorted(s.run_dir.glob("*.png"))]
    chat = f"llmcycle chat {done[2].run_dir / 'final'}"
    serve = f"llmcycle serve {done[2].run_dir / 'final'} --port 8000"
    curl = ("curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
            "-d '{\"model\": \"llmcycle\", \"messages\": [{\"role\": \"user\", \"content\": "
            "\"rotate: c a t s\"}], \"max_tokens\": 20, \"temperature\": 0}'")  # fmt: skip
    md = [
        "# llmcycle demo report" + (" (fast: a few steps per stage)" if fast else ""),
        "",
        "Every stage evaluated on the same held-out sets: perplexity on text no stage trained "
        f"on (`{HELD_OUT_TEXT.name}`), exact match on validation prompts of the synthetic tasks "
        "no recipe was tuned on (rotate, flip, sub, lookup), preference accuracy on validation "
        "pairs of the same tasks (chosen: the right answer; rejected: a near miss).",
        "",
        "## Metrics",
        "",
        markdown_table(header, rows),
        "",
        "## Stages",
        "",
        markdown_table(s_header, s_rows),
        "",
        "## Curves",
        "",
        *[f"![{p.parent.name}/{p.name}]({os.path.relpath(p, out)})" for p in plots],
        "",
        "## Sample answers (greedy)",
        "",
        markdown_table(["prompt", "expected", *STAGE_NAMES],
                       [[f"`{e['prompt']}`", f"`{e['target']}`",
                         *(f"`{e.get(n, '')}`" for n in STAGE_NAMES)] for e in examples]),
        "",
        "## Commands",
        "",
        "```bash",
        *[s.command for s in done],
        "```",
        "",
        "## Talk to the result",
        "",
        "```bash",
        chat,
        serve,
        curl,
        "```",
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    write_html(out, md, plots)
    return "\n\n".join([
        text_table(header, rows), text_table(s_header, s_rows),
        f"Report: {out / 'report.md'} and {out / 'report.html'}",
        f"Chat with the aligned model:  {chat}\nServe it:  {serve}\nThen ask it:  {curl}",
    ])  # fmt: skip


def write_html(out: Path, md: list[str], plots: list[Path]) -> None:
    """report.md as a self-contained page: tables as <table>, plots inlined as data URIs."""
    by_ref = {os.path.relpath(p, out): p for p in plots}
    body, table, code = [], [], False
    for line in "\n".join(md).splitlines() + [""]:
        if line.startswith("|"):
            if "---" not in line:
                cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
                table.append([html.escape(c.strip().strip("`").replace("\\|", "|")) for c in cells])
            continue
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                                  for r in rest) + "</table>")  # fmt: skip
            table = []
        if line.startswith("```"):
            body.append("</pre>" if code else "<pre>")
            code = not code
        elif code:
            body.append(html.escape(line))
        elif line.startswith("!["):
            body.append(image_tag(by_ref[line[line.index("(") + 1 : -1]]))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
             "pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}")  # fmt: skip
    page = (f"<!doctype html><meta charset='utf-8'><title>llmcycle demo</title>"
            f"<style>{style}</style>\n" + "\n".join(body))  # fmt: skip
    (out / "report.html").write_text(page, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEMO_FAST") == "1",
                        help="a few steps per stage (about two minutes)")  # fmt: skip
    parser.add_argument("--out_dir", type=Path, default=ROOT / "out" / "demo")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for stage in stages(out, args.fast):
        stage.seconds = llmcycle(stage.argv)
        describe_training(stage)
        done.append(stage)
    checkpoints = [s.run_dir / "final" for s in done]
    ev = evaluation(out, checkpoints, args.fast)
    ev.seconds = llmcycle(ev.argv)
    ev.notes.append(f"{len(checkpoints)} checkpoints side by side")
    done.append(ev)
    results = json.loads((ev.run_dir / "results.json").read_text(encoding="utf-8"))
    print("\n" + write_report(out, done, results, args.fast))
    return 0


if __name__ == "__main__":
    sys.exit(main())
