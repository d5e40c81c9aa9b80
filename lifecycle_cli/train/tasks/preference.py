"""Preference tuning (DPO, IPO, SimPO, ORPO): pairs of responses, a frozen reference, and the
implicit-reward metrics at every evaluation.

The reference model (DPO and IPO) is the starting checkpoint (or --ref_checkpoint) frozen:
- with LoRA/QLoRA and no --ref_checkpoint, the trained model itself with its adapters switched
  off (`lora.adapters_disabled`): no second copy of the weights;
- otherwise a second, frozen GPT beside the trained one (each rank holds all of it);
- with --precompute_ref, its log-probs of every pair are computed once before training, saved in
  out_dir/reference_logps.safetensors (reused when a run resumes) and the second copy dropped.

Chosen and rejected responses go through a model in one forward (the batch stacks them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lifecycle_cli.data.args import PreferenceData
from lifecycle_cli.errors import UserError
from lifecycle_cli.lora import LoRAArgs
from lifecycle_cli.train.tasks.from_checkpoint import CheckpointTask, Method

ObjectiveName = Literal["dpo", "ipo", "simpo", "orpo", "reward_model"]
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class PreferenceObjective:
    """Which loss and its settings (the verb's --objective, --beta, ... after defaults)."""

    name: ObjectiveName = "dpo"
    beta: Optional[float] = None
    label_smoothing: float = 0.0
    gamma: Optional[float] = None
    orpo_weight: Optional[float] = None
    rpo_alpha: Optional[float] = None

    def __post_init__(self) -> None:
        name = self.name
        given = {"--gamma": self.gamma, "--orpo_weight": self.orpo_weight, "--beta": self.beta}
        owner = {"--gamma": ("simpo",), "--orpo_weight": ("orpo",)}
        owner["--beta"] = ("dpo", "ipo", "simpo")
        owner["--rpo_alpha"], given["--rpo_alpha"] = ("dpo", "ipo"), self.rpo_alpha
        owner["--label_smoothing"] = ("dpo", "simpo")
        given["--label_smoothing"] = self.label_smoothing or None
        for flag, value in given.items():
            if value is not None and name not in owner[flag]:
                raise UserError(f"{flag} does not apply to --objective {name}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise UserError(f"--rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.orpo_weight is None and name == "orpo":
            self.orpo_weight = 0.1
        # ORPO's rewards (metrics only) are weight * mean log-prob, as TRL reports them.
        default = {"simpo": 2.0, "orpo": self.orpo_weight}.get(name, 0.1)
        self.beta = self.beta if self.beta is not None else default
        if self.beta <= 0:
            raise UserError(f"--beta must be > 0, got {self.beta}")
        self.gamma = 1.0 if self.gamma is None and name == "simpo" else self.gamma

    @property
    def needs_reference(self) -> bool:
        return self.name in ("dpo", "ipo")

    @property
    def length_normalized(self) -> bool:
        """Whether the objective compares per-token mean log-probs (SimPO, ORPO)."""
        return self.name in ("simpo", "orpo")

    def describe(self) -> str:
        rpo = f", rpo alpha {self.rpo_alpha}" if self.rpo_alpha else ""
        knobs = {
            "dpo": f"beta {self.beta}, label smoothing {self.label_smoothing}{rpo}",
            "ipo": f"beta {self.beta}{rpo}",
            "simpo": f"beta {self.beta}, gamma {self.gamma}",
            "orpo": f"weight {self.orpo_weight}",
            "reward_model": "a scalar head, Bradley-Terry loss",
        }
        return f"{self.name} ({knobs[self.name]})"

    def losses(self, policy, ref, counts):
        """Per-pair losses from (B, 2) log-probs (chosen, rejected) and token counts."""
        from lifecycle_cli import objectives as o

        pc, pr = policy.unbind(-1)
        nc, nr = counts.unbind(-1)
        if self.name in ("dpo", "ipo"):
            rc, rr = ref.unbind(-1)
            if self.name == "dpo":
                loss = o.dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)
            else:
                loss = o.ipo_loss(pc, pr, rc, rr, nc, nr, self.beta)
            # RPO (Pang et al. 2024): the chosen answer's NLL keeps its likelihood from
            # falling with the rejected one's, which DPO alone lets happen.
            return loss - (self.rpo_alpha or 0.0) * pc / nc
        if self.name == "simpo":
            return o.simpo_loss(pc, pr, nc, nr, self.beta, self.gamma, self.label_smoothing)
        return o.orpo_loss(pc, pr, nc, nr, self.orpo_weight)


class PreferenceTask(CheckpointTask):
    def __init__(
        self,
        checkpoint_dir: Path,
        data: PreferenceData,
        method: Method,
        lora: LoRAArgs,
        objective: PreferenceObjective,
        out_dir: Path,
        ref_checkpoint: Optional[Path] = None,
        precompute_ref: bool = False,
        prompt_style: Optional[str] = None,
        preference_samples: int = 200,
        exact_match_samples: int = 100,
        max_new_tokens: int = 32,
    ) -> None:
        from lifecycle_cli.train.tasks.sft import choose_style

        super().__init__(checkpoint_dir, method, lora)
        self.pairs, self.loss_fn, self.out_dir = data, objective, out_dir
        if not objective.needs_reference and (ref_checkpoint or precompute_ref):
            flag = "--ref_checkpoint" if ref_checkpoint else "--precompute_ref"
            raise UserError(f"{flag}: --objective {objective.name} uses no reference model")
        if ref_checkpoint is not None:
            from lifecycle_cli.checkpoint import check_checkpoint_dir, load_config

            ref_checkpoint = check_checkpoint_dir(ref_checkpoint)
            if load_config(ref_checkpoint).vocab_size != self.config.vocab_size:
                raise UserError(
                    f"--ref_checkpoint {ref_checkpoint}: its vocabulary differs from "
                    f"{checkpoint_dir}'s; the two must share the tokenizer"
                )
        self.ref_checkpoint, self.precompute_ref = ref_checkpoint, precompute_ref
        self.style = choose_style(prompt_style, checkpoint_dir, self.tokenizer)
        self.samples = preference_samples
        self.em_samples = exact_match_samples if data.synthetic else 0
        self.max_new_tokens = max_new_tokens
        val = ["accuracy", "reward_accuracy", "rewards_chosen", "rewards_rejected", "margin"]
        train = ["train_accuracy", "train_reward_accuracy", "train_margin"]
        if not objective.needs_reference:
            val.remove("reward_accuracy")
            train.remove("train_reward_accuracy")
        em = ["exact_match"] if self.em_samples > 0 else []
        self.extra_metrics = (*val, "logps_chosen", "logps_rejected", *train, *em)
        self.reference = None  # a second frozen GPT, when there is one
        self.objective = self.loss

    def data(self, seq_length: int, seed: int):
        from lifecycle_cli.data.preferences import PreferenceDataset, load_preference_data

        train, val = load_preference_data(self.pairs)
        tok, style = self.tokenizer, self.style
        self.train_data = PreferenceDataset(train, tok, style, seq_length, seed)
        self.val_data = PreferenceDataset(val, tok, style, seq_length, seed)
        self.seq_length = seq_length
        return self.train_data, self.val_data

    def model(self, fabric, seq_length: int):
        from lifecycle_cli.checkpoint import load_weights
        from lifecycle_cli.model import GPT

        model = super().model(fabric, seq_length)
        self.fabric = fabric
        if not self.loss_fn.needs_reference:
            return model
        if self.method == "full" or self.ref_checkpoint is not None:
            with fabric.init_module():
                ref = GPT(self.config)
            load_weights(ref, self.ref_checkpoint or self.checkpoint_dir)
            ref.max_seq_length = seq_length
            self.reference = ref.requires_grad_(False).eval().to(fabric.device)
        if self.precompute_ref:
            self.load_or_compute_reference(fabric, model)
            self.reference = None  # no longer needed in memory
        return model

    # -----------------------------------------------------------------------------------------
    # The reference

    def ref_forward(self, model) -> Callable:
        """token ids -> the reference's logits (no gradient)."""
        fabric = self.fabric

        def forward(idx, **kwargs):
            import torch

            from lifecycle_cli.lora import adapters_disabled

            with torch.no_grad():
                if self.reference is not None:
                    with fabric.autocast():
                        return self.reference(idx, **kwargs)
                with adapters_disabled(model):
                    return model(idx, **kwargs)

        return forward

    def load_or_compute_reference(self, fabric, model) -> None:
        """Reference log-probs of every pair into the datasets: from out_dir when a run with the
        same data and reference left them there, else computed by rank 0 and saved."""
        from safetensors.torch import load_file, save_file

        path = self.out_dir / REFERENCE_FILE
        key = self.fingerprint()
        found = path.is_file() and load_file(path).get("fingerprint_" + key) is not None
        if fabric.global_rank == 0 and not found:
            import torch

            n = len(self.train_data) + len(self.val_data)
            fabric.print(f"Computing reference log-probs of {n:,} pairs")
            model.to(fabric.device)
            tensors = {"fingerprint_" + key: torch.zeros(1)}
            for part, data in (("train", self.train_data), ("val", self.val_data)):
                tensors[part] = self.reference_logps(model, data)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.partial")
            save_file(tensors, str(tmp))
            tmp.replace(path)
        elif fabric.global_rank == 0:
            fabric.print(f"Reference log-probs: reusing {path}")
        fabric.barrier()
        tensors = load_file(path)
        self.train_data.set_reference(tensors["train"].numpy())
        self.val_data.set_reference(tensors["val"].numpy())

    def reference_logps(self, model, data):
        """(pairs, 2) reference log-probs of chosen and rejected, in dataset order."""
        import torch

        from lifecycle_cli.objectives import response_logps

        forward, out, size = self.ref_forward(model), [], 16
        for start in range(0, len(data), size):
            batch = data.rows(range(start, min(start + size, len(data))))
            batch = {k: v.to(self.fabric.device) for k, v in batch.items()}
            logps, _ = response_logps(forward, batch)
            out.append(logps.view(2, -1).T.double().cpu())
        return torch.cat(out)

    def fingerprint(self) -> str:
        """What the reference log-probs depend on: the reference's weight files (path, size,
        modification time) and every token of every pair."""
        from lifecycle_cli.checkpoint import weight_files

        h = hashlib.sha256()
        for f in weight_files(self.ref_checkpoint or self.checkpoint_dir):
            h.update(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        for data in (self.train_data, self.val_data):
            for tokens in (data.chosen, data.rejected):
                h.update(tokens._ids.tobytes())
                h.update(tokens.lengths.tobytes())
            h.update(data.prompt_lengths.tobytes())
        return h.hexdigest()[:16]

    # -----------------------------------------------------------------------------------------
    # Objective and metrics

    def loss(self, model, batch):
        from lifecycle_cli.objectives import response_logps

        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif self.loss_fn.needs_reference:
            ref, _ = response_logps(self.ref_forward(model), batch)
        else:
            ref = None
        logps, counts = response_logps(model, batch)
        pairs = lambda x: x.view(2, -1).T  # noqa: E731  (2B,) -> (B, 2): chosen, rejected
        ref = pairs(ref.to(logps.dtype)) if ref is not None else None
        return self.loss_fn.losses(pairs(logps), ref, pairs(counts).to(logps.dtype)).mean()

    def describe(self, trainable: int, seq_length: int) -> list[str]:
        if not self.loss_fn.needs_reference:
            ref = "none"
        elif self.precompute_ref:
            ref = "precomputed log-probs"
        elif self.reference is None:
            ref = "the same weights with the adapters off"
        else:
            ref = f"a frozen copy of {self.ref_checkpoint or self.checkpoint_dir}"
        train, val = self.train_data, self.val_data
        return [
            f"{self.method} alignment, {self.loss_fn.describe()}, reference: {ref}, prompt style "
            f"{self.style.name!r}: {trainable:,} trainable parameters; {len(train):,} training / "
            f"{len(val):,} validation pairs ({train.n_truncated + val.n_truncated} truncated to "
            f"{seq_length} tokens)"
        ]

    def score(self, model, data, n: int) -> dict[str, float]:
        """score_pairs on the first n pairs of `data` (dataset order)."""
        from lifecycle_cli.evaluate.preference import score_pairs

        pairs = data.pairs[:n]
        known = data.ref_logps[:n] if data.ref_logps is not None else None
        needs = self.loss_fn.needs_reference
        metrics, _ = score_pairs(
            model, self.tokenizer, pairs, prompt_style=self.style,
            ref_model=self.ref_forward(model) if needs and known is None else None,
            ref_logps=known, length_normalize=self.loss_fn.length_normalized,
            batch_size=16, max_seq_length=self.seq_length, beta=self.loss_fn.beta,
        )  # fmt: skip
        return metrics

    def extra_eval(self):
        from lifecycle_cli.train.fabric import unwrap
        from lifecycle_cli.train.tasks.sft import exact_match

        def measure(model) -> dict[str, float]:
            n = min(self.samples, len(self.val_data))
            val = self.score(model, self.val_data, n)
            train = self.score(model, self.train_data, n)
            out = {k: val[k] for k in self.extra_metrics if k in val}
            out |= {f"train_{k}": train[k] for k in ("accuracy", "reward_accuracy", "margin")
                    if f"train_{k}" in self.extra_metrics}  # fmt: skip
            if self.em_samples > 0:
                items = self.exact_match_items()[: self.em_samples]
                out["exact_match"] = exact_match(unwrap(model), self.tokenizer, items,
                                                 self.max_new_tokens, self.style.stop)  # fmt: skip
            return out

        return measure

    def exact_match_items(self) -> list[tuple[list[int], str]]:
        """(prompt ids, chosen answer) of each validation pair: the synthetic tasks' answers."""
        data = self.val_data
        return [
            (data.chosen.ids(i)[: data.prompt_lengths[i]].tolist(), data.pairs[i]["chosen"])
            for i in range(len(data))
        ]

    def save_extra(self, model, final: Path, say) -> None:
        from lifecycle_cli.prompts import save_prompt_style

        save_prompt_style(self.style, final)
        plot_preferences(self.out_dir / "metrics.csv", self.out_dir / "preferences.png")


def plot_preferences(metrics_csv: Path, out_png: Path) -> None:
    """Validation preference accuracy (policy and implicit reward) and the reward margin
    against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lifecycle_cli.train.logs import read_metrics, save_figure

    rows = [r for r in read_metrics(metrics_csv) if r.get("accuracy")]
    if not rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [int(r["step"]) for r in rows]
    for key, label in (("accuracy", "val log-prob"), ("reward_accuracy", "val reward"),
                       ("train_accuracy", "train log-prob"),
                       ("train_reward_accuracy", "train reward")):  # fmt: skip
        if rows[0].get(key):
            left.plot(steps, [float(r[key]) for r in rows], marker="o", label=label)
    left.set_ylabel("preference accuracy")
    right.plot(steps, [float(r["margin"]) for r in rows], marker="o", label="val margin")
    right.plot(steps, [float(r["rewards_chosen"]) for r in rows], label="val rewards/chosen")
    right.plot(steps, [float(r["rewards_rejected"]) for r in rows], label="val rewards/rejected")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, out_png)
