"""CLI start-up: wall time of `llmcycle --help` and `llmcycle download --help` in fresh processes,
next to `python -c "import torch"`, the cost the help path must avoid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import Row, median_and_min, wall_times

REPO = Path(__file__).resolve().parents[1]
REPEATS = 7


def llmcycle() -> list[str]:
    """The installed entry point beside this interpreter, else `python -m lifecycle_cli`."""
    script = Path(sys.executable).parent / "llmcycle"
    if script.exists():
        return [str(script)]
    found = shutil.which("llmcycle")
    return [found] if found else [sys.executable, "-m", "lifecycle_cli"]


def run() -> list[Row]:
    cli = llmcycle()
    config = {"command": " ".join(Path(cli[0]).name if i == 0 else a for i, a in enumerate(cli))}
    rows = []
    for args in (["--help"], ["download", "--help"]):
        name = "startup: llmcycle " + " ".join(args)
        try:
            times = wall_times([*cli, *args], REPEATS, cwd=REPO)
        except subprocess.CalledProcessError as err:  # e.g. a verb module that has not landed
            print(f"{name}: skipped, exit {err.returncode}", file=sys.stderr)
            continue
        rows += median_and_min(name, times, config)
    torch_times = wall_times([sys.executable, "-c", "import torch"], REPEATS)
    rows += median_and_min("startup: import torch", torch_times, {"command": "python -c ..."})
    return rows
