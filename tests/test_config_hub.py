"""Every recipe in config_hub/ parses against its verb (config_hub/<verb>/<name>.yaml), so none
rots when a verb's flags change. Parse only: nothing is trained."""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
from pathlib import Path, PurePath

import pytest
import yaml

from lifecycle_cli import cli
from lifecycle_cli.flags import parse_flags

HUB = Path(__file__).resolve().parents[1] / "config_hub"
RECIPES = sorted(HUB.glob("*/*.yaml"))


def verb_of(recipe: Path):
    verb = cli.VERBS.get(recipe.parent.name)
    assert verb is not None and verb.target, f"{recipe}: no verb {recipe.parent.name!r}"
    return cli._resolve(verb.target)


def plain(value):
    """`value` as YAML would write it: dataclasses as mappings, paths as strings."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def assert_holds(given, parsed, where: str) -> None:
    """Every value the recipe gives is the one the verb receives."""
    if isinstance(given, dict):
        assert isinstance(parsed, dict), where
        for key, value in given.items():
            assert key in parsed, f"{where}.{key}"
            assert_holds(value, parsed[key], f"{where}.{key}")
    elif isinstance(given, str) and isinstance(parsed, list) and len(parsed) == 1:
        assert parsed == [str(Path(given))], where  # one path where a list is taken
    elif isinstance(given, str) and isinstance(parsed, str):
        assert Path(parsed) == Path(given) or parsed == given, where
    else:
        assert parsed == given, where


def commands_in(recipe: Path) -> list[list[str]]:
    """The `llmcycle ...` command lines the recipe's comments show."""
    found = []
    for line in recipe.read_text().splitlines():
        m = re.search(r"(llmcycle [^`]+)", line) if line.startswith("#") else None
        if m:
            found.append(shlex.split(m.group(1))[1:])
    return found


def test_there_are_recipes_for_the_training_verbs():
    assert {r.parent.name for r in RECIPES} >= {"pretrain", "finetune"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_against_its_verb(recipe, monkeypatch):
    fn = verb_of(recipe)
    given = yaml.safe_load(recipe.read_text())
    assert isinstance(given, dict) and given, recipe
    # Required values a recipe leaves to the command line (finetune's checkpoint_dir).
    required = [
        arg
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is inspect.Parameter.empty and name not in given
        for arg in (f"--{name}", f"given/{name}")
    ]
    prog = f"llmcycle {recipe.parent.name}"
    kwargs = parse_flags(prog, fn, [*required, "--config", str(recipe)])
    assert_holds(given, {k: plain(v) for k, v in kwargs.items()}, recipe.name)

    # The command line the recipe's comment shows parses too (from the repository root).
    monkeypatch.chdir(HUB.parent)
    commands = commands_in(recipe)
    assert commands, f"{recipe}: no `llmcycle ...` line in its comments says how to use it"
    for argv in commands:
        assert argv[0] == recipe.parent.name, argv
        assert str(recipe.relative_to(HUB.parent)) in argv, argv
        parse_flags(prog, fn, argv[1:])
