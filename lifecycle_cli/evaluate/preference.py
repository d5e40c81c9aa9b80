"""Preference accuracy: how often a model prefers the chosen response of a pair.

`score_pairs` scores checked pairs (`data.preferences.load_pairs`) with the policy, and with a
reference model when one is given: per pair the summed log-probability of each response's tokens
(formatted and truncated exactly as `align` trains on them), and over all pairs

- accuracy: the share where the policy's log-prob of chosen beats rejected (summed; per-token
  mean with length_normalize);
- reward_accuracy (with a reference): the share whose implicit reward margin
  [log pi(c) - log pi_ref(c)] - [log pi(r) - log pi_ref(r)] is positive (TRL's
  rewards/accuracies);
- rewards_chosen / rewards_rejected / margin: mean implicit rewards beta * (log pi - log pi_ref)
  (without a reference, beta * log pi, per-token mean with length_normalize) and their gap;
- logps_chosen / logps_rejected: mean summed log-probs; pairs, truncated: counts.

Ties count as not preferring chosen. The model is used as it is (call it in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from lifecycle_cli.data.preferences import PreferenceDataset
from lifecycle_cli.objectives import response_logps


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[dict],
    *,
    prompt_style: Any,
    ref_model: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    length_normalize: bool = False,
    batch_size: int = 8,
    max_seq_length: Optional[int] = None,
    beta: float = 1.0,
    ref_logps: Optional[Sequence[Sequence[float]]] = None,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one row per pair): see the module docstring. `prompt_style` is a PromptStyle or
    a style name (None: the checkpoint's prompt_style.yaml, else its chat template, else
    plain). `ref_model` is anything that maps token ids to logits; `ref_logps` ((chosen,
    rejected) per pair, e.g. precomputed by align) stands in for it."""
    from lifecycle_cli.prompts import PromptStyle, resolve_style

    if not isinstance(prompt_style, PromptStyle):
        prompt_style = resolve_style(tokenizer.checkpoint_dir, tokenizer, prompt_style)
    length = max_seq_length or getattr(model, "max_seq_length", None) or model.config.block_size
    data = PreferenceDataset(pairs, tokenizer, prompt_style, length, seed=None)
    device = next(model.parameters()).device
    n = len(data)
    policy, ref, counts = torch.zeros(n, 2), torch.zeros(n, 2), torch.zeros(n, 2)
    for start in range(0, n, batch_size):
        ids = slice(start, min(start + batch_size, n))
        batch = {k: v.to(device) for k, v in data.rows(range(n)[ids]).items()}
        logps, tokens = response_logps(model, batch)
        policy[ids] = logps.view(2, -1).T.cpu()
        counts[ids] = tokens.view(2, -1).T.cpu().float()
        if ref_model is not None and ref_logps is None:
            logps, _ = response_logps(ref_model, batch)
            ref[ids] = logps.view(2, -1).T.cpu()
    has_ref = ref_model is not None or ref_logps is not None
    if ref_logps is not None:
        ref = torch.as_tensor(ref_logps, dtype=torch.float32).reshape(n, 2)

    shown = policy / counts if length_normalize else policy
    rewards = beta * (policy - ref) if has_ref else beta * shown
    metrics = {
        "pairs": float(n),
        "truncated": float(data.n_truncated),
        "accuracy": (shown[:, 0] > shown[:, 1]).float().mean().item(),
        "logps_chosen": policy[:, 0].mean().item(),
        "logps_rejected": policy[:, 1].mean().item(),
        "rewards_chosen": rewards[:, 0].mean().item(),
        "rewards_rejected": rewards[:, 1].mean().item(),
        "margin": (rewards[:, 0] - rewards[:, 1]).mean().item(),
    }
    if has_ref:
        metrics["reward_accuracy"] = (rewards[:, 0] > rewards[:, 1]).float().mean().item()
    rows = []
    for i, pair in enumerate(pairs):
        row = {
            "where": pair.get("where", f"pair {i + 1}"),
            "chosen_logp": policy[i, 0].item(),
            "rejected_logp": policy[i, 1].item(),
            "chosen_tokens": int(counts[i, 0]),
            "rejected_tokens": int(counts[i, 1]),
            "prefers_chosen": bool(shown[i, 0] > shown[i, 1]),
        }
        if has_ref:
            row |= {
                "ref_chosen_logp": ref[i, 0].item(),
                "ref_rejected_logp": ref[i, 1].item(),
                "reward_margin": (rewards[i, 0] - rewards[i, 1]).item(),
            }
        rows.append(row)
    return metrics, rows
