"""A verb's flags: its function's signature as a jsonargparse parser, and every parse error as
one line.

jsonargparse reports a bad flag as a dump of many lines (the usage, the union subtypes it tried,
Python class names). Here the parser raises instead of exiting (`exit_on_error=False`), and
`Problem.describe` turns what it raised into one line naming the flag, or the YAML key and its
file, and what that flag takes. `--config` files are read first, so a missing or malformed one
is named before jsonargparse sees it. No torch here: this module builds every verb's `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Optional, Union

from lifecycle_cli.errors import UserError

CONFIG_FLAGS = ("-c", "--config")
# Parser entries that are not parameters of the verb.
_NOT_FLAGS = {"help", "config", "print_config", "print_shtab"}
_NESTED = "_ActionConfigLoad"  # jsonargparse's action for a dataclass parameter's group


def leading_parameters(fn: Callable[..., object]) -> list[str]:
    """The parameters a bare value may set: the first one, and any up to the last required one."""
    params = list(inspect.signature(fn).parameters.values())
    required = [i for i, p in enumerate(params) if p.default is inspect.Parameter.empty]
    return [p.name for p in params[: max(required, default=0) + 1]]


def values_to_flags(names: list[str], args: list[str], many: bool = False) -> list[str]:
    """`ckpt --out_dir d` -> `--checkpoint_dir ckpt --out_dir d`: values before the first flag
    fill `names` in order, LitGPT style. many: the last name takes a list, and two or more
    values left for it become one (`evaluate a b` -> `--checkpoint_dir '["a", "b"]'`). Anything
    else is left for the parser to judge."""
    flags: list[str] = []
    while args and names and not args[0].startswith("-"):
        n = 1
        if many and len(names) == 1:
            while n < len(args) and not args[n].startswith("-"):
                n += 1
        value = args[0] if n == 1 else json.dumps(args[:n])
        flags += [f"--{names[0]}", value]
        names, args = names[1:], args[n:]
    return flags + args


def _takes_list(fn: Callable[..., object], name: str) -> bool:
    annotation = str(inspect.signature(fn).parameters[name].annotation)
    return "list[" in annotation


def build_parser(prog: str, fn: Callable[..., object], help: str = ""):
    """The jsonargparse parser of `fn`'s parameters, plus `--config FILE.yaml`; it raises
    `argparse.ArgumentError` on bad input instead of exiting."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    leading = leading_parameters(fn)
    shorthand = " ".join(f"[{name.upper()}]" for name in leading)
    description = f"{help}\n\nShorthand: `{prog} {shorthand} ...` sets --{', --'.join(leading)}."
    parser = ArgumentParser(
        prog=prog, description=description, formatter_class=_help_formatter(), exit_on_error=False
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="A YAML file with values for these flags."
    )
    parser.add_function_arguments(fn, as_group=False)
    return parser


def parse_flags(
    prog: str, fn: Callable[..., object], args: list[str], help: str = ""
) -> dict[str, Any]:
    """The keyword arguments for `fn` given by the command line `args` (bare leading values
    included); anything wrong with them is a UserError of one line."""
    leading = leading_parameters(fn)
    args = values_to_flags(leading, list(args), bool(leading) and _takes_list(fn, leading[-1]))
    parser = build_parser(prog, fn, help)
    problem = Problem(parser, prog, args, read_configs(prog, args), leading)
    try:
        cfg = parser.parse_args(args)
    except argparse.ArgumentError as err:
        raise UserError(problem.describe(str(err))) from None
    for action in parser._actions:
        if type(action).__name__ == _NESTED and not _is_namespace(cfg.get(action.dest)):
            raise UserError(problem.not_a_mapping(action.dest))
    try:
        cfg = parser.instantiate(cfg)  # dataclass parameters become instances
    except (TypeError, ValueError) as err:  # a dataclass's own check failed, wrapped
        raise UserError(problem.not_instantiated(err)) from None
    return {key: value for key, value in vars(cfg).items() if key != "config"}


