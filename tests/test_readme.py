"""Every `llmcycle` command the README shows parses: its verb exists and its flags, values and
`--config` files are accepted (parsed as the verb would parse them; nothing runs)."""

import re
import shlex
from pathlib import Path

import pytest

from lifecycle_cli.cli import VERBS, _resolve
from lifecycle_cli.flags import parse_flags

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def readme_commands() -> list[str]:
    """The `llmcycle ...` lines of the README's bash blocks, continuations joined, comments cut."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "llmcycle " not in line:
                continue  # e.g. a multi-line `python -c "..."`
            words = shlex.split(line, comments=True)
            while words and ASSIGNMENT.match(words[0]):  # HF_TOKEN=... llmcycle ...
                words = words[1:]
            if words[:1] == ["llmcycle"]:
                commands.append(shlex.join(words))
    return commands


def test_the_readme_shows_commands_of_every_verb():
    verbs = {shlex.split(c)[1] for c in readme_commands()}
    assert verbs >= set(VERBS)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # `--config config_hub/...` as a user in a clone types it
    words = shlex.split(command)[1:]
    table, prog = VERBS, "llmcycle"
    while True:
        name, words = words[0], words[1:]
        verb, prog = table[name], f"{prog} {name}"
        if not verb.subverbs:
            break
        table = verb.subverbs
    if name == "download" and words[:1] == ["list"]:
        return  # `download list` is a sub-command of download's own
    if any(w in ("-h", "--help") for w in words):
        return
    parse_flags(prog, _resolve(verb.target), words, verb.help)
