"""`llmcycle serve`: the real server on 127.0.0.1 answers the `openai` client (chat and completions,
streamed and not) and LitGPT's `/predict` with what the Python API generates, refuses bad requests
with a 4xx JSON error naming the field, batches concurrent requests without mixing up their
answers, frees the slot of a client that goes away, and ends its whole process group on SIGTERM."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pydoc_data.topics import topics

import openai
import pytest
import torch
from served import Server, port_is_free

from lifecycle_cli import LLM
from lifecycle_cli.checkpoint import save_checkpoint
from lifecycle_cli.config import Config
from lifecycle_cli.model import GPT
from lifecycle_cli.serve import BATCH_HEADER
from lifecycle_cli.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-7"
CONTEXT = 1024
LIMIT = 1000  # --max_new_tokens_limit
BATCH = 8  # --max_batch_size
TEXT = "\n".join(topics.values())
PROMPTS = [TEXT[i * 997 : i * 997 + 20 + 7 * (i % 5)] for i in range(12)]  # 12 prompts, 3 lengths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    tok = train_bpe(None, 512, d / "tok", texts=[TEXT])
    torch.manual_seed(0)
    config = Config(
        name="tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4,
        block_size=CONTEXT,
    )  # fmt: skip
    save_checkpoint(d / "ckpt", GPT(config), tokenizer_dir=d / "tok")
    return d / "ckpt"


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM.load(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    s = Server(
        checkpoint, log, "--api_key", KEY, "--max_batch_size", str(BATCH),
        "--max_new_tokens_limit", str(LIMIT),
    )  # fmt: skip
    yield s
    s.stop()


def call(url: str, body=None, key: str | None = KEY, method: str | None = None, timeout=30):
    """(status, JSON body, headers) of one request; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy_completion(server: Server, prompt: str, max_tokens: int = 12) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    status, out, headers = call(f"{server.url}/v1/completions", body)
    assert status == 200, out
    return out


# ---- what users see ---------------------------------------------------------------------------


