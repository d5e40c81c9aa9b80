"""Reward modelling (`align --objective reward_model`): the preference pairs of `PreferenceTask`,
a scalar head on the GPT (`reward_model.RewardModel`), the Bradley-Terry loss, and pairwise
accuracy (the share of pairs scored chosen > rejected) at every evaluation. final/ is a
checkpoint with the head and the marker that says it is a reward model.

With `--reward` (a verifier: exact match, a synthetic checker, a function) the pairs are the
starting checkpoint's own samples instead (on-policy pairs): --data's prompts (read as GRPO reads
them), --group_size completions of each sampled as GRPO samples them (--temperature, --top_p,
--max_new_tokens, a seed per row), ranked by the reward (`preferences.ranked_pairs`). A reward
model that GRPO will optimise then learns the mistakes that policy actually makes, not only the
ones a corruption rule makes up. The validation pairs come from the validation prompts; both
sets are written to out_dir/pairs-{train,val}.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lifecycle_cli.errors import UserError
from lifecycle_cli.train.tasks.preference import PreferenceTask

PAIRS_FILE = "pairs-{}.jsonl"


class RewardModelTask(PreferenceTask):
    extra_metrics = ("accuracy", "rewards_chosen", "rewards_rejected", "margin", "train_accuracy")

    def __init__(self, *args, verifier: Optional[list] = None, sampling=None, **kwargs) -> None:
        """verifier: the rewards that rank the checkpoint's own samples into pairs (none: the
        pairs of --data); sampling: how (`GRPOSettings`: group size, temperature, top_p,
        max_new_tokens)."""
        super().__init__(*args, **kwargs)
        self.extra_metrics = RewardModelTask.extra_metrics
        self.em_samples = 0
        self.objective = self.loss
        for r in verifier or ():
            if r.kind == "model":
                raise UserError(
                    f"--reward {r.spec}: --objective reward_model ranks its samples with a "
                    "verifier (exact_match, synthetic, format, FILE.py:FUNCTION), not a reward "
                    "model"
                )
        self.verifier, self.sampling = verifier, sampling
        self.sampled: dict[str, int] = {}

    def data(self, seq_length: int, seed: int):
        if not self.verifier:
            return super().data(seq_length, seed)
        from lifecycle_cli.data.preferences import PreferenceDataset
        from lifecycle_cli.data.prompts import load_prompts

        train, val = load_prompts(self.pairs)
        tok, style = self.tokenizer, self.style
        sets = []
        for part, records in (("train", train), ("val", val)):
            pairs = self.sample_pairs(records, seq_length, seed, part)
            if not pairs:
                raise UserError(
                    f"no {part} pairs: the {self.sampling.group_size} samples of every "
                    f"{part} prompt got the same reward (more --group_size or a higher "
                    "--temperature gives the verifier different answers to rank)"
                )
            path = self.out_dir / PAIRS_FILE.format(part)
            text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs)
            # Rank 0 writes; the other ranks (after it, sampling the same) find it written.
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.partial")
                tmp.write_text(text, encoding="utf-8")
                tmp.replace(path)
            sets.append(PreferenceDataset(pairs, tok, style, seq_length, seed))
        self.train_data, self.val_data = sets
        self.seq_length = seq_length
        return self.train_data, self.val_data

    def sample_pairs(self, records: list[dict], seq_length: int, seed: int, part: str):
        """The pairs of `records`' sampled completions, ranked by the verifier."""
        import torch

        from lifecycle_cli.checkpoint import load_model
        from lifecycle_cli.data.preferences import ranked_pairs
        from lifecycle_cli.generate import Generator
        from lifecycle_cli.rewards import Sample, score

        s, G = self.sampling, self.sampling.group_size
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        gpt = load_model(self.checkpoint_dir, device=device).eval()
        gpt.max_seq_length = seq_length
        generator = Generator(gpt, self.tokenizer)
        weights = [r.weight for r in self.verifier]
        salt = {"train": 0, "val": 1}[part]
        pairs, chunk = [], max(1, 256 // G)
        for start in range(0, len(records), chunk):
            items = []
            for n, record in enumerate(records[start : start + chunk], start):
                ids = s.prompt_ids(self.style, self.tokenizer, record, seq_length)
                items.append((n, record, ids))
            prompts = [ids for _, _, ids in items for _ in range(G)]
            params = [
                s.sampling(self.style, ((seed * 1_000_003 + salt) * 1_000_033 + n) * 4_099 + g)
                for n, _, _ in items
                for g in range(G)
            ]
            with torch.no_grad():
                completions = generator.generate_batch(prompts, params)
            samples = [
                Sample(record, record["prompt"], ids, c.text, c.token_ids, c.finish_reason)
                for (_, record, ids), k in zip(items, range(0, len(prompts), G))
                for c in completions[k : k + G]
            ]
            totals = [
                sum(w * v for w, v in zip(weights, row)) for row in score(self.verifier, samples)
            ]
            for i, (_, record, _) in enumerate(items):
                group = slice(i * G, (i + 1) * G)
                texts = [x.text for x in samples[group]]
                pairs += ranked_pairs(record, texts, totals[group])
        gpt.clear_kv_cache()
        self.sampled[part] = len(records) * G
        return pairs

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
        lines = [
            f"{self.method} reward model (a scalar head on the last response token, "
            f"Bradley-Terry loss), prompt style {self.style.name!r}: {trainable:,} trainable "
            f"parameters; {len(train):,} training / {len(val):,} validation pairs"
        ]
        if self.verifier:
            s = self.sampling
            rewards = " + ".join(f"{r.weight:g} * {r.spec}" for r in self.verifier)
            lines.append(
                f"pairs: the checkpoint's own completions ({s.group_size} per prompt, "
                f"temperature {s.temperature}, top_p {s.top_p}, up to {s.max_new_tokens} "
                f"tokens; {self.sampled['train']:,} + {self.sampled['val']:,} sampled) ranked "
                f"by {rewards}; out_dir/{PAIRS_FILE.format('train')}, "
                f"{PAIRS_FILE.format('val')}"
            )
        return lines

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
