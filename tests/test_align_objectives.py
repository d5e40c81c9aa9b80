"""The DPO family of losses against the published formulas, response log-probs, preference
pairs (reading, checking, formatting, truncation, synthetic corruption) and score_pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lifecycle_cli import objectives as o
from lifecycle_cli.data.instruct import SFTDataset
from lifecycle_cli.data.preferences import (
    PreferenceDataset,
    corrupt,
    load_pairs,
    synthetic_pairs,
)
from lifecycle_cli.data.synthetic import make_examples
from lifecycle_cli.errors import UserError
from lifecycle_cli.prompts import get_style
from lifecycle_cli.tokenizer import train_bpe

# Two pairs. Summed response log-probs of the policy (pc, pr) and the reference (rc, rr), and
# the responses' token counts (nc, nr). Pair 1 favours chosen, pair 2 rejected.
PC, PR = torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -2.0])
RC, RR = torch.tensor([-5.0, -3.5]), torch.tensor([-5.0, -1.0])
NC, NR = torch.tensor([2.0, 1.0]), torch.tensor([4.0, 2.0])


def close(value: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(value, torch.tensor(expected), atol=1e-6, rtol=0)


def test_dpo_is_minus_log_sigmoid_of_beta_times_the_log_ratio_margin():
    # h1 = (-4 - -5) - (-6 - -5) = 2; h2 = (-3 - -3.5) - (-2 - -1) = 1.5
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598139; log(1 + e^-0.15) = 0.620957
    close(o.dpo_loss(PC, PR, RC, RR, beta=0.1), [0.5981388694, 0.6209570478])
    # label smoothing 0.2: 0.8 * log(1 + e^-0.2) + 0.2 * log(1 + e^0.2) = 0.638139
    close(o.dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2), [0.6381388694, 0.6509570478])
    # Swapping chosen and rejected turns the margin around: the loss grows.
    assert (o.dpo_loss(PR, PC, RR, RC, beta=0.1) > o.dpo_loss(PC, PR, RC, RR, beta=0.1)).all()


def test_ipo_is_the_squared_distance_of_the_mean_log_ratio_margin_from_one_over_two_beta():
    # per-token means: h1 = (1 / 2) - (-1 / 4) = 0.75; h2 = 0.5 / 1 - (-1 / 2) = 1.0
    # (0.75 - 1 / 0.2)^2 = 18.0625; (1 - 5)^2 = 16
    close(o.ipo_loss(PC, PR, RC, RR, NC, NR, beta=0.1), [18.0625, 16.0])


def test_rpo_alpha_adds_the_chosen_responses_mean_token_nll_to_dpo_and_ipo():
    from lifecycle_cli.train.tasks.preference import PreferenceObjective

    policy, ref, counts = (
        torch.stack([PC, PR], -1),
        torch.stack([RC, RR], -1),
        torch.stack([NC, NR], -1),
    )
    # chosen NLL per token: 4 / 2 = 2 and 3 / 1 = 3; alpha 0.5 adds 1.0 and 1.5
    dpo = PreferenceObjective("dpo", rpo_alpha=0.5).losses(policy, ref, counts)
    close(dpo, [0.5981388694 + 1.0, 0.6209570478 + 1.5])
    ipo = PreferenceObjective("ipo", rpo_alpha=0.5).losses(policy, ref, counts)
    close(ipo, [18.0625 + 1.0, 16.0 + 1.5])
    close(PreferenceObjective("dpo").losses(policy, ref, counts), [0.5981388694, 0.6209570478])
    with pytest.raises(UserError, match="--rpo_alpha does not apply to --objective simpo"):
        PreferenceObjective("simpo", rpo_alpha=0.5)


def test_simpo_is_reference_free_and_length_normalised():
    # z1 = 2 * (-4 / 2 - -6 / 4) - 1 = -2; z2 = 2 * (-3 / 1 - -2 / 2) - 1 = -5
    # -log sigmoid(-2) = log(1 + e^2) = 2.126928; log(1 + e^5) = 5.006715
    close(o.simpo_loss(PC, PR, NC, NR, beta=2.0, gamma=1.0), [2.1269280110, 5.0067153485])


def test_orpo_is_the_chosen_nll_plus_the_weighted_log_odds_ratio_term():
    # mean log-probs: c1 = -2, r1 = -1.5; log odds(m) = m - log(1 - e^m)
    # log odds(-2) = -1.854587, log odds(-1.5) = -1.247518; -log sigmoid(-0.607069) = 1.042059
    # loss1 = 2 + 0.1 * 1.042059 = 2.104206; pair 2 likewise: 3 + 0.1 * 2.493812 = 3.249381
    close(o.orpo_loss(PC, PR, NC, NR, weight=0.1), [2.1042057808, 3.2493811709])


class FixedLogits(torch.nn.Module):
    """A model whose logits ignore its input; it records how many rows each call saw."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.calls = logits, []

    def forward(self, idx: torch.Tensor, logits_where=None) -> torch.Tensor:
        self.calls.append(idx.shape[0])
        logits = self.logits[: idx.shape[0], : idx.shape[1]]
        return logits if logits_where is None else logits[logits_where]  # as GPT.forward


