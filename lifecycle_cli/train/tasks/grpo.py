"""GRPO (`align --objective grpo`): reinforcement learning from rewards a program computes.

Each optimizer step takes --train.global_batch_size prompts. For each, --group_size completions
are sampled by the one decoder (`generate.Generator`: batched, KV cache), rewarded
(`lifecycle_cli.rewards`: a weighted sum), and given the advantage of their reward within the
prompt's group (`objectives.group_advantages`); the loss is the clipped policy-ratio objective
over the completion tokens, normalised by their count (`objectives.grpo_token_losses`), plus
--kl_coef times the KL to the reference (the LoRA base with adapters off, or a frozen copy for
--method full). One rollout serves --num_iterations optimizer steps: the first step's ratio is 1,
the later ones are off-policy and clipped. The decoder prefills a group's shared prompt once, and
the update's forward passes read it once per packed row of its completions
(`objectives.shared_prompt_logps`), not once per completion.

How it rides the one training loop: the data are global sample indices -> (rollout, slot,
prompt); the objective generates a micro-batch's completions when it first meets them (every
micro-batch of one step sees the same weights), keeps them for the rollout's other steps, and
writes them to out_dir/rollouts-rank<R>.pt so a run resumed mid-rollout continues with the very
same completions. Each completion is sampled with a seed of its own from (--seed, rollout, slot,
index in the group): the sampler's state is a function of the step, so resume is exact. There is
no validation loss; every evaluation measures pass@1 on held-out prompts (the share of greedy
answers the first reward scores >= 1; see `held_out`) and their mean reward.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lifecycle_cli.data.args import PreferenceData
from lifecycle_cli.errors import UserError
from lifecycle_cli.lora import LoRAArgs
from lifecycle_cli.rewards import Reward
from lifecycle_cli.train.tasks.from_checkpoint import CheckpointTask, Method

COMPLETIONS_FILE = "completions.jsonl"


@dataclass
class GRPOSettings:
    """The verb's GRPO flags."""

    group_size: int = 8
    num_iterations: int = 1
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    eval_samples: int = 100
    log_completions: int = 0
    scale_rewards: str = "group"

    def __post_init__(self) -> None:
        from lifecycle_cli.objectives import SCALE_REWARDS

        checks = {
            f"--scale_rewards must be one of {', '.join(SCALE_REWARDS)}": (
                self.scale_rewards in SCALE_REWARDS
            ),
            "--group_size must be at least 2": self.group_size >= 2,
            "--num_iterations must be at least 1": self.num_iterations >= 1,
            "--clip_eps must be > 0": self.clip_eps > 0,
            "--kl_coef must be >= 0": self.kl_coef >= 0,
            "--temperature must be > 0 for GRPO's sampling": self.temperature > 0,
            "--top_p must be in (0, 1]": 0 < self.top_p <= 1,
            "--max_new_tokens must be at least 1": self.max_new_tokens >= 1,
            "--exact_match_samples must be >= 0": self.eval_samples >= 0,
            "--log_completions must be >= 0": self.log_completions >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise UserError(message)

    def prompt_ids(self, style, tokenizer, record: dict, seq_length: int) -> list[int]:
        """A prompt record's token ids in `style`, refused if it leaves no room for
        max_new_tokens in `seq_length`."""
        ids = style.encode(tokenizer, style.apply(record["prompt"]))
        if len(ids) + self.max_new_tokens + 1 > seq_length:
            raise UserError(
                f"{record['where']}: the prompt is {len(ids)} tokens; with --max_new_tokens "
                f"{self.max_new_tokens} it needs more than the {seq_length} of "
                "--train.max_seq_length (shorten it or raise the length)"
            )
        return ids

    def sampling(self, style, seed: int):
        """How one completion is sampled: these settings, the style's stops, a row's seed."""
        from lifecycle_cli.generate import SamplingParams

        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=None,
            top_p=self.top_p, stop=tuple(style.stop), seed=seed,
        )  # fmt: skip


class PromptStream:
    """Global sample index i -> (rollout, slot, prompt): step s = i // B reads slot i % B of
    rollout s // num_iterations, whose prompts are samples [r*B, (r+1)*B) of the shared order
    (`data.order`). One epoch is every prompt once, for num_iterations steps each."""

    def __init__(self, n: int, per_step: int, iterations: int, seed: int) -> None:
        self.n, self.per_step, self.iterations, self.seed = n, per_step, iterations, seed
        self.cache: dict = {}

    def __len__(self) -> int:
        return self.n * self.iterations

    def get(self, indices):
        import torch

        from lifecycle_cli.data.order import sample_items

        step, slot = np.divmod(np.asarray(indices, dtype=np.int64), self.per_step)
        rollout = step // self.iterations
        items = sample_items(rollout * self.per_step + slot, self.n, self.seed, self.cache)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return {"rollout": as_tensor(rollout), "slot": as_tensor(slot), "item": as_tensor(items)}


