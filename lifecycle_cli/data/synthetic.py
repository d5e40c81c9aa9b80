"""Synthetic tasks whose answers can be checked exactly: finetuning made measurable in minutes.

Each task writes a short instruction with its operands and an answer. Most put one character
per "word" ("reverse: c a t" -> "t a c", "add: 1 7 + 2 5" -> "4 2"): a byte-level BPE then gives
each letter or digit a token of its own (" a", " 7"). Three do not (`date`, `echo`, `flip`):
their words are split however the tokenizer merges them, as a user's own text would be. The
`input` field of the Alpaca records is left empty, so every prompt style renders a task the
same way.

The tasks are split in two. Recipes (`config_hub/finetune/`) are chosen on `TUNING` only;
`HELD_OUT` (one task of each kind: rearranging characters, rearranging unspaced words,
arithmetic, lookup) measures whether a recipe learns a task it was not chosen on.

`make_examples` draws a task's validation examples first and its training examples after them,
from a random stream of its own (seeded by the seed and the task's name): the validation set
does not change when the training size or the other tasks change, and no (instruction, input)
pair is in both sets or twice in one.

Export to JSONL (readable by `--data.path`):

    python -m lifecycle_cli.data.synthetic --tasks reverse,add --n_train 1000 --n_val 100 --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lifecycle_cli.errors import UserError

Example = tuple[str, str, str]  # (instruction, input, output)
LETTERS = string.ascii_lowercase


def spaced(chars) -> str:
    """'cat' -> 'c a t': one token per character for a byte-level BPE."""
    return " ".join(str(c) for c in chars)


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _words(lo: int, hi: int) -> int:
    return sum(len(LETTERS) ** k for k in range(lo, hi + 1))


def _copy(rng: random.Random) -> Example:
    w = _word(rng)
    return f"copy: {spaced(w)}", "", spaced(w)


def _reverse(rng: random.Random) -> Example:
    w = _word(rng)
    return f"reverse: {spaced(w)}", "", spaced(w[::-1])


def _upper(rng: random.Random) -> Example:
    w = _word(rng)
    return f"upper: {spaced(w)}", "", spaced(w.upper())


def _sort(rng: random.Random) -> Example:
    w = _word(rng)
    return f"sort: {spaced(w)}", "", spaced(sorted(w))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add: {spaced(str(a))} + {spaced(str(b))}", "", spaced(str(a + b))


def _next_sequences() -> list[tuple[int, ...]]:
    # 3 or 4 terms, then the answer; steps +-1..9; every number in 0..99.
    out = []
    for shown in (3, 4):
        for step in [*range(-9, 0), *range(1, 10)]:
            for start in range(100):
                terms = tuple(start + k * step for k in range(shown + 1))
                if all(0 <= t <= 99 for t in terms):
                    out.append(terms)
    return out


_NEXT = _next_sequences()


def _next(rng: random.Random) -> Example:
    *shown, answer = rng.choice(_NEXT)
    return f"next: {', '.join(spaced(str(t)) for t in shown)}", "", spaced(str(answer))


def _length(rng: random.Random) -> Example:
    w = _word(rng, 3, 9)
    return f"length: {spaced(w)}", "", str(len(w))


def _max(rng: random.Random) -> Example:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"max: {spaced(digits)}", "", str(max(digits))


def _count(rng: random.Random) -> Example:
    # A small alphabet so that counts from 0 to 8 all occur.
    w = "".join(rng.choice("abcde") for _ in range(rng.randint(5, 8)))
    c = rng.choice("abcde")
    return f"count {c}: {spaced(w)}", "", str(w.count(c))


MONTHS = "january february march april may june july august september october november december"


def _date(rng: random.Random) -> Example:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"date: {y}-{m:02d}-{d:02d}", "", f"{d} {MONTHS.split()[m - 1]} {y}"


def _echo(rng: random.Random) -> Example:
    words = [_word(rng) for _ in range(3)]
    return f"echo: {' '.join(words)}", "", " ".join(words)


def _rotate(rng: random.Random) -> Example:
    w = _word(rng, 4, 6)
    return f"rotate: {spaced(w)}", "", spaced(w[1:] + w[0])


def _flip(rng: random.Random) -> Example:
    words = [_word(rng) for _ in range(3)]
    return f"flip: {' '.join(words)}", "", " ".join(words[::-1])


def _sub(rng: random.Random) -> Example:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return f"sub: {spaced(str(a))} - {spaced(str(b))}", "", spaced(str(a - b))


def _lookup(rng: random.Random) -> Example:
    keys = rng.sample(LETTERS, rng.randint(3, 5))
    values = [rng.randint(0, 9) for _ in keys]
    k = rng.randrange(len(keys))
    table = ", ".join(f"{key} = {v}" for key, v in zip(keys, values))
    return f"lookup {keys[k]}: {table}", "", str(values[k])


def _lookups() -> int:
    # ordered distinct keys, a digit each, one key asked
    total = 0
    for k in range(3, 6):
        perms = 1
        for i in range(k):
            perms *= len(LETTERS) - i
        total += perms * 10**k * k
    return total


@dataclass(frozen=True)
class Task:
    """A synthetic task: `task(rng)` -> (instruction, input, output); `size`: how many distinct
    (instruction, input) pairs it can produce."""

    name: str
    make: Callable[[random.Random], Example]
    size: int
    about: str

    def __call__(self, rng: random.Random) -> Example:
        return self.make(rng)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", _copy, _words(3, 5), "repeat a 3-5 letter word"),
        Task("reverse", _reverse, _words(3, 5), "a 3-5 letter word backwards"),
        Task("upper", _upper, _words(3, 5), "a 3-5 letter word in capitals"),
        Task("sort", _sort, _words(3, 5), "the letters of a 3-5 letter word in order"),
        Task("add", _add, 50 * 50, "the sum of two numbers 0-49"),
        Task("next", _next, len(_NEXT), "the next number of an arithmetic sequence"),
        Task("length", _length, _words(3, 9), "how many letters a 3-9 letter word has"),
        Task("max", _max, 10**3 + 10**4 + 10**5, "the largest of 3-5 digits"),
        Task("count", _count, 5 * sum(5**k for k in range(5, 9)), "how often a letter occurs"),
        Task("date", _date, 100 * 12 * 28, "an ISO date written out: 5 march 2024 (unspaced)"),
        Task("echo", _echo, _words(3, 5) ** 3, "three unspaced words repeated"),
        Task("rotate", _rotate, _words(4, 6), "a 4-6 letter word, first letter moved to the end"),
        Task("flip", _flip, _words(3, 5) ** 3, "three unspaced words in reverse order"),
        Task("sub", _sub, 100 * 101 // 2, "the difference of two numbers 0-99, never negative"),
        Task("lookup", _lookup, _lookups(), "the value of one key in a table of 3-5 keys"),
    )
}

TUNING: tuple[str, ...] = (
    "copy", "reverse", "upper", "sort", "add", "next", "length", "max", "count", "date", "echo"
)  # fmt: skip
"""Tasks recipes may be chosen on."""
HELD_OUT: tuple[str, ...] = ("rotate", "flip", "sub", "lookup")
"""Tasks no recipe was chosen on: what a recipe reaches on them is what a user can expect."""
GROUPS = {"all": tuple(TASKS), "tuning": TUNING, "held_out": HELD_OUT}


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from 'reverse,add' (or a list); 'all', 'tuning' and 'held_out' name groups.
    Order kept, repeats dropped; an unknown name is a UserError listing the tasks."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in names:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name in GROUPS:
            out += [n for n in GROUPS[name] if n not in out]
            continue
        if name not in TASKS:
            raise UserError(
                f"unknown synthetic task {name!r} (choose from {', '.join(TASKS)}, "
                f"or a group: {', '.join(GROUPS)})"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(
            f"no synthetic task named (choose from {', '.join(TASKS)}, or {', '.join(GROUPS)})"
        )
    return out


def make_examples(
    tasks: str | Sequence[str], n_train: int, n_val: int, seed: int = 42
) -> tuple[list[dict], list[dict]]:
    """(train, validation) Alpaca records {"instruction", "input", "output", "task"}: `n_train`
    and `n_val` per task. No (instruction, input) pair is repeated within or across the two sets.
    Training examples are shuffled; validation examples take the tasks in turn (so any prefix
    of them covers every task about equally). The same arguments give the same examples."""
    names = parse_tasks(tasks)
    if n_train < 0 or n_val < 0:
        raise UserError(f"synthetic set sizes must be >= 0, got {n_train} and {n_val}")
    train: list[dict] = []
    val_by_task: list[list[dict]] = []
    for name in names:
        task = TASKS[name]
        if n_train + n_val > task.size:
            raise UserError(
                f"synthetic task {name!r} has only {task.size} distinct examples; asked for "
                f"{n_train} training + {n_val} validation"
            )
        rng = random.Random(f"llmcycle-synthetic/{seed}/{name}")
        seen: set[tuple[str, str]] = set()
        val_by_task.append(_draw(task, rng, seen, n_val))
        train += _draw(task, rng, seen, n_train)
    random.Random(f"llmcycle-synthetic/{seed}/order").shuffle(train)
    val = [ex for group in zip(*val_by_task) for ex in group]  # all groups have n_val items
    return train, val


def _draw(task: Task, rng: random.Random, seen: set[tuple[str, str]], n: int) -> list[dict]:
    """`n` new examples of `task` whose (instruction, input) is not in `seen` (added to it)."""
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:  # cannot happen while `task.size` is right
            raise RuntimeError(f"synthetic task {task.name!r} ran out of distinct examples")
        instruction, inp, output = task(rng)
        if (instruction, inp) not in seen:
            seen.add((instruction, inp))
            out.append(
                {"instruction": instruction, "input": inp, "output": output, "task": task.name}
            )
    return out


def exact_match(prediction: str, expected: str) -> bool:
    """Whether an answer equals the expected one, up to whitespace at the ends and runs of
    whitespace inside ("t a c\\n" matches "t a c"; "tac" does not)."""
    return prediction.split() == expected.split()


def write_jsonl(examples: Sequence[dict], path: Path | str) -> Path:
    """Write one JSON record per line (UTF-8); parent folders are made. The path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lifecycle_cli.data.synthetic",
        description="Write synthetic task examples as train.jsonl and val.jsonl (Alpaca records).",
        epilog="tasks: " + "; ".join(f"{t.name}: {t.about}" for t in TASKS.values()),
    )
    parser.add_argument(
        "--tasks", required=True, help="comma-separated task names, or all, tuning, held_out"
    )
    parser.add_argument("--n_train", type=int, default=2000, help="training examples per task")
    parser.add_argument("--n_val", type=int, default=100, help="validation examples per task")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        train, val = make_examples(args.tasks, args.n_train, args.n_val, args.seed)
        for name, examples in (("train.jsonl", train), ("val.jsonl", val)):
            path = write_jsonl(examples, args.out / name)
            print(f"wrote {len(examples)} examples to {path}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
