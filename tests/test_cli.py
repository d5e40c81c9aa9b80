"""The `llmcycle` dispatcher: help is fast and complete, errors are one line with exit code 2."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import types
import typing
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


# Every kind of bad command line, on every verb: one line naming the flag (or the YAML key and
# its file) and what it takes, exit code 2. Built from each verb's own signature, so a verb that
# gains or loses flags is still covered.


def verb_paths() -> list[tuple[str, ...]]:
    paths = []
    for name, verb in cli.VERBS.items():
        if verb.target:
            paths.append((name,))
        paths += [(name, sub) for sub, v in verb.subverbs.items() if v.target]
    return paths


def verb_function(path: tuple[str, ...]):
    verb = cli.VERBS[path[0]]
    for sub in path[1:]:
        verb = verb.subverbs[sub]
    return cli._resolve(verb.target)


def parameter_types(path: tuple[str, ...]) -> dict[str, object]:
    fn = verb_function(path)
    hints = typing.get_type_hints(fn)
    return {name: hints[name] for name in inspect.signature(fn).parameters}


def options(hint) -> tuple:
    """The types a hint allows (Optional[X] and unions unpacked)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def choices(hint) -> list[str] | None:
    """The values a Literal (or bool) flag takes, as they are written."""
    (only,) = options(hint) if len(options(hint)) == 1 else (None,)
    if only is bool:
        return ["true", "false"]
    if typing.get_origin(only) is typing.Literal:
        return [str(a) for a in typing.get_args(only)]
    return None


def first(types_: dict[str, object], wanted) -> str | None:
    return next((name for name, hint in types_.items() if wanted(hint)), None)


def numeric(hint) -> bool:
    return options(hint)[0] in (int, float) and all(o in (int, float) for o in options(hint))


def scalar(hint) -> bool:  # a value a YAML list is not
    return numeric(hint) or any(isinstance(o, type) and issubclass(o, Path) for o in options(hint))