class NoValidation:
    """GRPO has no validation loss: the loop's evaluation only runs `extra_eval`."""

    n_truncated = 0

    def __len__(self) -> int:
        return 0

    def get(self, indices):
        raise IndexError("GRPO has no validation batches")


class GRPOTask(CheckpointTask):
    def __init__(
        self,
        checkpoint_dir: Path,
        data: PreferenceData,
        method: Method,
        lora: LoRAArgs,
        rewards: list[Reward],
        settings: GRPOSettings,
        out_dir: Path,
        prompts_per_step: int,
        prompt_style: Optional[str] = None,
        resuming: bool = False,
    ) -> None:
        from lifecycle_cli.train.tasks.sft import choose_style

        super().__init__(checkpoint_dir, method, lora)
        self.prompts, self.rewards, self.s, self.out_dir = data, rewards, settings, out_dir
        self.per_step, self.resuming = prompts_per_step, resuming
        self.style = choose_style(prompt_style, checkpoint_dir, self.tokenizer)
        per_reward = [f"reward_{r.name}_{x}" for r in rewards for x in ("mean", "std")]
        self.step_columns = (
            "reward_mean", "reward_std", *(per_reward if len(rewards) > 1 else ()),
            "zero_std_groups", "kl", "clip_fraction", "completion_length",
            "rollout_tokens_per_sec", "update_tokens_per_sec",
        )  # fmt: skip
        self.extra_metrics = ("pass@1", "val_reward", *self.step_columns)
        self.objective = self.loss
        self.reference = None  # a frozen copy (full finetuning with a KL term)
        self.buffer: dict[int, dict] = {}
        self.buffer_id: Optional[int] = None
        self.reset_stats()

    # -----------------------------------------------------------------------------------------
    # Setup

    def check(self, fabric) -> None:
        from lifecycle_cli.train.fabric import is_sharded

        super().check(fabric)
        if is_sharded(fabric):
            raise UserError("--objective grpo supports --strategy auto or ddp, not fsdp")

    def data(self, seq_length: int, seed: int):
        from lifecycle_cli.data.prompts import load_prompts

        train, val = load_prompts(self.prompts)
        self.seed, self.seq_length = seed, seq_length
        self.train_prompts = [self.encode(r, seq_length) for r in train]
        self.val_prompts = [self.encode(r, seq_length) for r in val]
        self.train_data = PromptStream(len(train), self.per_step, self.s.num_iterations, seed)
        self.val_data = NoValidation()
        return self.train_data, self.val_data

    def encode(self, record: dict, seq_length: int) -> tuple[dict, list[int]]:
        return record, self.s.prompt_ids(self.style, self.tokenizer, record, seq_length)

    def model(self, fabric, seq_length: int):
        from lifecycle_cli.checkpoint import load_weights
        from lifecycle_cli.model import GPT
        from lifecycle_cli.rewards import load_models

        model = super().model(fabric, seq_length)
        self.fabric = fabric
        if self.s.kl_coef > 0 and self.method == "full":
            with fabric.init_module():
                ref = GPT(self.config)
            load_weights(ref, self.checkpoint_dir)
            ref.max_seq_length = seq_length
            self.reference = ref.requires_grad_(False).eval().to(fabric.device)
        load_models(self.rewards, fabric.device, self.config.vocab_size)
        if not self.resuming and fabric.global_rank == 0:
            for stale in (self.buffer_file, self.out_dir / COMPLETIONS_FILE):
                stale.unlink(missing_ok=True)
        return model

    def describe(self, trainable: int, seq_length: int) -> list[str]:
        s = self.s
        rewards = " + ".join(f"{r.weight:g} * {r.spec}" for r in self.rewards)
        ref = "none (--kl_coef 0)"
        if s.kl_coef > 0:
            ref = "a frozen copy" if self.reference is not None else "the adapters off"
        scaled = f"over the {s.scale_rewards} std" if s.scale_rewards != "none" else "unscaled"
        return [
            f"{self.method} GRPO, reward {rewards}; {s.group_size} completions per prompt "
            f"(temperature {s.temperature}, top_p {s.top_p}, up to {s.max_new_tokens} tokens), "
            f"advantages {scaled}, {s.num_iterations} update(s) per rollout, clip "
            f"{s.clip_eps}, KL {s.kl_coef} to "
            f"{ref}; prompt style {self.style.name!r}: {trainable:,} trainable parameters; "
            f"{len(self.train_prompts):,} training / {len(self.val_prompts):,} held-out prompts"
        ]

    # -----------------------------------------------------------------------------------------
    # Rollouts

    @property
    def buffer_file(self) -> Path:
        rank = self.fabric.global_rank if hasattr(self, "fabric") else 0
        return self.out_dir / f"rollouts-rank{rank}.pt"

    def row_seed(self, rollout: int, slot: int, member: int) -> int:
        return ((self.seed * 1_000_003 + rollout) * 1_000_033 + slot) * 4_099 + member

    def rollout(self, rollout: int, todo: list[tuple[int, int]]) -> None:
        """Sample, reward and score the completions of (slot, prompt item) pairs into the
        buffer."""
        import torch

        from lifecycle_cli.generate import Generator
        from lifecycle_cli.objectives import group_advantages
        from lifecycle_cli.rewards import Sample, score

        s, gpt, G = self.s, self.gpt, self.s.group_size
        was_training = gpt.training
        gpt.eval()
        prompts, params = [], []
        for slot, item in todo:
            _, ids = self.train_prompts[item]
            for g in range(G):
                prompts.append(ids)
                params.append(s.sampling(self.style, self.row_seed(rollout, slot, g)))
        start = time.perf_counter()
        with torch.no_grad():
            completions = Generator(gpt, self.tokenizer).generate_batch(prompts, params)
        gpt.clear_kv_cache()
        self.stats["rollout_sec"] += time.perf_counter() - start
        samples = []
        for (_, item), k in zip(todo, range(0, len(prompts), G)):
            record, ids = self.train_prompts[item]
            for c in completions[k : k + G]:
                samples.append(Sample(record, record["prompt"], ids, c.text, c.token_ids,
                                      c.finish_reason))  # fmt: skip
        values = torch.tensor(score(self.rewards, samples), dtype=torch.float64)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        totals = (values * weights).sum(-1).view(len(todo), G)
        advantages = group_advantages(totals, s.scale_rewards).float()
        eos = self.tokenizer.eos_id
        budget = self.seq_length + 1
        for n, (slot, _) in enumerate(todo):
            group = samples[n * G : (n + 1) * G]
            seqs = []
            for x in group:
                tail = [eos] if x.finish_reason == "stop" and eos is not None else []
                seqs.append((x.prompt_ids + x.token_ids + tail)[:budget])
            self.buffer[slot] = {
                "seqs": seqs, "prompt_len": len(group[0].prompt_ids),
                "advantages": advantages[n], "values": values[n * G : (n + 1) * G],
                "totals": totals[n],
            }  # fmt: skip
        self.stats["completion_tokens"] += sum(len(x.token_ids) for x in samples)
        self.stats["rollouts"].append([self.buffer[slot] for slot, _ in todo])
        slots = [slot for slot, _ in todo]
        if s.num_iterations > 1 or s.kl_coef > 0:
            self.score_old_and_ref(slots)
        gpt.train(was_training)
        self.log_completions(rollout, samples, totals.flatten().tolist())
        if s.num_iterations > 1:
            self.save_buffer()

    def score_old_and_ref(self, slots: list[int]) -> None:
        """Per-token log-probs of the sampling policy (for later iterations' ratios) and of the
        reference (for the KL), stored with each slot's completions."""
        import torch

        from lifecycle_cli.lora import adapters_disabled

        with torch.no_grad():
            keys = []
            if self.s.num_iterations > 1:
                keys.append(("old", self.completion_logps(self.gpt, slots)[0]))
            if self.s.kl_coef > 0:
                if self.reference is not None:
                    ref = self.completion_logps(self.reference, slots)[0]
                else:
                    with adapters_disabled(self.gpt):
                        ref = self.completion_logps(self.gpt, slots)[0]
                keys.append(("ref", ref))
        row = 0
        for slot in slots:
            entry = self.buffer[slot]
            for key, logps in keys:
                entry[key] = [
                    logps[row + g, : len(q) - 1].cpu() for g, q in enumerate(entry["seqs"])
                ]
            row += len(entry["seqs"])

    def completion_logps(self, model, slots: list[int]):
        """(log-probs (B, W) of the slots' completion tokens, 0 elsewhere; the mask of those
        tokens; the tokens the model read), rows and positions as `labels` lays them out.
        Each slot's prompt goes through the model once for as many of its completions as fit
        in a row of --train.max_seq_length tokens (`objectives.shared_prompt_logps`), not once
        per completion."""
        import torch

        from lifecycle_cli.objectives import shared_prompt_logps

        labels = self.labels(slots)
        mask = labels != -100
        prompts, completions = [], []
        for slot in slots:
            entry = self.buffer[slot]
            p = entry["prompt_len"]
            prompts.append(entry["seqs"][0][:p])
            completions.append([q[p:] for q in entry["seqs"]])
        flat, read = shared_prompt_logps(model, prompts, completions, self.seq_length, self.pad_id)
        out = torch.zeros(labels.shape, dtype=torch.float32, device=flat.device)
        out[mask] = flat
        return out, mask, read

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)

    def labels(self, slots: list[int]):
        """(B, W) labels of the slots' completions as rows prompt + completion, right-padded:
        each token at the position before it, -100 on the prompt and the padding."""
        import torch

        seqs = [(q, self.buffer[s]["prompt_len"]) for s in slots for q in self.buffer[s]["seqs"]]
        labels = torch.full((len(seqs), max(len(q) for q, _ in seqs) - 1), -100)
        for b, (q, p) in enumerate(seqs):
            labels[b, p - 1 : len(q) - 1] = torch.tensor(q[p:])
        return labels.to(self.fabric.device)

    def save_buffer(self) -> None:
        import torch

        path = self.buffer_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        torch.save({"rollout": self.buffer_id, "buffer": self.buffer}, tmp)
        tmp.replace(path)

    def load_buffer(self, rollout: int) -> dict[int, dict]:
        """The completions of `rollout` a killed run left (resume mid-rollout), else none."""
        import torch

        path = self.buffer_file
        if not path.is_file():
            return {}
        saved = torch.load(path, weights_only=True)
        return saved["buffer"] if saved["rollout"] == rollout else {}

    def log_completions(self, rollout: int, samples, totals: list[float]) -> None:
        n = self.s.log_completions - self.stats["logged"]
        if n <= 0 or self.fabric.global_rank != 0:
            return
        self.stats["logged"] += min(n, len(samples))
        with (self.out_dir / COMPLETIONS_FILE).open("a", encoding="utf-8") as f:
            for x, total in list(zip(samples, totals))[:n]:
                f.write(json.dumps({
                    "rollout": rollout, "where": x.record["where"], "prompt": x.prompt,
                    "completion": x.text, "finish_reason": x.finish_reason, "reward": total,
                }) + "\n")  # fmt: skip

    # -----------------------------------------------------------------------------------------
    # Objective and metrics

    def loss(self, model, batch):
        import torch

        from lifecycle_cli.objectives import grpo_token_losses, masked_token_mean

        if self.stats["since"] is None:
            self.stats["since"] = time.perf_counter()
        rollout = int(batch["rollout"][0])
        slots, items = batch["slot"].tolist(), batch["item"].tolist()
        if rollout != self.buffer_id:
            self.buffer, self.buffer_id = self.load_buffer(rollout), rollout
            if self.buffer:  # resumed mid-rollout: its rewards are this step's figures too
                self.stats["rollouts"].append([self.buffer[k] for k in sorted(self.buffer)])
        todo = [(s, i) for s, i in zip(slots, items) if s not in self.buffer]
        if todo:
            self.rollout(rollout, todo)
        logps, mask, read = self.completion_logps(model, slots)
        entries = [self.buffer[s] for s in slots]
        advantages = torch.cat([e["advantages"] for e in entries]).to(logps.device)

        def per_token(key: str) -> Optional[torch.Tensor]:
            if key not in entries[0]:
                return None
            out = torch.zeros_like(logps)
            rows = [x for e in entries for x in e[key]]
            for b, values in enumerate(rows):
                out[b, : values.numel()] = values.to(out.device)
            return torch.where(mask, out, 0.0)

        old = per_token("old")
        old = logps.detach() if old is None else old
        losses, kl = grpo_token_losses(
            logps, old, advantages, self.s.clip_eps, per_token("ref"), self.s.kl_coef
        )
        with torch.no_grad():
            ratio = torch.exp(logps - old)
            clipped = ((ratio < 1 - self.s.clip_eps) | (ratio > 1 + self.s.clip_eps)) & mask
            st = self.stats
            st["kl_sum"] += float((kl * mask).sum())
            st["clipped"] += int(clipped.sum())
            st["update_tokens"] += int(mask.sum())
            st["read_tokens"] += read
        batch["n_tokens"] = torch.tensor(read)  # the loop's tokens/s: what the model read
        return masked_token_mean(losses, mask)

    def reset_stats(self) -> None:
        keep = self.stats if hasattr(self, "stats") else {"logged": 0, "last": {}}
        self.stats = {
            "rollout_sec": 0.0, "completion_tokens": 0, "rollouts": [], "kl_sum": 0.0,
            "clipped": 0, "update_tokens": 0, "read_tokens": 0, "since": None,
            "logged": keep["logged"], "last": keep["last"],
        }  # fmt: skip

    def step_metrics(self) -> tuple[dict[str, float], str]:
        """The figures of the steps since the last call: the rewards of the rollouts sampled
        (the last rollout's again on steps that reuse it), KL, clipping and speeds."""
        import torch

        st = self.stats
        out = dict(st["last"])
        entries = [e for group in st["rollouts"] for e in group]
        if entries:
            totals = torch.stack([e["totals"] for e in entries])
            values = torch.cat([e["values"] for e in entries])
            lengths = [len(q) - e["prompt_len"] for e in entries for q in e["seqs"]]
            out = {
                "reward_mean": totals.mean().item(),
                "reward_std": totals.std().item() if totals.numel() > 1 else 0.0,
                "zero_std_groups": (totals.std(-1) == 0).float().mean().item(),
                "completion_length": float(np.mean(lengths)),
            }
            if len(self.rewards) > 1:
                for k, r in enumerate(self.rewards):
                    out[f"reward_{r.name}_mean"] = values[:, k].mean().item()
                    out[f"reward_{r.name}_std"] = values[:, k].std().item()
            st["last"] = dict(out)
        tokens = max(st["update_tokens"], 1)
        out["kl"] = st["kl_sum"] / tokens
        out["clip_fraction"] = st["clipped"] / tokens
        if st["rollout_sec"] > 0:
            out["rollout_tokens_per_sec"] = st["completion_tokens"] / st["rollout_sec"]
        update_sec = time.perf_counter() - (st["since"] or 0.0) - st["rollout_sec"]
        if update_sec > 0 and st["read_tokens"]:
            out["update_tokens_per_sec"] = st["read_tokens"] / update_sec
        self.reset_stats()
        return out, f" reward {out.get('reward_mean', float('nan')):.3f}"

    def extra_eval(self):
        def measure(model) -> dict[str, float]:
            return self.held_out(self.s.eval_samples)

        return measure

    def held_out(self, n: int) -> dict[str, float]:
        """Over the first n held-out prompts: pass@1, the share of greedy answers the first
        --reward (the verifier) scores at least 1 (a reward model first: exact match against
        "answer" where every record has one), and the mean total reward of those answers."""
        from lifecycle_cli.data.synthetic import exact_match
        from lifecycle_cli.evaluate.exact_match import generate_answers
        from lifecycle_cli.rewards import Sample, score

        items = self.val_prompts[:n]
        if not items:
            return {}
        was_training = self.gpt.training
        self.gpt.eval()
        answers = generate_answers(
            self.gpt, self.tokenizer, [ids for _, ids in items], self.s.max_new_tokens,
            self.style.stop,
        )  # fmt: skip
        self.gpt.train(was_training)
        # Greedy answers that run to the token limit count as cut (format reward 0).
        samples = [Sample(r, r["prompt"], ids, a, self.tokenizer.encode(a, bos=False), "stop")
                   for (r, ids), a in zip(items, answers)]  # fmt: skip
        values = score(self.rewards, samples)
        weights = [r.weight for r in self.rewards]
        out = {"val_reward": float(np.mean([np.dot(v, weights) for v in values]))}
        if self.rewards[0].kind != "model":
            hits = [v[0] >= 1 for v in values]
        elif all(isinstance(r.get("answer"), str) for r, _ in items):
            hits = [exact_match(a, r["answer"]) for (r, _), a in zip(items, answers)]
        else:
            return out
        return {"pass@1": float(np.mean(hits)), **out}

    def save_extra(self, model, final: Path, say) -> None:
        from lifecycle_cli.prompts import save_prompt_style

        save_prompt_style(self.style, final)
        plot_grpo(self.out_dir / "metrics.csv", self.out_dir / "grpo.png")


def plot_grpo(metrics_csv: Path, out_png: Path) -> None:
    """Training reward (mean, and the share of groups with no variance) and held-out pass@1
    against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lifecycle_cli.train.logs import read_metrics, save_figure

    rows = read_metrics(metrics_csv)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in ((left, ("reward_mean", "zero_std_groups")), (right, ("pass@1", "val_reward"))):
        for key in keys:
            points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if ax is right else None, label=key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, out_png)
