"""`llmcycle serve` as the README describes it, seen from outside: the model id comes from the
checkpoint's path, requests that name no sampling field get each API's defaults, chat and
/predict use the prompt style saved with the checkpoint, `--max_batch_size 1` serves requests
one at a time, and Ctrl+C stops every process and frees the port. The server runs with
`--quantize int8`: every answer is checked against the Python API's int8 model."""

from __future__ import annotations

import http.client
import json
import signal
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from served import Server, port_is_free, tiny_checkpoint

from lifecycle_cli import LLM

LIMIT = 64  # --max_new_tokens_limit (above /predict's default of 50)
MODEL_ID = "org/tiny-chat"
CHATML_STOPS = ["<|im_end|>", "<|im_start|>"]
PROMPTS = ["The class", "A module", "Lists of", "When the", "It is", "Each", "Note that", "If"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_cli")
    ckpt = tiny_checkpoint(d / "checkpoints" / "org" / "tiny-chat", logit_scale=20)
    (ckpt / "prompt_style.yaml").write_text("name: chatml\n")  # as finetune saves it
    return d


@pytest.fixture(scope="module")
def llm(workdir) -> LLM:
    return LLM.load(workdir / "checkpoints" / MODEL_ID, quantize="int8")


@pytest.fixture(scope="module")
def server(workdir):
    # Started from the folder that holds checkpoints/, as the README's example does.
    s = Server(
        f"checkpoints/{MODEL_ID}", workdir / "server.log", "--max_batch_size", "1",
        "--max_new_tokens_limit", str(LIMIT), "--quantize", "int8", cwd=workdir,
    )  # fmt: skip
    yield s
    s.stop()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def post(server: Server, path: str, body: dict) -> dict:
    status, out, _ = server.call(path, body)
    assert status == 200, out
    return out


def test_the_model_id_is_the_checkpoint_path_below_checkpoints(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL_ID]
    out = c.completions.create(model=MODEL_ID, prompt="The class", max_tokens=3)
    assert out.model == MODEL_ID
    messages = [{"role": "user", "content": "Hi"}]
    kw = dict(model=MODEL_ID, messages=messages, max_tokens=3)
    assert c.chat.completions.create(**kw).model == MODEL_ID
    assert {chunk.model for chunk in c.chat.completions.create(**kw, stream=True)} == {MODEL_ID}


def test_the_server_reports_the_quantized_weights_at_load(server):
    log = server.output()
    assert "--quantize int8: weights" in log and "int8 linear layers" in log, log


def test_requests_without_sampling_fields_get_each_apis_defaults(server, llm):
    prompt = "The class"
    # /v1/completions: 16 tokens at temperature 1, no top_k (OpenAI's defaults).
    bare = post(server, "/v1/completions", {"prompt": prompt, "seed": 3, "ignore_eos": True})
    assert bare["usage"]["completion_tokens"] == 16
    assert bare["choices"][0]["finish_reason"] == "length"
    explicit = {"prompt": prompt, "seed": 3, "ignore_eos": True, "max_tokens": 16}
    text = bare["choices"][0]["text"]

    def sample(**fields) -> str:
        return post(server, "/v1/completions", {**explicit, **fields})["choices"][0]["text"]

    assert text == sample(temperature=1.0)
    assert text != sample(temperature=0.8) and text != sample(top_k=50)

    # /v1/chat/completions: up to --max_new_tokens_limit tokens, at temperature 1 (seed 2: a
    # reply that does not end itself before the limit).
    messages = [{"role": "user", "content": "Hi there"}]
    bare = post(server, "/v1/chat/completions", {"messages": messages, "seed": 2})
    assert bare["choices"][0]["finish_reason"] == "length"
    assert bare["usage"]["completion_tokens"] == LIMIT
    explicit = {"messages": messages, "seed": 2, "max_tokens": LIMIT}
    content = bare["choices"][0]["message"]["content"]
    chat = post(server, "/v1/chat/completions", {**explicit, "temperature": 1.0})
    assert content == chat["choices"][0]["message"]["content"]
    chat = post(server, "/v1/chat/completions", {**explicit, "temperature": 0.8})
    assert content != chat["choices"][0]["message"]["content"]

    # /predict: 50 tokens at temperature 0.8 and top_k 50, as `litgpt serve` and the Python API.
    output = post(server, "/predict", {"prompt": prompt, "seed": 3})["output"]
    assert output == llm.generate(prompt, max_new_tokens=50, temperature=0.8, top_k=50, seed=3)
    assert output != llm.generate(prompt, max_new_tokens=50, temperature=1.0, top_k=50, seed=3)
    assert output != llm.generate(prompt, max_new_tokens=50, temperature=0.8, top_k=None, seed=3)


def test_chat_and_predict_use_the_saved_prompt_style_completions_the_prompt_as_given(server, llm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    # ChatML, written out: what the model must be given for this conversation.
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    chatml += "<|im_start|>assistant\n"
    out = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 12,
                                                "temperature": 0})  # fmt: skip
    assert out["usage"]["prompt_tokens"] == len(llm.tokenizer.encode(chatml))
    expected = llm.generate(chatml, max_new_tokens=12, temperature=0, prompt_style="plain",
                            stop=CHATML_STOPS)  # fmt: skip
    assert out["choices"][0]["message"]["content"] == expected

    one = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    out = post(server, "/predict", {"prompt": "Name a colour.", "max_new_tokens": 12,
                                    "temperature": 0})  # fmt: skip
    assert out["output"] == llm.generate(one, max_new_tokens=12, temperature=0,
                                         prompt_style="plain", stop=CHATML_STOPS)  # fmt: skip

    out = post(server, "/v1/completions", {"prompt": "Name a colour.", "max_tokens": 12,
                                           "temperature": 0})  # fmt: skip
    assert out["usage"]["prompt_tokens"] == len(llm.tokenizer.encode("Name a colour."))
    assert out["choices"][0]["text"] == llm.generate(
        "Name a colour.", max_new_tokens=12, temperature=0, prompt_style="plain"
    )


