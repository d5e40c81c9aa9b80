"""`preference:FILE.jsonl`: records {"prompt", "chosen", "rejected"}; the share of pairs where
the model ranks chosen above rejected by summed response log-prob (`--length_normalize`: the
mean), formatted exactly as `align` formats them, and with `--ref_checkpoint` the implicit-reward
accuracy `align` reports; with `--reward_model DIR` also the share of pairs that reward model
scores chosen above rejected (`reward_model_accuracy`) and its mean margin. The reading and
scoring are align's (`data/preferences.py`, `evaluate/preference.py`,
`train/tasks/reward_model.py`); this module only wires them to the runner.
"""

from __future__ import annotations

from pathlib import Path

from lifecycle_cli.evaluate.results import Metric, TaskResult


def check(args: list[str], settings, n_checkpoints: int) -> None:
    from lifecycle_cli.data.preferences import load_pairs

    for arg in args:
        load_pairs(Path(arg))
    if settings.ref_checkpoint is not None:
        from lifecycle_cli.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(settings.ref_checkpoint)
    if settings.reward_model is not None:
        from lifecycle_cli.errors import UserError
        from lifecycle_cli.reward_model import is_reward_model

        if not is_reward_model(settings.reward_model):
            raise UserError(
                f"--reward_model {settings.reward_model}: not a reward model folder (train one "
                "with `llmcycle align CKPT --objective reward_model`)"
            )


def run(ctx, args: list[str]) -> list[TaskResult]:
    from lifecycle_cli.checkpoint import load_model
    from lifecycle_cli.data.preferences import load_pairs
    from lifecycle_cli.evaluate.preference import score_pairs

    s = ctx.settings
    ref = None
    if s.ref_checkpoint is not None:
        ref = load_model(s.ref_checkpoint, device=next(ctx.model.parameters()).device)
        ref.eval()
    rm = None
    if s.reward_model is not None:
        from lifecycle_cli.reward_model import RewardModel

        rm = RewardModel.load(s.reward_model, device=next(ctx.model.parameters()).device)
    out = []
    for arg in args:
        pairs = ctx.limited(load_pairs(Path(arg)))
        metrics, rows = score_pairs(
            ctx.model, ctx.tokenizer, pairs, prompt_style=ctx.style, ref_model=ref,
            length_normalize=s.length_normalize, batch_size=s.batch_size,
        )  # fmt: skip
        if rm is not None:
            metrics |= reward_model_metrics(rm, ctx, pairs, rows)
        out.append(
            TaskResult(
                f"preference:{arg}", len(pairs), [Metric(k, v) for k, v in metrics.items()], rows
            )
        )
    return out


def reward_model_metrics(rm, ctx, pairs: list[dict], rows: list[dict]) -> dict[str, float]:
    """The reward model's pairwise accuracy and mean margin over the pairs, formatted as align
    trains it (the evaluated checkpoint's prompt style); each row gets its two rewards."""
    from lifecycle_cli.data.preferences import PreferenceDataset
    from lifecycle_cli.train.tasks.reward_model import pair_rewards

    data = PreferenceDataset(pairs, ctx.tokenizer, ctx.style, rm.max_seq_length, seed=None)
    r = pair_rewards(rm, data, len(data), next(rm.parameters()).device, ctx.settings.batch_size)
    for row, (chosen, rejected) in zip(rows, r.tolist()):
        row |= {"reward_chosen": chosen, "reward_rejected": rejected}
    return {
        "reward_model_accuracy": (r[:, 0] > r[:, 1]).float().mean().item(),
        "reward_model_margin": (r[:, 0] - r[:, 1]).mean().item(),
    }
