"""Training objectives: what a batch's loss is. The loop does not know which one it runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens 0..t; `batch` is (B, T + 1)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def masked_sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100 (the response, by default)."""
    logits = model(batch["input_ids"])
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100
    )


# ---------------------------------------------------------------------------------------------
# Preference objectives (DPO family). Inputs are per-sequence log-probabilities summed over the
# response tokens (`response_logps`) and those tokens' counts; every function returns the loss of
# each pair (the task averages them). Chosen minus rejected is the preferred direction throughout.


def response_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's response tokens, their count), both (rows,): one
    forward over the whole batch (chosen and rejected rows concatenated)."""
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    token_logps = -F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    return token_logps.sum(-1), (labels != -100).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), sigmoid form: -log sigmoid(beta * h) with
    h = [log pi(c) - log pi_ref(c)] - [log pi(r) - log pi_ref(r)] (summed log-probs). With
    label smoothing eps (conservative DPO: the label is wrong with probability eps):
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, h the log-ratio difference of DPO on
    log-probs averaged over each response's tokens (as TRL computes it; beta is the paper's
    tau)."""
    h = (policy_chosen - ref_chosen) / n_chosen - (policy_rejected - ref_rejected) / n_rejected
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta/|c| log pi(c) -
    beta/|r| log pi(r) - gamma), |y| the response's token count; label smoothing as in DPO."""
    z = beta * (policy_chosen / n_chosen - policy_rejected / n_rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    weight: float = 0.1,
) -> torch.Tensor:
    """ORPO (Hong et al. 2024), reference-free: the SFT loss on the chosen response (its mean
    token negative log-likelihood) plus weight * -log sigmoid(log odds(c) - log odds(r)), where
    odds(y) = P(y) / (1 - P(y)) and P(y) = exp(mean token log-prob of y)."""
    mean_c, mean_r = policy_chosen / n_chosen, policy_rejected / n_rejected

    def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
        return mean_logp - torch.log(-torch.expm1(mean_logp.clamp(max=-1e-7)))

    return -mean_c - weight * F.logsigmoid(log_odds(mean_c) - log_odds(mean_r))
