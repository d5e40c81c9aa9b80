"""Instruction data for finetuning: files or synthetic tasks -> masked, padded training batches.

Records are Alpaca style `{"instruction", "input" (optional), "output"}` or chat style
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` whose last message
is the assistant's reply, one per line of a `.jsonl` file or in a `.json` list. `load_examples`
reads and checks them (a bad record is a UserError naming its file and line) and splits off the
validation set; `SFTDataset` turns them into token ids with a prompt style.

How an example becomes tokens. The prompt is what the style renders before the reply:
`style.apply(instruction, input=input)` for an Alpaca record (a style without an input section,
i.e. any but alpaca, gets the input appended to the instruction after a blank line), and
`style.render(messages[:-1])` for a chat record (earlier assistant turns are part of the prompt
and are not trained on). The reply is what rendering the whole conversation adds to the prompt,
so a chat format's end-of-turn marker (ChatML's `<|im_end|>`) is learned with it (when the style
renders the reply elsewhere, the reply's text alone), then eos if the reply does not already end
with it. Prompt and reply are tokenized separately, as generation sees them.

Truncation, for examples longer than max_seq_length + 1 tokens (the model reads all but the
last): the reply keeps its beginning and the prompt its end, where the reply is asked for. The
prompt keeps at least half the budget (or all of itself when shorter); the reply takes what is
left (cut at its end, losing the eos: counted in `n_reply_truncated`); anything left over goes
back to the prompt, cut from its start (a leading bos is kept). Every shortened example is
counted in `n_truncated`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from lifecycle_cli.data.args import InstructData
from lifecycle_cli.data.packed import PackedTokens
from lifecycle_cli.data.records import read_json_records
from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from lifecycle_cli.prompts import PromptStyle
    from lifecycle_cli.tokenizer import Tokenizer

FORMATS = ("auto", "alpaca", "chat", "classification")
JSON_SUFFIXES = (".json", ".jsonl")
TABLE_SUFFIXES = (".csv", ".tsv")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


def _keys(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"


def _kind(record: Any, where: str, fmt: str) -> str:
    """'alpaca' or 'chat': what `record` is (checked against an explicit format)."""
    if not isinstance(record, dict):
        what = "a list" if isinstance(record, list) else type(record).__name__
        raise UserError(f"{where}: expected a JSON object (a record), found {what}")
    if fmt in ("alpaca", "chat"):
        return fmt
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    raise UserError(
        f"{where}: neither an Alpaca record (instruction, input, output) nor a chat record "
        f"(messages); found keys: {_keys(record)}"
    )


def _field(record: dict, key: str, where: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if key not in record:
        raise UserError(f"{where}: missing field {key!r} (found: {_keys(record)})")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} should be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return value


def normalise_record(record: Any, where: str, fmt: str = "auto") -> dict:
    """A checked record: {"instruction", "input", "output"} (plus "task" when given) or
    {"messages": [{"role", "content"}, ...]}; anything malformed is a UserError at `where`."""
    kind = _kind(record, where, fmt)
    if kind == "alpaca":
        out = {
            "instruction": _field(record, "instruction", where),
            "input": _field(record, "input", where, required=False),
            "output": _field(record, "output", where),
        }
        if isinstance(record.get("task"), str):
            out["task"] = record["task"]
        return out
    messages = record.get("messages")
    if "messages" not in record:
        raise UserError(f"{where}: missing field 'messages' (found: {_keys(record)})")
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if messages == [] else type(messages).__name__
        raise UserError(f"{where}: 'messages' should be a list of messages, found {what}")
    out_messages = []
    for i, m in enumerate(messages, 1):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise UserError(f"{at}: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{at}: unknown role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            found = "nothing" if content is None else type(content).__name__
            raise UserError(f"{at}: 'content' should be a string, found {found}")
        if role != "system" and not content.strip():
            raise UserError(f"{at}: the {role}'s content is empty")
        if role == "system" and i > 1:
            raise UserError(f"{at}: a system message may only come first")
        out_messages.append({"role": role, "content": content})
    if out_messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the last message should be the assistant's reply (the one trained on), "
            f"found {out_messages[-1]['role']!r}"
        )
    if not any(m["role"] == "user" for m in out_messages):
        raise UserError(f"{where}: no user message before the assistant's reply")
    return {"messages": out_messages}


def detect_format(data: InstructData) -> str:
    """'alpaca', 'chat' or 'classification': --data.format, else what --data.path holds
    ('alpaca' covers files that mix Alpaca and chat records, and the synthetic tasks)."""
    fmt = _check_format(data.format)
    if data.synthetic:
        if fmt == "chat" or fmt == "classification":
            raise UserError(f"--data.synthetic makes Alpaca records, not {fmt} data")
        return "alpaca"
    if data.path is None:
        raise UserError("no data: give --data.path FILE or --data.synthetic TASKS")
    suffix = Path(data.path).suffix.lower()
    if suffix in TABLE_SUFFIXES:
        if fmt in ("alpaca", "chat"):
            raise UserError(
                f"{data.path}: a {suffix} file holds classification data (text, label), "
                f"not {fmt} records; use .json or .jsonl"
            )
        return "classification"
    if suffix not in JSON_SUFFIXES:
        raise UserError(
            f"{data.path}: unsupported file type {suffix or '(no extension)'!r}; instruction "
            "data must be .json or .jsonl (classification also .csv, .tsv)"
        )
    if fmt != "auto":
        return fmt
    return _format_of(_first_record(Path(data.path)))


def _first_record(path: Path) -> Any:
    if path.suffix.lower() == ".jsonl":  # the first line tells; no need to read the whole file
        try:
            with open(path, encoding="utf-8-sig") as f:
                for line in f:
                    if line.strip():
                        try:
                            return json.loads(line)
                        except json.JSONDecodeError:
                            break  # read_json_records reports it with its line
        except (OSError, UnicodeDecodeError):
            pass
    records = read_json_records(path)
    return records[0][1] if records else None


def _format_of(first: Any) -> str:
    if isinstance(first, dict):
        if {"text", "label"} <= set(first) and not {"instruction", "messages"} & set(first):
            return "classification"
        if "messages" in first:
            return "chat"
    return "alpaca"


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r} (choose from {', '.join(FORMATS)})")
    return fmt


def read_examples(path: Path | str, fmt: str = "auto") -> list[dict]:
    """The checked records of one .json/.jsonl file (see `normalise_record`)."""
    path = Path(path)
    if path.suffix.lower() not in JSON_SUFFIXES:
        raise UserError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; instruction "
            "data must be .json or .jsonl"
        )
    out = [normalise_record(r, where, fmt) for where, r in read_json_records(path)]
    if not out:
        raise UserError(f"{path} holds no records")
    return out


def split_examples(
    examples: list, val_fraction: float, seed: int, what: str = "the data"
) -> tuple[list, list]:
    """(train, val): a seeded random `val_fraction` of `examples` held out (at least one,
    and at least one left to train on); each part keeps the file's order."""
    if not 0 < val_fraction < 1:
        raise UserError(
            f"--data.val_fraction must be between 0 and 1, got {val_fraction} "
            "(or give a validation file with --data.val_path)"
        )
    n = len(examples)
    if n < 2:
        raise UserError(
            f"{what} holds {n} example(s): too few to hold out validation examples; "
            "give more or a --data.val_path"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    held = set(random.Random(seed).sample(range(n), n_val))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    val = [ex for i, ex in enumerate(examples) if i in held]
    return train, val


def load_examples(data: InstructData) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of `data`, checked and normalised.

    Alpaca records come as {"instruction", "input", "output"} (plus "task" for synthetic
    ones), chat records as {"messages": [...]}, classification rows as {"text", "label"}.
    Validation comes from --data.val_path, the synthetic tasks' own validation examples, or a
    seeded --data.val_fraction of --data.path."""
    fmt = detect_format(data)
    if data.synthetic:
        from lifecycle_cli.data.synthetic import make_examples

        if data.path is not None:
            raise UserError("give either --data.path or --data.synthetic, not both")
        if data.val_path is not None:
            raise UserError(
                "--data.val_path with --data.synthetic: the synthetic tasks make their own "
                "validation examples (--data.synthetic_val_size); export them to JSONL to mix"
            )
        if data.synthetic_train_size < 1 or data.synthetic_val_size < 1:
            raise UserError("--data.synthetic_train_size and synthetic_val_size must be >= 1")
        return make_examples(
            data.synthetic, data.synthetic_train_size, data.synthetic_val_size, data.seed
        )
    if fmt == "classification":
        from lifecycle_cli.data.classify import read_classification

        def read(path: Path) -> list[dict]:
            return [{"text": t, "label": label} for t, label in read_classification(path)]
    else:

        def read(path: Path) -> list[dict]:
            return read_examples(path, data.format)

    examples = read(Path(data.path))
    if data.val_path is not None:
        return examples, read(Path(data.val_path))
    return split_examples(examples, data.val_fraction, data.seed, str(data.path))


# ---------------------------------------------------------------------------------------------
# Tokens


def _takes_input(style: PromptStyle) -> bool:
    """Whether the style's `apply` has its own place for an Alpaca `input`."""
    from lifecycle_cli.prompts import PromptStyle

    return type(style).apply is not PromptStyle.apply


def prompt_and_reply(style: PromptStyle, example: dict) -> tuple[str, str, str]:
    """(prompt text, reply text as trained, expected answer) of a normalised record."""
    if "messages" in example:
        context, answer = example["messages"][:-1], example["messages"][-1]["content"]
        prompt = style.render(context)
    else:
        instruction, extra = example["instruction"], example.get("input") or ""
        answer = example["output"]
        if extra and not _takes_input(style):
            instruction, extra = f"{instruction}\n\n{extra}", ""
        prompt = style.apply(instruction, input=extra) if extra else style.apply(instruction)
        context = [{"role": "user", "content": instruction}]
    # The turn as the style writes it, end-of-turn marker included; the bare answer when the
    # style does not put it right after the generation prompt.
    before = style.render(context)
    full = style.render([*context, {"role": "assistant", "content": answer}], False)
    reply = full[len(before) :] if full.startswith(before) else ""
    if not reply.strip() or answer.strip() not in reply:
        reply = answer
    return prompt, reply, answer


class SFTDataset:
    """Tokenized instruction examples served as masked, padded batches.

    `get(indices)` takes global sample indices of an endless stream, like the pretraining data:
    with a `seed`, sample i is example perm_e[i % n] of epoch e = i // n, perm_e a permutation
    derived from (seed, e) alone; with seed=None, example i % n (dataset order).
    """

    def __init__(
        self,
        examples: Sequence[dict],
        tokenizer: Tokenizer,
        style: PromptStyle,
        max_seq_length: int,
        mask_prompt: bool = True,
        seed: Optional[int] = 42,
    ) -> None:
        if max_seq_length < 1:
            raise UserError(f"the sequence length must be at least 1, got {max_seq_length}")
        eos = tokenizer.eos_id
        if eos is None:
            raise UserError(
                f"the tokenizer in {tokenizer.checkpoint_dir} has no eos token to end replies with"
            )
        self.examples = list(examples)
        self.max_seq_length, self.mask_prompt, self.seed = max_seq_length, mask_prompt, seed
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else eos
        self.n_truncated = 0  # examples shortened to max_seq_length + 1 tokens
        self.n_reply_truncated = 0  # ... whose reply lost its end (and eos)
        budget = max_seq_length + 1
        ids, prompt_lengths, self.expected = [], [], []
        for example in self.examples:
            prompt_text, reply_text, answer = prompt_and_reply(style, example)
            prompt = style.encode(tokenizer, prompt_text)
            reply = tokenizer.encode(reply_text, bos=False)
            if not reply or reply[-1] != eos:
                reply.append(eos)
            if len(prompt) + len(reply) > budget:
                self.n_truncated += 1
                prompt, reply = _truncate(prompt, reply, budget, tokenizer.bos_id)
                if reply[-1] != eos:
                    self.n_reply_truncated += 1
            ids.append(prompt + reply)
            prompt_lengths.append(len(prompt))
            self.expected.append(answer)
        self.tokens = PackedTokens(ids, seed)  # prompt + reply of each example
        self.lengths = self.tokens.lengths
        self.prompt_lengths = np.array(prompt_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        return (
            f"SFTDataset({len(self)} examples, max_seq_length={self.max_seq_length}, "
            f"mask_prompt={self.mask_prompt}, {self.n_truncated} truncated)"
        )

    def ids(self, i: int) -> np.ndarray:
        """Token ids (prompt + reply) of example `i` in dataset order."""
        return self.tokens.ids(i)

    def example_ids(self, indices: Sequence[int]) -> np.ndarray:
        """Which example each global sample index reads."""
        return self.tokens.rows(indices)

    def get(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"input_ids": (B, T), "labels": (B, T), "n_tokens": 0-d} for global sample indices.

        Row b is the example's ids[:-1] with labels ids[1:], right-padded to the longest row
        (T = its length - 1) with the pad id (else eos); labels are -100 on padding and, with
        mask_prompt, wherever the next token is still prompt. n_tokens counts non-pad inputs."""
        import torch

        rows = self.example_ids(indices)
        width = int(self.lengths[rows].max()) - 1 if len(rows) else 0
        inputs = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for b, i in enumerate(rows.tolist()):
            seq = self.ids(i)
            n = len(seq) - 1
            inputs[b, :n] = seq[:-1]
            labels[b, :n] = seq[1:]
            if self.mask_prompt:
                labels[b, : self.prompt_lengths[i] - 1] = IGNORE_INDEX
        n_tokens = int((self.lengths[rows] - 1).sum())
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "n_tokens": torch.tensor(n_tokens, dtype=torch.long),
        }

    def eval_items(self) -> list[tuple[list[int], str]]:
        """(prompt ids, expected answer) of each example in dataset order: for exact match by
        generation. The prompt is truncated as in training."""
        return [
            (self.ids(i)[: self.prompt_lengths[i]].tolist(), self.expected[i])
            for i in range(len(self))
        ]


def _truncate(
    prompt: list[int], reply: list[int], budget: int, bos_id: Optional[int]
) -> tuple[list[int], list[int]]:
    keep_reply = min(len(reply), budget - min(len(prompt), budget // 2))
    keep_prompt = min(len(prompt), budget - keep_reply)
    head = prompt[:1] if prompt and bos_id is not None and prompt[0] == bos_id else []
    if len(head) >= keep_prompt:  # no room for a bos and text: keep the prompt's end
        head = []
    kept = head + (prompt[len(prompt) - (keep_prompt - len(head)) :] if keep_prompt else [])
    return kept, reply[:keep_reply]
