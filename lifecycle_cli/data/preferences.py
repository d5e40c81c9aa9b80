"""Preference pairs: files or synthetic tasks -> checked pairs -> token batches of chosen and
rejected responses.

A record holds `prompt`, `chosen` and `rejected`. As strings: the prompt is one user message,
formatted the way finetune formats an Alpaca instruction. As chat messages: `prompt` is the
conversation so far (a list of messages, or a string for one user message) and `chosen` /
`rejected` the final assistant turn (a string, one assistant message, or the whole conversation,
which must then start with the same messages, as in TRL's "implicit prompt" form; with no
`prompt` field the shared part of the two conversations is the prompt).

`load_pairs` reads and checks a file: every pair becomes {"prompt": str} or {"messages": [...]}
plus "chosen", "rejected" and "where" (FILE:LINE). A problem is one UserError naming the file
and line: a missing field, an empty response, identical responses.

Tokens (`PreferenceDataset`) are made exactly as finetune makes them (`instruct.prompt_and_reply`
on the pair's prompt with each response): the prompt rendered by the prompt style, each reply
with its end-of-turn marker and eos; only reply tokens count. A pair longer than
max_seq_length + 1 tokens is truncated the way finetune truncates one example, using the longer
response: the prompt gives up what it holds beyond half the budget from its start, then both
responses are cut to what is left (TRL cuts the prompt from the left, then the responses). A
prompt that alone exceeds max_seq_length is an error: no response token would fit.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lifecycle_cli.data.args import PreferenceData
from lifecycle_cli.data.instruct import (
    IGNORE_INDEX,
    JSON_SUFFIXES,
    _field,
    _keys,
    _truncate,
    normalise_record,
    prompt_and_reply,
    split_examples,
)
from lifecycle_cli.data.packed import PackedTokens
from lifecycle_cli.data.records import read_json_records
from lifecycle_cli.errors import UserError

RESPONSES = ("chosen", "rejected")


def normalise_pair(record: Any, where: str) -> dict:
    """A checked pair {"prompt": str | "messages": [...], "chosen", "rejected", "where"} (plus
    "task" when given); anything malformed is a UserError at `where`."""
    if not isinstance(record, dict):
        what = "a list" if isinstance(record, list) else type(record).__name__
        raise UserError(
            f"{where}: expected a JSON object with prompt, chosen, rejected; found {what}"
        )
    for key in RESPONSES:
        if key not in record:
            raise UserError(f"{where}: missing field {key!r} (found: {_keys(record)})")
    chat = any(isinstance(record.get(k), list) for k in ("prompt", *RESPONSES))
    if not chat:
        if "prompt" not in record:
            raise UserError(f"{where}: missing field 'prompt' (found: {_keys(record)})")
        out = {k: _field(record, k, where) for k in ("prompt", *RESPONSES)}
    else:
        prefix, chosen, rejected = _chat_parts(record, where)
        # The chosen conversation checked as finetune checks one (roles, order, contents).
        normalise_record({"messages": [*prefix, chosen]}, where, "chat")
        normalise_record({"messages": [*prefix, rejected]}, where, "chat")
        out = {"messages": prefix, "chosen": chosen["content"], "rejected": rejected["content"]}
    if out["chosen"] == out["rejected"]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same response")
    if isinstance(record.get("task"), str):
        out["task"] = record["task"]
    return {**out, "where": where}


def _chat_parts(record: dict, where: str) -> tuple[list[dict], dict, dict]:
    """(shared conversation, chosen assistant message, rejected assistant message)."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    turns = {}
    for key in RESPONSES:
        value = record[key]
        if isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        if not isinstance(value, list) or not value:
            what = "an empty list" if value == [] else type(value).__name__
            raise UserError(f"{where}: {key!r} should be a string or messages, found {what}")
        turns[key] = value
    if prompt is None:  # implicit prompt: what the two conversations share
        c, r = turns["chosen"], turns["rejected"]
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        prompt, turns = c[:n], {"chosen": c[n:], "rejected": r[n:]}
    if not isinstance(prompt, list):
        raise UserError(f"{where}: 'prompt' should be a string or messages, found "
                        f"{type(prompt).__name__}")  # fmt: skip
    finals = []
    for key in RESPONSES:
        value = turns[key]
        if len(value) > 1:  # a whole conversation: it must continue the prompt
            if value[: len(prompt)] != prompt or len(value) != len(prompt) + 1:
                raise UserError(
                    f"{where}: {key!r} should be the final assistant turn after the prompt "
                    f"(or the prompt's messages followed by it)"
                )
            value = value[len(prompt) :]
        message = value[0]
        if not isinstance(message, dict) or message.get("role") != "assistant":
            raise UserError(f"{where}: {key!r} should end with an assistant message")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: field {key!r} is empty")
        finals.append({"role": "assistant", "content": content})
    return prompt, finals[0], finals[1]


