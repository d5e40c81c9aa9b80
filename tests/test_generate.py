"""Generation: the KV-cache path gives the tokens of a full forward and of transformers, batches
give each row its own answer, sampling filters do what they say, text streams whole characters
and never shows a stop string, and `llmcycle generate` prints a completion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from hf_models import make_hf_model

from lifecycle_cli import LLM
from lifecycle_cli.checkpoint import load_model, save_checkpoint
from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.generate import (
    Engine,
    Generator,
    SamplingParams,
    TextStream,
    apply_repetition_penalty,
    fast_decode_layout,
    sample,
)
from lifecycle_cli.model import GPT
from lifecycle_cli.tokenizer import train_bpe
from lifecycle_cli.zoo.convert import convert_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
ASCII_TEXT = "".join(c for c in "\n".join(topics.values()) if ord(c) < 128)
UNICODE = "héllo wörld, 中文 ✓ done"


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, top_k=None, **kw)


@pytest.fixture(scope="module")
def ascii_tokenizer(tmp_path_factory):
    """Byte-level BPE that never saw a non-ASCII character: 'é' is 2 tokens, '中' 3."""
    out = tmp_path_factory.mktemp("tok")
    return train_bpe(
        None, 400, out, texts=[ASCII_TEXT], special_tokens=("<|endoftext|>", "<|im_end|>")
    )


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """family -> (transformers model, our model of the same weights)."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            hf = make_hf_model(family, d / "hf")
            convert_hf_checkpoint(d / "hf", d / "ours")
            cache[family] = (hf, load_model(d / "ours"))
        return cache[family]

    return get


def full_forward_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The reference: no cache, the whole sequence through the model at every step."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


# ---- greedy parity --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "mistral"])
def test_greedy_with_kv_cache_equals_full_forward_and_transformers(family, hf_pair):
    hf, model = hf_pair(family)
    torch.manual_seed(0)
    # 9 prompt + 24 new tokens: well past the sliding window (5) of gemma2 and mistral.
    prompt = torch.randint(3, 96, (9,)).tolist()
    hf.generation_config.eos_token_id = None  # no early stop: compare all 24 tokens
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0
        )[0, 9:].tolist()
    assert len(expected) == 24

    done = Generator(model).generate(prompt, greedy(24))
    assert done.token_ids == expected
    assert full_forward_greedy(model, prompt, 24) == expected
    assert done.finish_reason == "length" and done.prompt_tokens == 9


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batched_rows_equal_generating_each_alone(family, hf_pair):
    _, model = hf_pair(family)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (3, 11, 6, 8)]
    alone_gen = Generator(model)
    row_params = [
        greedy(15),
        greedy(7),  # a shorter budget
        SamplingParams(max_new_tokens=15, temperature=1.0, top_k=20, seed=7),  # seeded sampling
        greedy(15),
    ]
    alone = [alone_gen.generate(p, sp).token_ids for p, sp in zip(prompts, row_params)]
    # Row 3 also stops at a token it produces alone: a per-row stop, the others run on.
    stop_token = alone[3][4]
    row_params[3] = greedy(15, stop_token_ids=(stop_token,))
    alone[3] = alone[3][: alone[3].index(stop_token)]

    batch = Generator(model).generate_batch(prompts, row_params)
    assert [c.token_ids for c in batch] == alone
    assert [c.finish_reason for c in batch] == ["length", "length", "length", "stop"]
    assert [len(c.token_ids) for c in batch[:3]] == [15, 7, 15]


def test_requests_joining_a_running_batch_in_scattered_slots_get_their_own_tokens(hf_pair):
    """Continuous batching: new requests prefilled into free slots that are not side by side,
    while other rows are mid-way, decode exactly as they would alone."""
    _, model = hf_pair("gemma2")  # a sliding window: the cache positions must be right
    torch.manual_seed(2)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (5, 9, 4, 7, 6, 6)]
    alone = [Generator(model).generate(p, greedy(12)).token_ids for p in prompts]

    engine = Engine(model, max_batch_size=4, raise_errors=True)
    for key in range(4):
        engine.submit(key, prompts[key], greedy(12))
    done, steps = {}, 0
    while engine.busy():
        if steps == 3:  # free slots 0 and 2; two new requests take them together
            assert engine.cancel(0) is not None and engine.cancel(2) is not None
            engine.submit(4, prompts[4], greedy(12))
            engine.submit(5, prompts[5], greedy(12))
        for key, kind, payload in engine.step():
            assert kind in ("piece", "done")
            if kind == "done":
                done[key] = payload
        steps += 1
    assert sorted(done) == [1, 3, 4, 5]
    assert [done[k]["token_ids"] for k in (1, 3, 4, 5)] == [alone[k] for k in (1, 3, 4, 5)]
    assert max(done[k]["batch"] for k in done) == 4


