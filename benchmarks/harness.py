"""Run workloads, print one table, keep the rows as JSON in benchmarks/results/."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import pkgutil
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NOT_WORKLOADS = {  # minutes each, run on their own
    "harness", "__main__", "recipes", "real_check", "gguf_check", "gguf_llamacpp", "grpo",
}  # fmt: skip


@dataclass
class Row:
    """One measured figure."""

    workload: str
    value: float
    unit: str
    config: dict = field(default_factory=dict)


def venv_python(venv: Path, package: str) -> Path:
    """The python of a benchmark-only virtual environment with `package` (LitGPT, TRL), created
    on first use with the CPU torch wheel first, so the package does not pull a CUDA build."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, package], check=True)
    return python


def workloads() -> list[str]:
    """Every module in benchmarks/ that is a workload (has `run`), by name."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.ispkg)
    return [name for name in names if name not in NOT_WORKLOADS and not name.startswith("_")]


def run(names: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        rows += module.run()
    return rows


def wall_times(cmd: Sequence[str], repeats: int = 7, **kwargs) -> list[float]:
    """Wall-clock seconds of `cmd` in a fresh process, `repeats` times; it must exit 0."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, **kwargs)
        times.append(time.perf_counter() - start)
    return times


def median_and_min(workload: str, times: list[float], config: dict) -> list[Row]:
    config = {**config, "runs": len(times)}
    return [
        Row(f"{workload} (median)", round(statistics.median(times), 4), "s", config),
        Row(f"{workload} (min)", round(min(times), 4), "s", config),
    ]


def machine() -> dict:
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    torch = sys.modules.get("torch")  # reported only if a workload already imported it
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def table(rows: Sequence[Row]) -> str:
    cells = [("workload", "value", "unit", "config")]
    cells += [(r.workload, f"{r.value:g}", r.unit, json.dumps(r.config)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [
        f"{w:<{widths[0]}} | {v:>{widths[1]}} | {u:<{widths[2]}} | {c}" for w, v, u, c in cells
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def save(rows: Sequence[Row]) -> Path:
    """Write rows to results/<host>-<date>.json; rows of workloads not re-run today are kept."""
    info = machine()
    path = RESULTS / f"{info['host']}-{dt.date.today().isoformat()}.json"
    kept = []
    if path.exists():
        fresh = {r.workload for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if r["workload"] not in fresh]
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "written": dt.datetime.now().isoformat(timespec="seconds"),
        "rows": kept + [asdict(r) for r in rows],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