def load_pairs(path: Path | str) -> list[dict]:
    """The checked pairs of one .json/.jsonl file (see `normalise_pair`)."""
    path = Path(path)
    if path.suffix.lower() not in JSON_SUFFIXES:
        raise UserError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; preference "
            "data must be .json or .jsonl"
        )
    pairs = [normalise_pair(r, where) for where, r in read_json_records(path)]
    if not pairs:
        raise UserError(f"{path} holds no pairs")
    return pairs


def load_preference_data(data: PreferenceData) -> tuple[list[dict], list[dict]]:
    """(train, validation) pairs of --data.*: a file (validation from --data.val_path or a
    seeded --data.val_fraction of it) or synthetic tasks."""
    if data.synthetic:
        if data.path is not None or data.val_path is not None:
            raise UserError("give either --data.path or --data.synthetic, not both")
        if data.synthetic_train_size < 1 or data.synthetic_val_size < 1:
            raise UserError("--data.synthetic_train_size and synthetic_val_size must be >= 1")
        return synthetic_pairs(
            data.synthetic, data.synthetic_train_size, data.synthetic_val_size, data.seed
        )
    if data.path is None:
        raise UserError("no data: give --data.path FILE or --data.synthetic TASKS")
    pairs = load_pairs(data.path)
    if data.val_path is not None:
        return pairs, load_pairs(data.val_path)
    return split_examples(pairs, data.val_fraction, data.seed, str(data.path))


# ---------------------------------------------------------------------------------------------
# Synthetic pairs


def synthetic_pairs(
    tasks: str | Sequence[str], n_train: int, n_val: int, seed: int = 42
) -> tuple[list[dict], list[dict]]:
    """(train, validation) pairs of the synthetic tasks' examples (`synthetic.make_examples`,
    same split): chosen is the right answer, rejected `corrupt(answer)`. Each part corrupts from
    a random stream of its own: the validation pairs do not change with the training size."""
    from lifecycle_cli.data.synthetic import make_examples

    train, val = make_examples(tasks, n_train, n_val, seed)

    def pairs(examples: list[dict], part: str) -> list[dict]:
        rng = random.Random(f"llmcycle-preferences/{seed}/{part}")
        return [
            {
                "prompt": ex["instruction"],
                "chosen": ex["output"],
                "rejected": corrupt(ex["output"], rng),
                "task": ex["task"],
                "where": f"synthetic {part} pair {i + 1} ({ex['task']})",
            }
            for i, ex in enumerate(examples)
        ]

    return pairs(train, "training"), pairs(val, "validation")


