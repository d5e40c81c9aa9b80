"""`judge:FILE.jsonl`: records {"instruction", "reference" (optional)}. Each checkpoint answers
every instruction (greedy, formatted with its prompt style, `--max_new_tokens`, default 256);
an OpenAI-compatible chat endpoint (`--judge.url`, `--judge.model`, `--judge.api_key`) judges.

- `--judge.mode single`: a 1-10 score per answer with MT-Bench's single-answer prompt (its
  reference-guided one when the record has a reference); `score` is the mean, with its standard
  error and a 95% confidence interval.
- `--judge.mode pairwise`: each checkpoint after the first against the first, every pair judged
  in both orders to cancel position bias; `win_rate` counts a tie as half a win.

A verdict without a readable rating (or one outside 1-10) counts as `unparsable`, a request that
still fails after `--judge.retries` retries with doubling back-off as `failed`; neither enters
the mean. Every raw reply is kept in samples.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Optional

from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.records import read_jsonl, text_field
from lifecycle_cli.evaluate.results import Metric, TaskResult, mean_stderr

MAX_NEW_TOKENS = 256
SYSTEM = "You are a helpful assistant."
SINGLE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level "
    "of detail of the response.{ref_note} Begin your evaluation by providing a short "
    "explanation. Be as objective as possible. After providing your explanation, you must rate "
    'the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for '
    'example: "Rating: [[5]]".\n\n[Question]\n{question}\n\n{reference}'
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
PAIR = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the responses "
    "provided by two AI assistants to the user question displayed below. You should choose the "
    "assistant that follows the user's instructions and answers the user's question better."
    "{ref_note} Avoid any position biases and ensure that the order in which the responses were "
    "presented does not influence your decision. Begin your evaluation by comparing the two "
    "responses and provide a short explanation. After providing your explanation, output your "
    'final verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" '
    'if assistant B is better, and "[[C]]" for a tie.\n\n[User Question]\n{question}\n\n'
    "{reference}[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)
REF_NOTE = " Compare the response with the reference answer, which is correct."


def parse_record(record: dict) -> dict:
    return {
        "instruction": text_field(record, "instruction"),
        "reference": text_field(record, "reference", required=False),
    }


def check(args: list[str], settings, n_checkpoints: int) -> None:
    j = settings.judge
    if not j.url:
        raise UserError("judge tasks need --judge.url (an OpenAI-compatible endpoint, e.g. "
                        "http://127.0.0.1:8000/v1 from `llmcycle serve`)")  # fmt: skip
    if j.mode == "pairwise" and n_checkpoints < 2:
        raise UserError("--judge.mode pairwise compares checkpoints: give two or more")
    if j.retries < 0 or j.backoff < 0:
        raise UserError("--judge.retries and --judge.backoff must be >= 0")
    for arg in args:
        read_jsonl(arg, parse_record)


def parse_score(reply: Optional[str]) -> Optional[float]:
    """The [[rating]] of a verdict (else a lone [rating]), if it is within 1-10."""
    if reply is None:
        return None
    found = re.findall(r"\[\[(\d+(?:\.\d+)?)\]\]", reply) or re.findall(
        r"\[(\d+(?:\.\d+)?)\]", reply
    )
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def parse_pair(reply: Optional[str]) -> Optional[str]:
    """'A', 'B' or 'C' (a tie) from a pairwise verdict; None if it names none or several."""
    if reply is None:
        return None
    found = set(re.findall(r"\[\[([ABC])\]\]", reply))
    return found.pop() if len(found) == 1 else None


class Judge:
    """The endpoint: `ask(prompt)` -> (reply text or None, error or None)."""

    def __init__(self, args, sleep=time.sleep) -> None:
        self.args = args
        self.url = args.url.rstrip("/") + "/chat/completions"
        self.key = args.api_key or os.environ.get("OPENAI_API_KEY")
        self.sleep = sleep

    def ask(self, prompt: str) -> tuple[Optional[str], Optional[str]]:
        body = {
            "model": self.args.model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0,
            "max_tokens": self.args.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        error = None
        for attempt in range(self.args.retries + 1):
            if attempt:
                self.sleep(self.args.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url, json.dumps(body).encode(), headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.args.timeout) as response:
                    data = json.loads(response.read())
                content = data["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("content is not a string")
                return content, None
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code}{_message(err)}"
                if 400 <= err.code < 500 and err.code not in (408, 429):
                    break  # the request itself is wrong: retrying will not help
            except (urllib.error.URLError, OSError) as err:
                error = f"connection failed: {getattr(err, 'reason', err)}"
            except (ValueError, KeyError, IndexError, TypeError) as err:
                error = f"unexpected reply: {err!r:.80}"
        return None, error


def _message(err: urllib.error.HTTPError) -> str:
    """': <the error message>' of an OpenAI-style error body, if it has one."""
    try:
        return f": {json.loads(err.read())['error']['message']}"
    except Exception:  # any body at all, or none
        return ""


def answers(ctx, records: list[dict]) -> list[str]:
    from lifecycle_cli.evaluate.exact_match import generate_answers

    style = ctx.style
    prompts = [style.encode(ctx.tokenizer, style.apply(r["instruction"])) for r in records]
    bar = ctx.progress("judge: answering", len(prompts))
    n = ctx.settings.max_new_tokens or MAX_NEW_TOKENS
    return generate_answers(ctx.model, ctx.tokenizer, prompts, n, style.stop, bar)


def _reference(r: dict) -> tuple[str, str]:
    if not r["reference"]:
        return "", ""
    block = f"[The Start of Reference Answer]\n{r['reference']}\n[The End of Reference Answer]\n\n"
    return REF_NOTE, block


def with_ci(name: str, values: list[float]) -> list[Metric]:
    mean, stderr = mean_stderr(values)
    half = 1.96 * stderr if stderr is not None else math.nan
    return [
        Metric(name, mean, stderr),
        Metric(f"{name}_ci95_low", mean - half),
        Metric(f"{name}_ci95_high", mean + half),
    ]


def run(ctx, args: list[str]) -> list[TaskResult]:
    out = []
    judge = Judge(ctx.settings.judge)
    for arg in args:
        name = f"judge:{arg}"
        records = ctx.limited(read_jsonl(arg, parse_record))
        texts = answers(ctx, records)
        samples = [{**r, "answer": a} for r, a in zip(records, texts)]
        if ctx.settings.judge.mode == "pairwise":
            out.append(TaskResult(name, len(records), [], samples))
            continue
        bar = ctx.progress("judge: verdicts", len(records))
        scores, unparsable, failed = [], 0, 0
        for row in samples:
            note, ref = _reference(row)
            prompt = SINGLE.format(
                ref_note=note, question=row["instruction"], reference=ref, answer=row["answer"]
            )
            reply, error = judge.ask(prompt)
            value = parse_score(reply)
            row.update(judge_reply=reply, judge_error=error, score=value)
            failed += reply is None
            unparsable += reply is not None and value is None
            if value is not None:
                scores.append(value)
            bar(1)
        metrics = [*with_ci("score", scores), Metric("unparsable", unparsable),
                   Metric("failed", failed)]  # fmt: skip
        out.append(TaskResult(name, len(records), metrics, samples))
    return out


def finish(per_checkpoint: list[list[TaskResult]], settings) -> None:
    """Pairwise mode: each later checkpoint's answers against the first's, both orders."""
    if settings.judge.mode != "pairwise":
        return
    judge = Judge(settings.judge)
    base = {r.task: r for r in per_checkpoint[0] if r.task.startswith("judge:")}
    for results in per_checkpoint[1:]:
        for result in results:
            if result.task not in base:
                continue
            wins, unparsable, failed = [], 0, 0
            for mine, theirs in zip(result.samples, base[result.task].samples):
                note, ref = _reference(mine)
                replies = []
                for a, b, ours in ((theirs, mine, "B"), (mine, theirs, "A")):
                    prompt = PAIR.format(ref_note=note, question=mine["instruction"],
                                         reference=ref, a=a["answer"], b=b["answer"])  # fmt: skip
                    reply, error = judge.ask(prompt)
                    verdict = parse_pair(reply)
                    order = "first_as_A" if ours == "B" else "first_as_B"
                    replies.append(
                        {"order": order, "reply": reply, "error": error, "verdict": verdict}
                    )
                    failed += reply is None
                    unparsable += reply is not None and verdict is None
                    if verdict is not None:
                        wins.append(1.0 if verdict == ours else 0.5 if verdict == "C" else 0.0)
                mine.update(first_answer=theirs["answer"], judge_replies=replies)
            result.metrics = [*with_ci("win_rate", wins), Metric("unparsable", unparsable),
                              Metric("failed", failed)]  # fmt: skip
