"""Speculative decoding: greedy output is exactly the target's greedy output whatever the draft
(one that agrees often, one that rarely does), and the acceptance rule leaves the next token
with the target's distribution."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from served import tiny_checkpoint

from lifecycle_cli import LLM
from lifecycle_cli.checkpoint import save_checkpoint
from lifecycle_cli.generate import GREEDY, Generator, SamplingParams
from lifecycle_cli.generate.speculative import verify
from lifecycle_cli.model import GPT

PROMPTS = ["The class", "A module that"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("speculative")
    target = tiny_checkpoint(d / "target", logit_scale=20)
    torch.manual_seed(1)  # another random model of the same vocabulary: a poor draft
    config = LLM.load(target).config
    other = dataclasses.replace(config, n_layer=1, name="other")
    return target, save_checkpoint(d / "other", GPT(other))


@pytest.fixture(scope="module")
def plain(checkpoints):
    return LLM.load(checkpoints[0])


@pytest.mark.parametrize("draft, quantize, k", [("target", "int8", 4), ("other", None, 3)])
def test_greedy_speculative_decoding_is_the_targets_greedy_output(
    checkpoints, plain, draft, quantize, k
):
    target, other = checkpoints
    llm = LLM.load(
        target, draft_checkpoint=target if draft == "target" else other, draft_tokens=k,
        draft_quantize=quantize,
    )  # fmt: skip
    params = GREEDY.replace(max_new_tokens=23, ignore_eos=True)
    for prompt in PROMPTS:
        want = plain.generator().generate(prompt, params)
        got = llm.generator().generate(prompt, params)
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.drafted > 0 and got.completion_tokens == 23
        if draft == "target":  # its own int8 weights agree with it most of the time
            assert got.acceptance_rate > 0.5
    # Stops still end it where the target's greedy output ends.
    stop = plain.generator().generate(PROMPTS[0], params).token_ids[9]
    params = params.replace(stop_token_ids=(stop,))
    want = plain.generator().generate(PROMPTS[0], params)
    assert llm.generator().generate(PROMPTS[0], params).token_ids == want.token_ids


def test_the_acceptance_rule_leaves_the_targets_distribution():
    # One proposal over 4 tokens: drafted from q, verified against target logits for p.
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = torch.stack([p.log(), torch.tensor([0.0, 0.0, 0.0, 0.0])])
    params = SamplingParams(temperature=1.0, top_k=None)
    gen = torch.Generator().manual_seed(0)
    n, counts = 2000, torch.zeros(4)
    for d in torch.multinomial(q[0], n, replacement=True, generator=gen).tolist():
        kept, token = verify(torch.tensor([d]), q, logits, params, gen).tolist()
        counts[d if kept else token] += 1
    assert (counts / n - p).abs().max() < 0.04, counts / n  # 3.5 standard errors


def test_a_draft_with_another_vocabulary_is_refused(plain):
    model = plain.model
    config = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + 16)
    with pytest.raises(Exception, match="same tokenizer"):
        Generator(model, draft=GPT(config))