def test_a_request_alone_in_a_high_slot_decodes_as_a_batch_of_one(hf_pair):
    """A prompt that continues what slot 3 holds goes there (its prefix is reused), and then
    decodes alone: the free slots below it do not ride along."""
    _, model = hf_pair("llama")
    engine = Engine(model, max_batch_size=4, raise_errors=True)
    prompts = [[5 + i, 6, 7, 8, 9, 10] for i in range(4)]
    for key, prompt in enumerate(prompts):
        engine.submit(key, prompt, greedy(4))
    done = {}
    while engine.busy():
        done.update((k, v) for k, kind, v in engine.step() if kind == "done")
    later = prompts[3] + done[3]["token_ids"] + [11]
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(tuple(args[0].shape)))
    try:
        engine.submit("later", later, greedy(6))
        while engine.busy():
            done.update((k, v) for k, kind, v in engine.step() if kind == "done")
    finally:
        hook.remove()
    assert rows[0] == (1, 2)  # the prefill fed only what slot 3 did not hold
    assert set(rows[1:]) == {(1, 1)}
    assert done["later"]["token_ids"] == full_forward_greedy(model, later, 6)


def test_a_later_prompt_reuses_the_cached_prefix_and_gets_the_same_tokens(hf_pair):
    _, model = hf_pair("llama")
    gen = Generator(model)
    first = [5, 6, 7, 8, 9, 10]
    out = gen.generate(first, greedy(6)).token_ids
    second = first + out + [11, 12]
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args: fed.append(args[0].size(1)))
    try:
        reused = gen.generate(second, greedy(8)).token_ids
    finally:
        hook.remove()
    # Only the last generated token (never fed) and the two new ones went through prefill.
    assert fed[0] == 3
    assert reused == Generator(model).generate(second, greedy(8)).token_ids
    assert reused == full_forward_greedy(model, second, 8)


def test_context_guard_names_the_lengths_and_max_new_tokens_is_clamped(hf_pair):
    _, model = hf_pair("llama")
    gen = Generator(model)
    context = model.max_seq_length  # 64
    with pytest.raises(UserError, match=rf"70 tokens .*context is {context} tokens"):
        gen.stream(list(range(3, 73)), greedy(4))
    with pytest.raises(UserError, match=f"{context} tokens"):
        gen.generate([3] * context, greedy(4))
    done = gen.generate([3] * (context - 3), greedy(50))
    assert len(done.token_ids) == 3 and done.finish_reason == "length"
    # One prompt of a batch too long: the call fails and leaves the generator as it was.
    with pytest.raises(UserError, match="prompt 2 is 70 tokens"):
        gen.generate_batch([[3, 4], list(range(3, 73))], greedy(4))
    assert gen.generate([5, 6], greedy(8)).token_ids == full_forward_greedy(model, [5, 6], 8)


def test_compiled_decoding_gives_the_eager_tokens(hf_pair):
    _, model = hf_pair("gemma2")  # sliding window and soft-capping inside the compiled graph
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    eager = Generator(model).generate(prompt, greedy(12)).token_ids
    compiled = Generator(model, compile=True)
    assert compiled.generate(prompt, greedy(12)).token_ids == eager
    assert compiled.generate(prompt[:5], greedy(12)).token_ids == full_forward_greedy(
        model, prompt[:5], 12
    )


def test_decode_layout_changes_storage_not_values(tmp_path):
    torch.manual_seed(0)
    config = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, block_size=64)
    model = GPT(Config(**{**config.to_dict(), "tie_embeddings": True})).eval()
    idx = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        before = model(idx)
    tokens = Generator(model).generate([1, 2, 3], greedy(20)).token_ids
    fast_decode_layout(model)
    assert model.lm_head.weight.t().is_contiguous() and model.lm_head.weight is model.wte.weight
    assert model.blocks[0].mlp.proj.weight.is_contiguous()  # narrow (out < in): left alone
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=0)
    assert Generator(model).generate([1, 2, 3], greedy(20)).token_ids == tokens
    save_checkpoint(tmp_path / "ckpt", model)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(idx), before, atol=1e-5, rtol=0)


# ---- sampling ---------------------------------------------------------------------------------


