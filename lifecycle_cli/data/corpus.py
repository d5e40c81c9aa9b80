"""The bundled corpus: text that ships with CPython, written once as .txt files in the cache.

`--data.path` left out trains on it, so a first pretraining run needs no download. Also home of
`cache_root` and `rename_into_place`, which the token cache uses too.
"""

from __future__ import annotations

import ast
import os
import platform
import re
import shutil
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

_CORPUS_VERSION = 1


def cache_root() -> Path:
    """Where llmcycle caches data: $LLMCYCLE_CACHE, else ~/.cache/llmcycle."""
    env = os.environ.get("LLMCYCLE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmcycle"


def rename_into_place(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`; if another process got there first, keep its."""
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise


_STDLIB_SKIP = {
    "__pycache__",
    "__phello__",
    "dist-packages",
    "encodings",  # a hundred generated codec modules with the same boilerplate
    "ensurepip",
    "idlelib",
    "lib-dynload",
    "lib2to3",
    "pydoc_data",  # read as topics instead
    "site-packages",
    "tkinter",
    "turtledemo",
}


def bundled_corpus(cache_dir: Optional[Path] = None) -> list[Path]:
    """Text that ships with CPython, as .txt files in the cache (written once): each help topic
    of `pydoc_data.topics`, and for each standard-library module its docstrings in `help()`
    style (signatures with indented docstrings), read with `ast` from the .py sources (tests,
    idlelib, tkinter, encodings and site-packages left out). About 2.3 MB on CPython 3.11; the
    same files on every machine with the same Python. `cache_dir` defaults to `cache_root()`.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / "corpus" / f"cpython-{platform.python_version()}-v{_CORPUS_VERSION}"
    if not out.is_dir():
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for name, text in _corpus_documents():
                (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
            rename_into_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out.glob("*.txt"))


def _corpus_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield "topic-" + re.sub(r"[^A-Za-z0-9._-]", "_", topic), topics[topic]
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = []
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = [
            d
            for d in subfolders
            if d not in _STDLIB_SKIP and not d.startswith(("test", "config-", "."))
        ]
        rel = Path(folder).relative_to(stdlib).parts
        sources += [(*rel, n) for n in names if n.endswith(".py") and not n.startswith("test")]
    for parts in sorted(sources):
        try:
            tree = ast.parse(Path(stdlib, *parts).read_bytes())
        except (SyntaxError, ValueError, OSError):  # deliberately broken test data, odd files
            continue
        module = ".".join(parts).removesuffix(".py").removesuffix(".__init__")
        text = _module_help(module, tree)
        if text:
            yield "module-" + module, text


def _module_help(module: str, tree: ast.Module) -> str:
    """A module's docstrings, laid out like `help(module)`; "" when it has none."""
    body: list[str] = []
    _members_help(tree, "", body)
    doc = ast.get_docstring(tree)
    if not doc and not body:
        return ""
    head = f"{module}\n{'=' * len(module)}\n\n" + (f"{doc}\n\n" if doc else "")
    return head + "".join(body)


def _members_help(node: ast.Module | ast.ClassDef, indent: str, out: list[str]) -> None:
    def docblock(doc: str, indent: str) -> str:
        return "".join(f"{indent}{line}\n" if line else "\n" for line in doc.splitlines()) + "\n"

    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(child)
            if doc:
                kind = "async def" if isinstance(child, ast.AsyncFunctionDef) else "def"
                out.append(f"{indent}{kind} {child.name}({ast.unparse(child.args)})\n")
                out.append(docblock(doc, indent + "    "))
        elif isinstance(child, ast.ClassDef):
            members: list[str] = []
            _members_help(child, indent + "    ", members)
            doc = ast.get_docstring(child)
            if doc or members:
                bases = ", ".join(ast.unparse(b) for b in child.bases)
                out.append(f"{indent}class {child.name}" + (f"({bases})\n" if bases else "\n"))
                out.append(docblock(doc, indent + "    ") if doc else "")
                out.extend(members)
