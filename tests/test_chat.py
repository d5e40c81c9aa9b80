"""`llmcycle chat` in a real terminal, prompt styles against transformers' chat templates, and
the conversation fitted into the context."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from pydoc_data.topics import topics

import pexpect
import pytest
import torch
import transformers
from published_templates import MISTRAL_TEMPLATE, PHI3_TEMPLATE, QWEN_TEMPLATE

from lifecycle_cli.checkpoint import save_checkpoint
from lifecycle_cli.commands.chat import ChatSession, read_message
from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.generate import SamplingParams
from lifecycle_cli.model import GPT
from lifecycle_cli.prompts import (
    ALPACA_INPUT_SYSTEM,
    ChatTemplate,
    get_style,
    resolve_style,
    save_prompt_style,
    style_names,
)
from lifecycle_cli.tokenizer import Tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour.\nJust one."},
]


def make_checkpoint(folder: Path, template: str | None = None) -> Path:
    """A tiny random model with a ChatML-capable BPE tokenizer (and a chat template)."""
    tok_dir = folder / "tok"
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    train_bpe(None, 400, tok_dir, texts=["\n".join(topics.values())], special_tokens=specials)
    if template is not None:
        (tok_dir / "chat_template.jinja").write_text(template)
    torch.manual_seed(0)
    config = Config(
        name="tiny", vocab_size=400, n_layer=2, n_embd=32, n_head=4, block_size=256,
        intermediate_size=64, norm="rmsnorm", mlp="swiglu", bias=False,
    )  # fmt: skip
    return save_checkpoint(folder / "ckpt", GPT(config), tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chat"), CHATML_TEMPLATE)


# ---- the terminal session ---------------------------------------------------------------------

# Runs `llmcycle chat` with the model's logits replaced by a script: each reply is
# "#<user messages in the conversation>: <last message in capitals> 中文 ✓", decided from every
# token the model has been fed (so a lost turn or a wrong cache shows). The 5th token of reply N
# waits until the test creates the file <gate>/N: text shown before that was streamed.
CHILD = r"""
import signal, sys, time
from pathlib import Path
import torch
from lifecycle_cli import model as model_module
from lifecycle_cli.cli import main
from lifecycle_cli.tokenizer import Tokenizer

ckpt, gate = Path(sys.argv[1]), Path(sys.argv[2])
# A suite started in the background by a shell without job control runs with SIGINT ignored,
# which this child would inherit: Ctrl-C must reach it as it reaches a chat in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
tok = Tokenizer(ckpt)
END = tok.token_to_id("<|im_end|>")
forward = model_module.GPT.forward
state = {"fed": {}, "script": [], "step": 0, "replies": 0}

def scripted(self, idx, input_pos=None, *, logits_at=None):
    logits = forward(self, idx, input_pos, logits_at=logits_at)
    for p, t in zip(input_pos.tolist(), idx[0].tolist()):
        state["fed"][p] = t
    if logits_at is not None:
        seen = tok.decode([state["fed"][p] for p in range(int(input_pos[-1]) + 1)])
        users = seen.split("<|im_start|>user\n")
        last = users[-1].split("<|im_end|>")[0]
        state["replies"] += 1
        state["script"] = tok.encode(f"#{len(users) - 1}: {last.upper()} 中文 ✓") + [END]
        state["step"] = 0
    elif state["step"] == 4:
        (gate / f"stuck{state['replies']}").touch()  # the test interrupts only from here on
        while not (gate / str(state["replies"])).exists():
            time.sleep(0.005)
    out = torch.full_like(logits[:, -1:], -10.0)
    out[..., state["script"][state["step"]]] = 10.0
    state["step"] += 1
    return out

