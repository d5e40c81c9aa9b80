"""Reward modelling (`align --objective reward_model`): the preference pairs of `PreferenceTask`,
a scalar head on the GPT (`reward_model.RewardModel`), the Bradley-Terry loss, and pairwise
accuracy (the share of pairs scored chosen > rejected) at every evaluation. final/ is a
checkpoint with the head and the marker that says it is a reward model."""

from __future__ import annotations

from pathlib import Path

from lifecycle_cli.train.tasks.preference import PreferenceTask


class RewardModelTask(PreferenceTask):
    extra_metrics = ("accuracy", "rewards_chosen", "rewards_rejected", "margin", "train_accuracy")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_metrics = RewardModelTask.extra_metrics
        self.em_samples = 0
        self.objective = self.loss

    def wrap(self, gpt):
        from lifecycle_cli.reward_model import RewardModel

        return RewardModel(gpt)

    def rewards(self, model, batch):
        """(B, 2) rewards of the batch's pairs: chosen, rejected."""
        from lifecycle_cli.reward_model import last_response_index

        r = model(batch["input_ids"], last_response_index(batch["labels"]))
        return r.view(2, -1).T

    def loss(self, model, batch):
        from lifecycle_cli.reward_model import bradley_terry_loss

        chosen, rejected = self.rewards(model, batch).unbind(-1)
        return bradley_terry_loss(chosen, rejected).mean()

    def describe(self, trainable: int, seq_length: int) -> list[str]:
        train, val = self.train_data, self.val_data
        return [
            f"{self.method} reward model (a scalar head on the last response token, "
            f"Bradley-Terry loss), prompt style {self.style.name!r}: {trainable:,} trainable "
            f"parameters; {len(train):,} training / {len(val):,} validation pairs"
        ]

    def score(self, model, data, n: int) -> dict[str, float]:
        return score_reward_pairs(model, data, n, self.fabric.device)

    def extra_eval(self):
        from lifecycle_cli.train.fabric import unwrap

        def measure(model) -> dict[str, float]:
            model = unwrap(model)
            n = min(self.samples, len(self.val_data))
            out = self.score(model, self.val_data, n)
            out["train_accuracy"] = self.score(model, self.train_data, n)["accuracy"]
            return out

        return measure

    def save_extra(self, model, final: Path, say) -> None:
        from lifecycle_cli.prompts import save_prompt_style

        save_prompt_style(self.style, final)
        model.save_head(final)
        n = len(self.val_data)
        say(f"Validation pairwise accuracy {self.score(model, self.val_data, n)['accuracy']:.4f}")


def pair_rewards(model, data, n: int, device, batch_size: int = 16):
    """(n, 2) rewards (chosen, rejected) of the first n pairs of a PreferenceDataset."""
    import torch

    from lifecycle_cli.reward_model import last_response_index

    rewards = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = data.rows(range(start, min(start + batch_size, n)))
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            rewards.append(model(ids, last_response_index(labels)).view(2, -1).T.cpu())
    return torch.cat(rewards) if rewards else torch.zeros(0, 2)


def score_reward_pairs(model, data, n: int, device, batch_size: int = 16) -> dict[str, float]:
    """Pairwise accuracy (ties count as wrong), mean rewards and margin of a reward model over
    the first n pairs of a PreferenceDataset."""
    r = pair_rewards(model, data, n, device, batch_size)
    return {
        "accuracy": (r[:, 0] > r[:, 1]).float().mean().item(),
        "rewards_chosen": r[:, 0].mean().item(),
        "rewards_rejected": r[:, 1].mean().item(),
        "margin": (r[:, 0] - r[:, 1]).mean().item(),
    }
