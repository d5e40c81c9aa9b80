"""`llmcycle serve`: one batched generation engine behind LitGPT's `/predict` and the OpenAI API.

Three parts, in the order a request meets them:

- **Requests** (`Front.parse_*`, in the HTTP process, no torch): each body is checked field by
  field and becomes a `job`, a plain dict of prompt token ids and sampling settings. Anything
  wrong is a 4xx JSON error in the OpenAI shape, `{"error": {"message", "type", "param",
  "code"}}`, whose `param` names the field.
- **`Engine`** (in LitServe's inference worker): continuous batching. `max_batch_size` slots
  share one static KV cache; a waiting request is prefilled into a free slot between two decode
  steps and then decodes with all the others, one token per row per step, each row at its own
  position with its own sampling settings, seed and stops. A row leaves its slot the step it
  ends, or the step after its client goes away, and the next waiting request takes it.
- **The LitServe wiring**: `EngineAPI` is the LitAPI (its `setup` loads the model),
  `EngineLoop` the LitLoop that runs the engine in the worker. The routes are added to the
  FastAPI app LitServe builds (its own generic POST route is replaced), so one engine serves
  every route.

A request's trip: the route puts `(consumer, uid, time, job)` on LitServe's request queue (the
same queue and tuple LitServe's own routes use); the loop's reader thread hands it to the engine;
after every step the loop sends one message per HTTP process holding that step's events for all
rows, `[(uid, "piece" | "done" | "error", payload), ...]`, under the fixed uid `MAILBOX`;
LitServe's response reader files it in `response_buffer[MAILBOX]` and `Front` hands each event to
the waiting route. A client that goes away puts `{"cancel": true}` for its uid on the request
queue. One message per step instead of one per row keeps the inter-process traffic flat as the
batch grows. The pieces of LitServe used beyond LitAPI/LitLoop/LitServer (the request queues,
`response_buffer`, `ResponseBufferItem`, `app.response_queue_id`) are those of litserve 0.2.19.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import litserve as ls
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    from lifecycle_cli.model import GPT
    from lifecycle_cli.prompts import PromptStyle
    from lifecycle_cli.tokenizer import Tokenizer

log = logging.getLogger("llmcycle.serve")

API_PATH = "/predict"
MAILBOX = "llmcycle-engine-events"  # the uid every engine message travels under
CANCEL = {"cancel": True}
MAX_BODY_BYTES = 16 * 1024 * 1024
BATCH_HEADER = "x-llmcycle-batch"
SHUTDOWN_GRACE_S = 2  # open streams may hold a shutdown up this long, no more
MAX_STOPS = 16
OPEN_PATHS = frozenset({"/health"})  # answered without an API key (load balancers)
HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::": "::"}
# Fields of the OpenAI API this server does not implement, and the values that mean "off".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}


# --------------------------------------------------------------------------------------------
# Errors


class RequestError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        status: int = 400,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message, param, status, code, kind,
        )  # fmt: skip

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(
    status: int,
    message: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    kind: str = "invalid_request_error",
    headers: Optional[dict[str, str]] = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


# --------------------------------------------------------------------------------------------
# Request fields


def _get_int(body: dict, name: str, minimum: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"`{name}` must be an integer, got {_json_type(value)}", name)
    if minimum is not None and value < minimum:
        raise RequestError(f"`{name}` must be at least {minimum}, got {value}", name)
    return value


def _get_number(body: dict, name: str) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"`{name}` must be a number, got {_json_type(value)}", name)
    if not math.isfinite(value):
        raise RequestError(f"`{name}` must be a finite number, got {value}", name)
    return float(value)


def _get_bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"`{name}` must be true or false, got {_json_type(value)}", name)
    return value


def _get_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(
            f"`stop` must be a string or an array of strings, got {_json_type(value)}", "stop"
        )
    if len(stops) > MAX_STOPS:
        raise RequestError(f"`stop` holds {len(stops)} strings; at most {MAX_STOPS}", "stop")
    if any(not s for s in stops):
        raise RequestError("`stop` strings must not be empty", "stop")
    return stops


@dataclass(frozen=True)
class Defaults:
    """A route's sampling defaults (each API has its own conventions)."""

    max_tokens: Optional[int]  # None: as many as the server's limit and the context allow
    temperature: float
    top_k: Optional[int]


OPENAI_CHAT = Defaults(max_tokens=None, temperature=1.0, top_k=None)
OPENAI_COMPLETIONS = Defaults(max_tokens=16, temperature=1.0, top_k=None)  # OpenAI's default 16
LITGPT_PREDICT = Defaults(max_tokens=50, temperature=0.8, top_k=50)  # `litgpt serve`'s defaults


@dataclass
class Options:
    """What a route needs to know about a request besides the job."""

    stream: bool = False
    include_usage: bool = False


# --------------------------------------------------------------------------------------------
# The engine (runs in the inference worker)


@dataclass
class _Row:
    key: Any
    slot: int
    prompt_len: int
    params: Any  # SamplingParams
    stops: set[int]
    budget: int
    stream: bool
    text: Any  # TextStream
    generator: Any  # torch.Generator or None
    last: int = 0
    generated: int = 0
    batch: int = 1  # the most rows this one decoded with in one step


