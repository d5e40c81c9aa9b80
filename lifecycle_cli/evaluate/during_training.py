"""`--eval.tasks` of finetune, align and pretrain: evaluate's tasks (the same list as evaluate's
`--tasks`, run by the same code) on the model being trained, at every evaluation.

Each metric becomes a column `<task>/<metric>` of metrics.csv and is shown on the evaluation's
progress line, the task named as evaluate names its samples folders (`synthetic-reverse/
exact_match`, `perplexity-val/bits_per_byte`, `lm_eval-arc_easy/acc`). Prompts are formatted
with the run's prompt style, as evaluate formats them for the checkpoint the run saves.

Every rank runs every task on the same examples: a sharded (FSDP) model gathers its weights in
each forward, so all ranks must run the same forwards; rank 0's figures are the ones logged.
The random state is put back afterwards (lm-eval seeds every generator), so evaluating does not
change what the run trains on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.args import LmEvalArgs, Settings
from lifecycle_cli.evaluate.results import folder_name
from lifecycle_cli.evaluate.spec import parse_tasks

FLAG = "--eval.tasks"
NOT_IN_TRAINING = {"judge": "judge tasks run in `llmcycle evaluate` (they need --judge.url)"}


class TrainingTasks:
    """The tasks of `--eval.tasks`, checked when made (before training starts)."""

    def __init__(self, text: str, limit: Optional[int] = None, include_path=None) -> None:
        from lifecycle_cli.evaluate.runner import check_before_loading

        self.specs = parse_tasks(text, FLAG)
        prefixes: dict[str, str] = {}
        for spec in self.specs:
            if spec.kind in NOT_IN_TRAINING:
                raise UserError(f"{FLAG}: {spec.name}: {NOT_IN_TRAINING[spec.kind]}")
            prefix = folder_name(spec.name)
            if prefix in prefixes:
                raise UserError(
                    f"{FLAG}: {prefixes[prefix]} and {spec.name} would share the columns "
                    f"{prefix}/...; give the files different names"
                )
            prefixes[prefix] = spec.name
        if limit is not None and limit < 1:
            raise UserError(f"--eval.limit must be at least 1, got {limit}")
        self.settings = Settings(limit=limit, lm_eval=LmEvalArgs(include_path))
        check_before_loading(self.specs, self.settings, 1)

    def measure(self, fabric, model, tokenizer, style, source: Path) -> dict[str, float]:
        """{"<task>/<metric>": value} of every task on `model` (the GPT, in eval mode)."""
        from lifecycle_cli.evaluate.runner import Context, groups, task_function

        ctx = Context(source, self.settings, model, tokenizer, style, show_progress=False)
        figures: dict[str, float] = {}
        with kept_random_state():
            for kind, args in groups(self.specs):
                for result in task_function(kind)(ctx, args):
                    prefix = folder_name(result.task)
                    figures |= {f"{prefix}/{m.name}": float(m.value) for m in result.metrics}
        model.clear_kv_cache()
        if fabric.world_size > 1:
            figures = fabric.broadcast(figures, src=0)
        return figures

    def after(self, own: Optional[Callable], fabric, tokenizer, style, source: Path) -> Callable:
        """The evaluation's extra figures: the task's own (`own(model)`), then these."""
        from lifecycle_cli.train.fabric import unwrap

        def measure(model) -> dict[str, float]:
            figures = own(model) if own is not None else {}
            return figures | self.measure(fabric, unwrap(model), tokenizer, style, source)

        return measure


@contextmanager
def kept_random_state():
    """Python's, NumPy's and torch's random generators as they were on entry, on exit."""
    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
