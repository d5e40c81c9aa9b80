"""Synthetic verifiable tasks: right answers, disjoint splits, the same sets for the same seed."""

import random
import subprocess
import sys
from collections import Counter

import pytest

from lifecycle_cli.data.instruct import InstructData, load_examples
from lifecycle_cli.data.synthetic import (
    HELD_OUT,
    MONTHS,
    TASKS,
    TUNING,
    exact_match,
    make_examples,
    parse_tasks,
)
from lifecycle_cli.errors import UserError


def operands(instruction: str, task: str) -> str:
    prefix = f"{task}: "
    assert instruction.startswith(prefix)
    return instruction[len(prefix) :]


def letters(instruction, task, lo=3, hi=5) -> list[str]:
    out = operands(instruction, task).split(" ")
    assert lo <= len(out) <= hi and all(len(c) == 1 and "a" <= c <= "z" for c in out)
    return out


def number(spaced_digits: str) -> int:
    digits = spaced_digits.strip().split(" ")
    assert all(len(d) == 1 and d.isdigit() for d in digits)
    return int("".join(digits))


def check_next(instruction: str, output: str) -> bool:
    terms = [number(t) for t in operands(instruction, "next").split(",")]
    steps = {b - a for a, b in zip(terms, terms[1:])}
    (step,) = steps  # an arithmetic sequence
    answer = number(output)
    return len(terms) in (3, 4) and step != 0 and answer == terms[-1] + step and answer <= 99


def check_count(instruction: str, output: str) -> bool:
    head, word = instruction.split(": ")
    (c,) = head.removeprefix("count ")
    return int(output) == word.split(" ").count(c)


def check_date(instruction: str, output: str) -> bool:
    y, m, d = (int(x) for x in operands(instruction, "date").split("-"))
    return output == f"{d} {MONTHS.split()[m - 1]} {y}"


def check_lookup(instruction: str, output: str) -> bool:
    head, table = instruction.split(": ")
    pairs = dict(item.split(" = ") for item in table.split(", "))
    return 3 <= len(pairs) <= 5 and pairs[head.removeprefix("lookup ")] == output


# An independent check of every task's answer (a new task without one fails the test below).
CHECKS = {
    "copy": lambda i, o: o.split(" ") == letters(i, "copy"),
    "reverse": lambda i, o: o.split(" ")[::-1] == letters(i, "reverse"),
    "upper": lambda i, o: [c.lower() for c in o.split(" ")] == letters(i, "upper") and o.isupper(),
    "sort": lambda i, o: (
        Counter(o.split(" ")) == Counter(letters(i, "sort"))
        and all(a <= b for a, b in zip(o.split(" "), o.split(" ")[1:]))
    ),
    "add": lambda i, o: (
        sum(number(x) for x in operands(i, "add").split("+")) == number(o)
        and all(0 <= number(x) <= 49 for x in operands(i, "add").split("+"))
    ),
    "next": check_next,
    "length": lambda i, o: int(o) == len(letters(i, "length", 3, 9)),
    "max": lambda i, o: int(o) == max(int(d) for d in operands(i, "max").split(" ")),
    "count": check_count,
    "date": check_date,
    "echo": lambda i, o: o.split(" ") == operands(i, "echo").split(" ") and len(o.split()) == 3,
    "rotate": lambda i, o: (w := letters(i, "rotate", 4, 6)) and o.split(" ") == w[1:] + w[:1],
    "flip": lambda i, o: o.split(" ")[::-1] == operands(i, "flip").split(" ") and " " in o,
    "sub": lambda i, o: (
        number(operands(i, "sub").split("-")[0]) - number(operands(i, "sub").split("-")[1])
        == number(o)
    ),
    "lookup": check_lookup,
}


def test_tuning_and_held_out_tasks_split_the_tasks():
    assert not set(TUNING) & set(HELD_OUT)
    assert set(TUNING) | set(HELD_OUT) == set(TASKS)
    assert len(TUNING) >= 6 and len(HELD_OUT) >= 4
    assert parse_tasks("held_out") == list(HELD_OUT)
    assert parse_tasks("tuning,rotate") == [*TUNING, "rotate"]


def test_every_answer_is_right():
    assert set(CHECKS) == set(TASKS)
    train, val = make_examples(list(TASKS), 150, 30, seed=0)
    for ex in train + val:
        assert ex["input"] == ""
        assert CHECKS[ex["task"]](ex["instruction"], ex["output"]), ex
    # The checks are not vacuous: an answer one off fails them.
    rng = random.Random(0)
    for name, task in TASKS.items():
        for _ in range(20):
            instruction, _, output = task(rng)
            assert CHECKS[name](instruction, output)
            assert not CHECKS[name](instruction, one_off(output)), (name, instruction)