class Engine:
    """Continuous batching over `max_batch_size` slots of one KV cache.

    `submit(key, job)` queues a request; every `step()` first prefills waiting requests into free
    slots, then advances every occupied slot by one token, and returns what happened as events
    `(key, "piece" | "done" | "error", payload)`. `cancel(key)` drops a request, waiting or
    running; its slot is free for the next step.

    A job is `{"ids": [...], "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop",
    "ignore_eos", "stream"}`. Streamed rows report each text piece; the others only their
    `done` payload (`text`, `finish_reason`, `prompt_tokens`, `completion_tokens`, and `batch`:
    the most rows it decoded together with).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch_size: int) -> None:
        from lifecycle_cli.generate import Generator, fast_decode_layout

        fast_decode_layout(model)
        self.model, self.tokenizer = model, tokenizer
        self._stop_rules = Generator(model, tokenizer)  # its `stop_ids`, nothing else
        self.device = next(model.parameters()).device
        self.slots: list[Optional[_Row]] = [None] * max_batch_size
        self.waiting: deque[tuple[Any, dict]] = deque()
        self.cache_len = 0
        self._cache = None  # the first layer's cache as this engine set it

    @property
    def context(self) -> int:
        return self.model.max_seq_length

    def busy(self) -> bool:
        return bool(self.waiting) or any(row is not None for row in self.slots)

    def running(self) -> int:
        return sum(row is not None for row in self.slots)

    def submit(self, key: Any, job: dict) -> None:
        self.waiting.append((key, job))

    def cancel(self, key: Any) -> Optional[int]:
        """Drop request `key`; the tokens it had generated (None if it was not here)."""
        for i, (waiting, _) in enumerate(self.waiting):
            if waiting == key:
                del self.waiting[i]
                return 0
        for row in self.slots:
            if row is not None and row.key == key:
                self.slots[row.slot] = None
                return row.generated
        return None

    def step(self) -> list[tuple[Any, str, Any]]:
        import torch

        events: list[tuple[Any, str, Any]] = []
        with torch.inference_mode():
            admitted = []
            while self.waiting and None in self.slots:
                key, job = self.waiting.popleft()
                try:
                    admitted.append(self._admit(key, job, self.slots.index(None)))
                except UserError as e:
                    events.append((key, "error", {"status": 400, "message": str(e)}))
                except Exception as e:
                    log.exception("admitting a request failed")
                    events.append((key, "error", {"status": 500, "message": str(e)}))
            for group in _prefill_groups(admitted):
                try:
                    self._prefill(group, events)
                except Exception as e:
                    log.exception("prefill failed")
                    for row, _ in group:
                        self.slots[row.slot] = None
                        events.append((row.key, "error", {"status": 500, "message": str(e)}))
            rows = [row for row in self.slots if row is not None]
            if rows:
                try:
                    self._decode(rows, events)
                except Exception as e:
                    log.exception("decode step failed")
                    for row in rows:
                        self.slots[row.slot] = None
                        events.append((row.key, "error", {"status": 500, "message": str(e)}))
        return events

    # ---- internals -----------------------------------------------------------------------

    def _admit(self, key: Any, job: dict, slot: int) -> tuple[_Row, list[int]]:
        """A row for `job` in `slot`, with room in the cache; not prefilled yet."""
        import torch

        from lifecycle_cli.generate import SamplingParams, TextStream, check_prompt_length

        ids = list(job["ids"])
        check_prompt_length(len(ids), self.context)
        params = SamplingParams(
            max_new_tokens=job["max_new_tokens"], temperature=job["temperature"],
            top_k=job["top_k"], top_p=job["top_p"], seed=job["seed"], stop=job["stop"],
        )  # fmt: skip
        stops = self._stop_rules.stop_ids(params)
        if job.get("ignore_eos"):
            stops -= set(self.tokenizer.eos_ids) - set(params.stop_token_ids)
        budget = min(params.max_new_tokens, self.context - len(ids))
        self._reserve(len(ids) + budget)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        row = _Row(
            key, slot, len(ids), params, stops, budget, bool(job.get("stream")),
            TextStream(self.tokenizer, ids, params.stop), generator,
        )  # fmt: skip
        self.slots[slot] = row
        return row, ids

    def _prefill(self, group: list[tuple[_Row, list[int]]], events: list) -> None:
        """Prompts of new rows through the model in one call (padded at the end), their keys
        and values into the rows' slots, and each row's first token."""
        import torch

        from lifecycle_cli.generate import prefill
        from lifecycle_cli.model import KVCache

        rows = [row for row, _ in group]
        T = max(len(ids) for _, ids in group)
        idx = torch.zeros(len(group), T, dtype=torch.long)
        for i, (_, ids) in enumerate(group):
            idx[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        last = torch.tensor([len(ids) - 1 for _, ids in group], device=self.device)
        blocks = self.model.blocks
        caches = [block.attn.kv_cache for block in blocks]
        dtype = caches[0].k.dtype
        for block in blocks:
            block.attn.kv_cache = KVCache(self.model.config, len(group), T, self.device, dtype)
        try:
            logits = prefill(
                self.model, idx.to(self.device), torch.arange(T, device=self.device), last
            )
            filled = [block.attn.kv_cache for block in blocks]
        finally:
            for block, cache in zip(blocks, caches):
                block.attn.kv_cache = cache
        # Past a row's prompt, its slot now holds the padding's keys: positions it only reads
        # after writing its own tokens there.
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        for cache, new in zip(caches, filled):
            cache.k[:, :, :T].index_copy_(0, slots, new.k)
            cache.v[:, :, :T].index_copy_(0, slots, new.v)
        for row, token in zip(rows, self._sample(rows, logits)):
            self._take(row, token, events)

    def _reserve(self, length: int) -> None:
        """Make the cache hold `length` positions per slot (powers of two, kept what it holds)."""
        blocks = self.model.blocks
        if blocks[0].attn.kv_cache is not self._cache:  # someone else set one: not ours
            if self.running():
                raise RuntimeError("the model's KV cache was replaced while requests ran")
            self.cache_len = 0
        if length <= self.cache_len:
            return
        new_len = min(max(256, 1 << (length - 1).bit_length()), self.context)
        old = [block.attn.kv_cache for block in blocks] if self.cache_len else []
        self.model.set_kv_cache(len(self.slots), new_len, device=self.device)
        for block, cache in zip(blocks, old):
            block.attn.kv_cache.k[:, :, : cache.max_len].copy_(cache.k)
            block.attn.kv_cache.v[:, :, : cache.max_len].copy_(cache.v)
        self._cache, self.cache_len = blocks[0].attn.kv_cache, new_len

    def _decode(self, rows: list[_Row], events: list) -> None:
        """One token for every running row. Free slots below the last used one ride along
        (token 0 at position 0, output ignored): the cache rows stay where they are."""
        import torch

        from lifecycle_cli.generate import decode_step

        n = max(row.slot for row in rows) + 1
        tokens, positions = [0] * n, [0] * n
        for row in rows:
            tokens[row.slot] = row.last
            positions[row.slot] = row.prompt_len + row.generated - 1
            row.batch = max(row.batch, len(rows))
        token_in = torch.tensor(tokens, dtype=torch.long, device=self.device).view(n, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(n, 1)
        with self._cache_window(0, n, max(positions) + 1):
            logits = decode_step(self.model, token_in, pos)
        slots = [row.slot for row in rows]
        if slots != list(range(n)):
            logits = logits[torch.tensor(slots, device=self.device)]
        for row, token in zip(rows, self._sample(rows, logits)):
            self._take(row, token, events)

    @contextmanager
    def _cache_window(self, first: int, end: int, length: int):
        """Let the model see only rows first..end-1 and the first `length` positions of the cache
        (attention reads the whole cache it is given: at batch 32 those reads are what a decode
        step spends most of its time on, so it gets only the positions in use)."""
        blocks = self.model.blocks
        caches = [block.attn.kv_cache for block in blocks]
        length = min(length, self.cache_len)
        for block, cache in zip(blocks, caches):
            block.attn.kv_cache = _cache_view(cache, first, end, length)
        try:
            yield
        finally:
            for block, cache in zip(blocks, caches):
                block.attn.kv_cache = cache

    def _sample(self, rows: list[_Row], logits) -> list[int]:
        """Each row's next token under its own settings (the rule `Generator` uses)."""
        import torch

        from lifecycle_cli.generate import sample

        if all(row.params.greedy for row in rows):
            return logits.argmax(-1).tolist()
        device = logits.device
        ps = [row.params for row in rows]
        temperature = torch.tensor([p.temperature for p in ps], device=device)
        top_k = torch.tensor([p.top_k or 0 for p in ps], device=device)
        top_p = torch.tensor([p.top_p for p in ps], device=device)
        return sample(
            logits,
            temperature,
            top_k if any(p.top_k for p in ps) else None,
            top_p if any(p.top_p < 1 for p in ps) else None,
            None,
            [row.generator for row in rows],
        ).tolist()

    def _take(self, row: _Row, token: int, events: list) -> None:
        finish = None
        piece = ""
        if token in row.stops:
            finish = "stop"
        else:
            row.generated += 1
            row.last = token
            piece = row.text.add(token)
            if row.text.stopped:
                finish = "stop"
            elif row.generated >= row.budget:
                finish = "length"
        if finish is not None:
            piece += row.text.finish()
        if row.stream and piece:
            events.append((row.key, "piece", piece))
        if finish is not None:
            self.slots[row.slot] = None
            done = {
                "text": "" if row.stream else row.text.text,
                "finish_reason": finish,
                "prompt_tokens": row.prompt_len,
                "completion_tokens": row.generated,
                "batch": row.batch,
            }
            events.append((row.key, "done", done))


