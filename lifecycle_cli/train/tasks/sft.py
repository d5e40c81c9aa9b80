"""Instruction finetuning: next-token loss on the responses; exact match by generation on
synthetic tasks; the prompt style saved in final/ so every verb formats prompts alike."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lifecycle_cli.data.args import InstructData
from lifecycle_cli.lora import LoRAArgs
from lifecycle_cli.train.tasks.from_checkpoint import CheckpointTask, Method


class SFTTask(CheckpointTask):
    def __init__(
        self,
        checkpoint_dir: Path,
        data: InstructData,
        method: Method,
        lora: LoRAArgs,
        prompt_style: Optional[str] = None,
        trainable_blocks: Optional[int] = None,
        exact_match_samples: int = 100,
        max_new_tokens: int = 32,
    ) -> None:
        from lifecycle_cli.objectives import masked_sft_loss

        super().__init__(checkpoint_dir, method, lora, trainable_blocks)
        self.examples = data
        self.style = choose_style(prompt_style, checkpoint_dir, self.tokenizer)
        self.samples = exact_match_samples if data.synthetic else 0
        self.max_new_tokens = max_new_tokens
        self.extra_metrics = ("exact_match",) if self.samples > 0 else ()
        self.objective = masked_sft_loss

    def data(self, seq_length: int, seed: int):
        from lifecycle_cli.data.instruct import SFTDataset, load_examples

        train, val = load_examples(self.examples)
        mask = self.examples.mask_prompt
        self.train_data = SFTDataset(train, self.tokenizer, self.style, seq_length, mask, seed)
        self.val_data = SFTDataset(val, self.tokenizer, self.style, seq_length, mask, seed)
        return self.train_data, self.val_data

    def describe(self, trainable: int, seq_length: int) -> list[str]:
        return [self.summary(trainable, seq_length, f"prompt style {self.style.name!r}")]

    def extra_eval(self):
        if self.samples <= 0:
            return None
        from lifecycle_cli.train.fabric import unwrap

        items = self.val_data.eval_items()[: self.samples]

        def measure(model) -> dict[str, float]:
            answered = exact_match(
                unwrap(model), self.tokenizer, items, self.max_new_tokens, self.style.stop
            )
            return {"exact_match": answered}

        return measure

    def save_extra(self, model, final: Path, say) -> None:
        from lifecycle_cli.prompts import save_prompt_style

        save_prompt_style(self.style, final)


def choose_style(name: Optional[str], checkpoint_dir: Path, tokenizer):
    """--prompt_style, else the checkpoint's saved style or chat template, else alpaca."""
    from lifecycle_cli.prompts import get_style, read_style_file

    if name is None:
        name = read_style_file(checkpoint_dir)
    if name is None:
        name = "chat_template" if tokenizer.chat_template else "alpaca"
    return get_style(name, tokenizer)


def exact_match(model, tokenizer, items, max_new_tokens: int, stop=()) -> float:
    """Share of validation items (prompt ids, expected answer) whose greedy answer equals the
    expected one: the same measure as `llmcycle evaluate`'s exact match."""
    from lifecycle_cli.evaluate.exact_match import answer_rate

    return answer_rate(model, tokenizer, items, max_new_tokens, stop)
