"""judge tasks: a stdlib HTTP judge on 127.0.0.1 with canned replies (numeric, out of range,
not numeric, failing, then failing for good), pairwise in both orders, and `llmcycle serve`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from eval_fixtures import tiny_llama, write_jsonl
from served import Server

from lifecycle_cli.commands.evaluate import evaluate
from lifecycle_cli.evaluate.args import JudgeArgs
from lifecycle_cli.evaluate.judge import parse_pair, parse_score

RECORDS = [
    {"instruction": "Say hello.", "reference": "Hello."},
    {"instruction": "Name a colour."},
    {"instruction": "Count to three."},
    {"instruction": "What is 2+2?"},
    {"instruction": "Spell cat."},
]


class CannedJudge:
    """Replies in order: a string is the verdict, an int an HTTP error status, b"..." a raw
    body. `prompts` records what was asked."""

    def __init__(self, replies: list) -> None:
        self.replies, self.prompts, self.keys = list(replies), [], []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.prompts.append(body["messages"][-1]["content"])
                judge.keys.append(self.headers.get("Authorization"))
                reply = judge.replies.pop(0) if judge.replies else "[[5]]"
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    return
                data = (
                    reply
                    if isinstance(reply, bytes)
                    else json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                    ).encode()
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("judge") / "ckpt")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics(out: Path, checkpoint: str = "ckpt") -> dict[str, float]:
    data = json.loads((out / "results.json").read_text())["results"]
    return {r["metric"]: r["value"] for r in data if r["checkpoint"] == checkpoint}


def test_verdicts_parsed_out_of_range_garbage_and_failures_counted(ckpt, tmp_path):
    replies = [
        "The answer is fine. Rating: [[7]]",
        "Great! [[11]]",  # out of range
        "I cannot rate this.",  # no number
        500, 503, "Rating: [[3]]",  # retried twice, then a verdict
        500, 500, 500,  # fails for good (retries=2)
    ]  # fmt: skip
    judge = CannedJudge(replies)
    try:
        write_jsonl(tmp_path / "j.jsonl", RECORDS)
        out = tmp_path / "out"
        evaluate(ckpt, f"judge:{tmp_path / 'j.jsonl'}", out_dir=out, max_new_tokens=8,
                 judge=JudgeArgs(url=judge.url, api_key="sekret", retries=2,
                                 backoff=0))  # fmt: skip
    finally:
        judge.close()
    m = metrics(out)
    assert m["score"] == 5.0 and m["unparsable"] == 2 and m["failed"] == 1
    assert m["score_ci95_low"] < 5.0 < m["score_ci95_high"]
    samples = rows(out / "judge-j" / "samples.jsonl")
    assert [s["score"] for s in samples] == [7.0, None, None, 3.0, None]
    assert samples[1]["judge_reply"] == "Great! [[11]]"  # raw replies kept
    assert samples[4]["judge_reply"] is None and samples[4]["judge_error"].startswith("HTTP 500")
    assert len(judge.prompts) == 9 and set(judge.keys) == {"Bearer sekret"}
    assert "[The Start of Reference Answer]\nHello." in judge.prompts[0]
    assert "Reference" not in judge.prompts[1]
    assert f"[The Start of Assistant's Answer]\n{samples[0]['answer']}\n" in judge.prompts[0]


def test_parsing_rules():
    assert parse_score("Rating: [[8]]") == 8.0
    assert parse_score("[[2.5]] after thought [[9]]") == 9.0  # the last rating counts
    assert parse_score("rated [6]") == 6.0
    assert parse_score("[[0]]") is None and parse_score("[[10.5]]") is None
    assert parse_score("eight") is None and parse_score(None) is None
    assert parse_pair("so [[A]]") == "A" and parse_pair("[[C]]") == "C"
    assert parse_pair("[[A]] or [[B]]") is None and parse_pair("A is better") is None


def test_pairwise_judges_both_orders_so_a_position_biased_judge_gives_half(ckpt, tmp_path):
    other = tiny_llama(tmp_path / "other", seed=1)
    judge = CannedJudge(["[[A]]"] * 2 * len(RECORDS))
    try:
        write_jsonl(tmp_path / "j.jsonl", RECORDS)
        out = tmp_path / "out"
        evaluate([ckpt, other], f"judge:{tmp_path / 'j.jsonl'}", out_dir=out, max_new_tokens=8,
                 judge=JudgeArgs(url=judge.url, mode="pairwise", backoff=0))  # fmt: skip
    finally:
        judge.close()
    assert metrics(out, "other")["win_rate"] == 0.5
    assert len(judge.prompts) == 2 * len(RECORDS)
    samples = rows(out / "other" / "judge-j" / "samples.jsonl")
    first = rows(out / "ckpt" / "judge-j" / "samples.jsonl")
    a_first = f"[The Start of Assistant A's Answer]\n{first[0]['answer']}\n"
    a_second = f"[The Start of Assistant A's Answer]\n{samples[0]['answer']}\n"
    assert a_first in judge.prompts[0] and a_second in judge.prompts[1]
    assert [r["order"] for r in samples[0]["judge_replies"]] == ["first_as_A", "first_as_B"]


def test_against_llmcycle_serve_garbage_verdicts_do_not_crash(ckpt, tmp_path):
    write_jsonl(tmp_path / "j.jsonl", RECORDS[:2])
    judge_ckpt = tiny_llama(tmp_path / "judge", context=1024)  # room for the judge's prompt
    server = Server(judge_ckpt, tmp_path / "serve.log")
    try:
        out = tmp_path / "out"
        evaluate(ckpt, f"judge:{tmp_path / 'j.jsonl'}", out_dir=out, max_new_tokens=4,
                 judge=JudgeArgs(url=f"{server.url}/v1", model="judge", max_tokens=8,
                                 backoff=0))  # fmt: skip
    finally:
        server.stop()
    m = metrics(out)
    samples = rows(out / "judge-j" / "samples.jsonl")
    assert m["failed"] == 0 and all(isinstance(s["judge_reply"], str) for s in samples)
    parsed = sum(s["score"] is not None for s in samples)
    assert parsed + m["unparsable"] == len(samples)


def test_an_unreachable_judge_is_counted_as_failed(ckpt, tmp_path):
    write_jsonl(tmp_path / "j.jsonl", RECORDS[:1])
    out = tmp_path / "out"
    evaluate(ckpt, f"judge:{tmp_path / 'j.jsonl'}", out_dir=out, max_new_tokens=4,
             judge=JudgeArgs(url="http://127.0.0.1:9/v1", retries=1, backoff=0))  # fmt: skip
    assert metrics(out)["failed"] == 1
    assert "connection failed" in rows(out / "judge-j" / "samples.jsonl")[0]["judge_error"]