def test_openai_client_completions_streamed_and_not(server, llm):
    c = client(server)
    (model,) = c.models.list().data
    assert model.id == "ckpt"
    expected = llm.generate("The class", max_new_tokens=12, temperature=0)
    out = c.completions.create(model=model.id, prompt="The class", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode("The class"))
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12

    chunks = list(
        c.completions.create(
            model=model.id, prompt="The class", max_tokens=12, temperature=0, stream=True
        )
    )
    assert len(chunks) > 2
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat_streamed_and_not(server, llm):
    c = client(server)
    messages = [{"role": "user", "content": "Hello there"}]
    # No chat template and no saved style: chat uses the `plain` style.
    expected = llm.generate("Hello there", max_new_tokens=10, temperature=0, prompt_style="plain")
    out = c.chat.completions.create(model="ckpt", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.completion_tokens == 10

    stream = c.chat.completions.create(
        model="ckpt", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_seeded_sampling_repeats_and_stop_strings_end_the_text(server):
    c = client(server)
    kw = dict(model="ckpt", prompt="Lists", max_tokens=20, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=5, **kw).choices[0].text
    assert a == c.completions.create(seed=5, **kw).choices[0].text
    greedy = greedy_completion(server, "The class", 30)["choices"][0]["text"]
    stop = greedy[10:13]
    out = c.completions.create(
        model="ckpt", prompt="The class", max_tokens=30, temperature=0, stop=[stop]
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == greedy[: greedy.index(stop)]


def test_min_p_and_repetition_penalty_are_honoured_as_the_cli_applies_them(server, llm):
    c = client(server)
    kw = dict(model="ckpt", prompt="The class", max_tokens=24)

    def served(**extra) -> str:
        return c.completions.create(**kw, **extra).choices[0].text

    # Greedy, with and without a penalty on repeated tokens: the server's text is the local
    # library's for the same settings, and the penalty changes it.
    plain = llm.generate("The class", max_new_tokens=24, temperature=0)
    penalised = llm.generate("The class", max_new_tokens=24, temperature=0, repetition_penalty=4.0)
    assert penalised != plain
    assert served(temperature=0, extra_body={"repetition_penalty": 4.0}) == penalised
    body = {"prompt": "The class", "max_new_tokens": 24, "temperature": 0}
    _, out, _ = call(f"{server.url}/predict", {**body, "repetition_penalty": 4.0})
    assert out == {"output": penalised}

    # Seeded sampling with and without a min_p floor.
    sampled = dict(max_new_tokens=24, temperature=1.0, top_k=None, seed=3)
    floored = llm.generate("The class", min_p=0.9, **sampled)
    assert floored != llm.generate("The class", **sampled)
    assert served(temperature=1.0, seed=3, extra_body={"min_p": 0.9}) == floored


REFUSED = [
    # (route, extra request fields, the field named)
    ("completions", {"n": 2}, "n"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"extra_body": {"min_p": 1.5}}, "min_p"),
    ("completions", {"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ("completions", {"extra_body": {"top_k": 0}}, "top_k"),
    ("completions", {"seed": -1}, "seed"),
    ("chat", {"n": 3}, "n"),
    ("chat", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"frequency_penalty": 1.0}, "frequency_penalty"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"temperature": -0.5}, "temperature"),
]


@pytest.mark.parametrize("route, extra, field", REFUSED)
def test_openai_fields_it_cannot_honour_are_refused_naming_the_field(server, route, extra, field):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as refused:
        if route == "chat":
            c.chat.completions.create(model="ckpt", messages=USER, max_tokens=4, **extra)
        else:
            c.completions.create(model="ckpt", prompt="x", max_tokens=4, **extra)
    assert refused.value.status_code == 400 and refused.value.param == field
    assert field in refused.value.message
    assert server.healthy()


def test_text_response_format_logprobs_off_and_zero_penalties_are_accepted(server):
    out = client(server).chat.completions.create(
        model="ckpt", messages=USER, max_tokens=3, temperature=0, n=1, logprobs=False,
        presence_penalty=0, frequency_penalty=0, response_format={"type": "text"},
    )  # fmt: skip
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_predict_has_litgpt_shape(server, llm):
    expected = llm.generate("The class", max_new_tokens=12, temperature=0)
    body = {"prompt": "The class", "max_new_tokens": 12, "temperature": 0}
    status, out, _ = call(f"{server.url}/predict", body)
    assert (status, out) == (200, {"output": expected})

    req = urllib.request.Request(
        f"{server.url}/predict", data=json.dumps({**body, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        lines = [json.loads(line) for line in r.read().decode().splitlines()]
    assert "".join(line["output"] for line in lines) == expected


def test_api_key_is_required_except_for_health(server):
    for key in (None, "wrong-key"):
        status, out, headers = call(f"{server.url}/v1/models", key=key)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in out["error"]["message"]
        status, out, _ = call(f"{server.url}/predict", {"prompt": "x"}, key=key)
        assert status == 401 and "error" in out
    assert call(f"{server.url}/v1/models")[0] == 200
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as r:  # no key needed
        assert r.status == 200
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong-key").models.list()


USER = [{"role": "user", "content": "x"}]
BAD_REQUESTS = [
    # (path, body, status, param, words in the message)
    ("/v1/completions", b'{"prompt": "x",', 400, "body", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "body", "JSON object"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "`prompt`"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": LIMIT + 1}, 400, "max_tokens", "at most"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "must be 1"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "stop", "`stop`"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, 400, "seed", "integer"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("/v1/completions", {"prompt": "word " * CONTEXT}, 400, "prompt", "context is 1024"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/chat/completions", {"model": "ckpt"}, 400, "messages", "`messages`"),
    ("/v1/chat/completions", {"messages": [{"role": "robot"}]}, 400, "messages[0].role", "robot"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "null"),
    ("/v1/chat/completions", {"messages": USER, "n": 3}, 400, "n", "must be 1"),
    (
        "/v1/chat/completions",
        {"messages": USER, "max_completion_tokens": LIMIT + 5},
        400,
        "max_completion_tokens",
        "at most",
    ),  # fmt: skip
    ("/predict", {"text": "x"}, 400, "prompt", "`prompt`"),
    ("/predict", {"prompt": "x", "max_new_tokens": -3}, 400, "max_new_tokens", "at least 1"),
    ("/predict", {"prompt": "x", "top_k": 1.5}, 400, "top_k", "integer"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD_REQUESTS)
def test_bad_requests_are_4xx_json_errors_naming_the_field(
    server, path, body, status, param, words
):
    got, out, _ = call(f"{server.url}{path}", body)
    assert got == status, out
    assert out["error"]["param"] == param
    assert words in out["error"]["message"]
    if param != "body":
        assert param.split("[")[0] in out["error"]["message"]


def test_unknown_routes_and_methods_are_4xx(server):
    assert call(f"{server.url}/v1/nothing", {"prompt": "x"})[0] == 404
    assert call(f"{server.url}/v1/completions", method="GET")[0] == 405


# ---- under load -------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    alone = [greedy_completion(server, p)["choices"][0]["text"] for p in PROMPTS]
    invalid = [
        ({"prompt": "x", "max_tokens": LIMIT + 1}, 400),
        ({"prompt": "x", "model": "nope"}, 404),
        ({"prompt": ["a", "b"]}, 400),
        (b"{oops", 400),
        ({"prompt": "word " * CONTEXT}, 400),
    ]

    def one(i: int):
        if i % 3 == 2:  # a third of the requests are bad ones
            body, want = invalid[i % len(invalid)]
            status, out, _ = call(f"{server.url}/v1/completions", body)
            return status == want and "error" in out, 0
        k = i % len(PROMPTS)
        status, out, headers = call(
            f"{server.url}/v1/completions",
            {"prompt": PROMPTS[k], "max_tokens": 12, "temperature": 0},
        )
        ok = status == 200 and out["choices"][0]["text"] == alone[k]
        return ok, int(headers.get(BATCH_HEADER, 0))

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(300), timeout=120))
    took = time.monotonic() - start
    wrong = [i for i, (ok, _) in enumerate(results) if not ok]
    assert wrong == [], f"{len(wrong)} of 300 requests got a wrong answer"
    # Requests were generated together: some step decoded a full batch.
    assert max(batch for _, batch in results) == BATCH
    assert took < 120
    assert server.healthy()
    assert greedy_completion(server, PROMPTS[0])["choices"][0]["text"] == alone[0]


CANCELLED = "cancelled (client went away)"


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "waiting"])
def test_a_client_that_goes_away_frees_its_slot(server, stream):
    before = server.output().count(CANCELLED)
    body = json.dumps({"prompt": "The class", "max_tokens": LIMIT, "ignore_eos": True,
                       "stream": stream}).encode()  # fmt: skip
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        if stream:  # generation is under way once the first event is here
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(4096)
                assert chunk, "the stream closed before its first event"
                received += chunk
        else:  # the answer (1000 tokens) takes longer than this
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(4096)

    deadline = time.monotonic() + 20
    while server.output().count(CANCELLED) == before:
        assert time.monotonic() < deadline, f"no cancellation logged:\n{server.output()}"
        time.sleep(0.05)
    line = [x for x in server.output().splitlines() if CANCELLED in x][-1]
    assert int(line.split(" after ")[1].split()[0]) < LIMIT  # dropped, not finished
    assert server.healthy()
    assert greedy_completion(server, "The class")["choices"][0]["finish_reason"] == "length"


# ---- the process ------------------------------------------------------------------------------


def test_key_from_environment_and_sigterm_ends_the_process_group(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path / "server.log", env={"LLMCYCLE_API_KEY": "env-key"})
    try:
        assert call(f"{s.url}/v1/models", key=None)[0] == 401
        assert call(f"{s.url}/v1/models", key="env-key")[0] == 200
        # A stream in flight gets the grace period: it ends, done or with an error event.
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        body = {"prompt": "a", "max_tokens": LIMIT, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Authorization": "Bearer env-key"})  # fmt: skip
        response = conn.getresponse()
        assert response.status == 200
        with ThreadPoolExecutor(1) as pool:
            events = pool.submit(lambda: response.read().decode().split("\n\n"))
            took = s.stop()
            events = [e for e in events.result(timeout=10) if e]
    finally:
        if s.proc.poll() is None:
            s.stop()
    assert took < 10, s.output()
    assert s.proc.returncode == 0, s.output()
    assert port_is_free(s.port)
    assert events[-1] == "data: [DONE]" or "the server is shutting down" in events[-1]
    assert "Traceback" not in s.output() and "ERROR" not in s.output()


def llmcycle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle_cli", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_user_errors_are_one_line_exit_2(checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["serve", tmp_path / "missing"], "missing"),
            (["serve", checkpoint, "--host", "10.0.0.1"], "--host"),
            (["serve", checkpoint, "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
        ]
        for args, words in cases:
            proc = llmcycle(*args)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
            assert words in proc.stderr
