"""What a run shows and leaves behind: a progress bar, metrics.csv (+ TensorBoard, Weights &
Biases or MLflow through Lightning's loggers), loss.png."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Optional

from lifecycle_cli.errors import UserError

COLUMNS = (
    "step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu",
    "elapsed_sec", "skipped_steps", "rollbacks",
)  # fmt: skip


# --logger: the package each one needs (csv needs none).
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_logger(name: str) -> None:
    """Refuse a logger whose package is not installed, saying how to install it."""
    package = LOGGER_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        pip = "mlflow-skinny" if name == "mlflow" else package
        raise UserError(f"--logger {name} needs the {package} package: pip install {pip}")


def make_logger(name: str, out_dir: Path):
    """Lightning's logger for `--logger name` (None for csv: metrics.csv is always written).

    wandb runs offline (out_dir/wandb/, `wandb sync` uploads it) unless WANDB_MODE=online;
    mlflow logs to MLFLOW_TRACKING_URI, by default a store in out_dir/mlruns/.
    """
    if name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(root_dir=out_dir / "tensorboard", name="", version="")
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        online = os.environ.get("WANDB_MODE") == "online"
        return WandbLogger(project="llmcycle", name=out_dir.name, save_dir=out_dir,
                           offline=not online)  # fmt: skip
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a local store needs no server (and no database package)
            uri = (out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLFlowLogger(experiment_name="llmcycle", run_name=out_dir.name, tracking_uri=uri)
    return None


class MetricsLog:
    """Rows of metrics appended to `out_dir/metrics.csv` (rank 0 only), and to the --logger.

    On resume, rows after the resumed step are dropped so the file reads like one run. A figure
    not seen before (an --eval.tasks metric) adds a column: the file is rewritten with it.
    """

    def __init__(self, out_dir: Path, resume_step: int = 0, logger: str = "csv", extra=()):
        self.path = out_dir / "metrics.csv"
        self.columns = (*COLUMNS, *extra)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rewind(resume_step)
        self.logger = make_logger(logger, out_dir)

    def rewind(self, step: int) -> None:
        """Drop the rows after `step` (a resumed or rolled-back run continues from there); the
        columns of figures first seen later (--eval.tasks metrics) stay."""
        rows = [r for r in read_metrics(self.path) if int(r["step"]) <= step]
        self.columns = (
            *self.columns,
            *(k for k in (rows[0] if rows else {}) if k not in self.columns),
        )
        self.write(rows)

    def write(self, rows: list[dict]) -> None:
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, **values: Optional[float]) -> None:
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns = (*self.columns, *new)
            self.write(read_metrics(self.path))
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        if self.logger is not None:
            self.logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.finalize("success")


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