def _prefill_groups(admitted: list[tuple[_Row, list[int]]], max_tokens: int = 8192) -> list[list]:
    """New rows in groups to prefill together: by length, so that padding to the longest
    prompt of a group at most doubles its tokens (plus some slack for short prompts)."""
    groups: list[list] = []
    for item in sorted(admitted, key=lambda item: len(item[1])):
        group = groups[-1] if groups else None
        n = len(item[1])
        if group is not None:
            padded = n * (len(group) + 1)
            real = sum(len(ids) for _, ids in group) + n
            if padded <= 2 * real + 256 and padded <= max_tokens:
                group.append(item)
                continue
        groups.append([item])
    return groups


def _cache_view(cache, first: int, end: int, length: int):
    """A KV cache whose tensors are rows first..end-1 and positions 0..length-1 of `cache`
    (views: what the model writes lands in `cache`)."""
    import torch.nn as nn

    from lifecycle_cli.model import KVCache

    view = KVCache.__new__(KVCache)
    nn.Module.__init__(view)
    view.k = cache.k[first:end, :, :length]
    view.v = cache.v[first:end, :, :length]
    view.positions, view.max_len = cache.positions[:length], length
    return view


# --------------------------------------------------------------------------------------------
# LitServe: the API and the loop (inference worker side)


