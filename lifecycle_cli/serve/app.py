"""The HTTP app (the API server process): LitGPT's `/predict` and the OpenAI routes, added to
the FastAPI app LitServe builds (its own generic POST route is replaced), so one engine serves
every route. `Front` checks each request (requests.py), hands the job to the engine worker
through LitServe's request queue and turns the engine's events into LitGPT or OpenAI responses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Optional

import litserve as ls
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lifecycle_cli.serve.requests import (
    ModelInfo,
    RequestError,
    Requests,
    error_response,
    read_body,
)
from lifecycle_cli.serve.worker import (
    API_PATH,
    CANCEL,
    consumer_id,
    drop_generic_route,
    open_mailbox,
    request_queue,
)

BATCH_HEADER = "x-llmcycle-batch"
SHUTDOWN_GRACE_S = 2  # open streams may hold a shutdown up this long, no more
OPEN_PATHS = frozenset({"/health"})  # answered without an API key (load balancers)


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


class Front:
    """The routes. Parses requests into jobs, hands them to the engine through LitServe's request
    queue, and turns the engine's events into LitGPT or OpenAI responses."""

    def __init__(self, server: ls.LitServer, info: ModelInfo) -> None:
        self.server, self.info = server, info
        self.requests = Requests(info)
        self.created = int(time.time())
        self.inboxes: dict[str, asyncio.Queue] = {}
        self._dispatcher: Optional[asyncio.Task] = None
        self.closing_at: Optional[float] = None  # when the HTTP server was told to stop

    def mount(self, app: FastAPI) -> None:
        drop_generic_route(app)
        app.add_api_route(API_PATH, self.predict, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model:path}", self.model, methods=["GET"])
        app.add_exception_handler(RequestError, _request_error)

    # ---- the engine's events ---------------------------------------------------------------

    def _start_dispatcher(self) -> None:
        if self._dispatcher is not None and not self._dispatcher.done():
            return
        self._watch_shutdown()
        event, box = open_mailbox(self.server)
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
        consumer = consumer_id(request.app)
        uid = uuid.uuid4().hex
        inbox: asyncio.Queue = asyncio.Queue()
        self.inboxes[uid] = inbox
        requests = request_queue(self.server)
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
        job, options = self.requests.parse_predict(await read_body(request))
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
        job, options = self.requests.parse_completion(await read_body(request))
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
        job, options = self.requests.parse_chat(await read_body(request))
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
        self.requests.check_model({"model": model})
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
