"""`llmcycle align`: teach a checkpoint preferences (DPO, IPO, SimPO, ORPO), train a reward model,
or reinforce it with rewards (GRPO)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from lifecycle_cli.curate.plan import PlanArgs
from lifecycle_cli.data.args import PreferenceData
from lifecycle_cli.lora import LoRAArgs
from lifecycle_cli.train.args import (
    Devices,
    EvalArgs,
    LoggerName,
    Resume,
    StrategyName,
    TrainArgs,
    with_run_flags_help,
)


@with_run_flags_help
def align(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/align"),
    data: PreferenceData = PreferenceData(),
    objective: Literal["dpo", "ipo", "simpo", "orpo", "reward_model", "grpo"] = "dpo",
    beta: Optional[float] = None,
    label_smoothing: float = 0.0,
    gamma: Optional[float] = None,
    orpo_weight: Optional[float] = None,
    rpo_alpha: Optional[float] = None,
    ref_checkpoint: Optional[Path] = None,
    precompute_ref: bool = False,
    method: Literal["full", "lora", "qlora"] = "lora",
    lora: LoRAArgs = LoRAArgs(),
    prompt_style: Optional[str] = None,
    train: TrainArgs = TrainArgs(
        global_batch_size=16,
        micro_batch_size=4,
        epochs=1,
        lr=5e-5,
        min_lr=0.0,
        warmup_steps=10,
        weight_decay=0.0,
        save_interval=None,
    ),  # fmt: skip
    eval: EvalArgs = EvalArgs(interval=100, max_iters=20),
    preference_samples: int = 200,
    exact_match_samples: int = 100,
    max_new_tokens: int = 32,
    reward: Optional[str] = None,
    group_size: int = 8,
    num_iterations: int = 1,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    log_completions: int = 0,
    resume: Resume = False,
    devices: Devices = 1,
    num_nodes: int = 1,
    strategy: StrategyName = "auto",
    precision: Optional[str] = None,
    logger: LoggerName = "csv",
    seed: int = 42,
    compile: bool = False,
    activation_checkpointing: bool = False,
    fp8: bool = False,
    tensor_parallel: int = 1,
    dry_run: bool = False,
    plan: PlanArgs = PlanArgs(),
) -> None:
    """Align a checkpoint to preference pairs (prompt, chosen, rejected): JSON/JSONL files or
    synthetic pairs, formatted as finetune formats prompts; train a reward model on such pairs;
    or improve a checkpoint by GRPO on prompts (JSON/JSONL records with a "prompt", or
    synthetic tasks) with rewards a program computes.

    Args:
        checkpoint_dir: The checkpoint folder to start from (usually a finetuned one).
        out_dir: Where step folders, final/ (a plain checkpoint; LoRA merged, with
            lora.safetensors beside), metrics.csv, hparams.yaml, loss.png and preferences.png go.
        data: The preference pairs (grpo: the prompts, records with a "prompt" string and
            whatever the rewards read, e.g. "answer").
        objective: dpo (sigmoid loss on the implicit reward margin), ipo (squared loss on it),
            simpo (reference-free, length-normalised, with a margin gamma), orpo (reference-free:
            SFT loss on chosen plus an odds-ratio term), reward_model (a scalar head on the last
            response token, Bradley-Terry loss; final/ loads as a reward model for --reward
            and `evaluate --reward_model`), grpo (group-relative policy optimisation: sampled
            completions, rewards, clipped policy-ratio loss).
        beta: Strength of the preference term: DPO/IPO's beta (default 0.1), SimPO's (default
            2.0); not for orpo.
        label_smoothing: DPO/SimPO: the assumed probability that a pair's label is wrong.
        gamma: SimPO's target reward margin (default 1.0).
        orpo_weight: ORPO's weight of the odds-ratio term beside the SFT loss (default 0.1).
        rpo_alpha: DPO/IPO: add this times the chosen response's per-token NLL (RPO, TRL's
            rpo_alpha), which keeps the model's right answers likely while it learns the
            preference (default: none).
        ref_checkpoint: The reference model (DPO/IPO) if not the starting checkpoint; it must
            share the tokenizer.
        precompute_ref: Compute the reference's log-probs of every pair once before training
            (saved in out_dir, reused on resume) instead of at every step.
        method: full (every weight; the reference is a frozen copy), lora (adapters; the
            reference is the same weights with the adapters off), qlora (4-bit base, CUDA only).
        lora: LoRA rank, scale, dropout and which layers get adapters.
        prompt_style: How prompts are formatted: alpaca, chatml, llama3, ..., chat_template
            (default: the checkpoint's prompt_style.yaml, else its chat template, else alpaca).
        train: Optimisation and duration.
        eval: Validation during training (with --eval.tasks, evaluate's tasks too).
        preference_samples: Validation pairs (and as many training pairs) scored for the
            preference metrics at every evaluation.
        exact_match_samples: Validation prompts answered greedily to measure exact match
            against the chosen answer (synthetic pairs only; 0 turns it off).
        max_new_tokens: Longest answer generated for exact match (grpo: for every completion).
        reward: grpo: exact_match (against the record's "answer"), synthetic (the task's
            checker), format (ended by itself on one line), FILE.py:FUNCTION (called with
            prompt, completion, record; returns a number) or a reward model folder;
            comma-separated, each optionally =WEIGHT: the reward is the weighted sum.
            reward_model: such a verifier (not a reward model) ranks the checkpoint's own
            samples of --data's prompts (GRPO's prompt records) into the training and
            validation pairs (on-policy pairs), sampled with --group_size, --temperature,
            --top_p and --max_new_tokens.
        group_size: grpo: completions sampled per prompt (advantages are relative to the group);
            reward_model with --reward: per prompt, to rank into pairs.
        num_iterations: grpo: optimizer steps per rollout (later ones clipped off-policy).
        clip_eps: grpo: the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps].
        kl_coef: grpo: weight of the KL to the reference (the base with adapters off for LoRA,
            a frozen copy for full); 0 computes no reference.
        temperature: grpo: sampling temperature of the completions.
        top_p: grpo: nucleus sampling of the completions.
        scale_rewards: grpo: what a reward's difference from its group's mean is divided by
            (TRL's scale_rewards): group (the group's std, GRPO's default), batch (the std of
            the rollout's rewards: noise-level differences within a group stay small, as a
            learned reward needs), none (Dr. GRPO: the differences as they are).
        log_completions: grpo: write the first N sampled completions with their rewards to
            out_dir/completions.jsonl.
        dry_run: Print the plan (parameters, FLOPs with the reference's forward pass, memory
            per precision with the reference copy full DPO holds, time and cost) and stop;
            checkpoint_dir may then be a named model.
        plan: The hardware --dry_run plans for.
    """
    if dry_run:
        from lifecycle_cli.curate.dry_run import align_plan

        align_plan(
            checkpoint_dir, method, lora, train, plan, devices, num_nodes, precision, objective,
            ref_checkpoint, precompute_ref,
        )  # fmt: skip
        return
    flags = dict(locals())
    from lifecycle_cli.checkpoint import check_checkpoint_dir
    from lifecycle_cli.errors import UserError
    from lifecycle_cli.train.session import RunFlags, run_session
    from lifecycle_cli.train.tasks.preference import PreferenceObjective, PreferenceTask

    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    if objective == "grpo":
        task = grpo_task({**flags, "checkpoint_dir": checkpoint_dir})
        run_session(task, out_dir, train, eval, RunFlags.pick(flags), flags)
        return
    if reward is not None and objective != "reward_model":
        raise UserError("--reward applies to --objective grpo and reward_model")
    loss = PreferenceObjective(objective, beta, label_smoothing, gamma, orpo_weight, rpo_alpha)
    extra = {}
    if objective == "reward_model":
        from lifecycle_cli.train.tasks.reward_model import RewardModelTask as PreferenceTask

        if reward is not None:  # pairs from the checkpoint's own samples, ranked by a verifier
            from lifecycle_cli.rewards import parse_rewards
            from lifecycle_cli.train.tasks.grpo import GRPOSettings

            extra["verifier"] = parse_rewards(reward)
            extra["sampling"] = GRPOSettings(
                group_size, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
            )
    task = PreferenceTask(
        checkpoint_dir, data, method, lora, loss, out_dir, ref_checkpoint, precompute_ref,
        prompt_style, preference_samples, exact_match_samples, max_new_tokens, **extra,
    )  # fmt: skip
    run_session(task, out_dir, train, eval, RunFlags.pick(flags), flags)


def grpo_task(f: dict):
    """The GRPO task of align's flags; the preference-only flags are refused."""
    from lifecycle_cli.errors import UserError
    from lifecycle_cli.rewards import parse_rewards
    from lifecycle_cli.train.tasks.grpo import GRPOSettings, GRPOTask

    for flag in ("beta", "gamma", "orpo_weight", "ref_checkpoint"):
        if f[flag] is not None:
            raise UserError(f"--{flag} does not apply to --objective grpo")
    if f["label_smoothing"] or f["precompute_ref"]:
        flag = "--label_smoothing" if f["label_smoothing"] else "--precompute_ref"
        raise UserError(f"{flag} does not apply to --objective grpo")
    settings = GRPOSettings(
        f["group_size"], f["num_iterations"], f["clip_eps"], f["kl_coef"], f["temperature"],
        f["top_p"], f["max_new_tokens"], f["exact_match_samples"], f["log_completions"],
        f["scale_rewards"],
    )  # fmt: skip
    return GRPOTask(
        f["checkpoint_dir"], f["data"], f["method"], f["lora"], parse_rewards(f["reward"]),
        settings, f["out_dir"], f["train"].global_batch_size, f["prompt_style"],
        resuming=f["resume"] not in (False, None),
    )  # fmt: skip