class EngineAPI(ls.LitAPI):
    """Loads the checkpoint in LitServe's inference worker and holds the `Engine`.

    The requests themselves go through `EngineLoop`, not through `predict`.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        max_batch_size: int,
        batch_timeout: float,
        precision: Optional[str],
        device: str,
        banner: str = "",
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH,
            stream=True, loop=EngineLoop(),
        )  # fmt: skip
        self.checkpoint_dir = Path(checkpoint_dir)
        self.precision, self.device_name, self.banner = precision, device, banner
        # Set in the parent: a setup failure comes back as one readable line.
        self.setup_errors = mp.get_context("spawn").SimpleQueue()
        self.engine: Optional[Engine] = None

    def setup(self, device: str) -> None:
        from lifecycle_cli.api import load_for_inference

        wanted = self.device_name if self.device_name != "auto" else device
        try:
            llm = load_for_inference(self.checkpoint_dir, wanted, self.precision)
        except UserError as e:
            self.setup_errors.put(str(e))
            raise
        if llm.model.wte.weight.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            _leave_a_core_for_http()
        self.engine = Engine(llm.model, llm.tokenizer, self.max_batch_size)
        n = sum(p.numel() for p in llm.model.parameters())
        dtype = str(next(llm.model.parameters()).dtype).removeprefix("torch.")
        print(
            f"llmcycle serve: {self.checkpoint_dir} loaded ({n / 1e6:.1f}M parameters, "
            f"{self.engine.device}, {dtype}, up to {self.max_batch_size} requests per batch)"
            f"{self.banner}",
            file=sys.stderr,
            flush=True,
        )

    def predict(self, x):  # pragma: no cover - EngineLoop drives the engine directly
        raise NotImplementedError("requests go through EngineLoop")


def _leave_a_core_for_http() -> None:
    """On CPU the engine and the HTTP server run at once: torch gets all usable cores but one.
    (More OpenMP threads than free cores make every small op wait for a descheduled thread:
    on 2 cores a decode step with 2 threads was several times slower than with 1.)"""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (usable or 1) - 1))


class EngineLoop(LitLoop):
    """Runs `Engine` in the inference worker: reads LitServe's request queue (in a thread, so a
    step never waits on it), steps the engine while it has work, and sends each step's events
    back as one message per HTTP process."""

    def __call__(
        self,
        lit_api: EngineAPI,
        device: str,
        worker_id: int,
        request_queue,
        transport,
        workers_setup_status,
        callback_runner,
    ) -> None:
        engine = lit_api.engine
        inbox: queue.Queue = queue.Queue()
        reader = threading.Thread(
            target=_read_requests, args=(request_queue, inbox), daemon=True, name="requests"
        )
        reader.start()
        try:
            while True:
                items = self._next_items(inbox, engine, lit_api)
                if items is None:
                    return
                for consumer, uid, _, job in items:
                    key = (consumer, uid)
                    if job == CANCEL:
                        generated = engine.cancel(key)
                        if generated is not None:
                            print(
                                f"llmcycle serve: request {uid} cancelled (client went away) "
                                f"after {generated} tokens; its slot is free",
                                file=sys.stderr,
                                flush=True,
                            )
                    else:
                        engine.submit(key, job)
                if engine.busy():
                    self._send(transport, engine.step())
        except KeyboardInterrupt:
            return

    @staticmethod
    def _next_items(inbox: queue.Queue, engine: Engine, lit_api: EngineAPI) -> Optional[list]:
        """What arrived since the last step (waiting for something when idle); None: stop."""
        items = []
        if not engine.busy():
            try:
                items.append(inbox.get(timeout=1.0))
            except queue.Empty:
                return []
            # An idle server waits `batch_timeout` for requests that arrive together.
            deadline = time.monotonic() + lit_api.batch_timeout
            while len(items) < lit_api.max_batch_size and items[-1] is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                items.append(inbox.get_nowait())
            except queue.Empty:
                break
        return None if any(item is None for item in items) else items

    def _send(self, transport, events: list[tuple[Any, str, Any]]) -> None:
        by_consumer: dict[int, list] = {}
        for (consumer, uid), kind, payload in events:
            by_consumer.setdefault(consumer, []).append((uid, kind, payload))
        for consumer, batch in by_consumer.items():
            self.put_response(
                transport, consumer, MAILBOX, batch, LitAPIStatus.OK, LoopResponseType.STREAMING
            )


def _read_requests(request_queue, inbox: queue.Queue) -> None:
    """LitServe's request queue -> `inbox`; None once LitServe says stop or the queue is gone."""
    while True:
        try:
            item = request_queue.get(timeout=1.0)
        except queue.Empty:
            continue
        except (EOFError, OSError):
            inbox.put(None)
            return
        if not isinstance(item, tuple) or len(item) != 4 or item[1] is None:
            inbox.put(None)  # LitServe's sentinel (None, None, None, None)
            return
        inbox.put(item)


