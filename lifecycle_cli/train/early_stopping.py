"""Early stopping (`--train.early_stopping METRIC --train.patience N`): stop once a validation
figure has not improved for N evaluations in a row, and hand over the best evaluation's model.

The figure is `val_loss` (lower is better) or one the task measures (`exact_match`, `accuracy`:
higher is better). Ties are no improvement, so the earliest of equal evaluations is kept; with
`--train.min_delta D` an evaluation must beat the best by more than D to count (as in Lightning's
and Keras' early stopping), so the kept model is the first within D of the best seen. Each
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
    min_delta: float = 0.0

    @classmethod
    def of(
        cls,
        metric: Optional[str],
        patience: int,
        extra_metrics: tuple[str, ...],
        out_dir: Path,
        min_delta: float = 0.0,
    ) -> Optional[EarlyStopping]:
        """The tracker for --train.early_stopping (None when it is off); a metric the task
        does not measure, a patience below 1 or a negative min_delta is a UserError."""
        if metric is None:
            return None
        known = ("val_loss", *extra_metrics)
        if metric not in known:
            raise UserError(
                f"--train.early_stopping {metric!r}: this run measures {', '.join(known)}"
            )
        if patience < 1:
            raise UserError(f"--train.patience must be at least 1, got {patience}")
        if not min_delta >= 0:
            raise UserError(f"--train.min_delta must be 0 or more, got {min_delta}")
        return cls(metric, patience, out_dir / BEST_DIR, min_delta)

    def improves(self, value: float, best: Optional[float]) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        if self.metric in LOWER_IS_BETTER:
            return value < best - self.min_delta
        return value > best + self.min_delta

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