def ranked_pairs(record: dict, completions: Sequence[str], scores: Sequence[float]) -> list[dict]:
    """Pairs of one prompt's sampled completions as a reward scored them (pairs from a policy's
    own samples, `align --objective reward_model --reward`): every distinct completion against
    every distinct one scored lower, the higher one chosen. Equal scores make no pair, so a
    prompt whose completions all score alike makes none. `record` is a prompt record
    (`data.prompts`: "prompt", "where", maybe "task")."""
    first: dict[str, float] = {}
    for text, value in zip(completions, scores):
        first.setdefault(text, float(value))
    out = []
    for chosen, high in first.items():
        for rejected, low in first.items():
            if high > low:
                pair = {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected,
                        "where": record["where"]}  # fmt: skip
                if isinstance(record.get("task"), str):
                    pair["task"] = record["task"]
                out.append(pair)
    return out


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one digit off by one, one letter changed, or two neighbouring
    characters swapped (a sorted answer comes out unsorted, a reversal half-done)."""
    spots = [i for i, c in enumerate(answer) if c.isalnum()]
    if not spots:
        return answer + " ?"
    for _ in range(32):
        out = list(answer)
        k = rng.randrange(len(spots))
        i = spots[k]
        if k + 1 < len(spots) and answer[spots[k + 1]] != answer[i] and rng.random() < 0.5:
            j = spots[k + 1]
            out[i], out[j] = out[j], out[i]
        else:
            out[i] = _near(answer[i], rng)
        wrong = "".join(out)
        if wrong != answer:
            return wrong
    return answer + " ?"  # cannot happen for an answer with a letter or digit


def _near(c: str, rng: random.Random) -> str:
    if c.isdigit():
        return str((int(c) + rng.choice((-1, 1))) % 10)
    letters = "abcdefghijklmnopqrstuvwxyz"
    other = rng.choice([x for x in letters if x != c.lower()])
    return other.upper() if c.isupper() else other


# ---------------------------------------------------------------------------------------------
# Tokens


def format_pair(style, pair: dict) -> tuple[str, str, str]:
    """(prompt text, chosen reply, rejected reply) as finetune would train on each response."""
    replies = []
    for key in RESPONSES:
        if "messages" in pair:
            example = {"messages": [*pair["messages"], {"role": "assistant", "content": pair[key]}]}
        else:
            example = {"instruction": pair["prompt"], "input": "", "output": pair[key]}
        prompt, reply, _ = prompt_and_reply(style, example)
        replies.append(reply)
    return prompt, replies[0], replies[1]


class PreferenceDataset:
    """Tokenized pairs served as batches of chosen rows then rejected rows.

    `get(indices)` reads global sample indices of an endless stream in the order every training
    dataset shares (`order.sample_items`; seed None: dataset order). Reference log-probs set by
    `set_reference` ride along in every batch (`ref_logps`)."""

    def __init__(
        self,
        pairs: Sequence[dict],
        tokenizer,
        style,
        max_seq_length: int,
        seed: Optional[int] = 42,
    ) -> None:
        eos = tokenizer.eos_id
        if eos is None:
            raise UserError(
                f"the tokenizer in {tokenizer.checkpoint_dir} has no eos token to end replies with"
            )
        self.pairs = list(pairs)
        self.max_seq_length, self.seed = max_seq_length, seed
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else eos
        self.n_truncated = 0  # pairs shortened to max_seq_length + 1 tokens
        budget = max_seq_length + 1
        prompts, chosen, rejected = [], [], []
        for n, pair in enumerate(self.pairs):
            prompt_text, *reply_texts = format_pair(style, pair)
            prompt = style.encode(tokenizer, prompt_text)
            if len(prompt) > max_seq_length:
                where = pair.get("where", f"pair {n + 1}")
                raise UserError(
                    f"{where}: the prompt alone is {len(prompt)} tokens, more than the "
                    f"{max_seq_length} of --train.max_seq_length; shorten it or raise the length"
                )
            replies = []
            for text in reply_texts:
                reply = tokenizer.encode(text, bos=False)
                if not reply or reply[-1] != eos:
                    reply.append(eos)
                replies.append(reply)
            longest = max(replies, key=len)
            if len(prompt) + len(longest) > budget:
                self.n_truncated += 1
                prompt, longest = _truncate(prompt, longest, budget, tokenizer.bos_id)
                replies = [r[: len(longest)] for r in replies]
            prompts.append(len(prompt))
            chosen.append(prompt + replies[0])
            rejected.append(prompt + replies[1])
        self.prompt_lengths = np.array(prompts, dtype=np.int64)
        self.chosen, self.rejected = PackedTokens(chosen, seed), PackedTokens(rejected, seed)
        self.ref_logps: Optional[np.ndarray] = None  # (pairs, 2): chosen, rejected

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (
            f"PreferenceDataset({len(self)} pairs, max_seq_length={self.max_seq_length}, "
            f"{self.n_truncated} truncated)"
        )

    def set_reference(self, logps: np.ndarray) -> None:
        """Reference log-probs (pairs, 2) of each pair's chosen and rejected response."""
        self.ref_logps = np.asarray(logps, dtype=np.float64).reshape(len(self), 2)

    def get(self, indices: Sequence[int]) -> dict:
        """{"input_ids": (2B, T), "labels": (2B, T), "n_tokens", "ref_logps": (2B,) when set}:
        rows 0..B-1 the chosen responses of the B pairs, rows B..2B-1 their rejected ones, right-
        padded to the longest row (pad id, else eos); labels are -100 on the prompt and padding."""
        return self.rows(self.chosen.rows(indices))

    def rows(self, pair_ids: Sequence[int]) -> dict:
        """The batch of these pairs (dataset order)."""
        import torch

        pair_ids = np.asarray(pair_ids, dtype=np.int64)
        seqs = [self.chosen.ids(i) for i in pair_ids] + [self.rejected.ids(i) for i in pair_ids]
        prompts = np.concatenate([self.prompt_lengths[pair_ids]] * 2)
        width = max((len(s) for s in seqs), default=1) - 1
        inputs = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
        for b, (seq, p) in enumerate(zip(seqs, prompts.tolist())):
            n, p = len(seq) - 1, max(p, 1)
            inputs[b, :n] = seq[:-1]
            labels[b, p - 1 : n] = seq[p:]
        batch = {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "n_tokens": torch.tensor(sum(len(s) - 1 for s in seqs), dtype=torch.long),
        }
        if self.ref_logps is not None:
            ref = self.ref_logps[pair_ids]
            batch["ref_logps"] = torch.from_numpy(np.concatenate([ref[:, 0], ref[:, 1]]))
        return batch