def test_max_batch_size_1_answers_concurrent_requests_one_at_a_time(server, llm):
    alone = llm.generate(PROMPTS, max_new_tokens=12, temperature=0, prompt_style="plain")

    def one(prompt: str):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        status, out, headers = server.call("/v1/completions", body)
        assert status == 200, out
        return out["choices"][0]["text"], headers.get("x-llmcycle-batch")

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, PROMPTS * 2, timeout=120))
    assert [text for text, _ in results] == alone * 2
    assert {batch for _, batch in results} == {"1"}  # no step decoded two requests together


@pytest.fixture(scope="module")
def ctrl_c(workdir, tmp_path_factory):
    """A server that was sent Ctrl+C while streaming: (server, the stream's events)."""
    s = Server(workdir / "checkpoints" / MODEL_ID, tmp_path_factory.mktemp("ctrl_c") / "log")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        body = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body))
        response = conn.getresponse()
        assert response.status == 200
        first = response.read(6)
        assert first == b"data: "  # generating
        with ThreadPoolExecutor(1) as pool:
            events = pool.submit(lambda: (first + response.read()).decode().split("\n\n"))
            s.stop(signal.SIGINT, group=True)  # what Ctrl+C in the terminal sends
            events = [e for e in events.result(timeout=10) if e]
    finally:
        if s.group_alive():
            s.stop(signal.SIGKILL, group=True)
    return s, events


def test_ctrl_c_stops_every_process_and_frees_the_port(ctrl_c):
    s, events = ctrl_c  # Server.stop failed the fixture if any process outlived 15 s
    assert s.proc.returncode in (0, 130), s.output()
    assert port_is_free(s.port)
    # The stream in flight got its grace period: it ended, done or with an error event.
    assert events[-1] == "data: [DONE]" or "the server is shutting down" in events[-1]
    assert "Traceback" not in s.output(), s.output()
