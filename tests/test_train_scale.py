"""Training at scale, on the one loop: guards against non-finite steps and loss spikes,
precision and logger choices, prefetched batches, background checkpoints."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from lifecycle_cli.train.args import EvalArgs, TrainArgs
from lifecycle_cli.train.logs import read_metrics


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """One thread (the models are tiny; the CPU is shared) and no matmul probe for MFU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("lifecycle_cli.train.loop.peak_flops", lambda *a: 1e12)
    yield
    torch.set_num_threads(threads)


NAN, SPIKE = -1, -2  # a sample's first token: poisoned (loss NaN) or spiking (loss x 50)


class Tokens:
    """TrainData of counting token blocks (B, 9) from a random start, some marked."""

    def __init__(self, marks: dict[int, int]) -> None:
        self.marks = marks
        self.reads = []  # (first index, the thread that read it)

    def __len__(self) -> int:
        return 64

    def get(self, indices):
        self.reads.append((indices[0], threading.current_thread().name))
        rows = []
        for i in indices:
            row = (i * 7 + torch.arange(9)) % 64
            row[0] = self.marks.get(i, row[0])
            rows.append(row)
        return torch.stack(rows)


def poisoned_loss(model, batch):
    from lifecycle_cli.objectives import next_token_loss

    loss = next_token_loss(model, batch.clamp(min=0))
    if (batch[:, 0] == NAN).any():
        return loss * math.nan
    return loss * 50 if (batch[:, 0] == SPIKE).any() else loss


def tiny_run(tmp_path, marks, precision="32-true", **train):
    """A 2-layer GPT trained in this process on `Tokens(marks)`: (model, run, progress)."""
    import lightning as L

    from lifecycle_cli.model import GPT
    from lifecycle_cli.train.fabric import make_optimizer
    from lifecycle_cli.train.loop import Run, fit
    from lifecycle_cli.train.state import Progress
    from lifecycle_cli.zoo import named_config

    config = named_config(
        "pythia-14m", n_layer=2, n_embd=32, n_head=2, vocab_size=64,
        block_size=8, intermediate_size=64,
    )  # fmt: skip
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    fabric.seed_everything(0, verbose=False)
    model = fabric.setup(GPT(config))
    optimizer = make_optimizer(model, 1e-2, 0.0, (0.9, 0.95), fused=False)
    optimizer = fabric.setup_optimizers(optimizer)
    args = dict(global_batch_size=4, micro_batch_size=2, lr=1e-2, lr_schedule="constant")
    train = TrainArgs(**{**args, **train})
    run = Run(
        objective=poisoned_loss, train_data=Tokens(marks), val_data=Tokens({}), train=train,
        eval=EvalArgs(interval=None, final_validation=False), out_dir=tmp_path,
        max_steps=train.max_steps, flops_per_token=1.0,
    )  # fmt: skip
    progress = fit(fabric, model, optimizer, run, Progress())
    tiny_run.data = run.train_data
    return model, optimizer, progress


def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, capsys):
    """Samples 12-15 make step 4's loss NaN: its update is not applied, the next steps are."""
    model, _, progress = tiny_run(tmp_path, {13: NAN}, max_steps=8, save_interval=None)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["skipped_steps"]) for r in rows] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert math.isnan(float(rows[3]["train_loss"]))
    finite = [float(r["train_loss"]) for r in rows[4:]]
    assert all(math.isfinite(x) for x in finite) and finite[-1] < float(rows[0]["train_loss"])
    assert progress.step == 8 and progress.skipped_steps == 1
    assert "step 4: loss nan" in capsys.readouterr().err
    # Batches are read ahead, in the background: all but the first step's, each once. The reads
    # planned for a ninth step (32, 34) happen only if they start before the run ends and
    # cancels them.
    firsts = [first for first, _ in tiny_run.data.reads]
    assert firsts[:16] == list(range(0, 32, 2)) and firsts[16:] == [32, 34][: len(firsts) - 16]
    assert {thread for _, thread in tiny_run.data.reads[2:]} == {"llmcycle-prefetch_0"}


def test_loss_spikes_roll_back_to_the_last_step_folder_and_skip_their_batches(tmp_path, capsys):
    """Steps 9 and 10 (samples 32-39) spike: the run goes back to step-000008, skips those
    samples, and steps 9 and 10 train on samples 40-47 instead."""
    marks = {33: SPIKE, 37: SPIKE}
    _, _, progress = tiny_run(
        tmp_path, marks, max_steps=12, save_interval=4, keep_last=None, spike_rollback=2
    )
    err = capsys.readouterr().err
    assert "rolled back to step-000008; samples 32-39 are skipped" in err
    assert progress.rollbacks == 1 and progress.skip == [[32, 40]]
    assert progress.step == 12 and progress.samples == 56  # 12 steps + the 2 skipped
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))  # the spiking rows are gone
    assert all(float(r["train_loss"]) < 10 for r in rows)
    assert [int(r["rollbacks"]) for r in rows] == [0] * 8 + [1] * 4


