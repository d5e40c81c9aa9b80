"""What the black-box tests of generate, chat and serve share: a tiny checkpoint, the CLI in a
subprocess, and `llmcycle serve` on 127.0.0.1 in its own process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from pydoc_data.topics import topics
from typing import Optional

import torch

from lifecycle_cli.checkpoint import save_checkpoint
from lifecycle_cli.config import Config
from lifecycle_cli.model import GPT
from lifecycle_cli.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n".join(topics.values())
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_checkpoint(
    folder: Path,
    context: int = 256,
    chat_template: Optional[str] = None,
    logit_scale: float = 1,
    logit_offset: float = 0,
) -> Path:
    """A random 2-layer model with a 400-token BPE tokenizer (ChatML's special tokens among
    them, and `chat_template` as its template if given), saved in `folder`. Its logits are
    nearly flat unless `logit_scale` sharpens them (then the temperature changes samples).
    `logit_offset` is added to every logit (an output bias): it changes no probability, but
    at 64 a 16-bit float keeps too few digits to tell the logits apart."""
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    tok = train_bpe(None, 400, tok_dir, texts=[TEXT], special_tokens=SPECIALS)
    if chat_template is not None:
        (tok_dir / "chat_template.jinja").write_text(chat_template)
    torch.manual_seed(0)
    config = Config(
        name="tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
        block_size=context, intermediate_size=64, norm="rmsnorm", mlp="swiglu", bias=False,
        lm_head_bias=bool(logit_offset),
    )  # fmt: skip
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight *= logit_scale
        if logit_offset:
            model.lm_head.bias.fill_(logit_offset)
    return save_checkpoint(folder, model, tokenizer_dir=tok_dir)


def llmcycle(
    *args, input: Optional[str] = None, timeout: float = 120, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """`python -m lifecycle_cli <args>`: its exit code, stdout and stderr; `env` adds to the
    environment."""
    return subprocess.run(
        [sys.executable, "-m", "lifecycle_cli", *map(str, args)], cwd=REPO, capture_output=True,
        text=True, timeout=timeout, input=input, env=os.environ | (env or {}),
    )  # fmt: skip


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: exit code 2, one line on stderr naming `words`, nothing on stdout."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert proc.stdout == ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Server:
    """`llmcycle serve <checkpoint> <args>` in its own process group (as a shell starts it),
    its output in `log`; ready once /health answers."""

    def __init__(
        self, checkpoint: Path | str, log: Path, *args: str, cwd: Path = REPO,
        env: Optional[dict] = None,
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "lifecycle_cli", "serve", str(checkpoint),
               "--port", str(self.port), *args]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        deadline = time.monotonic() + 60
        while not self.healthy():
            assert self.proc.poll() is None, f"server exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"server not healthy in 60 s:\n{self.output()}"
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text()

    def group_alive(self) -> bool:
        self.proc.poll()  # reap the main process: a zombie still counts as a group member
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM, group: bool = False, timeout: float = 15) -> float:
        """Send `sig` to the main process (what a process manager does) or, with `group`, to
        every process of the group (what Ctrl+C in a terminal does); wait until all are gone.
        Returns the seconds that took."""
        start = time.monotonic()
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        while self.group_alive() and time.monotonic() - start < timeout:
            time.sleep(0.05)
        took = time.monotonic() - start
        if self.group_alive():  # leave nothing behind, then fail
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(
                f"processes still alive {timeout} s after {sig!r}:\n{self.output()}"
            )
        self.proc.wait(5)
        return took

    def call(self, path: str, body=None, key: Optional[str] = None, timeout: float = 60):
        """(status, JSON body, headers) of one request; `body` bytes are sent as they are."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers
