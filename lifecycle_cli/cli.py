"""`llmcycle`: the verb table and a small dispatcher.

Each verb is a plain function named by a "module:function" string. Its signature and docstring are
its flags and help (jsonargparse, LitGPT style: `--config FILE.yaml`, dotted flags such as
`--train.lr` for dataclass parameters). A verb's module is imported only when that verb runs or its
help is asked, so `llmcycle --help` and `llmcycle <verb> --help` never import torch. `flags.py`
builds a verb's parser and turns every parse error into one line.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lifecycle_cli import __version__
from lifecycle_cli.errors import UserError

PROG = "llmcycle"


@dataclass(frozen=True)
class Verb:
    """One entry of the verb table."""

    help: str
    """One line for `llmcycle --help`."""
    target: str | None = None
    """"module:function" that runs the verb; None for a verb made of sub-verbs."""
    subverbs: dict[str, Verb] = field(default_factory=dict)
    """For verbs like `convert to_hf`: the sub-verbs, each with its own target."""


VERBS: dict[str, Verb] = {
    "download": Verb(
        "Get a model from the Hugging Face Hub or a local HF folder; `download list` shows models.",
        target="lifecycle_cli.commands.download:download",
    ),
    "pretrain": Verb(
        "Pretrain a model on text, from scratch or from a checkpoint.",
        target="lifecycle_cli.commands.pretrain:pretrain",
    ),
    "finetune": Verb(
        "Finetune a model on instructions or a task (full or LoRA).",
        target="lifecycle_cli.commands.finetune:finetune",
    ),
    "align": Verb(
        "Align a model to preferences (DPO, IPO, SimPO, ORPO).",
        target="lifecycle_cli.commands.align:align",
    ),
    "evaluate": Verb(
        "Measure a model: perplexity, multiple choice, exact match, lm-eval tasks, a judge.",
        target="lifecycle_cli.commands.evaluate:evaluate",
    ),
    "chat": Verb("Talk to a model in the terminal.", target="lifecycle_cli.commands.chat:chat"),
    "generate": Verb(
        "Generate text from a prompt.", target="lifecycle_cli.commands.generate:generate"
    ),
    "serve": Verb(
        "Serve a model over HTTP, OpenAI-compatible.", target="lifecycle_cli.commands.serve:serve"
    ),
    "convert": Verb(
        "Convert a checkpoint folder to another format.",
        subverbs={
            "to_hf": Verb(
                "Export a checkpoint as a Hugging Face folder that transformers loads.",
                target="lifecycle_cli.commands.convert:to_hf",
            ),
            "to_peft": Verb(
                "Export a LoRA run's adapters in PEFT's format, for the to_hf export of its base.",
                target="lifecycle_cli.commands.convert:to_peft",
            ),
            "to_gguf": Verb(
                "Export a checkpoint as a GGUF file for llama.cpp and Ollama.",
                target="lifecycle_cli.commands.convert:to_gguf",
            ),
            "from_gguf": Verb(
                "Import a GGUF file (llama.cpp, Ollama) as a checkpoint folder.",
                target="lifecycle_cli.commands.convert:from_gguf",
            ),
        },
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `llmcycle` with `argv` (default: the command line); return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(args, VERBS)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def dispatch(args: list[str], table: dict[str, Verb], prefix: str = PROG) -> int:
    """Find the verb named by `args[0]` in `table`, then run it (or a sub-verb) with the rest."""
    if not args or args[0] in ("-h", "--help"):
        print(_table_help(prefix, table), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version" and prefix == PROG:
        print(f"{PROG} {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in table:
        choices = ", ".join(table)
        raise UserError(f"{prefix}: unknown verb {name!r} (choose from {choices})")
    verb, prog = table[name], f"{prefix} {name}"
    if verb.subverbs:
        return dispatch(rest, verb.subverbs, prog)
    assert verb.target is not None, f"{prog} has neither a target nor sub-verbs"
    return run_function(prog, _resolve(verb.target), rest, verb.help)


def run_function(prog: str, fn: Callable[..., object], args: list[str], help: str = "") -> int:
    """Parse `args` against `fn`'s signature (plus `--config`) and call it."""
    from lifecycle_cli.flags import parse_flags

    fn(**parse_flags(prog, fn, args, help))
    return 0


def _resolve(target: str) -> Callable[..., object]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _table_help(prefix: str, table: dict[str, Verb]) -> str:
    top = prefix == PROG
    width = max(len(name) for name in table)
    lines = [f"usage: {prefix} <verb> [flags]  (`{prefix} <verb> --help` for its flags)", ""]
    if top:
        lines += ["The whole life of a language model in one command-line tool.", ""]
    lines.append("verbs:" if top else "sub-verbs:")
    for name, verb in table.items():
        lines.append(f"  {name:<{width}}  {verb.help}")
    if top:
        lines += ["", "options:", "  -h, --help  show this help", "  --version   show the version"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