def test_top_k_1_is_greedy_and_temperature_0_rows_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    assert torch.equal(sample(logits, temperature=1.5, top_k=1), logits.argmax(-1))
    mixed = sample(logits, temperature=torch.tensor([0.0, 1.0] * 32), top_k=None)
    # Per-row top_k in one batch: rows with top_k 1 are greedy, rows without it are not.
    per_row = sample(logits, temperature=1.0, top_k=torch.tensor([1, 0] * 32))
    assert torch.equal(per_row[0::2], logits.argmax(-1)[0::2])
    assert not torch.equal(per_row[1::2], logits.argmax(-1)[1::2])
    assert torch.equal(mixed[0::2], logits.argmax(-1)[0::2])
    assert not torch.equal(mixed[1::2], logits.argmax(-1)[1::2])


def draws(n: int = 4000, **filters) -> torch.Tensor:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(n, 4).contiguous()
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    return sample(logits, temperature=1.0, generators=gens, **filters)


def test_top_p_and_min_p_cut_the_tail():
    assert set(draws().tolist()) == {0, 1, 2, 3}  # nothing cut: every token shows up
    top_p = draws(top_p=0.7)  # 0.5 < 0.7 <= 0.8: the two most likely tokens
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised
    assert set(draws(top_p=0.85).tolist()) == {0, 1, 2}
    assert set(draws(min_p=0.2).tolist()) == {0, 1, 2}  # floor 0.1
    assert set(draws(min_p=0.5).tolist()) == {0, 1}  # floor 0.25
    assert set(draws(top_k=3, top_p=0.95).tolist()) == {0, 1, 2}


def test_repetition_penalty_follows_transformers():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_seed_makes_sampling_repeat(hf_pair):
    _, model = hf_pair("llama")
    gen = Generator(model)
    prompt = [4, 5, 6, 7]
    seeded = lambda s: SamplingParams(max_new_tokens=20, temperature=1.0, top_k=None, seed=s)  # noqa
    a, b, c = (gen.generate(prompt, seeded(s)).token_ids for s in (11, 11, 12))
    assert a == b
    assert a != c
    assert a != gen.generate(prompt, greedy(20)).token_ids


def test_bad_sampling_values_are_user_errors():
    for bad in (dict(top_p=0), dict(top_k=0), dict(min_p=1.0), dict(temperature=-1)):
        with pytest.raises(UserError):
            SamplingParams(**bad)


# ---- text: UTF-8 and stop strings ---------------------------------------------------------------


def test_the_tokenizer_really_splits_characters(ascii_tokenizer):
    ids = ascii_tokenizer.encode(UNICODE)
    assert any("\ufffd" in ascii_tokenizer.decode([i]) for i in ids)


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    pieces = [stream.add(i) for i in ids]
    pieces.append(stream.finish())
    return [p for p in pieces if p]


def test_streamed_text_never_shows_half_a_character(ascii_tokenizer):
    prompt = ascii_tokenizer.encode("Say: ")
    ids = ascii_tokenizer.encode(UNICODE)
    pieces = feed(TextStream(ascii_tokenizer, prompt), ids)
    assert "".join(pieces) == UNICODE
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 5  # it streams, it does not wait for the end


@pytest.mark.parametrize(
    "text, stop, shown",
    [
        ("Hello, world. STOP and more", ["STOP"], "Hello, world. "),
        ("héllo 中文 tail", ["中文"], "héllo "),  # a stop string of split characters
        ("a ST b STOP c", ["STOP"], "a ST b "),  # a false start is shown once it fails
        ("ends with ST", ["STOP"], "ends with ST"),  # held back, then shown at the end
        ("x\n\n### Instruction: y", ["### Instruction:", "\n\n### Instruction:"], "x"),
    ],
)
def test_stop_strings_never_leak(ascii_tokenizer, text, stop, shown):
    ids = ascii_tokenizer.encode(text)
    stream = TextStream(ascii_tokenizer, [], stop)
    pieces = []
    for i in ids:
        pieces.append(stream.add(i))
        # At no point has any shown text contained a stop string's start that then matched.
        assert shown.startswith(stream.text)
    pieces.append(stream.finish())
    assert "".join(pieces) == shown == stream.text


