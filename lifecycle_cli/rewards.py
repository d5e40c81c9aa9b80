"""Rewards for GRPO (`align --objective grpo --reward SPEC`): a weighted sum of one or more of

- `exact_match`: 1 if the completion equals the record's "answer" (whitespace-normalised, as
  `evaluate`'s exact match), else 0;
- `synthetic`: the synthetic task's checker (records of `--data.synthetic`, or any record with a
  "task" naming one and its "answer");
- `format`: 1 if the completion ended by itself (not cut at --max_new_tokens) on one non-empty
  line, else 0;
- `FILE.py:FUNCTION`: a Python function called as FUNCTION(prompt=..., completion=...,
  record=...) returning a number; whatever it raises stops the run naming the record;
- a reward model folder (`align --objective reward_model`): its score of prompt + completion.

SPEC is comma-separated, each item optionally `=WEIGHT` (default 1): `exact_match,format=0.1`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lifecycle_cli.errors import UserError

BUILT_IN = ("exact_match", "synthetic", "format")


@dataclass
class Reward:
    spec: str  # as given, without the weight
    name: str  # its metrics' column name: reward_<name>_mean
    weight: float
    kind: str  # one of BUILT_IN, "function", "model"
    fn: Optional[Callable[..., Any]] = None
    folder: Optional[Path] = None
    model: Any = None  # the loaded RewardModel (`load_models`)


def parse_rewards(spec: Optional[str]) -> list[Reward]:
    if not spec or not spec.strip():
        raise UserError(
            "--objective grpo needs --reward: exact_match, synthetic, format, FILE.py:FUNCTION "
            "or a reward model folder (comma-separated, each optionally =WEIGHT)"
        )
    out: list[Reward] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        what, weight = item, 1.0
        if "=" in item:
            what, _, text = item.rpartition("=")
            try:
                weight = float(text)
            except ValueError:
                raise UserError(f"--reward {item}: the weight {text!r} is not a number") from None
            if not math.isfinite(weight):
                raise UserError(f"--reward {item}: the weight must be finite")
        out.append(_one(what.strip()))
        out[-1].weight = weight
    names = [r.name for r in out]
    for r in out:
        if names.count(r.name) > 1:
            raise UserError(f"--reward: {r.name} is given twice; give it once with a weight")
    return out


def _one(what: str) -> Reward:
    if what in BUILT_IN:
        return Reward(what, what, 1.0, what)
    file, sep, fn_name = what.rpartition(":")
    if sep and file.endswith(".py"):
        return Reward(what, fn_name, 1.0, "function", fn=load_function(Path(file), fn_name))
    folder = Path(what)
    if folder.is_dir():
        from lifecycle_cli.reward_model import is_reward_model

        if not is_reward_model(folder):
            raise UserError(
                f"--reward {what}: not a reward model folder (train one with "
                "`llmcycle align CKPT --objective reward_model`)"
            )
        return Reward(what, "model", 1.0, "model", folder=folder)
    raise UserError(
        f"--reward {what}: not a built-in reward ({', '.join(BUILT_IN)}), a FILE.py:FUNCTION "
        "or a reward model folder"
    )


def load_function(path: Path, name: str) -> Callable[..., Any]:
    import importlib.util

    if not path.is_file():
        raise UserError(f"--reward {path}:{name}: no such file {path}")
    spec = importlib.util.spec_from_file_location(f"llmcycle_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"--reward {path}:{name}: importing {path} failed: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward {path}:{name}: {path} defines no function {name!r}")
    return fn


def load_models(rewards: Sequence[Reward], device, vocab_size: int) -> None:
    """Load the reward models among `rewards` (frozen, eval mode) onto `device`."""
    from lifecycle_cli.checkpoint import load_config
    from lifecycle_cli.reward_model import RewardModel

    for r in rewards:
        if r.kind == "model" and r.model is None:
            if load_config(r.folder).vocab_size != vocab_size:
                raise UserError(
                    f"--reward {r.spec}: its vocabulary differs from the policy's; a reward "
                    "model must share the policy's tokenizer"
                )
            r.model = RewardModel.load(r.folder, device)


@dataclass
class Sample:
    """One completion to reward."""

    record: dict
    prompt: str  # the prompt text as the user wrote it (before the prompt style)
    prompt_ids: list[int]  # as the policy read it
    text: str
    token_ids: list[int]  # without the end-of-sequence token
    finish_reason: str


def score(rewards: Sequence[Reward], samples: Sequence[Sample]) -> list[list[float]]:
    """(samples, rewards) unweighted values; the total is sum(weight * value)."""
    columns = [_column(r, samples) for r in rewards]
    return [list(row) for row in zip(*columns)] if columns else [[] for _ in samples]


def _column(reward: Reward, samples: Sequence[Sample]) -> list[float]:
    from lifecycle_cli.data.synthetic import TASKS, exact_match

    if reward.kind == "model":
        sequences = [s.prompt_ids + s.token_ids for s in samples]
        return reward.model.score(sequences).tolist()
    out = []
    for s in samples:
        record = s.record
        if reward.kind in ("exact_match", "synthetic"):
            if reward.kind == "synthetic" and record.get("task") not in TASKS:
                raise UserError(
                    f'{record["where"]}: --reward synthetic needs a "task" naming a synthetic '
                    "task (use --data.synthetic, or --reward exact_match)"
                )
            if not isinstance(record.get("answer"), str):
                raise UserError(f'{record["where"]}: --reward {reward.kind} needs an "answer"')
            out.append(float(exact_match(s.text, record["answer"])))
        elif reward.kind == "format":
            text = s.text.strip()
            out.append(float(s.finish_reason == "stop" and bool(text) and "\n" not in text))
        else:
            out.append(_call(reward, s))
    return out


def _call(reward: Reward, s: Sample) -> float:
    public = {k: v for k, v in s.record.items() if k != "where"}
    try:
        value = reward.fn(prompt=s.prompt, completion=s.text, record=public)
    except Exception as e:
        raise UserError(
            f"{s.record['where']}: --reward {reward.spec} raised {type(e).__name__}: {e}"
        ) from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(
            f"{s.record['where']}: --reward {reward.spec} returned {value!r:.40}, not a finite "
            "number"
        )
    return number