# --------------------------------------------------------------------------------------------
# HTTP (the API server process)


class BearerAuth:
    """ASGI middleware: every path but `OPEN_PATHS` needs `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                message = (
                    "wrong API key: send the header `Authorization: Bearer <key>`"
                    if given
                    else "this server needs an API key: send `Authorization: Bearer <key>`"
                )
                response = error_response(
                    401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class ModelInfo:
    """What the HTTP process knows of the model: enough to check and tokenize requests."""

    name: str
    aliases: tuple[str, ...]
    tokenizer: Tokenizer
    context: int
    chat_style: PromptStyle
    predict_style: Optional[PromptStyle]
    max_new_tokens_limit: int


class Front:
    """The routes. Parses requests into jobs, hands them to the engine through LitServe's request
    queue, and turns the engine's events into LitGPT or OpenAI responses."""

    def __init__(self, server: ls.LitServer, info: ModelInfo) -> None:
        self.server, self.info = server, info
        self.created = int(time.time())
        self.inboxes: dict[str, asyncio.Queue] = {}
        self._dispatcher: Optional[asyncio.Task] = None
        self.closing_at: Optional[float] = None  # when the HTTP server was told to stop

    def mount(self, app: FastAPI) -> None:
        # LitServe registered a generic POST route for the LitAPI; these routes replace it.
        app.router.routes = [
            r for r in app.router.routes if getattr(r, "path", None) != API_PATH
        ]  # fmt: skip
        app.add_api_route(API_PATH, self.predict, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model:path}", self.model, methods=["GET"])
        app.add_exception_handler(RequestError, _request_error)

    # ---- parsing ---------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", "body") from None
        if not isinstance(body, dict):
            raise RequestError(
                f"the request body must be a JSON object, got {_json_type(body)}", "body"
            )
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return
        if not isinstance(model, str):
            raise RequestError(f"`model` must be a string, got {_json_type(model)}", "model")
        if model not in self.info.aliases:
            raise RequestError(
                f"model {model!r} does not exist here; this server has {self.info.name!r}",
                "model",
                status=404,
                code="model_not_found",
            )

    @staticmethod
    def _check_unsupported(body: dict) -> None:
        n = _get_int(body, "n")
        if n is not None and n != 1:
            raise RequestError(f"`n` must be 1 (one choice per request), got {n}", "n")
        for name, off in UNSUPPORTED.items():
            if name in body and not any(body[name] == v for v in off):
                raise RequestError(f"`{name}` is not supported by this server", name)

    def _job(
        self, body: dict, ids: list[int], field: str, defaults: Defaults, max_names: tuple[str, ...]
    ) -> dict:
        """Sampling fields + prompt ids -> a job, every value checked."""
        info = self.info
        if not ids:
            raise RequestError(f"`{field}` is empty: there is nothing to continue", field)
        if len(ids) >= info.context:
            raise RequestError(
                f"`{field}` is {len(ids)} tokens but the model's context is {info.context} "
                f"tokens; shorten it to at most {info.context - 1} tokens to leave room for the "
                "reply",
                field,
                code="context_length_exceeded",
            )
        max_tokens, name = None, max_names[0]
        for candidate in max_names:
            value = _get_int(body, candidate, minimum=1)
            if value is not None:
                max_tokens, name = value, candidate
                break
        if max_tokens is not None and max_tokens > info.max_new_tokens_limit:
            raise RequestError(
                f"`{name}` is {max_tokens} but this server allows at most "
                f"{info.max_new_tokens_limit} new tokens (--max_new_tokens_limit)",
                name,
            )
        if max_tokens is None:
            max_tokens = min(defaults.max_tokens or info.max_new_tokens_limit,
                             info.max_new_tokens_limit)  # fmt: skip
        temperature = _get_number(body, "temperature")
        temperature = defaults.temperature if temperature is None else temperature
        if temperature < 0:
            raise RequestError(f"`temperature` must be >= 0, got {temperature:g}", "temperature")
        top_p = _get_number(body, "top_p")
        top_p = 1.0 if top_p is None else top_p
        if not 0 < top_p <= 1:
            raise RequestError(f"`top_p` must be in (0, 1], got {top_p:g}", "top_p")
        top_k = _get_int(body, "top_k", minimum=1) if "top_k" in body else defaults.top_k
        seed = _get_int(body, "seed", minimum=0)
        if seed is not None and seed >= 2**63:
            raise RequestError(f"`seed` must be below 2**63, got {seed}", "seed")
        return {
            "ids": ids, "max_new_tokens": max_tokens, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "seed": seed, "stop": _get_stop(body),
            "ignore_eos": _get_bool(body, "ignore_eos"),
        }  # fmt: skip

    def _options(self, body: dict) -> Options:
        stream = _get_bool(body, "stream")
        usage = body.get("stream_options")
        include = False
        if usage is not None:
            if not isinstance(usage, dict):
                raise RequestError("`stream_options` must be an object", "stream_options")
            include = _get_bool(usage, "include_usage")
        return Options(stream=stream, include_usage=include)

    def _encode_prompt(self, body: dict) -> list[int]:
        """`prompt` of /v1/completions: a string, or token ids (one prompt per request)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.info.tokenizer.encode(prompt)
        vocab = self.info.tokenizer.vocab_size
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt
        ):
            return list(prompt)
        if prompt is None:
            raise RequestError("`prompt` is required", "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise RequestError("`prompt` must be one prompt per request (n = 1)", "prompt")
        raise RequestError(
            f"`prompt` must be a string or an array of token ids in [0, {vocab}), "
            f"got {_json_type(prompt)}",
            "prompt",
        )

    def _chat_messages(self, body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            got = "none" if messages is None else _json_type(messages)
            raise RequestError(
                f"`messages` must be a non-empty array of messages, got {got}", "messages"
            )
        out = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise RequestError(f"`{where}` must be an object, got {_json_type(m)}", where)
            role = m.get("role")
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise RequestError(
                    f"`{where}.role` must be system, developer, user or assistant, got {role!r}",
                    f"{where}.role",
                )
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                texts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):  # fmt: skip
                        raise RequestError(
                            f"`{where}.content` parts must be {{'type': 'text', 'text': str}}",
                            f"{where}.content",
                        )
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise RequestError(
                    f"`{where}.content` must be a string, got {_json_type(content)}",
                    f"{where}.content",
                )
            out.append({"role": role, "content": content})
        return out

    def parse_completion(self, body: dict) -> tuple[dict, Options]:
        self._check_model(body)
        self._check_unsupported(body)
        job = self._job(
            body, self._encode_prompt(body), "prompt", OPENAI_COMPLETIONS, ("max_tokens",)
        )
        return job, self._options(body)

    def parse_chat(self, body: dict) -> tuple[dict, Options]:
        self._check_model(body)
        self._check_unsupported(body)
        messages = self._chat_messages(body)
        style = self.info.chat_style
        try:
            ids = style.encode(self.info.tokenizer, style.render(messages))
        except UserError as e:
            raise RequestError(f"`messages`: {e}", "messages") from None
        names = ("max_completion_tokens", "max_tokens")
        job = self._job(body, ids, "messages", OPENAI_CHAT, names)
        job["stop"] = [*job["stop"], *style.stop]
        return job, self._options(body)

    def parse_predict(self, body: dict) -> tuple[dict, Options]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            got = "none" if prompt is None else _json_type(prompt)
            raise RequestError(f"`prompt` must be a string, got {got}", "prompt")
        style = self.info.predict_style
        tokenizer = self.info.tokenizer
        ids = tokenizer.encode(prompt) if style is None else style.encode(
            tokenizer, style.apply(prompt)
        )  # fmt: skip
        job = self._job(body, ids, "prompt", LITGPT_PREDICT, ("max_new_tokens", "max_tokens"))
        if style is not None:
            job["stop"] = [*job["stop"], *style.stop]
        return job, self._options(body)

    # ---- the engine's events ---------------------------------------------------------------

    def _start_dispatcher(self) -> None:
        if self._dispatcher is not None and not self._dispatcher.done():
            return
        self._watch_shutdown()
        event, box = asyncio.Event(), deque()
        self.server.response_buffer[MAILBOX] = ResponseBufferItem(event=event, response_queue=box)
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(event, box))

    def _watch_shutdown(self) -> None:
        """Note when uvicorn is told to stop (its SIGINT/SIGTERM handlers, wrapped): running
        requests then get the grace period to finish, not more."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()

        def closing() -> None:
            if self.closing_at is None:
                self.closing_at = time.monotonic()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum, frame, previous=previous) -> None:
                loop.call_soon_threadsafe(closing)
                previous(signum, frame)

            signal.signal(sig, handler)

    async def _dispatch(self, event: asyncio.Event, box: deque) -> None:
        while True:
            await event.wait()
            event.clear()
            while box:
                batch, _status = box.popleft()
                for uid, kind, payload in batch:
                    inbox = self.inboxes.get(uid)
                    if inbox is not None:
                        inbox.put_nowait((kind, payload))

    async def _events(
        self, request: Request, job: dict, stream: bool
    ) -> AsyncIterator[tuple[str, Any]]:
        """Submit `job`; yield its events up to "done" or "error". If the caller stops early (a
        client that went away), the engine is told to drop the request. Once the server is
        shutting down, a request still running near the end of the grace period ends with a 503
        error, so that no response is cut off without a word."""
        self._start_dispatcher()
        consumer = getattr(request.app, "response_queue_id", None) or 0
        uid = uuid.uuid4().hex
        inbox: asyncio.Queue = asyncio.Queue()
        self.inboxes[uid] = inbox
        requests = self.server.litapi_request_queues[API_PATH]
        requests.put((consumer, uid, time.monotonic(), {**job, "stream": stream}))
        finished = False
        try:
            while True:
                if self.closing_at is not None and (
                    time.monotonic() > self.closing_at + SHUTDOWN_GRACE_S - 0.75
                ):
                    yield "error", {"status": 503, "message": "the server is shutting down"}
                    return
                try:
                    if inbox.empty():
                        kind, payload = await asyncio.wait_for(inbox.get(), 0.25)
                    else:  # no timer for what is already here
                        kind, payload = inbox.get_nowait()
                except asyncio.TimeoutError:
                    # A streamed response notices a client that went away by itself (Starlette
                    # cancels it); one that sends nothing until the end has to look.
                    if not stream and await request.is_disconnected():
                        return
                    continue
                yield kind, payload
                if kind in ("done", "error"):
                    finished = True
                    return
        finally:
            self.inboxes.pop(uid, None)
            if not finished:
                requests.put((consumer, uid, time.monotonic(), CANCEL))

    async def _complete(self, request: Request, job: dict) -> Optional[dict]:
        """The whole answer (the "done" payload); None if the client went away first."""
        async with aclosing(self._events(request, job, stream=False)) as events:
            async for kind, payload in events:
                if kind == "done":
                    return payload
                if kind == "error":
                    raise RequestError(
                        payload["message"], status=payload["status"], kind=_error_type(payload)
                    )
        return None

    def _sse(self, request: Request, job: dict, chunk, first: Optional[dict], include_usage: bool):
        """An OpenAI event stream: `chunk(text, finish_reason)` per piece, then [DONE]."""

        async def events() -> AsyncIterator[str]:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async with aclosing(self._events(request, job, stream=True)) as stream:
                async for kind, payload in stream:
                    if kind == "piece":
                        yield f"data: {json.dumps(chunk(payload, None))}\n\n"
                    elif kind == "error":
                        error = {"message": payload["message"], "type": _error_type(payload),
                                 "param": None, "code": None}  # fmt: skip
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        return
                    else:
                        yield f"data: {json.dumps(chunk('', payload['finish_reason']))}\n\n"
                        if include_usage:
                            last = chunk("", None)
                            last["choices"], last["usage"] = [], _usage(payload)
                            yield f"data: {json.dumps(last)}\n\n"
                        yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # ---- routes ----------------------------------------------------------------------------

    async def predict(self, request: Request) -> Response:
        """LitGPT's shape: {"prompt": ...} -> {"output": ...}; with "stream": true, one JSON line
        {"output": piece} per piece."""
        job, options = self.parse_predict(await self._body(request))
        if options.stream:

            async def lines() -> AsyncIterator[str]:
                async with aclosing(self._events(request, job, stream=True)) as stream:
                    async for kind, payload in stream:
                        if kind == "piece":
                            yield json.dumps({"output": payload}) + "\n"
                        elif kind == "error":
                            yield json.dumps({"error": {"message": payload["message"]}}) + "\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")
        done = await self._complete(request, job)
        if done is None:
            return Response(status_code=499)
        return JSONResponse({"output": done["text"]}, headers=_batch_header(done))

    async def completions(self, request: Request) -> Response:
        job, options = self.parse_completion(await self._body(request))
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.info.name

        def chunk(text: str, finish_reason: Optional[str]) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [choice]}  # fmt: skip

        if options.stream:
            return self._sse(request, job, chunk, None, options.include_usage)
        done = await self._complete(request, job)
        if done is None:
            return Response(status_code=499)
        body = chunk(done["text"], done["finish_reason"])
        body["usage"] = _usage(done)
        return JSONResponse(body, headers=_batch_header(done))

    async def chat_completions(self, request: Request) -> Response:
        job, options = self.parse_chat(await self._body(request))
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.info.name

        def chunk(text: str, finish_reason: Optional[str], role: bool = False) -> dict:
            delta = {"role": "assistant", "content": text} if role else (
                {"content": text} if text else {}
            )  # fmt: skip
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [choice]}  # fmt: skip

        if options.stream:
            first = chunk("", None, role=True)
            return self._sse(request, job, chunk, first, options.include_usage)
        done = await self._complete(request, job)
        if done is None:
            return Response(status_code=499)
        message = {"role": "assistant", "content": done["text"]}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": done["finish_reason"]}  # fmt: skip
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": _usage(done)}  # fmt: skip
        return JSONResponse(body, headers=_batch_header(done))

    def _model_card(self) -> dict:
        return {"id": self.info.name, "object": "model", "created": self.created,
                "owned_by": "llmcycle", "max_model_len": self.info.context}  # fmt: skip

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, model: str) -> JSONResponse:
        self._check_model({"model": model})
        return JSONResponse(self._model_card())