class Scripted(GPT):
    """A real GPT (cache and all) whose logits always pick the next token of `script`."""

    script: list[int] = []

    def forward(self, idx, input_pos=None, *, logits_at=None):
        logits = super().forward(idx, input_pos, logits_at=logits_at)
        if logits_at is not None:  # a prefill: the reply starts over
            self.step = 0
        out = torch.full_like(logits[:, -1:], -10.0)
        out[..., self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return out


def scripted(tokenizer, script: list[int]) -> Scripted:
    torch.manual_seed(0)
    config = Config(n_layer=1, n_embd=16, n_head=2, vocab_size=tokenizer.vocab_size, block_size=128)
    model = Scripted(config).eval()
    model.script = script
    return model


def test_generator_streams_utf8_and_stops_at_strings_tokens_and_eos(ascii_tokenizer):
    tok = ascii_tokenizer
    eos, im_end = tok.eos_id, tok.token_to_id("<|im_end|>")
    prompt = tok.encode("Q: ")

    model = scripted(tok, tok.encode(UNICODE + " STOP more") + [eos])
    stream = Generator(model, tok).stream(prompt, greedy(100, stop=("STOP",)))
    pieces = list(stream)
    assert "".join(pieces) == "héllo wörld, 中文 ✓ done " == stream.completion.text
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 5
    assert stream.completion.finish_reason == "stop"

    model.script = tok.encode(UNICODE) + [eos] + tok.encode(" after eos")
    done = Generator(model, tok).generate(prompt, greedy(100))
    assert done.text == UNICODE and done.finish_reason == "stop"
    assert done.token_ids == tok.encode(UNICODE)  # the eos itself is not output

    # A stop string that is one special token is caught as a token: decoded text never has it.
    model.script = tok.encode("hi") + [im_end] + tok.encode(" more")
    done = Generator(model, tok).generate(prompt, greedy(100, stop=("<|im_end|>",)))
    assert (done.text, done.finish_reason) == ("hi", "stop")

    model.script = tok.encode("abc def ghi jkl")
    done = Generator(model, tok).generate(prompt, greedy(3))
    assert done.finish_reason == "length" and len(done.token_ids) == 3


def test_closing_a_stream_early_cancels_it(ascii_tokenizer):
    tok = ascii_tokenizer
    model = scripted(tok, tok.encode("one two three four five six seven"))
    stream = Generator(model, tok).stream(tok.encode("Q: "), greedy(50))
    first = next(iter(stream))
    stream.close()
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.text.startswith(first)


# ---- the Python API and the CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model with a real BPE tokenizer (vocab 400), context 64."""
    d = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe(None, 400, d / "tok", texts=["\n".join(topics.values())])
    torch.manual_seed(0)
    config = Config(
        name="tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
        block_size=64, intermediate_size=64, norm="rmsnorm", mlp="swiglu", bias=False,
    )  # fmt: skip
    save_checkpoint(d / "ckpt", GPT(config), tokenizer_dir=d / "tok")
    return d / "ckpt"


def llmcycle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle_cli", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_llm_generate_stream_and_batch_agree(tiny_checkpoint):
    llm = LLM.load(tiny_checkpoint)
    text = llm.generate("The class", max_new_tokens=12, temperature=0)
    assert text and "".join(llm.stream("The class", max_new_tokens=12, temperature=0)) == text
    batch = llm.generate(["The class", "A"], max_new_tokens=12, temperature=0)
    assert batch[0] == text and batch[1] == llm.generate("A", max_new_tokens=12, temperature=0)


def test_cli_generate_prints_the_completion(tiny_checkpoint):
    proc = llmcycle(
        "generate", tiny_checkpoint, "--prompt", "The class", "--max_new_tokens", "12",
        "--temperature", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = LLM.load(tiny_checkpoint).generate("The class", max_new_tokens=12, temperature=0)
    assert proc.stdout == expected + "\n"
    assert "Time for inference:" in proc.stderr and "12 tokens" in proc.stderr


def test_cli_generate_prompt_longer_than_context_is_one_line_exit_2(tiny_checkpoint):
    proc = llmcycle("generate", tiny_checkpoint, "--prompt", "word " * 100)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "context is 64 tokens" in proc.stderr and "the prompt is" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "verb, flag, value, words",
    [
        ("generate", "--top_p", "0", "(0, 1]"),
        ("generate", "--min_p", "1.5", "[0, 1)"),
        ("generate", "--repetition_penalty", "0", "> 0"),
        ("chat", "--max_new_tokens", "0", "at least 1"),
        ("chat", "--temperature", "-1", ">= 0"),
    ],
)
def test_cli_bad_sampling_flag_is_one_line_naming_it_exit_2(
    tiny_checkpoint, verb, flag, value, words
):
    args = ["--prompt", "x"] if verb == "generate" else []
    proc = llmcycle(verb, tiny_checkpoint, *args, flag, value)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert flag in proc.stderr and words in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_verb_help_lists_the_flags_without_importing_torch(verb):
    probe = (
        "import sys\nfrom lifecycle_cli.cli import main\n"
        f"try:\n    main([{verb!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jinja2')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert "HEAVY []" in proc.stdout
    for flag in ("--temperature", "--top_p", "--min_p", "--stop", "--prompt_style", "--compile"):
        assert flag in proc.stdout
