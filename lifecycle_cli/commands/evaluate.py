"""`llmcycle evaluate`: measure one or more checkpoints on a list of tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from lifecycle_cli.evaluate.args import JudgeArgs, LmEvalArgs, Settings


def evaluate(
    checkpoint_dir: Union[Path, list[Path]],
    tasks: Optional[str] = None,
    out_dir: Optional[Path] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    num_fewshot: Optional[int] = None,
    seed: Optional[int] = None,
    stride: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    prompt_style: Optional[str] = None,
    dev_path: Optional[Path] = None,
    apply_chat_template: bool = False,
    ref_checkpoint: Optional[Path] = None,
    reward_model: Optional[Path] = None,
    length_normalize: bool = False,
    contamination_of: Optional[list[Path]] = None,
    contamination_n: int = 13,
    judge: JudgeArgs = JudgeArgs(),  # noqa: B008  (jsonargparse reads the default's fields)
    lm_eval: LmEvalArgs = LmEvalArgs(),  # noqa: B008
    precision: Optional[str] = None,
    device: str = "auto",
    quantize: Optional[str] = None,
) -> None:
    """Evaluate checkpoints on tasks; print a table (a column per checkpoint) and write
    results.json and each task's samples.jsonl to --out_dir.

    Tasks (comma-separated; an item without `kind:` continues the kind before it):
    perplexity:FILE_OR_FOLDER (.txt/.jsonl text), multiple_choice:FILE.jsonl
    (question/choices/answer), exact_match:FILE.jsonl (prompt/answer), synthetic:NAME (a
    built-in synthetic task as exact match: reverse, add, ..., all), preference:FILE.jsonl
    (prompt/chosen/rejected), judge:FILE.jsonl (instruction, optional reference), lm_eval:TASK
    (lm-evaluation-harness; `pip install 'llmcycle[eval]'`).

    Args:
        checkpoint_dir: One checkpoint folder, or several (`evaluate a b --tasks ...`) to
            compare side by side.
        tasks: The tasks, e.g. `synthetic:reverse,add,perplexity:val.txt,lm_eval:arc_easy`.
        out_dir: Where results.json and <task>/samples.jsonl go (with several checkpoints
            <checkpoint>/<task>/samples.jsonl). Default: print only.
        limit: At most this many examples (documents for perplexity) per task. For synthetic
            tasks, how many validation examples (default 100, as finetune).
        batch_size: Sequences per forward pass when scoring log-likelihoods.
        num_fewshot: Solved examples before each question (multiple_choice; lm_eval tasks:
            default their own setting).
        seed: Seed of few-shot draws and of which synthetic examples are drawn (finetune's
            --data.seed; default 42); for lm_eval tasks all of lm-eval's seeds (default: its
            own).
        stride: Perplexity: tokens each sliding window advances (default: the whole context).
        max_new_tokens: Longest generated answer (exact_match/synthetic: 32, judge: 256).
        prompt_style: How exact_match, synthetic and judge prompts are formatted (default: the
            style the checkpoint was finetuned with, its chat template, else alpaca).
        dev_path: multiple_choice: a JSONL file to draw few-shot examples from (default: the
            other records of the task file).
        apply_chat_template: lm_eval tasks: format prompts with the tokenizer's chat template
            (as lm-eval's --apply_chat_template; default raw).
        ref_checkpoint: preference: the reference model, for the implicit-reward accuracy.
        reward_model: preference: also score the pairs with this reward model (`align
            --objective reward_model`): reward_model_accuracy, the share it ranks chosen first.
        length_normalize: preference: rank by mean (not summed) response log-prob.
        contamination_of: Training data (files or folders, read as pretrain reads them) to
            check every task's examples against: the share of examples that share a word
            n-gram with it is printed and saved in results.json.
        contamination_n: The n-gram length, in words, that counts as overlap.
        judge: The judge endpoint for judge tasks.
        lm_eval: lm-evaluation-harness settings.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on a GPU, else 32-true).
        device: auto (a GPU if there is one), cpu, cuda, cuda:N or mps.
        quantize: int8 or int4: evaluate the model with weight-only quantized linear layers
            and output head, as `generate --quantize` runs it (default: as stored).
    """
    from lifecycle_cli.errors import UserError
    from lifecycle_cli.evaluate.runner import run
    from lifecycle_cli.evaluate.spec import parse_tasks

    if tasks is None:
        raise UserError("--tasks is required (e.g. --tasks synthetic:reverse)")
    checkpoints = [checkpoint_dir] if isinstance(checkpoint_dir, (str, Path)) else checkpoint_dir
    settings = Settings(
        limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, seed=seed, stride=stride,
        max_new_tokens=max_new_tokens, prompt_style=prompt_style, dev_path=dev_path,
        apply_chat_template=apply_chat_template, ref_checkpoint=ref_checkpoint,
        reward_model=reward_model, length_normalize=length_normalize,
        contamination_of=contamination_of, contamination_n=contamination_n, judge=judge,
        lm_eval=lm_eval,
    )  # fmt: skip
    check_settings(settings)
    specs = parse_tasks(tasks)
    run(
        [Path(c) for c in checkpoints],
        specs,
        settings,
        out_dir,
        device,
        precision,
        quantize=quantize,
    )


def check_settings(s: Settings) -> None:
    from lifecycle_cli.errors import UserError

    if s.limit is not None and s.limit < 1:
        raise UserError(f"--limit must be at least 1, got {s.limit}")
    if s.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {s.batch_size}")
    if s.num_fewshot is not None and s.num_fewshot < 0:
        raise UserError(f"--num_fewshot must be >= 0, got {s.num_fewshot}")