def test_response_logps_sum_only_the_unmasked_tokens_in_one_forward():
    vocab = 4
    logits = torch.zeros(4, 3, vocab)  # uniform: every token has log-prob log(1/4)
    logits[:, :, 2] = torch.log(torch.tensor(3.0))  # token 2: log(3/6) = log(1/2)
    model = FixedLogits(logits)
    labels = torch.tensor([[-100, 2, 2], [-100, -100, 1], [-100, 0, -100], [2, 2, 2]])
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": labels}
    logps, counts = o.response_logps(model, batch)
    half, sixth = torch.log(torch.tensor(0.5)), torch.log(torch.tensor(1 / 6))
    torch.testing.assert_close(logps, torch.stack([2 * half, sixth, sixth, 3 * half]))
    assert counts.tolist() == [2, 1, 1, 3]
    assert model.calls == [4]  # chosen and rejected rows together


def test_token_logps_equal_the_full_logits_ones_though_only_labelled_positions_reach_the_head():
    from lifecycle_cli.config import Config
    from lifecycle_cli.model import GPT

    torch.manual_seed(0)
    model = GPT(Config(name="t", block_size=16, vocab_size=50, n_layer=2, n_embd=32, n_head=2,
                       n_query_groups=1, intermediate_size=64))  # fmt: skip
    ids = torch.randint(0, 50, (4, 10))
    labels = torch.full((4, 10), -100)
    labels[0, 4:7], labels[1, 1:9], labels[2, [6, 8]] = ids[0, 5:8], ids[1, 2:10], 3
    full = torch.nn.functional.cross_entropy(
        model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    )
    torch.testing.assert_close(o.token_logps(model, ids, labels), -full.view(4, 10))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from pydoc_data.topics import topics

    return train_bpe(None, 512, tmp_path_factory.mktemp("tok"), texts=list(topics.values()))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pairs_are_tokenized_exactly_as_finetune_tokenizes_the_same_example(tokenizer, tmp_path):
    chat = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello there"}],
        "rejected": "Go away",
    }
    plain = {"prompt": "reverse: c a t", "chosen": "t a c", "rejected": "t c a"}
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", [chat, plain]))
    for style_name in ("chatml", "alpaca"):
        style = get_style(style_name, tokenizer)
        data = PreferenceDataset(pairs, tokenizer, style, 128, seed=None)
        batch = data.rows([0, 1])
        examples = [
            {"messages": [*chat["prompt"], {"role": "assistant", "content": "Hello there"}]},
            {"messages": [*chat["prompt"], {"role": "assistant", "content": "Go away"}]},
            {"instruction": "reverse: c a t", "input": "", "output": "t a c"},
            {"instruction": "reverse: c a t", "input": "", "output": "t c a"},
        ]
        sft = SFTDataset(examples, tokenizer, style, 128, seed=None)
        rows = [0, 2, 1, 3]  # the batch: chosen of both pairs, then rejected of both
        for b, i in enumerate(rows):
            want = sft.get([i])
            n = want["input_ids"].shape[1]
            assert batch["input_ids"][b, :n].tolist() == want["input_ids"][0].tolist()
            assert batch["labels"][b, :n].tolist() == want["labels"][0].tolist()  # prompt masked
            assert (batch["labels"][b, n:] == -100).all()


