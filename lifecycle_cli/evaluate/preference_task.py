"""`preference:FILE.jsonl`: records {"prompt", "chosen", "rejected"}; the share of pairs where
the model ranks chosen above rejected by summed response log-prob (`--length_normalize`: the
mean), formatted exactly as `align` formats them, and with `--ref_checkpoint` the implicit-reward
accuracy `align` reports. The reading and scoring are align's (`data/preferences.py`,
`evaluate/preference.py`); this module only wires them to the runner.
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


def run(ctx, args: list[str]) -> list[TaskResult]:
    from lifecycle_cli.checkpoint import load_model
    from lifecycle_cli.data.preferences import load_pairs
    from lifecycle_cli.evaluate.preference import score_pairs

    s = ctx.settings
    ref = None
    if s.ref_checkpoint is not None:
        ref = load_model(s.ref_checkpoint, device=next(ctx.model.parameters()).device)
        ref.eval()
    out = []
    for arg in args:
        pairs = ctx.limited(load_pairs(Path(arg)))
        metrics, rows = score_pairs(
            ctx.model, ctx.tokenizer, pairs, prompt_style=ctx.style, ref_model=ref,
            length_normalize=s.length_normalize, batch_size=s.batch_size,
        )  # fmt: skip
        out.append(
            TaskResult(
                f"preference:{arg}", len(pairs), [Metric(k, v) for k, v in metrics.items()], rows
            )
        )
    return out
