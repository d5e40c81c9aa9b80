"""Loss spikes: when K steps in a row have a loss far above its running mean, roll back.

The OPT and BLOOM logbooks did it by hand: reload the last checkpoint from before the spike and
skip the batches that caused it. The state lives in `Progress`, so a resumed run judges its
steps exactly as the uninterrupted one would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from lifecycle_cli.train.state import Progress

WINDOW = 20  # losses in the running mean
MIN_HISTORY = 5  # losses seen before any step is judged a spike


def is_spike(progress: Progress, loss: float, factor: float) -> bool:
    """Whether `loss` (of step progress.step) is a spike; non-spike losses join the mean."""
    recent = progress.recent_losses
    if len(recent) >= MIN_HISTORY and loss > factor * sum(recent) / len(recent):
        return True
    recent.append(loss)
    del recent[:-WINDOW]
    return False


def count_spike(progress: Progress, spike: bool, first_sample: int) -> None:
    """Track the current run of consecutive spikes (its first step and data position)."""
    if not spike:
        progress.spike_run, progress.spike_start = 0, None
        return
    if progress.spike_run == 0:
        progress.spike_start = [progress.step, first_sample]
    progress.spike_run += 1


def past_skipped(samples: int, skip: list[list[int]]) -> int:
    """The data position moved past any sample ranges a rollback skipped."""
    for start, end in skip:
        if start <= samples < end:
            samples = end
    return samples


def rollback_folder(step_dirs: list, first_spike_step: int) -> Optional[object]:
    """The newest step folder saved before the spikes began (None if there is none)."""
    before = [d for d in step_dirs if int(d.name.split("-")[1]) < first_spike_step]
    return before[-1] if before else None
