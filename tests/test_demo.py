"""`make demo`'s script, fast: every stage runs and the report shows each one's figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fast_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DEMO_FAST": "1", "LLMCYCLE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--out_dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("pretrain", "finetune", "align"):
        assert (out / stage / "final" / "model.safetensors").is_file()
        assert (out / stage / "loss.png").is_file()
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert len(results["labels"]) == 3
    tasks = {r["task"].split(":")[0] for r in results["results"]}
    assert tasks == {"perplexity", "synthetic", "preference"}
    report = (out / "report.md").read_text()
    for heading in ("## Metrics", "## Stages", "## Curves", "## Sample answers", "## Commands"):
        assert heading in report
    assert "llmcycle align " in report and "llmcycle serve " in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == report.count("![")
    assert "<table>" in page
    # the terminal gets the same table and the commands to talk to the result
    assert "perplexity:README.md" in done.stdout and "llmcycle chat " in done.stdout
