"""Early stopping (`--train.early_stopping METRIC --train.patience N`): stop once a validation
figure has not improved for N evaluations in a row, and hand over the best evaluation's model.

The figure is `val_loss` (lower is better) or one the task measures (`exact_match`, `accuracy`:
higher is better). Ties are no improvement, so the earliest of equal evaluations is kept. Each
new best is written to `out_dir/best/` (a step folder, sharded under FSDP like any other);
when training ends (stopped early or at its last step) the model is set back to it, so final/
(LoRA adapters merged, a class head...) is the best evaluation's model. The best value, its
step and the evaluations since live in `Progress`, so a resumed run stops where an
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lifecycle_cli.errors import UserError

BEST_DIR = "best"
LOWER_IS_BETTER = ("val_loss",)


@dataclass
class EarlyStopping:
    metric: str
    patience: int
    folder: Path  # out_dir/best

    @classmethod
    def of(
        cls, metric: Optional[str], patience: int, extra_metrics: tuple[str, ...], out_dir: Path
    ) -> Optional[EarlyStopping]:
        """The tracker for --train.early_stopping (None when it is off); a metric the task
        does not measure, or a patience below 1, is a UserError."""
        if metric is None:
            return None
        known = ("val_loss", *extra_metrics)
        if metric not in known:
            raise UserError(
                f"--train.early_stopping {metric!r}: this run measures {', '.join(known)}"
            )
        if patience < 1:
            raise UserError(f"--train.patience must be at least 1, got {patience}")
        return cls(metric, patience, out_dir / BEST_DIR)

    def improves(self, value: float, best: Optional[float]) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best if self.metric in LOWER_IS_BETTER else value > best

    def update(self, progress, figures: dict[str, float]) -> bool:
        """Record an evaluation in `progress`; whether it is a new best (to be saved)."""
        value = float(figures[self.metric])
        if self.improves(value, progress.best_value):
            progress.best_step, progress.best_value = progress.step, value
            progress.evals_since_best = 0
            return True
        progress.evals_since_best += 1
        return False

    def exhausted(self, progress) -> bool:
        """Whether `patience` evaluations in a row brought no improvement."""
        return progress.evals_since_best >= self.patience