def _error_type(payload: dict) -> str:
    return "server_error" if payload["status"] >= 500 else "invalid_request_error"


async def _request_error(request: Request, e: RequestError) -> JSONResponse:
    return e.response()


def _batch_header(done: dict) -> dict[str, str]:
    """How many requests, at most, were generated together with this one (a batching check)."""
    return {BATCH_HEADER: str(done["batch"])}


def _usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# --------------------------------------------------------------------------------------------
# Building and running the server


def model_names(checkpoint_dir: Path | str) -> tuple[str, ...]:
    """The id a checkpoint is served under (its path below `checkpoints/`, e.g. `org/name`, else
    its folder name) first, then other names a request may use for it (the path as given)."""
    path = Path(checkpoint_dir)
    parts, name = path.parts, path.name
    below = [i for i, part in enumerate(parts[:-1]) if part == "checkpoints"]
    if below:
        name = "/".join(parts[below[-1] + 1 :])
    return tuple(dict.fromkeys([name, path.name, str(checkpoint_dir), str(path.resolve())]))


def _accelerator(device: str) -> str:
    key = device.strip().lower()
    if key in ("auto", "cpu", "mps") or key == "cuda" or key.startswith("cuda:"):
        return "cuda" if key.startswith("cuda") else key
    raise UserError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")


