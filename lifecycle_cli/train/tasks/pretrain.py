"""Pretraining: next-token loss on plain text, from scratch or from a checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lifecycle_cli.config import Config
from lifecycle_cli.data.args import TextData
from lifecycle_cli.errors import UserError
from lifecycle_cli.train.args import TrainArgs


@dataclass
class TokenizerArgs:
    """The tokenizer trained for a from-scratch run (no --tokenizer_dir)."""

    vocab_size: int = 4096
    """Vocabulary size of the byte-level BPE trained on the training files."""


class PretrainTask:
    """A GPT of a named or given architecture (or an initial checkpoint) learning text."""

    extra_metrics: tuple[str, ...] = ()
    style = None  # --eval.tasks' prompts: the tokenizer's chat template, else alpaca

    def __init__(
        self,
        model_name: Optional[str],
        model_config: Optional[Config],
        initial_checkpoint_dir: Optional[Path],
        tokenizer_dir: Optional[Path],
        tokenizer: TokenizerArgs,
        data: TextData,
        out_dir: Path,
        train: Optional[TrainArgs] = None,
    ) -> None:
        from lifecycle_cli.objectives import next_token_loss

        given = [x is not None for x in (model_name, model_config, initial_checkpoint_dir)]
        if sum(given) != 1:
            raise UserError(
                "give exactly one of: a model name, --model_config, --initial_checkpoint_dir"
            )
        from lifecycle_cli.checkpoint import load_config
        from lifecycle_cli.zoo import named_config

        if model_name is not None:
            self.config = named_config(model_name)
        else:
            self.config = model_config or load_config(initial_checkpoint_dir)
        self.initial = initial_checkpoint_dir
        self.given_tokenizer, self.tokenizer_args = tokenizer_dir, tokenizer
        self.text, self.out_dir, self.train = data, out_dir, train
        self.objective = next_token_loss

    def check(self, fabric) -> None:
        pass

    def configure(self, fabric) -> Config:
        config = self.config
        self.tokenizer, self._tokenizer_dir = self.get_tokenizer(fabric)
        vocab = self.tokenizer.vocab_size
        if self.initial is None:
            config = dataclasses.replace(config, vocab_size=64 * math.ceil(vocab / 64))
        elif vocab > config.vocab_size:
            raise UserError(
                f"tokenizer of {vocab} tokens does not fit the model's vocab of "
                f"{config.vocab_size} ({self.initial})"
            )
        self.config = config
        return config

    @property
    def tokenizer_dir(self) -> Path:
        return self._tokenizer_dir

    def get_tokenizer(self, fabric):
        """(Tokenizer, folder holding its files): given, from the initial checkpoint, or
        trained on the data by rank 0 (the others wait and read it)."""
        from lifecycle_cli.data.text import iter_texts, training_files
        from lifecycle_cli.tokenizer import Tokenizer, train_bpe

        folder = self.given_tokenizer or self.initial
        if folder is not None:
            return Tokenizer(folder), Path(folder)
        folder = self.out_dir / "tokenizer"
        if fabric.global_rank == 0 and not (folder / "tokenizer.json").is_file():
            files = training_files(self.text)
            size = self.tokenizer_args.vocab_size
            fabric.print(f"Training a {size}-token BPE tokenizer on {len(files)} file(s)")
            train_bpe(None, size, folder, texts=iter_texts(files))
        fabric.barrier()
        return Tokenizer(folder), folder

    def data(self, seq_length: int, seed: int):
        from lifecycle_cli.data.text import prepare

        self.train_data, self.val_data = prepare(self.text, self.tokenizer, seq_length, seed)
        return self.train_data, self.val_data

    def model(self, fabric, seq_length: int):
        from lifecycle_cli.checkpoint import load_weights
        from lifecycle_cli.model import GPT

        with fabric.init_module():
            model = GPT(self.config)
        model.max_seq_length = seq_length
        if self.initial is not None:
            load_weights(model, self.initial)
        return model

    def describe(self, trainable: int, seq_length: int) -> list[str]:
        from lifecycle_cli.train.throughput import n_params

        c = self.config
        lines = [
            f"Model: {n_params(c, non_embedding=False):,} parameters ({c.n_layer} layers, "
            f"{c.n_embd} wide, vocab {c.vocab_size}); {len(self.train_data):,} training blocks "
            f"of {seq_length} tokens, {len(self.val_data):,} validation blocks",
            f"Unigram baseline (token frequencies only): validation loss "
            f"{self.val_data.unigram_loss(self.train_data):.4f}",
        ]
        return lines + self.describe_data(seq_length)

    def describe_data(self, seq_length: int) -> list[str]:
        """What curation removed, and the mixture table (also saved as out_dir/data_mix.tsv)."""
        from lifecycle_cli.curate.curation import describe

        data, lines = self.train_data, []
        reports = data.curation if isinstance(data.curation, dict) else None
        if reports and "removed" not in reports:  # a mixture: one report per source
            for name, report in reports.items():
                lines += describe(report, name)
        else:
            lines += describe(reports)
        if hasattr(data, "table"):
            from lifecycle_cli.curate.mixture import format_table, write_table

            budget = None
            if self.train is not None:
                steps = self.train.total_steps(len(data), seq_length)
                budget = steps * self.train.global_batch_size * seq_length
            rows = data.table(budget)
            lines += ["Data mixture:", *format_table(rows, budget)]
            write_table(self.out_dir / "data_mix.tsv", rows)
        return lines

    def extra_eval(self):
        return None

    def finish(self, fabric, model, final: Path) -> None:
        from lifecycle_cli.train.state import save_final

        save_final(fabric, final, model, self.tokenizer_dir)