def bad_command_lines(path: tuple[str, ...], tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(kind, arguments, what the one line must say) for each kind of mistake this verb can
    receive."""
    hints = parameter_types(path)
    params = inspect.signature(verb_function(path)).parameters
    cases = [
        ("unknown flag", ["--no_such_flag", "1"], ["unknown flag --no_such_flag", "--help"]),
    ]
    missing = tmp / "missing.yaml"
    cases.append(("missing config", ["--config", str(missing)], [f"{missing}: no such file"]))
    malformed = tmp / "malformed.yaml"
    malformed.write_text("out_dir: [1,\n")
    cases.append(
        (
            "malformed config",
            ["--config", str(malformed)],
            [str(malformed), "not valid YAML", "line"],
        )
    )
    unknown = tmp / "unknown.yaml"
    unknown.write_text("no_such_key: 1\n")
    some = [name for name in hints][:3]
    cases.append(
        (
            "unknown key",
            ["--config", str(unknown)],
            [f"unknown key no_such_key in {unknown}", *some],
        )
    )
    group = first(hints, dataclasses.is_dataclass)
    if group is not None:
        nested = tmp / "nested.yaml"
        nested.write_text(f"{group}:\n  no_such_key: 1\n")
        fields = [f.name for f in dataclasses.fields(hints[group])]
        expected = [f"unknown key {group}.no_such_key in {nested}", f"{group} takes", *fields]
        cases.append(("unknown nested key", ["--config", str(nested)], expected))
    if (flag := first(hints, numeric)) is not None:
        words = "an integer" if options(hints[flag])[0] is int else "a number"
        cases.append(("wrong type", [f"--{flag}", "abc"], [f"--{flag}: expected {words}", "'abc'"]))
    if (key := first(hints, scalar)) is not None:
        typed = tmp / "typed.yaml"
        typed.write_text(f"{key}: [1, 2]\n")
        cases.append(("wrong type in config", ["--config", str(typed)], [f"{key} in {typed}"]))
    if (flag := first(hints, choices)) is not None:
        allowed = choices(hints[flag])
        cases.append(("bad choice", [f"--{flag}", "not_a_choice"], [f"--{flag}", *allowed]))
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    if required:
        names = " and ".join(f"--{name}" for name in required)
        cases.append(("missing required", [], [f"{names} {'are' if len(required) > 1 else 'is'}"]))
    return cases


def test_every_verb_meets_every_kind_of_mistake_it_can_receive(tmp_path):
    kinds: dict[str, int] = {}
    for path in verb_paths():
        for kind, _, _ in bad_command_lines(path, tmp_path):
            kinds[kind] = kinds.get(kind, 0) + 1
    n = len(verb_paths())
    assert n >= 7  # download, pretrain, finetune, generate, chat, serve, convert to_hf
    for kind in ("unknown flag", "missing config", "malformed config", "unknown key",
                 "wrong type in config"):  # fmt: skip
        assert kinds[kind] == n, kind
    # Flags of a number type: all but download and the convert sub-verbs; of a few choices: all
    # but serve and the convert sub-verbs (whose flags are mostly paths and free text).
    converts = sum(1 for path in verb_paths() if path[0] == "convert")
    assert kinds["wrong type"] >= n - 1 - converts and kinds["bad choice"] >= n - 1 - converts


@pytest.mark.parametrize("path", verb_paths(), ids=" ".join)
def test_bad_command_lines_are_one_line_naming_the_flag_and_what_it_takes(path, tmp_path, capsys):
    for kind, args, expected in bad_command_lines(path, tmp_path):
        code = cli.main([*path, *args])
        err = capsys.readouterr().err
        assert code == 2, (kind, err)
        assert err.startswith(f"error: llmcycle {' '.join(path)}: "), (kind, err)
        assert err.count("\n") == 1 and err.endswith("\n"), (kind, err)
        for words in expected:
            assert words in err, (kind, words, err)


def test_parse_errors_come_before_any_heavy_import(tmp_path):
    """All the mistakes above, in one fresh interpreter: each exits 2 without importing torch."""
    lines = [
        [*path, *args] for path in verb_paths() for _, args, _ in bad_command_lines(path, tmp_path)
    ]
    script = (
        "import io, json, sys, contextlib\n"
        "from lifecycle_cli.cli import main\n"
        "codes = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    with contextlib.redirect_stderr(io.StringIO()):\n"
        "        codes.append(main(argv))\n"
        "heavy = {'torch', 'lightning', 'transformers'} & {m.split('.')[0] for m in sys.modules}\n"
        "print(json.dumps({'codes': codes, 'heavy': sorted(heavy)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(lines)], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2] * len(lines)
    assert result["heavy"] == []


# The README's command lines, as a new user types them (with a tiny budget added).


def test_readme_pretrain_then_finetune_with_plain_data_paths(tmp_path):
    """`llmcycle pretrain pythia-14m --data.path my_texts/ ...` (a folder, not `[my_texts/]`),
    then `llmcycle finetune CKPT --data.path alpaca.json --method lora --lora.r 16`."""
    from pydoc_data.topics import topics

    texts = tmp_path / "my_texts"
    texts.mkdir()
    for i, doc in enumerate(list(topics.values())[:40]):
        (texts / f"doc{i}.txt").write_text(doc)
    small = ["--train.global_batch_size", "2", "--train.micro_batch_size", "2",
             "--train.max_seq_length", "32", "--eval.max_iters", "1"]  # fmt: skip
    pretrain = llmcycle(
        "pretrain", "pythia-14m", "--data.path", "my_texts/", "--out_dir", "out/pythia",
        "--train.max_steps", "1", "--tokenizer.vocab_size", "300", "--data.cache_dir", "cache",
        *small, cwd=tmp_path,
    )  # fmt: skip
    assert pretrain.returncode == 0, pretrain.stderr
    final = tmp_path / "out" / "pythia" / "final"
    assert (final / "model.safetensors").is_file()
    hparams = (tmp_path / "out" / "pythia" / "hparams.yaml").read_text()
    assert "my_texts" in hparams and "doc0.txt" not in hparams

    records = [{"instruction": f"Repeat {w}", "input": "", "output": w} for w in "abcdefghij"]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    finetune = llmcycle(
        "finetune", "out/pythia/final", "--data.path", "alpaca.json", "--method", "lora",
        "--lora.r", "16", "--out_dir", "out/lora", "--train.max_steps", "1", *small,
        cwd=tmp_path,
    )  # fmt: skip
    assert finetune.returncode == 0, finetune.stderr
    assert (tmp_path / "out" / "lora" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "lora" / "lora.safetensors").is_file()  # the adapters, beside
