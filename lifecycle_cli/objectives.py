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
    labels = batch["labels"]
    return token_logps(model, batch["input_ids"], labels).sum(-1), (labels != -100).sum(-1)


def token_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    """(B, T) log-probability of each label token given the tokens before it (0 where the
    label is -100). Only each row's span from its first to its last label goes through the LM
    head: with a large vocabulary the head is most of the work, and a prompt needs none of it
    (GRPO: a few completion tokens after each prompt)."""
    labelled = labels != -100
    T = labels.size(1)
    index = torch.arange(T, device=labels.device).expand_as(labels)
    first = torch.where(labelled, index, T).amin(1).clamp(max=T - 1)
    last = torch.where(labelled, index, -1).amax(1)
    span = torch.arange(max(int((last - first).max()) + 1, 1), device=labels.device)
    cols = (first[:, None] + span).clamp(max=T - 1)
    picked = torch.where(span <= (last - first)[:, None], labels.gather(1, cols), -100)
    logits = model(input_ids, logits_at=cols)
    logps = -F.cross_entropy(
        logits.flatten(0, 1).float(), picked.flatten(), ignore_index=-100, reduction="none"
    ).view(picked.shape)
    return torch.zeros_like(logps[:, :1]).expand(-1, T).scatter_add(1, cols, logps)


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


# ---------------------------------------------------------------------------------------------
# GRPO (Shao et al. 2024, DeepSeekMath): several completions per prompt, each one's advantage its
# reward standardised within the prompt's group (no value network), a PPO-style clipped ratio per
# completion token.


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(prompts, G) rewards -> (r - group mean) / (group std + eps), std with Bessel's
    correction as TRL computes it. A group whose rewards are all equal gets 0 everywhere."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.size(-1) > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def grpo_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token KL) from (N, T) token log-probs of the policy, of the policy
    that sampled them (`old_logps`, no gradient) and of the reference, and (N,) advantages:

        -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL,

    ratio = exp(logp - old_logp) and KL the k3 estimator exp(ref - logp) - (ref - logp) - 1
    (>= 0, unbiased; as DeepSeekMath and TRL). Without a reference the KL is 0."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    policy = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if ref_logps is None:
        return policy, torch.zeros_like(policy)
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1
    return policy + kl_coef * kl, kl


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is set: every completion token weighs the same (the loss
    is normalised by the batch's token count, not per completion)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
