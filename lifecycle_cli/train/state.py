"""Resumable training state: step-NNNNNN/ folders and finding the newest one.

A step folder is a checkpoint folder (loadable by every verb) plus `train_state/`: optimizer,
counters, RNG states and the data position. Under FSDP the model and optimizer are saved sharded
inside `train_state/` instead (torch.distributed.checkpoint), and only `final/` is consolidated.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lifecycle_cli.checkpoint import write_checkpoint_files
from lifecycle_cli.errors import UserError
from lifecycle_cli.train.fabric import is_sharded, unwrap

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_DIR = "train_state"
STATE_FILE = "state.pt"


@dataclass
class Progress:
    """Counters of a run; `samples` is the data position (global samples consumed)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    # early stopping (train/early_stopping.py): the best evaluation so far, and evaluations since
    best_step: Optional[int] = None
    best_value: Optional[float] = None
    evals_since_best: int = 0
    # guards (train/guards.py): steps not applied (non-finite loss or gradient norm), rollbacks,
    # sample ranges [start, end) a rollback skipped, the running loss window, the spike run
    skipped_steps: int = 0
    rollbacks: int = 0
    skip: list = field(default_factory=list)
    recent_losses: list = field(default_factory=list)
    spike_run: int = 0
    spike_start: Optional[list] = None  # [step, data position] of the run's first spike


def step_dirs(out_dir: Path) -> list[Path]:
    """Complete step folders, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in out_dir.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_DIR).exists()]


def find_resume(resume: bool | str | Path, out_dir: Path) -> Optional[Path]:
    """The step folder to resume from: `auto`/True = newest in out_dir (None if there is none)."""
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        dirs = step_dirs(out_dir)
        return dirs[-1] if dirs else None
    path = Path(resume)
    if not (path / STATE_DIR).exists():
        raise UserError(f"--resume {path}: not a step folder (no {STATE_DIR}/ inside)")
    return path


def save_step(fabric, folder: Path, model, optimizer, progress: Progress, tokenizer_dir) -> None:
    """Write a resumable step folder atomically (all ranks call this)."""
    tmp = partial_dir(folder)
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)
    fabric.barrier()
    state = {"optimizer": optimizer, "progress": asdict(progress), "rng": rng_state()}
    if is_sharded(fabric):
        fabric.save(tmp / STATE_DIR, {"model": model, **state})
    else:
        if fabric.global_rank == 0:
            module = unwrap(model)
            write_checkpoint_files(tmp, module.config, module.state_dict(), tokenizer_dir)
        fabric.save(tmp / STATE_DIR / STATE_FILE, state)
    fabric.barrier()
    if fabric.global_rank == 0:
        replace_dir(tmp, folder)
    fabric.barrier()


class BackgroundSave:
    """Step folders written while training goes on (`--train.async_checkpoint`).

    `start` copies the state (to CPU) and returns; the files are written in the background,
    into `.step-NNNNNN.partial/`, a name `--resume auto` never picks. Under FSDP every rank
    writes its shards with `torch.distributed.checkpoint.async_save` (the layout `fabric.save`
    writes, so `fabric.load` reads it); otherwise rank 0 writes the checkpoint folder in a
    thread. Only when every rank reports its writes `done()` (the loop reduces the flag with its
    per-step figures) does `complete` rename the folder into place on rank 0.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix="llmcycle-save", initializer=lower_thread_priority
        )
        self.future = None
        self.folder: Optional[Path] = None
        self.group = None

    @property
    def pending(self) -> bool:
        return self.folder is not None

    def done(self) -> bool:
        """This rank has nothing left to write."""
        return self.future is None or self.future.done()

    def start(self, fabric, folder: Path, model, optimizer, progress: Progress, tokenizer_dir):
        self.wait(fabric)
        tmp = partial_dir(folder)
        if fabric.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)
        fabric.barrier()
        meta = {"progress": asdict(progress), "rng": rng_state()}
        if is_sharded(fabric):
            from torch.distributed.checkpoint import async_save
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            module, options = unwrap(model), StateDictOptions(cpu_offload=True)
            shards = {
                "model": get_model_state_dict(module, options=options),
                "optimizer": get_optimizer_state_dict(module, optimizer, options=options),
            }
            if self.group is None:  # its writes gather in a thread: a CPU (gloo) group
                self.group = torch.distributed.new_group(backend="gloo")
            self.future = async_save(
                shards, checkpoint_id=tmp / STATE_DIR, process_group=self.group
            )  # stages a copy; fmt: skip
            if fabric.global_rank == 0:
                torch.save(meta, tmp / STATE_DIR / "meta.pt")  # what fabric.save puts beside
        elif fabric.global_rank == 0:
            module = unwrap(model)
            weights = cpu_copy(module.state_dict())
            state = {"optimizer": cpu_copy(optimizer.state_dict()), **meta}
            self.future = self.pool.submit(write_step, tmp, module.config, weights, state,
                                           tokenizer_dir)  # fmt: skip
        self.folder = folder

    def complete(self, fabric) -> None:
        """Every rank is done: put the folder in place (rank 0); raise what a writer raised."""
        if self.future is not None:
            self.future.result()
        if fabric.global_rank == 0:
            replace_dir(partial_dir(self.folder), self.folder)
        self.future, self.folder = None, None

    def wait(self, fabric) -> None:
        """Finish the save under way, if any (all ranks call this)."""
        if not self.pending:
            return
        if self.future is not None:
            self.future.result()
        fabric.barrier()
        self.complete(fabric)
        fabric.barrier()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19; Linux, where a thread's nice
    value is its own): the writer then takes only the CPU time training leaves, instead of
    slowing every step while a save is written."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:  # not permitted here: the writer keeps the normal priority
            pass


