"""What a run shows and leaves behind: a progress bar, metrics.csv (+ TensorBoard), loss.png."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Optional

COLUMNS = (
    "step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu",
    "elapsed_sec", "skipped_steps", "rollbacks",
)  # fmt: skip


class MetricsLog:
    """Rows of metrics appended to `out_dir/metrics.csv` (rank 0 only).

    On resume, rows after the resumed step are dropped so the file reads like one run.
    """

    def __init__(
        self, out_dir: Path, resume_step: int = 0, tensorboard: bool = False, extra=()
    ) -> None:
        self.path = out_dir / "metrics.csv"
        self.columns = (*COLUMNS, *extra)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rewind(resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def rewind(self, step: int) -> None:
        """Drop the rows after `step` (a resumed or rolled-back run continues from there)."""
        rows = [r for r in read_metrics(self.path) if int(r["step"]) <= step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, **values: Optional[float]) -> None:
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(metrics_csv: Path, out_png: Path) -> None:
    """Train and validation loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(float(r["tokens"]), float(r[key])) for r in rows if r.get(key)]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out_png)


def save_figure(fig, out_png: Path) -> None:
    """Write a matplotlib figure as PNG, atomically (a reader never sees half a file), and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)


class ProgressBar:
    """A tqdm bar on rank 0: step, loss, lr, tokens/s, MFU and the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, file=sys.stderr, unit="step",
            dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip

    def step(
        self, loss: Optional[float] = None, lr=0.0, tokens_per_sec=0.0, mfu=0.0, extra: str = ""
    ) -> None:
        """Advance one step; with a loss, also refresh the figures shown (`extra` appended)."""
        if loss is not None:
            figures = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_sec:,.0f} tok/s MFU {mfu:.1%}"
            figures += extra
            self.bar.set_postfix_str(figures, refresh=False)
        self.bar.update(1)

    def restart(self, step: int) -> None:
        """Show `step` as the current one again (after a rollback)."""
        self.bar.reset(total=self.bar.total)
        self.bar.update(step)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def fmt_loss(value: float) -> str:
    return f"{value:.4f} (ppl {math.exp(min(value, 50)):.1f})"
