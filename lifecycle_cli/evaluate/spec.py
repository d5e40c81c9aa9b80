"""`--tasks` as a list of task specs; checked before any model loads (no torch here).

    perplexity:FILE_OR_FOLDER      text (.txt, .jsonl "text"): token NLL, perplexity, bits/byte
    multiple_choice:FILE.jsonl     question, choices, answer: acc, acc_norm
    exact_match:FILE.jsonl         prompt, answer: greedy answer equals the answer
    synthetic:NAME                 a built-in synthetic task (reverse, add, ..., all) as exact match
    preference:FILE.jsonl          prompt, chosen, rejected: chosen ranked higher
    judge:FILE.jsonl               instruction (+ reference): scored by an LLM judge
    lm_eval:TASK                   an lm-evaluation-harness task

Items are separated by commas; an item without `kind:` continues the kind before it, so
`synthetic:reverse,add` is two synthetic tasks and `lm_eval:arc_easy,hellaswag` two lm-eval ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle_cli.errors import UserError

KINDS: dict[str, str] = {
    "perplexity": "a text file or folder",
    "multiple_choice": "a JSONL file of question/choices/answer",
    "exact_match": "a JSONL file of prompt/answer",
    "synthetic": "a synthetic task name (or all)",
    "preference": "a JSONL file of prompt/chosen/rejected",
    "judge": "a JSONL file of instruction (and reference)",
    "lm_eval": "an lm-evaluation-harness task name",
}


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    arg: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}"


def parse_tasks(text: str, flag: str = "--tasks") -> list[TaskSpec]:
    """The specs of `--tasks` (see the module docstring); a bad one is a UserError naming it
    and `flag` (finetune's and align's `--eval.tasks` take the same list)."""
    specs: list[TaskSpec] = []
    kind = None
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        head, sep, arg = item.partition(":")
        if sep and head in KINDS:
            kind, item = head, arg.strip()
        elif item in KINDS:
            raise UserError(f"{flag}: {item!r} needs {KINDS[item]}: write {item}:<{item} arg>")
        elif kind is None:
            raise UserError(
                f"{flag}: unknown task {item!r}; write KIND:ARG with KIND one of "
                f"{', '.join(KINDS)} (e.g. synthetic:reverse, lm_eval:arc_easy)"
            )
        if not item:
            raise UserError(f"{flag}: {kind}: needs {KINDS[kind]}")
        spec = TaskSpec(kind, item)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise UserError(f"{flag} names no task (e.g. {flag} synthetic:reverse)")
    return specs