def check_address(host: str, port: int) -> str:
    """The address to bind (LitServe binds 127.0.0.1, 0.0.0.0 or ::), checked to be free."""
    if host not in HOSTS:
        raise UserError(
            f"--host {host!r}: LitServe listens on 127.0.0.1 (this machine only, the default), "
            "0.0.0.0 (every IPv4 interface) or :: (every IPv6 interface)"
        )
    if not 1024 <= port <= 65535:
        raise UserError(f"--port must be between 1024 and 65535, got {port}")
    address = HOSTS[host]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as e:
            raise UserError(f"cannot listen on {address}:{port}: {e.strerror}") from None
    return address


def build_server(
    checkpoint_dir: Path | str,
    *,
    api_key: Optional[str] = None,
    max_batch_size: int = 16,
    batch_timeout: float = 0.0,
    max_new_tokens_limit: int = 1024,
    prompt_style: Optional[str] = "auto",
    precision: Optional[str] = None,
    device: str = "auto",
    banner: str = "",
) -> ls.LitServer:
    """A LitServer for a checkpoint folder: the checks that need no model happen here, the model
    loads in the inference worker when the server runs."""
    from lifecycle_cli.checkpoint import check_checkpoint_dir, load_config
    from lifecycle_cli.prompts import resolve_style
    from lifecycle_cli.tokenizer import Tokenizer

    if max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    if batch_timeout < 0:
        raise UserError(f"--batch_timeout must be >= 0 seconds, got {batch_timeout}")
    if max_new_tokens_limit < 1:
        raise UserError(f"--max_new_tokens_limit must be at least 1, got {max_new_tokens_limit}")
    folder = check_checkpoint_dir(checkpoint_dir)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json: serving text needs a tokenizer")
    config = load_config(folder)
    tokenizer = Tokenizer(folder)
    names = model_names(checkpoint_dir)
    info = ModelInfo(
        name=names[0], aliases=names, tokenizer=tokenizer, context=config.block_size,
        chat_style=resolve_style(folder, tokenizer, prompt_style, default="chat"),
        predict_style=resolve_style(folder, tokenizer, prompt_style, default="raw"),
        max_new_tokens_limit=max_new_tokens_limit,
    )  # fmt: skip
    api = EngineAPI(
        folder, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
        precision=precision, device=device, banner=banner,
    )  # fmt: skip
    middlewares = [(BearerAuth, {"api_key": api_key})] if api_key else []
    server = ls.LitServer(
        api, accelerator=_accelerator(device), devices=1, workers_per_device=1, timeout=False,
        middlewares=middlewares, model_metadata={"model": info.name, "context": info.context},
    )  # fmt: skip
    server.uvicorn_graceful_timeout = SHUTDOWN_GRACE_S
    Front(server, info).mount(server.app)
    server.setup_errors = api.setup_errors
    return server