def read_configs(prog: str, args: Sequence[str]) -> list[tuple[str, dict]]:
    """(file as given, its YAML mapping) of each `--config` in `args`; a missing, unreadable or
    malformed file is a UserError naming it."""
    import yaml

    out = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name not in CONFIG_FLAGS:
            continue
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                raise UserError(f"{prog}: {name} needs a YAML file")
            value = args[i + 1]
        path = Path(value)
        where = f"{prog}: --config {value}"
        if not path.exists():
            raise UserError(f"{where}: no such file")
        if path.is_dir():
            raise UserError(f"{where}: is a folder, not a YAML file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"{where}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise UserError(f"{where}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(data, dict):
            found = "nothing" if data is None else f"a {type(data).__name__}"
            raise UserError(
                f"{where}: expected a mapping of flag names to values (`out_dir: out`), "
                f"found {found}"
            )
        out.append((value, data))
    return out


@dataclasses.dataclass
class Problem:
    """What went wrong in one parse, told in one line."""

    parser: Any
    prog: str
    args: list[str]
    configs: list[tuple[str, dict]]
    leading: list[str]

    def describe(self, message: str) -> str:
        """One line for jsonargparse's error `message`."""
        text = message.strip()
        if m := re.match(r"unrecognized arguments: (.*)", text, re.S):
            return self.unrecognized(m.group(1).split())
        if m := re.match(r"the following arguments are required: (.*)", text):
            names = [f"--{n.strip()}" for n in m.group(1).split(",")]
            verb = "is" if len(names) == 1 else "are"
            return f"{self.prog}: {' and '.join(names)} {verb} required ({self._help()})"
        if m := re.match(r"argument (\S+): expected one argument", text):
            flag = m.group(1).split("/")[-1]
            return f"{self.prog}: {flag} needs a value: {describe_type(self.hint(flag[2:]))}"
        keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', text)))
        if m := re.search(r"Group '([^']+)' does not accept option '([^']+)'", text):
            return self.unknown_key(m.group(1), m.group(2))
        if m := re.search(r"Option '([^']+)' is not accepted", text):
            return self.unknown_key(".".join(keys), m.group(1))
        if keys and keys[0] != "config":
            return self.bad_value(".".join(keys), text)
        return f"{self.prog}: {_squeeze(text)}"

    def unrecognized(self, tokens: list[str]) -> str:
        flag = next((t for t in tokens if t.startswith("-")), None)
        if flag is None:
            bare = ", ".join(f"--{n}" for n in self.leading)
            return (
                f"{self.prog}: unexpected value {tokens[0]!r}: values without a flag set only "
                f"{bare}, in that order; give the others as --name value"
            )
        name = flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, self._flags(), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"{self.prog}: unknown flag {name}{hint}; {self._help()}"

    def unknown_key(self, group: str, key: str) -> str:
        full = f"{group}.{key}" if group else key
        allowed = self.fields(group)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        where = self.where(full)
        owner = f"{group} takes" if group else "the keys are"
        if where.startswith("--"):  # a mapping given on the command line, e.g. --train '{...}'
            where = f"--{group}" if group else where
        return f"{self.prog}: unknown key {full}{hint} in {where}; {owner}: {', '.join(allowed)}"

    def bad_value(self, key: str, text: str) -> str:
        if key in self._groups():
            return self.not_a_mapping(key)
        reasons = [r for r in _reasons(text) if not r.startswith(("Expected a", "Not of type"))]
        if reasons:  # the value's own check failed (a dataclass __post_init__): say its words
            return f"{self.prog}: {self.label(key)}: {reasons[0]}"
        value = self.value(key, text)
        return (
            f"{self.prog}: {self.label(key)}: expected {describe_type(self.hint(key))}, got {value}"
        )

    def not_a_mapping(self, group: str) -> str:
        return (
            f"{self.prog}: {self.label(group)}: expected a mapping of its fields "
            f"({', '.join(self.fields(group))}), got {self.value(group)}"
        )

    def not_instantiated(self, err: Exception) -> str:
        """One line for a failure to build a dataclass parameter from valid-looking values."""
        chain, cause = [], err
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        reason = next((str(c) for c in chain if isinstance(c, UserError)), None)
        reason = reason or next(iter(_reasons(str(err))), _squeeze(str(err)))
        for action in self._parameters():
            cls = _dataclass_of(getattr(action, "_typehint", None))
            if cls is not None and cls.__name__ in str(err):
                return f"{self.prog}: {self.label(action.dest)}: {reason}"
        return f"{self.prog}: {reason}"

    # --- looking things up in the parser, the command line and the config files

    def hint(self, key: str) -> Any:
        """The type of the flag `key` (a dotted name); None when unknown."""
        for action in self._parameters():
            if action.dest == key:
                return getattr(action, "_typehint", None)
        head, _, rest = key.rpartition(".")
        cls = _dataclass_of(self.hint(head)) if head else None
        if cls is not None and rest in _field_types(cls):
            return _field_types(cls)[rest]
        return None

    def fields(self, group: str) -> list[str]:
        """The keys a YAML mapping for `group` ("" for the top level) may hold."""
        if group:
            cls = _dataclass_of(self.hint(group))
            if cls is not None:
                return list(_field_types(cls))
        prefix = f"{group}." if group else ""
        names = []
        for action in self._parameters():
            if action.dest.startswith(prefix):
                name = action.dest[len(prefix) :].split(".")[0]
                if name not in names:
                    names.append(name)
        return names

    def where(self, key: str) -> str:
        """`--KEY` when the command line sets `key`, else the config file that does."""
        flag, top = f"--{key}", f"--{key.split('.')[0]}"
        for arg in self.args:
            name = arg.split("=", 1)[0]
            if name in (flag, top) or flag.startswith(name + "."):
                return flag
        for file, data in reversed(self.configs):
            if _lookup(data, key) is not _MISSING:
                return file
        if self.configs:
            return self.configs[-1][0]
        return f"--{key}"

    def label(self, key: str) -> str:
        """`--KEY` or `KEY in FILE`: how the user gave `key`."""
        where = self.where(key)
        return where if where.startswith("--") else f"{key} in {where}"

    def value(self, key: str, text: str = "") -> str:
        """The value given for `key`, as the user wrote it."""
        where = self.where(key)
        if where.startswith("--"):
            for i in range(len(self.args) - 1, -1, -1):
                name, eq, value = self.args[i].partition("=")
                if name == f"--{key}":
                    if eq:
                        return repr(value)
                    if i + 1 < len(self.args):
                        return repr(self.args[i + 1])
        else:
            data = dict(self.configs)[where]
            found = _lookup(data, key)
            if found is not _MISSING:
                return repr(found)
        m = re.search(r"Got value: (.*)", text) or re.search(r"Given value: (.*)", text)
        return repr(m.group(1).strip()) if m else "another value"

    def _parameters(self) -> list[Any]:
        """The parser's actions that set the verb's parameters (no --help, --config, ...)."""
        return [
            a
            for a in self.parser._actions
            if a.dest not in _NOT_FLAGS and not a.dest.endswith(".help")
        ]

    def _groups(self) -> set[str]:
        return {a.dest for a in self._parameters() if type(a).__name__ == _NESTED}

    def _flags(self) -> list[str]:
        return [o for a in self._parameters() for o in a.option_strings if o.startswith("--")]

    def _help(self) -> str:
        return f"`{self.prog} --help` lists the flags"


def describe_type(hint: Any) -> str:
    """What a value of type `hint` looks like, in a user's words: "a number", "one of a, b"."""
    if hint is None:
        return "another value"
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]
            return describe_type(options[0]) + " or null"
        parts = [", ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                 else describe_type(a) for a in options]  # fmt: skip
        if len(options) < len(args):
            parts.append("null")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin in (list, tuple, set, Sequence, typing.Sequence):
        inner = describe_type(args[0]) if args else "values"
        return f"a list of {_plural(inner)} ([x, y])"
    if origin is dict or hint is dict:
        return "a mapping (key: value)"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "a path"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _reasons(text: str) -> list[str]:
    """The lines of a jsonargparse message that say why, without its scaffolding."""
    skip = (
        "Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value",
        "Expected a <class 'NoneType'>", "Problem with given class_path",
    )  # fmt: skip
    out = []
    for line in text.splitlines():
        line = line.strip().removeprefix("- ").strip()
        if line and not line.startswith(skip):
            out.append(line)
    return out


def _dataclass_of(hint: Any) -> Optional[type]:
    """The dataclass `hint` is, or is Optional of; else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else ()
    for candidate in (hint, *options):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def _is_namespace(value: Any) -> bool:
    from jsonargparse import Namespace

    return isinstance(value, Namespace)


def _plural(noun: str) -> str:
    for article in ("a ", "an "):
        if noun.startswith(article) and " " not in noun[len(article) :]:
            return noun[len(article) :] + "s"
    return noun


def _squeeze(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return _squeeze(where + problem, 160)


def _help_formatter() -> type:
    """jsonargparse's help layout, but keeping the description's line breaks."""
    from argparse import RawDescriptionHelpFormatter

    from jsonargparse import DefaultHelpFormatter

    return type("HelpFormatter", (DefaultHelpFormatter, RawDescriptionHelpFormatter), {})
