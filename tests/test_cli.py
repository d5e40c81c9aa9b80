"""The `llmcycle` dispatcher: help is fast and complete, errors are one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lifecycle_cli import cli
from lifecycle_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# Runs `llmcycle ARGS` in a fresh interpreter, then prints the heavy modules it imported.
PROBE = """
import json, sys
from lifecycle_cli.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "lightning", "transformers"})
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def probe(*args: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, stdout) of `llmcycle ARGS` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
    result = json.loads(line[len("PROBE ") :])
    return result["code"], result["heavy"], proc.stdout


def llmcycle(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_verb_without_heavy_imports():
    code, heavy, out = probe("--help")
    assert code == 0
    assert heavy == []
    for verb in cli.VERBS:
        assert f"  {verb} " in out
    assert "not available yet" in out


def test_version():
    proc = llmcycle("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"llmcycle {__import__('lifecycle_cli').__version__}"


@pytest.mark.parametrize(
    "args, flags",
    [
        (["download", "--help"], ["--checkpoint_dir", "--from_dir", "--revision", "--config"]),
        (["convert", "to_hf", "--help"], ["--checkpoint_dir", "--out_dir", "--config"]),
        (["pretrain", "--help"], ["--data.path", "--train.max_steps", "--resume"]),
        (["finetune", "--help"], ["--data.synthetic", "--lora.r", "--method"]),
    ],
)
def test_verb_help_shows_flags_without_heavy_imports(args, flags):
    code, heavy, out = probe(*args)
    assert code == 0
    assert heavy == []
    for flag in flags:
        assert flag in out


def test_sub_verb_table_help():
    proc = llmcycle("convert", "--help")
    assert proc.returncode == 0
    assert "to_hf" in proc.stdout


@pytest.mark.parametrize("verb", [name for name, verb in cli.VERBS.items() if not verb.available])
def test_verb_not_landed_is_one_line_exit_2(verb):
    proc = llmcycle(verb, "some/checkpoint", "--flag", "1")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"llmcycle {verb}: not available yet")
    issue = cli.VERBS[verb].issue
    if issue is not None:
        assert f"issue #{issue}" in proc.stderr

    help_proc = llmcycle(verb, "--help")
    assert help_proc.returncode == 0
    assert "not available yet" in help_proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["no_such_verb"],
        ["convert"],
        ["convert", "to_nowhere"],
        ["download", "--bogus", "1"],
    ],
)
def test_bad_command_lines_exit_2_without_traceback(args):
    proc = llmcycle(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip()


def test_unknown_flag_is_named():
    proc = llmcycle("download", "org/name", "--no_such_flag", "1")
    assert proc.returncode == 2
    assert "--no_such_flag" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_with_unknown_key_exits_2(tmp_path):
    config = tmp_path / "download.yaml"
    config.write_text("repo_id: org/name\nno_such_key: 1\n")
    proc = llmcycle("download", "--config", str(config))
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr
    assert "Traceback" not in proc.stderr


# In-process checks of the dispatcher against a stand-in verb defined here.


@dataclass
class TrainArgs:
    lr: float = 0.1
    """Peak learning rate."""
    steps: int = 10
    """How many optimizer steps."""


CALLS: list[dict] = []


def fake_verb(
    checkpoint_dir: Path, out_dir: Path = Path("out"), train: TrainArgs = TrainArgs()
) -> None:
    """A stand-in verb.

    Args:
        checkpoint_dir: Where the model is. "fail" raises a UserError.
        out_dir: Where results go.
        train: Training settings.
    """
    if str(checkpoint_dir) == "fail":
        raise UserError(f"{checkpoint_dir}: no such checkpoint folder")
    if str(checkpoint_dir) == "interrupt":
        raise KeyboardInterrupt
    CALLS.append({"checkpoint_dir": checkpoint_dir, "out_dir": out_dir, "train": train})


@pytest.fixture
def fake_table(monkeypatch):
    CALLS.clear()
    table = {"fake": cli.Verb("A stand-in verb.", target=f"{__name__}:fake_verb")}
    monkeypatch.setattr(cli, "VERBS", table)
    return table


def test_flags_positionals_and_dotted_flags(fake_table):
    assert cli.main(["fake", "ckpt", "--train.lr", "0.5", "--out_dir", "o"]) == 0
    assert CALLS == [
        {"checkpoint_dir": Path("ckpt"), "out_dir": Path("o"), "train": TrainArgs(lr=0.5)}
    ]


def test_config_file_then_flags(fake_table, tmp_path):
    config = tmp_path / "fake.yaml"
    config.write_text("checkpoint_dir: ckpt\ntrain:\n  lr: 0.5\n  steps: 3\n")
    assert cli.main(["fake", "--config", str(config), "--train.steps", "7"]) == 0
    assert CALLS[-1]["train"] == TrainArgs(lr=0.5, steps=7)


def test_config_with_unknown_nested_key_exits_2(fake_table, tmp_path, capsys):
    config = tmp_path / "fake.yaml"
    config.write_text("checkpoint_dir: ckpt\ntrain:\n  lr: 0.5\n  no_such_key: 3\n")
    assert cli.main(["fake", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"error: llmcycle fake: unknown key train.no_such_key in {config}; train takes: lr, steps\n"
    )
    assert CALLS == []


def test_user_error_is_one_line_exit_2(fake_table, capsys):
    assert cli.main(["fake", "fail"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: fail: no such checkpoint folder\n"
    assert captured.out == ""


def test_keyboard_interrupt_exits_130(fake_table, capsys):
    assert cli.main(["fake", "interrupt"]) == 130
    assert capsys.readouterr().err.count("\n") == 1
