"""Chat over HTTP in prompt styles other than plain: `/v1/chat/completions` gives the model the
conversation rendered by the checkpoint's own chat template (exactly the tokens transformers'
`apply_chat_template` gives), or by the style `serve --prompt_style` names, which wins; so does
`/predict` with its one prompt."""

from __future__ import annotations

import openai
import pytest
import transformers
from published_templates import PHI3_TEMPLATE
from served import Server, tiny_checkpoint

from lifecycle_cli import LLM

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("styles") / "ckpt", chat_template=PHI3_TEMPLATE)


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM.load(checkpoint)


def serve(checkpoint, tmp_path_factory, *args: str):
    s = Server(checkpoint, tmp_path_factory.mktemp("log") / "server.log", *args)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def template_server(checkpoint, tmp_path_factory):
    yield from serve(checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def chatml_server(checkpoint, tmp_path_factory):
    yield from serve(checkpoint, tmp_path_factory, "--prompt_style", "chatml")


def chat(server: Server, messages, stream: bool = False):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    kw = dict(model="ckpt", messages=messages, max_tokens=12, temperature=0)
    if not stream:
        return c.chat.completions.create(**kw)
    chunks = c.chat.completions.create(**kw, stream=True)
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


@pytest.mark.parametrize("messages", [CONVERSATION[1:2], CONVERSATION], ids=["one", "several"])
def test_chat_is_rendered_by_the_checkpoints_chat_template(template_server, checkpoint, llm,
                                                           messages):  # fmt: skip
    hf = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"])
    assert text.startswith("<|user|>" if len(messages) == 1 else "<|system|>\nBe brief.")
    assert llm.tokenizer.encode(text) == ids  # the text as a prompt is those tokens

    out = chat(template_server, messages)
    assert out.usage.prompt_tokens == len(ids)
    # What the model writes after exactly that prompt.
    expected = llm.generate(text, max_new_tokens=12, temperature=0, prompt_style="plain")
    assert out.choices[0].message.content == expected
    assert chat(template_server, messages, stream=True) == expected


def test_predict_and_the_api_format_a_prompt_with_the_chat_template_by_default(
    template_server, checkpoint, llm
):
    hf = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    message = [{"role": "user", "content": "Name a colour."}]
    text = hf.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    stop = list(llm.prompt_style().stop)  # the template's end of turn
    expected = llm.generate(text, max_new_tokens=12, temperature=0, prompt_style="plain", stop=stop)
    assert llm.generate("Name a colour.", max_new_tokens=12, temperature=0) == expected
    status, body, _ = template_server.call(
        "/predict", {"prompt": "Name a colour.", "max_new_tokens": 12, "temperature": 0}
    )
    assert status == 200 and body["output"] == expected, body


def test_serve_prompt_style_flag_wins_over_the_chat_template(chatml_server, llm):
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    chatml += "<|im_start|>assistant\n"
    out = chat(chatml_server, CONVERSATION)
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode(chatml))
    expected = llm.generate(chatml, max_new_tokens=12, temperature=0, prompt_style="plain",
                            stop=["<|im_end|>", "<|im_start|>"])  # fmt: skip
    assert out.choices[0].message.content == expected

    # /predict formats its prompt in the named style too.
    status, body, _ = chatml_server.call(
        "/predict", {"prompt": "Name a colour.", "max_new_tokens": 12, "temperature": 0}
    )
    assert status == 200, body
    one = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert body["output"] == llm.generate(one, max_new_tokens=12, temperature=0,
                                          prompt_style="plain", stop=["<|im_end|>"])  # fmt: skip
