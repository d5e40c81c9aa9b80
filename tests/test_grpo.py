"""Reward models and GRPO in `llmcycle align`: the GRPO arithmetic against values computed by
hand, a group whose rewards are all equal teaches nothing, a reward model learns and loads for
`evaluate`, rewards from a user's function (its errors name the record), resume after SIGKILL
is exact (completions included)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lifecycle_cli.checkpoint import iter_tensors, weight_files
from lifecycle_cli.cli import main
from lifecycle_cli.config import Config
from lifecycle_cli.model import GPT
from lifecycle_cli.objectives import (
    group_advantages,
    grpo_token_losses,
    masked_token_mean,
    token_logps,
)
from lifecycle_cli.train.logs import read_metrics


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """12 add prompts with their answers, one JSON record per line."""
    from lifecycle_cli.data.synthetic import make_examples

    train, _ = make_examples("add", 12, 0, seed=3)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": e["instruction"], "answer": e["output"]}) + "\n"
                            for e in train))  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------
# The arithmetic


def test_group_advantages_are_rewards_standardised_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0], [2.0, 0.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(1 / 3)  # Bessel: sum of squares 1 over 3
    expected = [
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)],
        [0.0] * 4,
        [1 / (math.sqrt(2 / 3) + 1e-4), -1 / (math.sqrt(2 / 3) + 1e-4), 0.0, 0.0],
    ]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_scale_rewards_batch_divides_by_the_std_of_all_rewards_and_none_by_nothing():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.1, 0.2, 0.1]])
    centred = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.05, -0.05, 0.05, -0.05]])
    torch.testing.assert_close(group_advantages(rewards, "none"), centred)
    # The batch's std (Bessel, over all 8): the noise-level group keeps small advantages,
    # where "group" would blow its +-0.05 up to the same +-0.87 as the real difference above.
    values = rewards.flatten().tolist()
    mean = sum(values) / 8
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 7)
    torch.testing.assert_close(group_advantages(rewards, "batch"), centred / (std + 1e-4))
    grouped = group_advantages(rewards, "group")
    torch.testing.assert_close(grouped[1].abs(), grouped[0].abs(), rtol=1e-2, atol=0)
    assert torch.equal(group_advantages(torch.full((2, 4), 0.7), "batch"), torch.zeros(2, 4))


def test_clipped_ratio_loss_and_kl_on_a_fixed_batch_equal_the_hand_computed_values():
    # One token per row: ratio e^0.5 (above 1.2) and e^-0.5 (below 0.8), advantages +1 and -1.
    old = torch.zeros(4, 1)
    logps = torch.tensor([[0.5], [0.5], [-0.5], [-0.5]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ref = torch.tensor([[0.0], [1.0], [0.0], [-1.0]])
    losses, kl = grpo_token_losses(logps, old, adv, clip_eps=0.2, ref_logps=ref, kl_coef=0.5)
    up, down = math.exp(0.5), math.exp(-0.5)
    # -min(r A, clip(r) A): a good token gains at most 1.2, a bad one is pushed down unclipped.
    policy = [-1.2, up, -down, 0.8]
    d = [-0.5, 0.5, 0.5, -0.5]  # ref - logp
    k3 = [math.exp(x) - x - 1 for x in d]
    torch.testing.assert_close(kl.flatten(), torch.tensor(k3))
    torch.testing.assert_close(losses.flatten(), torch.tensor(policy) + 0.5 * torch.tensor(k3))
    # Normalised by the token count of the batch: rows with more tokens weigh more.
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    assert masked_token_mean(values, mask).item() == pytest.approx(2.0)


@pytest.mark.parametrize("window", [None, 3])
def test_shared_prompt_log_probs_and_gradients_equal_one_row_per_completion(window):
    from lifecycle_cli.objectives import shared_prompt_logps

    config = Config(name="t", block_size=32, vocab_size=32, n_layer=2, n_embd=32, n_head=4,
                    n_query_groups=2, intermediate_size=64, sliding_window=window)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    draw = lambda n: torch.randint(1, 32, (n,)).tolist()  # noqa: E731
    prompts = [draw(5), draw(3)]
    completions = [[draw(n) for n in (3, 1, 4, 2)], [draw(n) for n in (2, 5)]]
    rows = [(p, c) for p, group in zip(prompts, completions) for c in group]
    width = max(len(p) + len(c) for p, c in rows) - 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for b, (p, c) in enumerate(rows):
        q = p + c
        ids[b, : len(q) - 1] = torch.tensor(q[:-1])
        labels[b, len(p) - 1 : len(q) - 1] = torch.tensor(c)
    alone = token_logps(model, ids, labels)[labels != -100]
    grads = torch.autograd.grad(alone.sum(), list(model.parameters()))
    # max_len 9: the first prompt's four completions need two packed rows.
    shared, read = shared_prompt_logps(model, prompts, completions, max_len=9)
    assert read == 2 * 5 + 3 + sum(len(c) - 1 for group in completions for c in group)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(shared.sum(), list(model.parameters())), grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_group_of_equal_rewards_contributes_no_policy_gradient():
    config = Config(name="t", block_size=16, vocab_size=32, n_layer=2, n_embd=32, n_head=2,
                    n_query_groups=1, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    ids = torch.randint(0, 32, (4, 8))
    labels = ids.roll(-1, 1)
    labels[:, :3] = -100  # the prompt
    equal = group_advantages(torch.tensor([[0.7, 0.7, 0.7, 0.7]])).flatten()
    assert torch.equal(equal, torch.zeros(4))

    def loss(adv, kl_coef, ref=None):
        model.zero_grad()
        logps = token_logps(model, ids, labels)
        losses, _ = grpo_token_losses(logps, logps.detach(), adv, 0.2, ref, kl_coef)
        value = masked_token_mean(losses, labels != -100)
        value.backward()
        return value, [p.grad.clone() for p in model.parameters()]

    value, grads = loss(equal, 0.0)
    assert value.item() == 0 and all(torch.count_nonzero(g) == 0 for g in grads)
    ref = token_logps(model, ids, labels).detach() - 0.3  # a reference that differs
    _, grads = loss(equal, 0.1, ref)  # only the KL term pulls
    assert any(torch.count_nonzero(g) > 0 for g in grads)
    mixed = torch.tensor([1.0, -1.0, 0.5, -0.5])
    _, grads = loss(mixed, 0.0)
    assert any(torch.count_nonzero(g) > 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# The verb


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lifecycle_cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_reward_model_learns_held_out_pairs_and_evaluate_loads_it(base, tmp_path):
    from lifecycle_cli.data.synthetic import make_examples

    # chosen: the word in capitals, rejected: the word as it came (a signal a head must find).
    train, val = make_examples("upper", 96, 16, seed=5)
    for name, examples in (("train", train), ("val", val)):
        rows = [{"prompt": e["instruction"], "chosen": e["output"],
                 "rejected": e["output"].lower()} for e in examples]  # fmt: skip
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    main([
        "align", str(base), "--objective", "reward_model", "--method", "full",
        "--data.path", str(tmp_path / "train.jsonl"), "--data.val_path",
        str(tmp_path / "val.jsonl"), "--prompt_style", "plain", "--train.epochs", "null",
        "--train.max_steps", "12", "--train.global_batch_size", "8",
        "--train.micro_batch_size", "8", "--train.lr", "3e-3", "--train.warmup_steps", "0",
        "--eval.interval", "12", "--out_dir", str(out),
    ])  # fmt: skip
    final = [r for r in read_metrics(out / "metrics.csv") if r["accuracy"]][-1]
    assert float(final["accuracy"]) >= 0.9
    assert json.loads((out / "final" / "reward_model.json").read_text())["kind"] == "reward_model"

    results = tmp_path / "eval"
    main([
        "evaluate", str(base), "--tasks", f"preference:{tmp_path / 'val.jsonl'}",
        "--reward_model", str(out / "final"), "--prompt_style", "plain", "--out_dir",
        str(results),
    ])  # fmt: skip
    rows = json.loads((results / "results.json").read_text())["results"]
    scored = {r["metric"]: r["value"] for r in rows}
    assert scored["reward_model_accuracy"] == pytest.approx(float(final["accuracy"]))
    # Not a reward model: one line, exit 2.
    code = main(["evaluate", str(base), "--tasks", f"preference:{tmp_path / 'val.jsonl'}",
                 "--reward_model", str(base)])  # fmt: skip
    assert code == 2


def test_ranked_pairs_put_every_better_distinct_sample_above_every_worse_one():
    from lifecycle_cli.data.preferences import ranked_pairs

    record = {"prompt": "max 3 9 4 =", "where": "p.jsonl:1", "task": "max"}
    pairs = ranked_pairs(record, ["9", "4", "9", "x", "4", "3"], [1, 0, 1, 0, 0, 0.5])
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("9", "4"), ("9", "x"), ("9", "3"), ("3", "4"), ("3", "x")}
    assert len(pairs) == len(got) and all(p["task"] == "max" for p in pairs)
    assert ranked_pairs(record, ["1", "2"], [0, 0]) == []  # all alike: nothing to learn


def test_a_reward_model_on_the_checkpoints_own_samples_ranked_by_a_verifier(
    base, prompts, tmp_path, capsys
):
    (tmp_path / "r.py").write_text(
        "def score(prompt, completion, record):\n    return float(len(completion))\n"
    )
    out = tmp_path / "rm"
    main([
        "align", str(base), "--objective", "reward_model", "--method", "full",
        "--data.path", str(prompts), "--data.val_fraction", "0.25", "--prompt_style", "plain",
        "--reward", f"{tmp_path / 'r.py'}:score", "--group_size", "4", "--max_new_tokens", "4",
        "--train.epochs", "null", "--train.max_steps", "2", "--train.global_batch_size", "4",
        "--train.micro_batch_size", "4", "--eval.interval", "2", "--out_dir", str(out),
    ])  # fmt: skip
    assert "the checkpoint's own completions (4 per prompt" in capsys.readouterr().out
    val = [json.loads(line) for line in (out / "pairs-val.jsonl").open()]
    train = [json.loads(line) for line in (out / "pairs-train.jsonl").open()]
    assert train and val and all(len(p["chosen"]) > len(p["rejected"]) for p in train + val)
    held_out = {p["prompt"] for p in val}
    assert held_out and not held_out & {p["prompt"] for p in train}
    assert (out / "final" / "reward_model.json").is_file()
    # A reward model cannot label the pairs: one line, exit 2.
    args = ["align", str(base), "--objective", "reward_model", "--data.path", str(prompts),
            "--reward", str(out / "final"), "--out_dir", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    assert "not a reward model" in capsys.readouterr().err


GRPO = [
    "--objective", "grpo", "--prompt_style", "plain", "--train.epochs", "null",
    "--train.max_steps", "4", "--train.global_batch_size", "2", "--train.micro_batch_size", "1",
    "--train.lr", "3e-3", "--train.warmup_steps", "0", "--group_size", "4",
    "--max_new_tokens", "4", "--num_iterations", "2", "--kl_coef", "0.05",
    "--eval.interval", "100", "--exact_match_samples", "2", "--lora.embedding", "true",
]  # fmt: skip


def test_grpo_resume_after_sigkill_mid_rollout_continues_exactly(base, prompts, tmp_path):
    (tmp_path / "r.py").write_text(
        "def score(prompt, completion, record):\n    return float(len(completion))\n"
    )
    args = ["align", str(base), "--data.path", str(prompts), "--data.val_fraction", "0.2",
            "--reward", "r.py:score,exact_match=0.5", "--train.save_interval", "3",
            *GRPO]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lifecycle_cli", *args, "--out_dir", str(killed)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 600
    while not (killed / "step-000003").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    done = run(*args, "--out_dir", str(straight), "--log_completions", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = run(*args, "--out_dir", str(killed), "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 3" in resumed.stdout  # the second update of rollout 1

    def column(out, key):
        return {int(r["step"]): r[key] for r in read_metrics(out / "metrics.csv") if r[key]}

    for key in ("train_loss", "reward_mean", "kl"):
        assert column(killed, key) == column(straight, key) and len(column(straight, key)) == 4
    rewards = column(straight, "reward_mean")
    assert rewards[1] == rewards[2] != rewards[3]  # one rollout serves two updates
    a = dict(iter_tensors(weight_files(straight / "final")))
    b = dict(iter_tensors(weight_files(killed / "final")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (straight / "completions.jsonl").open()]
    assert len(logged) == 3  # each with its reward: length + 0.5 * exact match
    assert all(x["reward"] - len(x["completion"]) in (0.0, 0.5) for x in logged)
    assert (straight / "grpo.png").is_file()


def test_a_failing_reward_function_names_the_record_and_exits_2(base, prompts, tmp_path, capsys):
    (tmp_path / "bad.py").write_text(
        "def score(prompt, completion, record):\n    return 1 / 0 if '3' in prompt else 0.0\n"
    )
    args = ["align", str(base), "--data.path", str(prompts), "--reward",
            f"{tmp_path / 'bad.py'}:score", "--out_dir", str(tmp_path / "o"), *GRPO]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{prompts}:" in err and "ZeroDivisionError" in err
    line = int(err.split(f"{prompts}:")[1].split(":")[0])
    record = json.loads(prompts.read_text().splitlines()[line - 1])
    assert "3" in record["prompt"]