def write_step(tmp: Path, config, weights: dict, state: dict, tokenizer_dir) -> None:
    write_checkpoint_files(tmp, config, weights, tokenizer_dir)
    torch.save(state, tmp / STATE_DIR / STATE_FILE)


def cpu_copy(obj):
    """A state dict with every tensor copied to CPU (training goes on changing the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def partial_dir(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.partial"


def save_final(fabric, folder: Path, model, tokenizer_dir) -> None:
    """A plain checkpoint folder (consolidated from shards under FSDP), written by rank 0."""
    state_dict = full_state_dict(fabric, model)
    if fabric.global_rank == 0:
        write_final(folder, unwrap(model).config, state_dict, tokenizer_dir)
    fabric.barrier()


def write_final(folder: Path, config, state_dict: dict[str, torch.Tensor], tokenizer_dir) -> None:
    """Write a checkpoint folder atomically from a full state dict (one process)."""
    tmp = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_checkpoint_files(tmp, config, state_dict, tokenizer_dir)
    replace_dir(tmp, folder)


def full_state_dict(fabric, model) -> dict[str, torch.Tensor]:
    if not is_sharded(fabric):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lifecycle_cli.train.tensor_parallel import merge_qkv

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return merge_qkv(get_model_state_dict(unwrap(model), options=options))


def load_step(fabric, folder: Path, model, optimizer) -> Progress:
    """Restore model, optimizer, RNG and counters from a step folder (all ranks call this)."""
    state = {"optimizer": optimizer, "progress": {}, "rng": {}}
    if is_sharded(fabric):
        state["model"] = model
        fabric.load(folder / STATE_DIR, state, weights_only=True)
    else:
        from lifecycle_cli.checkpoint import load_weights

        load_weights(unwrap(model), folder)
        fabric.load(folder / STATE_DIR / STATE_FILE, state, weights_only=True)
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def prune_steps(out_dir: Path, keep_last: Optional[int]) -> None:
    if keep_last is None:
        return
    dirs = step_dirs(out_dir)
    for old in dirs[: max(0, len(dirs) - keep_last)]:
        shutil.rmtree(old)


def replace_dir(tmp: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.parent / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