model_module.GPT.forward = scripted
sys.exit(main(["chat", str(ckpt), "--temperature", "0"] + sys.argv[3:]))
"""


def test_chat_in_a_terminal_streams_keeps_history_resets_and_exits(checkpoint, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    child = pexpect.spawn(
        sys.executable, ["-c", CHILD, str(checkpoint), str(gate)],
        cwd=str(REPO), encoding="utf-8", timeout=60, dimensions=(40, 200),
    )  # fmt: skip
    try:
        child.expect("chat_template prompt style")  # the checkpoint's own template by default

        def turn(message: str, n: int, reply: str) -> None:
            child.expect_exact(">> Prompt: ")
            child.sendline(message)
            # Shown while the model is stuck on the reply's 5th token: the reply streams.
            child.expect_exact(f">> Reply: #{reply[1]}")
            assert not (gate / str(n)).exists()
            (gate / str(n)).touch()
            child.expect_exact(reply[2:])
            child.expect(r"Time for inference: [\d.]+ sec total, [\d.]+ tokens/sec, \d+ tokens")

        turn("hello there", 1, "#1: HELLO THERE 中文 ✓")
        turn("and again", 2, "#2: AND AGAIN 中文 ✓")  # the first exchange is still there

        child.expect_exact(">> Prompt: ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")

        child.expect_exact(">> Prompt: ")
        for line in ('"""', "line one", "line two", '"""'):
            child.sendline(line)
        child.expect_exact(">> Reply: #1")  # history gone; both lines are one message
        (gate / "3").touch()
        child.expect_exact(": LINE ONE\r\nLINE TWO 中文 ✓")

        # Ctrl-C while the model is stuck stops the reply, not the chat.
        child.expect_exact(">> Prompt: ")
        child.sendline("stop me")
        child.expect_exact(">> Reply: #2")
        wait_until((gate / "stuck4").exists)  # a Ctrl-C a few tokens earlier tests another moment
        child.sendintr()
        child.expect_exact("(reply stopped)")
        turn("still here", 5, "#3: STILL HERE 中文 ✓")

        child.expect_exact(">> Prompt: ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def wait_until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("key", ["ctrl-d", "empty line"])
def test_ctrl_d_and_empty_line_end_the_session(checkpoint, key):
    child = pexpect.spawn(
        sys.executable, ["-m", "lifecycle_cli", "chat", str(checkpoint)],
        cwd=str(REPO), encoding="utf-8", timeout=60, dimensions=(40, 200),
    )  # fmt: skip
    try:
        child.expect("quits \\(so does Ctrl-D\\)")  # the help line says how to leave
        child.expect_exact(">> Prompt: ")
        if key == "ctrl-d":
            child.sendeof()
        else:
            child.sendline("")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    # The chat just ends: no reply, no new prompt, no traceback; exit status 0.
    assert child.before.strip() == "", child.before
    assert (child.exitstatus, child.signalstatus) == (0, None)


def test_read_message_joins_fenced_lines(monkeypatch):
    lines = iter(['"""first', "second", 'third"""', '"""one line"""'])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert read_message() == "first\nsecond\nthird"
    assert read_message() == "one line"


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(checkpoint, capsys):
    tok = Tokenizer(checkpoint)
    style = get_style("chatml", tok)
    params = SamplingParams(max_new_tokens=40)
    session = ChatSession(types.SimpleNamespace(context=256), tok, style, params, system="Sys.")
    long = "a fairly long message about the class and the module " * 2
    for i in range(6):
        session.history += [
            {"role": "user", "content": f"{i} {long}"},
            {"role": "assistant", "content": f"reply {i} {long}"},
        ]
    session.history.append({"role": "user", "content": "the latest question"})
    ids = session.fit()
    assert len(ids) + 40 <= 256
    assert session.history[-1]["content"] == "the latest question"
    assert session.history[0]["role"] == "user" and 1 < len(session.history) < 13
    kept = tok.decode(ids)
    assert kept.startswith("<|im_start|>system\nSys.") and "0 a fairly" not in kept
    assert "dropped the" in capsys.readouterr().err

    session.history = [{"role": "user", "content": "word " * 300}]
    with pytest.raises(UserError, match="your message is .* context is 256 tokens"):
        session.fit()


# ---- prompt styles ----------------------------------------------------------------------------


def hf_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize(
    "template, builtin", [(CHATML_TEMPLATE, "chatml"), (LLAMA3_TEMPLATE, "llama3")]
)
def test_chat_template_renders_and_encodes_like_transformers(template, builtin, tmp_path):
    ckpt = make_checkpoint(tmp_path, template)
    tok = Tokenizer(ckpt)
    style = resolve_style(ckpt, tok)  # the template is the default
    assert isinstance(style, ChatTemplate)
    hf = hf_tokenizer(ckpt)
    for messages, gen in ((CONVERSATION, True), (CONVERSATION[:3], False)):
        text = style.render(messages, add_generation_prompt=gen)
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert text == expected
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        assert style.encode(tok, text) == list(ids["input_ids"])
        # The built-in style writes the same text, minus the bos the tokenizer adds itself.
        assert get_style(builtin, tok).render(messages, gen) == text.removeprefix(style.bos_token)


def test_chat_template_stop_is_its_end_of_turn_token(checkpoint):
    style = resolve_style(checkpoint, Tokenizer(checkpoint))
    assert style.stop == ("<|im_end|>",)


def test_builtin_styles_render_single_and_multi_turn(checkpoint):
    assert get_style("plain").apply("just this") == "just this"
    alpaca = get_style("alpaca")
    assert alpaca.apply("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert alpaca.apply("Sum.", input="2, 3") == (
        f"{ALPACA_INPUT_SYSTEM}\n\n### Instruction:\nSum.\n\n### Input:\n2, 3\n\n### Response:\n"
    )
    # Each family's style writes what its published template renders (minus the bos token the
    # tokenizer adds itself): the prompt of one and of several turns, and the whole conversation
    # with the reply (what finetune trains on), with a system message where the family has one.
    tok, hf = Tokenizer(checkpoint), hf_tokenizer(checkpoint)
    reply = {"role": "assistant", "content": "Red."}
    published = {
        "chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "qwen": QWEN_TEMPLATE,
        "phi3": PHI3_TEMPLATE, "mistral": MISTRAL_TEMPLATE,
    }  # fmt: skip
    for name, template in published.items():
        style = get_style(name, tok)
        turns = [CONVERSATION[1:2], CONVERSATION[1:], [{"role": "user", "content": " Hi \n"}]]
        if name != "mistral":  # Mistral's template has no system role
            turns += [CONVERSATION[:2], CONVERSATION]
        for messages in turns:
            for conversation, gen in ((messages, True), ([*messages, reply], False)):
                expected = hf.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, add_generation_prompt=gen
                )
                got = style.render(conversation, gen)
                assert got == expected.removeprefix(hf.bos_token), (name, conversation, gen)
    # Mistral: a system message leads the first user message.
    first = {"role": "user", "content": "Be brief.\n\nHi there"}
    expected = hf.apply_chat_template([first, *CONVERSATION[2:]], chat_template=MISTRAL_TEMPLATE,
                                      tokenize=False)  # fmt: skip
    assert get_style("mistral", tok).render(CONVERSATION) == expected.removeprefix(hf.bos_token)
    assert get_style("gemma").render(CONVERSATION[1:2]) == (
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    )
    assert get_style("llama2").render(CONVERSATION) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? </s>"
        "<s>[INST] Name a colour.\nJust one. [/INST]"
    )
    for name in style_names()[:-1]:  # every style: the reply is what it adds to the prompt
        style = get_style(name)
        prompt = style.render(CONVERSATION)
        full = style.render([*CONVERSATION, reply], False)
        assert full.startswith(prompt) and "Red." in full[len(prompt) :], name


def test_generate_prompts_an_instruct_checkpoint_in_its_template_plain_as_given(checkpoint,
                                                                               capsys):  # fmt: skip
    from lifecycle_cli import LLM
    from lifecycle_cli.cli import main

    llm = LLM.load(checkpoint)
    formatted = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    kw = dict(max_new_tokens=8, temperature=0)
    templated = llm.generate(formatted, prompt_style="plain", stop=["<|im_end|>"], **kw)
    raw = llm.generate("Name a colour.", prompt_style="plain", **kw)
    assert templated and raw and templated != raw  # the two prompts continue differently
    assert llm.generate("Name a colour.", **kw) == templated  # auto: the chat template
    assert llm.generate("Name a colour.", prompt_style="raw", **kw) == raw
    capsys.readouterr()
    args = ["--prompt", "Name a colour.", "--temperature", "0", "--max_new_tokens", "8"]
    assert main(["generate", str(checkpoint), *args]) == 0
    assert capsys.readouterr().out == templated + "\n"


def test_prompt_style_file_and_the_order_styles_are_chosen_in(tmp_path):
    ckpt = make_checkpoint(tmp_path, CHATML_TEMPLATE)
    tok = Tokenizer(ckpt)
    assert resolve_style(ckpt, tok).name == "chat_template"
    base = make_checkpoint(tmp_path / "base")  # no template, no saved style: plain
    assert resolve_style(base, Tokenizer(base)).name == "plain"
    save_prompt_style("alpaca", ckpt)
    assert (ckpt / "prompt_style.yaml").read_text() == "name: alpaca\n"
    assert resolve_style(ckpt, tok).name == "alpaca"
    assert resolve_style(ckpt, tok, "plain").name == resolve_style(ckpt, tok, "raw").name == "plain"
    assert resolve_style(ckpt, tok, "llama3").name == "llama3"  # the flag wins
    (ckpt / "prompt_style.yaml").write_text("class_path: litgpt.prompts.Phi3\n")  # LitGPT's
    assert resolve_style(ckpt, tok).name == "phi3"
    (ckpt / "prompt_style.yaml").write_text("[1, 2\n")
    with pytest.raises(UserError, match="prompt_style.yaml"):
        resolve_style(ckpt, tok)
    with pytest.raises(UserError, match="unknown prompt style 'nope'.*alpaca, chatml"):
        get_style("nope")
    with pytest.raises(UserError, match="unknown prompt style"):
        save_prompt_style("nope", ckpt)