def run_server(
    checkpoint_dir: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    log_level: str = "info",
    **kwargs: Any,
) -> None:
    """Build the server and serve until Ctrl+C or SIGTERM (both shut every process down)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the HTTP process is forked
    address = check_address(host, port)
    url_host = f"[{address}]" if ":" in address else address
    banner = f"; listening on http://{url_host}:{port}" + (" (API key required)" if api_key else "")
    server = build_server(checkpoint_dir, api_key=api_key, banner=banner, **kwargs)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        handler = _signal_handler(server, os.getpid())
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(
            host=address, port=port, num_api_servers=1, generate_client_file=False,
            log_level=log_level, access_log=False,
        )  # fmt: skip
    except RuntimeError as e:
        setup_errors = server.setup_errors
        if not setup_errors.empty():
            raise UserError(setup_errors.get()) from None
        raise UserError(f"the server failed to start: {e}") from None
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
        _end_children()


def _signal_handler(server: ls.LitServer, main_pid: int):
    """Ctrl+C and SIGTERM both take LitServe's clean shutdown path (KeyboardInterrupt).

    In the main process the handler first gives the HTTP process a moment longer than its own
    graceful timeout, so that LitServe does not kill it while it closes open streams. Processes
    forked from the main one (the HTTP server, LitServe's queue manager) inherit the handler:
    while the main process lives they leave the signal to it (a SIGTERM to the whole process
    group must not kill the queue manager under the shutdown); orphaned, SIGTERM ends them."""

    def handler(signum, frame) -> None:
        if os.getpid() == main_pid:
            server.uvicorn_graceful_timeout = SHUTDOWN_GRACE_S + 2
            raise KeyboardInterrupt
        if os.getppid() == main_pid:
            return
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    return handler


def _end_children(grace: float = 3.0) -> None:
    """Stop the processes this server started that are still running (startup interrupted
    before LitServe's own shutdown could run)."""
    children = mp.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)