def test_mixed_precision_keeps_fp32_weights_and_optimizer_state(tmp_path):
    model, optimizer, _ = tiny_run(tmp_path, {}, precision="bf16-mixed", max_steps=2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_fsdp_mixed_precision_reduces_in_fp32():
    from lifecycle_cli.train.fabric import mixed_precision_policy

    policy = mixed_precision_policy("bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("32-true") is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision="16-mixed"), "--precision 16-mixed needs a CUDA GPU"),
        (dict(precision="fp16"), "--precision 'fp16' is not one of 32-true, bf16-mixed"),
        (dict(precision=None, fp8=True), "--fp8 needs an H100-class GPU"),
    ],
)
def test_what_this_cpu_cannot_do_is_refused_in_one_line(kwargs, message):
    from lifecycle_cli.errors import UserError
    from lifecycle_cli.train.fabric import setup_fabric

    with pytest.raises(UserError) as refused:
        setup_fabric(1, 1, "auto", **kwargs)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def logged_values(name: str, out_dir) -> list[float]:
    """train_loss as the logger stored it."""
    if name == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out_dir / "tensorboard"))
        events.Reload()
        return [e.value for e in events.Scalars("train_loss")]
    if name == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient((out_dir / "mlruns").resolve().as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("llmcycle").experiment_id])
        return [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    (run,) = (out_dir / "wandb").glob("offline-run-*")  # a binary log `wandb sync` uploads
    assert list(run.glob("run-*.wandb"))[0].stat().st_size > 0
    return [2.0, 1.5]


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_metrics_go_to_the_chosen_logger_as_well_as_metrics_csv(name, tmp_path, monkeypatch):
    from lifecycle_cli.train.logs import MetricsLog

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLog(tmp_path, 0, name)
    log.log(1, train_loss=2.0, lr=1e-3)
    log.log(2, train_loss=1.5, lr=1e-3)
    log.close()
    assert [float(r["train_loss"]) for r in read_metrics(tmp_path / "metrics.csv")] == [2.0, 1.5]
    assert logged_values(name, tmp_path) == [2.0, 1.5]


def test_a_missing_logger_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    from lifecycle_cli.errors import UserError
    from lifecycle_cli.train.logs import check_logger

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--logger wandb needs the wandb package: pip install"):
        check_logger("wandb")
    check_logger("csv")


def test_background_checkpoints_equal_synchronous_ones(tmp_path):
    from tests.test_pretrain import weights

    for mode in ("sync", "async"):
        tiny_run(tmp_path / mode, {}, max_steps=6, save_interval=2, keep_last=None,
                 async_checkpoint=mode == "async")  # fmt: skip
    for step in ("step-000002", "step-000004", "step-000006"):
        a, b = weights(tmp_path / "sync" / step), weights(tmp_path / "async" / step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
        states = [torch.load(tmp_path / m / step / "train_state" / "state.pt", weights_only=True)
                  for m in ("sync", "async")]  # fmt: skip
        assert states[0]["progress"] == states[1]["progress"]
        moments = [[s["exp_avg"] for s in st["optimizer"]["state"].values()] for st in states]
        assert all(torch.equal(x, y) for x, y in zip(*moments))


def test_a_crash_in_a_background_save_leaves_no_folder_resume_would_pick(tmp_path, monkeypatch):
    from lifecycle_cli.train import state
    from lifecycle_cli.train.state import find_resume

    def crash(tmp, config, weights, saved, tokenizer_dir):
        if saved["progress"]["step"] == 4:
            state.write_checkpoint_files(tmp, config, weights, tokenizer_dir)  # weights only
            raise OSError("disk full")
        write(tmp, config, weights, saved, tokenizer_dir)

    write = state.write_step
    monkeypatch.setattr(state, "write_step", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny_run(tmp_path, {}, max_steps=6, save_interval=2, async_checkpoint=True)
    assert (tmp_path / ".step-000004.partial" / "model.safetensors").exists()
    assert find_resume("auto", tmp_path) == tmp_path / "step-000002"


def test_a_sharded_step_folder_names_the_consolidated_one_to_use(tmp_path):
    from lifecycle_cli import LLM
    from lifecycle_cli.errors import UserError

    step = tmp_path / "out" / "step-000003"
    (step / "train_state").mkdir(parents=True)
    (step / "train_state" / ".metadata").write_bytes(b"")  # what an FSDP run writes there
    with pytest.raises(UserError, match="sharded .FSDP. step folder, for --resume.*out/final"):
        LLM.load(step)
