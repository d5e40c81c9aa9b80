"""Training objectives: what a batch's loss is. The loop does not know which one it runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lifecycle_cli.linear import matmul_t


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens 0..t; `batch` is (B, T + 1).
    The model computes it (`GPT.loss`): inside its forward, so compiled with it, and where a
    sharded head's weight is gathered."""
    return model(batch[:, :-1], targets=batch[:, 1:])


LOSS_CHUNK = 256  # rows of logits at a time in `linear_cross_entropy` (1 MB each at 1,024 tokens)


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight.T, targets_i), its gradients computed in the forward chunk by
    chunk: a chunk's logits become its softmax, minus one at the target, over the row count,
    which is the logits' gradient; two matmuls then give the hidden states' and the weight's
    gradients. The backward only scales them. Same matmuls as the unfused head + loss."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        n = hidden.size(0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, LOSS_CHUNK):
            h, y = hidden[start : start + LOSS_CHUNK], targets[start : start + LOSS_CHUNK, None]
            logp = torch.log_softmax(matmul_t(h, weight), dim=-1)
            total -= logp.gather(1, y).sum()
            probs = logp.exp_()
            probs.scatter_add_(1, y, torch.full_like(y, -1, dtype=probs.dtype))
            probs.mul_(1 / n)
            grad_hidden[start : start + LOSS_CHUNK] = matmul_t(probs, weight.t())
            grad_weight.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets)` for (N, d) hidden states, a (V, d) head
    and (N,) targets (every one counted: no ignore index), the logits made and used in chunks
    of LOSS_CHUNK rows."""
    return LinearCrossEntropy.apply(hidden, weight, targets)


def masked_sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100 (the response, by default);
    the head runs on those positions only."""
    scored = batch["labels"] != -100
    logits = model(batch["input_ids"], logits_where=scored)
    return F.cross_entropy(logits.float(), batch["labels"][scored])


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
    label is -100); the head runs on the labelled positions only."""
    scored = labels != -100
    logits = model(input_ids, logits_where=scored)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    out[scored] = -F.cross_entropy(logits.float(), labels[scored], reduction="none")
    return out


def shared_prompt_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[Sequence[int]]],
    max_len: int,
    pad_id: int = 0,
) -> tuple[torch.Tensor, int]:
    """The log-probability of every token of completions that share their prompt (GRPO's
    group: completions[g] all follow prompts[g]), flat (N,) in the order prompt, completion,
    token: the values `token_logps` gives rows prompt + completion, in the order of their
    labelled positions, computed with each prompt through the model once per packed row
    instead of once per completion; and the number of tokens the model read (padding not
    counted).

    A packed row holds a prompt and then as many of its completions (all but their last token:
    inputs) as fit in `max_len` tokens; every completion token sees the prompt and its own
    earlier tokens at the positions it would have alone (`GPT.forward(positions=, mask=)`), so
    the values are the same; the prompt's last position predicts every completion's first
    token. Gradients flow to the prompt positions from all of its completions at once."""
    rows: list[tuple[int, list[int]]] = []  # (prompt, the completions it holds)
    for g, (prompt, group) in enumerate(zip(prompts, completions)):
        held, length = [], len(prompt)
        for m, c in enumerate(group):
            if held and length + len(c) - 1 > max_len:
                rows.append((g, held))
                held, length = [], len(prompt)
            held.append(m)
            length += len(c) - 1
        rows.append((g, held))
    lengths = [len(prompts[g]) + sum(len(completions[g][m]) - 1 for m in held)
               for g, held in rows]  # fmt: skip
    R, T = len(rows), max(lengths)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros(R, T, dtype=torch.long)
    mask = torch.eye(T, dtype=torch.bool).repeat(R, 1, 1)  # padding sees itself only
    scored = torch.zeros(R, T, dtype=torch.bool)
    at_row, at_pos, labels = [], [], []  # per token: the row and position scoring it, its label
    for r, (g, held) in enumerate(rows):
        prompt = list(prompts[g])
        P = len(prompt)
        ids[r, :P] = torch.tensor(prompt)
        pos[r, :P] = torch.arange(P)
        mask[r, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        scored[r, P - 1] = True
        at = P
        for m in held:
            c = list(completions[g][m])
            n = len(c) - 1
            ids[r, at : at + n] = torch.tensor(c[:-1], dtype=torch.long)
            pos[r, at : at + n] = torch.arange(P, P + n)
            mask[r, at : at + n, :P] = True
            mask[r, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            scored[r, at : at + n] = True
            at_row += [r] * (n + 1)
            at_pos += [P - 1, *range(at, at + n)]
            labels += c
            at += n
    device = next(model.parameters()).device
    logits = model(
        ids.to(device), positions=pos.to(device), mask=mask.to(device),
        logits_where=scored.to(device),
    )  # fmt: skip
    # Row-major index of each scored position among the selected logits.
    index = torch.full((R, T), -1, dtype=torch.long)
    index[scored] = torch.arange(int(scored.sum()))
    pick = index[torch.tensor(at_row), torch.tensor(at_pos)].to(device)
    target = torch.tensor(labels, device=device)
    return -F.cross_entropy(logits.float()[pick], target, reduction="none"), sum(lengths)


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


SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """(prompts, G) rewards -> advantages: each reward minus its group's mean, divided by
    (`scale`, TRL's `scale_rewards`) the group's std + eps ("group", the GRPO paper's and TRL's
    default), the std of all the rewards given ("batch": a group whose rewards differ only by
    noise keeps small advantages), or nothing ("none", Dr. GRPO); stds with Bessel's
    correction as TRL computes them. A group whose rewards are all equal gets 0 everywhere."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    mean = rewards.mean(-1, keepdim=True)
    centred = rewards - mean
    if scale == "none":
        return centred
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
    else:
        std = rewards.std(-1, keepdim=True) if rewards.size(-1) > 1 else torch.zeros_like(mean)
    return centred / (std + eps)


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
