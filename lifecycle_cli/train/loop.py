"""The training loop: one for every task (pretraining, finetuning, classification).

What differs between tasks is the data (`TrainData`: `get(indices)` -> batch) and the objective
(`objective(model, batch)` -> mean loss); everything else lives here: gradient accumulation,
clipping, the LR schedule, evaluation, checkpoints, exact resume, logging and throughput.

Sample indices are global: optimizer step s consumes samples [s*G, (s+1)*G) of the data's
endless stream, and rank r takes its contiguous share of them. So the data position is a single
integer and a run on W devices sees exactly the batches a run on one device sees. Under tensor
parallelism "rank" is the data-parallel index: the ranks of a tensor-parallel group share a batch.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lifecycle_cli.mlp import expert_load, moe_layers, router_loss
from lifecycle_cli.train.args import EvalArgs, TrainArgs
from lifecycle_cli.train.data import Batch, TrainData
from lifecycle_cli.train.early_stopping import EarlyStopping
from lifecycle_cli.train.fabric import clip_gradients, data_parallel
from lifecycle_cli.train.guards import count_spike, is_spike, past_skipped, rollback_folder
from lifecycle_cli.train.logs import MetricsLog, ProgressBar, fmt_loss, plot_losses
from lifecycle_cli.train.prefetch import Prefetcher
from lifecycle_cli.train.schedule import lr_at
from lifecycle_cli.train.state import (
    BackgroundSave,
    Progress,
    load_step,
    prune_steps,
    save_step,
    step_dirs,
)
from lifecycle_cli.train.throughput import Throughput, peak_flops


@dataclass
class Run:
    """Everything `fit` needs besides the model and optimizer."""

    objective: Callable[[torch.nn.Module, Batch], torch.Tensor]
    train_data: TrainData
    val_data: TrainData
    train: TrainArgs
    eval: EvalArgs
    out_dir: Path
    max_steps: int
    flops_per_token: float
    tokenizer_dir: Optional[Path] = None
    logger: str = "csv"
    # Extra validation metrics (e.g. exact match by generation) and their names.
    extra_eval: Optional[Callable[[torch.nn.Module], dict[str, float]]] = None
    extra_metrics: tuple[str, ...] = ()
    early_stopping: Optional[EarlyStopping] = None
    # Figures of the steps since the last log line (GRPO's rewards), logged with train_loss, and
    # what the progress line shows of them.
    step_metrics: Optional[Callable[[], tuple[dict[str, float], str]]] = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False  # set by `fit`: early stopping ended the run before max_steps


def fit(fabric, model, optimizer, run: Run, progress: Progress) -> Progress:
    """Train until run.max_steps, early stopping (`run.stopped_early`) or a SIGINT/SIGTERM;
    return the final counters. With early stopping the model is left at its best evaluation.

    The session has the task write final/ (merged LoRA, a classifier head, ...).
    """
    args, world = run.train, fabric.world_size
    dp_rank, dp_size = data_parallel(fabric)
    accumulation = args.accumulation(dp_size)
    per_rank = args.global_batch_size // dp_size
    log = None
    moe = bool(moe_layers(model))  # a mixture of experts: router loss and expert load logged
    if rank0(fabric):
        extra = (*run.extra_metrics, *(MOE_METRICS if moe else ()))
        log = MetricsLog(run.out_dir, progress.step, run.logger, extra)
    peak = peak_flops(fabric.device.type, str(fabric.strategy.precision.precision))
    speed = Throughput(run.flops_per_token, peak, world)
    bar = ProgressBar(run.max_steps, progress.step, enabled=rank0(fabric))
    stop = StopRequest()
    saver = BackgroundSave() if args.async_checkpoint else None
    reader = Prefetcher(run.train_data, args.micro_batch_size, pin=fabric.device.type == "cuda")

    if run.eval.initial_validation and progress.step == 0:
        figures = evaluate(fabric, model, run, progress, log, bar)
        judge(fabric, model, optimizer, run, progress, figures)
    try:
        while progress.step < run.max_steps and not run.stopped_early:
            progress.samples = past_skipped(progress.samples, progress.skip)
            lr = lr_at(progress.step, run.max_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            step_samples = progress.samples
            first = step_samples + dp_rank * per_rank
            loss_sum = torch.zeros((), device=fabric.device)
            router_sum = torch.zeros((), device=fabric.device)
            tokens = torch.zeros((), device=fabric.device, dtype=torch.long)
            starts = [first + m * args.micro_batch_size for m in range(accumulation)]
            batches = [reader.get(start) for start in starts]
            ahead = past_skipped(step_samples + args.global_batch_size, progress.skip)
            reader.plan([ahead - step_samples + s for s in starts])  # the next step's
            for micro, batch in enumerate(batches):
                batch = fabric.to_device(batch)
                with fabric.no_backward_sync(model, enabled=micro < accumulation - 1):
                    loss = run.objective(model, batch)
                    router = router_loss(model)  # None without experts
                    fabric.backward((loss if router is None else loss + router) / accumulation)
                loss_sum += loss.detach()
                if router is not None:
                    router_sum += router.detach()
                tokens += count_tokens(batch)
            # The gradient norm is needed even without clipping: a non-finite one skips the step.
            max_norm = math.inf if args.max_norm is None else args.max_norm
            grad_norm = clip_gradients(fabric, model, optimizer, max_norm)
            saved = torch.tensor(float(saver is None or saver.done()))
            signalled = torch.tensor(float(stop.flag))
            parts = (loss_sum / accumulation, grad_norm, tokens, router_sum, saved, signalled)
            figures = torch.stack([x.to(fabric.device, torch.float64) for x in parts])
            if world > 1:  # one collective per step; every rank then takes the same decisions
                figures = fabric.all_reduce(figures, reduce_op="sum")
            loss_total, norm_total, token_total, router_total, saved, signalled = figures.tolist()
            if saver is not None and saver.pending and saved == world:
                finish_save(fabric, saver, run)
            train_loss, norm = loss_total / world, norm_total / world
            finite = math.isfinite(train_loss) and math.isfinite(norm)
            # A gradient scaler (16-mixed) skips a non-finite step itself and lowers its scale.
            if finite or scaler_of(fabric) is not None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.samples += args.global_batch_size
            step_tokens = int(token_total) * dp_size // world  # counted once per TP group
            progress.tokens += step_tokens
            speed.step(step_tokens)
            if not finite:
                progress.skipped_steps += 1
                bar.write(
                    f"step {progress.step}: loss {train_loss:.4g}, gradient norm {norm:.4g}: "
                    "not finite, update skipped"
                )
            spiking = False
            if finite and args.spike_rollback:
                spiking = is_spike(progress, train_loss, args.spike_factor)
                count_spike(progress, spiking, step_samples)

            if progress.step % args.log_interval == 0 or progress.step == run.max_steps:
                rate, mfu = speed.measure()
                bar_values = dict(train_loss=train_loss, lr=lr, tokens_per_sec=rate, mfu=mfu)
                moe_values, shown = moe_figures(model, router_total / world / accumulation)
                if progress.skipped_steps:
                    shown += f" skipped {progress.skipped_steps}"
                if run.step_metrics is not None:
                    task_values, task_shown = run.step_metrics()
                    moe_values, shown = moe_values | task_values, shown + task_shown
                if log is not None:
                    log.log(
                        progress.step, tokens=progress.tokens, grad_norm=norm,
                        skipped_steps=progress.skipped_steps, rollbacks=progress.rollbacks,
                        **bar_values, **moe_values,
                    )  # fmt: skip
                run.history.append({"step": progress.step, "train_loss": train_loss})
                bar.step(train_loss, lr, rate, mfu, shown)
            else:
                bar.step()
            if spiking and progress.spike_run >= args.spike_rollback:
                roll_back(fabric, model, optimizer, run, progress, log, bar, saver)
                speed.resume()
                continue

            last = progress.step == run.max_steps
            interval = run.eval.interval
            if (interval and progress.step % interval == 0) or (last and run.eval.final_validation):
                figures = evaluate(fabric, model, run, progress, log, bar)
                judge(fabric, model, optimizer, run, progress, figures)
            stopping = signalled > 0  # on any rank
            save_every = args.save_interval
            if (save_every and progress.step % save_every == 0) or stopping:
                checkpoint(fabric, model, optimizer, run, progress, saver)
            speed.resume()
            if stopping:
                bar.write(f"Stopped at step {progress.step}; resume with --resume auto")
                break
        if saver is not None:
            saver.wait(fabric)
            finish_save(fabric, saver, run)
    finally:
        if saver is not None:
            saver.close()
        reader.close()
        bar.close()
        stop.restore()
        if log is not None:
            log.close()
    done = progress.step == run.max_steps or run.stopped_early
    if done and rank0(fabric):
        plot_losses(run.out_dir / "metrics.csv", run.out_dir / "loss.png")
    if done and run.early_stopping is not None:
        restore_best(fabric, model, optimizer, run, progress)
    return progress


MOE_METRICS = ("router_loss", "experts_used", "expert_max_load")


def moe_figures(model, router: float) -> tuple[dict[str, float], str]:
    """Router loss (this step's mean) and expert load (last micro-batch): for metrics.csv, and
    as the progress line shows them."""
    load = expert_load(model)
    if load is None:
        return {}, ""
    used, busiest = load
    values = dict(router_loss=router, experts_used=used, expert_max_load=busiest)
    return values, f" router {values['router_loss']:.4f} experts {used:.0%} max {busiest:.2f}x"


def scaler_of(fabric):
    """The gradient scaler of 16-mixed precision, or None."""
    return getattr(fabric.strategy.precision, "scaler", None)


def roll_back(fabric, model, optimizer, run: Run, progress: Progress, log, bar, saver) -> None:
    """After `spike_rollback` spikes in a row: reload the newest step folder from before them
    and skip the samples of the spiking steps from then on (or only skip them, with no such
    folder)."""
    if saver is not None:
        saver.wait(fabric)
    first_step, first_sample = progress.spike_start
    skipped = [first_sample, progress.samples]
    what = (
        f"loss above {run.train.spike_factor} x its running mean for {progress.spike_run} "
        f"steps ({first_step}-{progress.step})"
    )
    folder = rollback_folder(step_dirs(run.out_dir), first_step)
    if folder is None:
        bar.write(f"{what}: no step folder from before them to roll back to; skipping on")
        progress.spike_run, progress.spike_start = 0, None
        return
    kept = dict(skipped_steps=progress.skipped_steps, rollbacks=progress.rollbacks + 1,
                skip=[*progress.skip, skipped])  # fmt: skip
    saved = load_step(fabric, folder, model, optimizer)
    for name, value in {**asdict(saved), **kept}.items():
        setattr(progress, name, value)
    if log is not None:
        log.rewind(progress.step)
    bar.restart(progress.step)
    bar.write(
        f"{what}: rolled back to {folder.name}; samples {skipped[0]}-{skipped[1] - 1} are skipped"
    )


def judge(fabric, model, optimizer, run: Run, progress: Progress, figures: dict) -> None:
    """Early stopping's verdict on an evaluation: save a new best, stop when patience is out."""
    rule = run.early_stopping
    if rule is None:
        return
    if rule.update(progress, figures):
        save_step(fabric, rule.folder, model, optimizer, progress, run.tokenizer_dir)
    elif rule.exhausted(progress):
        run.stopped_early = True
        fabric.print(
            f"Early stopping at step {progress.step}: {rule.metric} has not improved on "
            f"{progress.best_value:.4f} (step {progress.best_step}) for {rule.patience} "
            "evaluations"
        )


def restore_best(fabric, model, optimizer, run: Run, progress: Progress) -> None:
    """Set the model back to the best evaluation's weights (out_dir/best/) for final/."""
    rule = run.early_stopping
    if progress.best_step is None:  # never evaluated: final/ is the last step
        return
    if progress.best_step != progress.step:
        saved = load_step(fabric, rule.folder, model, optimizer)
        if saved.step != progress.best_step:
            raise RuntimeError(f"{rule.folder} holds step {saved.step}, not {progress.best_step}")
    fabric.print(f"final/ is step {progress.best_step}: {rule.metric} {progress.best_value:.4f}")


def checkpoint(fabric, model, optimizer, run: Run, progress: Progress, saver) -> None:
    folder = run.out_dir / f"step-{progress.step:06d}"
    if saver is not None:  # written in the background; finish_save once every rank is done
        saver.start(fabric, folder, model, optimizer, progress, run.tokenizer_dir)
        return
    save_step(fabric, folder, model, optimizer, progress, run.tokenizer_dir)
    if rank0(fabric):
        prune_steps(run.out_dir, run.train.keep_last)
        plot_losses(run.out_dir / "metrics.csv", run.out_dir / "loss.png")


def finish_save(fabric, saver, run: Run) -> None:
    """A background save is written on every rank: its folder goes into place."""
    if saver.pending:
        saver.complete(fabric)
    if rank0(fabric):
        prune_steps(run.out_dir, run.train.keep_last)
        plot_losses(run.out_dir / "metrics.csv", run.out_dir / "loss.png")


@torch.no_grad()
def evaluate(fabric, model, run: Run, progress: Progress, log, bar) -> dict[str, float]:
    """{"val_loss": mean validation loss over the first eval.max_iters micro-batches of every
    rank, **the task's extra figures}; no val_loss when the task has no validation batches
    (GRPO: its figures are the task's)."""
    model.eval()
    (dp_rank, world), size = data_parallel(fabric), run.train.micro_batch_size
    n = len(run.val_data)
    if run.eval.max_iters is not None:
        n = min(n, run.eval.max_iters * size * world)
    per_rank = n // world  # equal on every rank: sharded models run collectives per forward
    first = dp_rank * per_rank
    totals = torch.zeros(2, device=fabric.device)
    for start in range(first, first + per_rank, size):
        stop = min(start + size, first + per_rank)
        batch = fabric.to_device(run.val_data.get(range(start, stop)))
        totals[0] += run.objective(model, batch) * (stop - start)
        totals[1] += stop - start
    figures = {}
    if n > 0:
        totals = fabric.all_reduce(totals, reduce_op="sum")
        figures["val_loss"] = (totals[0] / totals[1]).item()
    figures |= run.extra_eval(model) if run.extra_eval else {}
    if log is not None:
        log.log(progress.step, tokens=progress.tokens, **figures)
    shown = [f"val loss {fmt_loss(figures['val_loss'])}"] if n > 0 else []
    shown += [f"{k} {v:.4f}" for k, v in figures.items() if k != "val_loss"]
    bar.write(f"step {progress.step}: {', '.join(shown)}")
    run.history.append({"step": progress.step, **figures})
    model.train()
    return figures


def count_tokens(batch: Batch) -> int | torch.Tensor:
    """Tokens the model reads in a batch: (B, T + 1) token blocks or a dict from a dataset."""
    if isinstance(batch, dict):
        return batch["n_tokens"] if "n_tokens" in batch else batch["input_ids"].numel()
    return batch.size(0) * (batch.size(1) - 1)


def rank0(fabric) -> bool:
    return fabric.global_rank == 0


class StopRequest:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.flag = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.flag:  # a second signal: stop now
            raise KeyboardInterrupt
        self.flag = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