def test_implicit_prompt_conversations_give_the_same_pair(tokenizer, tmp_path):
    user = {"role": "user", "content": "Hi"}
    explicit = {"prompt": [user], "chosen": "Hello", "rejected": "No"}
    implicit = {
        "chosen": [user, {"role": "assistant", "content": "Hello"}],
        "rejected": [user, {"role": "assistant", "content": "No"}],
    }
    a, b = load_pairs(write_jsonl(tmp_path / "p.jsonl", [explicit, implicit]))
    assert {k: v for k, v in a.items() if k != "where"} == {
        k: v for k, v in b.items() if k != "where"
    }


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "q", "chosen": "a"}, ":2: missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, ":2: missing field 'prompt'"),
        ({"prompt": "q", "chosen": " ", "rejected": "b"}, ":2: field 'chosen' is empty"),
        (
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]},
            ":2: field 'rejected' is empty",
        ),  # fmt: skip
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, ":2: 'chosen' and 'rejected' are the"),
        (
            {"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"},
            ":2: message 1: unknown role 'bot'",
        ),  # fmt: skip
    ],
)
def test_a_bad_pair_is_named_by_file_and_line(record, message, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(UserError) as err:
        load_pairs(path)
    assert f"{path}{message}" in str(err.value)


def test_truncation_cuts_the_prompt_from_the_left_then_the_responses(tokenizer):
    style = get_style("plain", tokenizer)
    long_prompt = " ".join("abcdefghij" * 4)
    pair = {"prompt": long_prompt, "chosen": "x " * 30, "rejected": "y", "where": "f.jsonl:7"}
    full = PreferenceDataset([pair], tokenizer, style, 128, seed=None)
    p, c = int(full.prompt_lengths[0]), len(full.chosen.ids(0)) - int(full.prompt_lengths[0])
    assert full.n_truncated == 0 and p > 40 and c > 25

    budget = 50  # max_seq_length 49: prompt keeps its last 25 tokens, the responses the rest
    cut = PreferenceDataset([pair], tokenizer, style, budget - 1, seed=None)
    assert cut.n_truncated == 1
    kept = cut.chosen.ids(0)
    assert len(kept) == budget
    assert int(cut.prompt_lengths[0]) == budget // 2
    assert kept[: budget // 2].tolist() == full.chosen.ids(0)[p - budget // 2 : p].tolist()
    assert kept[budget // 2 :].tolist() == full.chosen.ids(0)[p : p + budget - budget // 2].tolist()
    assert len(cut.rejected.ids(0)) == len(full.rejected.ids(0)) - (p - budget // 2)

    with pytest.raises(UserError, match=r"f.jsonl:7: the prompt alone is \d+ tokens, more than"):
        PreferenceDataset([pair], tokenizer, style, 30, seed=None)


def test_synthetic_pairs_reject_a_plausible_wrong_answer():
    train, val = synthetic_pairs("sort,add,lookup", 50, 10, seed=3)
    examples = make_examples("sort,add,lookup", 50, 10, seed=3)
    assert [p["chosen"] for p in train] == [e["output"] for e in examples[0]]
    assert [p["prompt"] for p in val] == [e["instruction"] for e in examples[1]]
    for pair in train + val:
        chosen, rejected = pair["chosen"], pair["rejected"]
        assert rejected != chosen and len(rejected) == len(chosen)
        differ = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        assert 1 <= len(differ) <= 2  # one character changed, or two neighbours swapped
    rng = random.Random(0)
    wrong = {corrupt("4 2", rng) for _ in range(100)}
    assert wrong >= {"5 2", "3 2", "4 3", "4 1", "2 4"}
    assert wrong <= {"5 2", "3 2", "4 3", "4 1", "2 4"}


def test_synthetic_validation_pairs_do_not_change_with_the_training_size():
    assert (
        synthetic_pairs("add,lookup", 20, 10, seed=3)[1]
        == synthetic_pairs("add,lookup", 50, 10, seed=3)[1]
    )