def one_off(answer: str) -> str:
    """The answer with its number one higher (a digit: one lower when 9) or its first letter
    changed."""
    if answer.replace(" ", "").isdigit():
        n = int(answer.replace(" ", ""))
        n = n - 1 if len(answer) == 1 and n == 9 else n + 1
        return " ".join(str(n)) if " " in answer else str(n)
    first = answer[0]
    base = ord("A") if first.isupper() else ord("a")
    return chr(base + (ord(first) - base + 1) % 26) + answer[1:]


def key(ex) -> tuple[str, str]:
    return ex["instruction"], ex["input"]


def test_train_and_validation_are_disjoint_and_balanced():
    train, val = make_examples("all", 400, 60, seed=1)
    assert len(train) == 400 * len(TASKS) and len(val) == 60 * len(TASKS)
    assert len({key(ex) for ex in train}) == len(train)  # no repeats within train
    assert len({key(ex) for ex in val}) == len(val)
    assert not {key(ex) for ex in train} & {key(ex) for ex in val}
    assert Counter(ex["task"] for ex in train) == {name: 400 for name in TASKS}
    # Validation takes the tasks in turn, so any prefix measures every task.
    assert [ex["task"] for ex in val[: len(TASKS)]] == list(TASKS)
    assert [ex["task"] for ex in train[:20]] != sorted(ex["task"] for ex in train[:20])


def test_a_task_can_be_drawn_exhaustively():
    # `size` is the exact number of distinct prompts: all of them can be drawn, no more.
    for name in ("add", "next"):
        size = TASKS[name].size
        train, val = make_examples([name], size - 10, 10, seed=0)
        assert len({key(ex) for ex in train + val}) == size
        with pytest.raises(UserError, match=f"has only {size} distinct examples"):
            make_examples([name], size - 9, 10, seed=0)


def test_examples_depend_on_the_seed_only():
    a = make_examples("reverse,add", 50, 10, seed=7)
    assert make_examples("reverse,add", 50, 10, seed=7) == a
    assert make_examples("reverse,add", 50, 10, seed=8) != a
    # Validation does not move when the training size or the other tasks change.
    more = make_examples("reverse,add", 80, 10, seed=7)
    assert more[1] == a[1]
    alone = make_examples("add", 5, 10, seed=7)[1]
    assert alone == [ex for ex in a[1] if ex["task"] == "add"]
    # Each set is computed afresh in a new process too (no dependence on hash seeds).
    code = (
        "from lifecycle_cli.data.synthetic import make_examples as m; "
        "print(repr(m('reverse,add', 50, 10, seed=7)))"
    )
    env_runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    ]
    assert env_runs[0] == env_runs[1] == repr(a) + "\n"


def test_exact_match_ignores_whitespace_only():
    assert exact_match("t a c", "t a c")
    assert exact_match("  t  a\tc\n", "t a c")
    assert exact_match("\n4 2", "4 2")
    assert not exact_match("tac", "t a c")
    assert not exact_match("t a c d", "t a c")
    assert not exact_match("T A C", "t a c")
    assert not exact_match("", "t a c")


def test_parse_tasks():
    assert parse_tasks("reverse, ADD,reverse,") == ["reverse", "add"]
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks(["sort", "copy"]) == ["sort", "copy"]
    with pytest.raises(UserError, match="unknown synthetic task 'revers' \\(choose from copy"):
        parse_tasks("reverse,revers")
    with pytest.raises(UserError, match="no synthetic task named"):
        parse_tasks(" , ")
    with pytest.raises(UserError, match="unknown synthetic task 'nope'"):
        load_examples(InstructData(synthetic="nope"))


def test_export_writes_jsonl_that_loads_back(tmp_path):
    out = tmp_path / "tasks"
    cmd = [sys.executable, "-m", "lifecycle_cli.data.synthetic", "--tasks", "reverse,add"]
    done = subprocess.run(
        [*cmd, "--n_train", "40", "--n_val", "6", "--seed", "3", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote 80 examples to {out / 'train.jsonl'}" in done.stdout
    train, val = load_examples(InstructData(path=out / "train.jsonl", val_path=out / "val.jsonl"))
    assert (train, val) == make_examples(["reverse", "add"], 40, 6, seed=3)

    bad = subprocess.run(
        [*cmd, "--tasks", "nope", "--out", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown synthetic task 'nope'")
