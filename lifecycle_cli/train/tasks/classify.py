"""Classification: a class head on the last real token; accuracy at every evaluation; the head,
the labels and a confusion table at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lifecycle_cli.data.args import InstructData
from lifecycle_cli.errors import UserError
from lifecycle_cli.lora import LoRAArgs
from lifecycle_cli.train.tasks.from_checkpoint import CheckpointTask, Method


class ClassifyTask(CheckpointTask):
    extra_metrics = ("accuracy",)

    def __init__(
        self,
        checkpoint_dir: Path,
        data: InstructData,
        method: Method,
        lora: LoRAArgs,
        trainable_blocks: Optional[int] = None,
    ) -> None:
        from lifecycle_cli.classifier import classification_loss

        super().__init__(checkpoint_dir, method, lora, trainable_blocks)
        self.examples = data
        self.objective = classification_loss

    def check(self, fabric) -> None:
        from lifecycle_cli.train.fabric import is_sharded

        super().check(fabric)
        if is_sharded(fabric):
            raise UserError("classification finetuning supports --strategy auto or ddp, not fsdp")

    def data(self, seq_length: int, seed: int):
        from lifecycle_cli.data.classify import ClassificationDataset
        from lifecycle_cli.data.instruct import load_examples

        train, val = load_examples(self.examples)
        pairs = lambda examples: [(e["text"], e["label"]) for e in examples]  # noqa: E731
        tok = self.tokenizer
        self.train_data = ClassificationDataset(pairs(train), tok, None, seq_length, seed)
        self.labels = self.train_data.labels
        self.val_data = ClassificationDataset(pairs(val), tok, self.labels, seq_length, seed)
        return self.train_data, self.val_data

    def wrap(self, gpt):
        from lifecycle_cli.classifier import Classifier

        return Classifier(gpt, self.labels)

    def describe(self, trainable: int, seq_length: int) -> list[str]:
        what = f"classification into {len(self.labels)} classes: {', '.join(self.labels)}"
        return [self.summary(trainable, seq_length, what)]

    def accuracy(self, model) -> float:
        from lifecycle_cli.classifier import confusion

        table = confusion(model, self.val_data)
        return float(table.diag().sum() / table.sum())

    def extra_eval(self):
        from lifecycle_cli.train.fabric import unwrap

        return lambda model: {"accuracy": self.accuracy(unwrap(model))}

    def save_extra(self, model, final: Path, say) -> None:
        from lifecycle_cli.classifier import confusion, format_confusion

        model.save_head(final)
        table = confusion(model, self.val_data)
        say(f"Validation accuracy {float(table.diag().sum() / table.sum()):.4f}")
        say(format_confusion(table, self.labels))
