"""The inference worker: `EngineAPI` (LitServe's LitAPI; its `setup` loads the model and builds
the `Engine`) and `EngineLoop`, the LitLoop that runs the engine for every route.

A request's trip: a route puts `(consumer, uid, time, job)` on LitServe's request queue (the
same queue and tuple LitServe's own routes use); the loop's reader thread hands it to the engine;
after every step the loop sends one message per HTTP process holding that step's events for all
rows, `[(uid, "piece" | "done" | "error", payload), ...]`, under the fixed uid `MAILBOX` (the app
hands each event to the waiting route). A client that goes away puts `CANCEL` for its uid on the
request queue.

Why not LitServe's own `ContinuousBatchingLoop` (litserve 0.2.19, `loops/continuous_batching_loop`,
the public way to run such a loop): it cannot carry this engine. It sends one response message
per row per step (at batch 32 that traffic alone costs a large share of a step on a small CPU),
it has no way to drop a running request whose client went away (requests only leave by
finishing), and it answers only through LitServe's generic route and spec, not the LitGPT and
OpenAI routes with their own error and streaming shapes. So this module subclasses the public
`LitLoop`, and the few LitServe 0.2.19 internals the package needs beyond it (the request queue
of a route, the response buffer, an HTTP process's consumer id, the generic route) are reached
only through the functions at the end of this module: that is why pyproject pins
litserve >=0.2.19,<0.3.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import litserve as ls
from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

from lifecycle_cli.errors import UserError

API_PATH = "/predict"
MAILBOX = "llmcycle-engine-events"  # the uid every engine message travels under
CANCEL = {"cancel": True}


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
        quantize: Optional[str] = None,
        adapter: Optional[Path] = None,
        banner: str = "",
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH,
            stream=True, loop=EngineLoop(),
        )  # fmt: skip
        self.checkpoint_dir = Path(checkpoint_dir)
        self.precision, self.device_name, self.banner = precision, device, banner
        self.quantize = quantize
        self.adapter = adapter
        # Set in the parent: a setup failure comes back as one readable line.
        self.setup_errors = mp.get_context("spawn").SimpleQueue()
        self.engine: Any = None  # the Engine, once set up

    def setup(self, device: str) -> None:
        from lifecycle_cli.api import load_for_inference
        from lifecycle_cli.generate.engine import Engine, fast_decode_layout

        wanted = self.device_name if self.device_name != "auto" else device
        try:
            llm = load_for_inference(
                self.checkpoint_dir, wanted, self.precision, self.quantize, adapter=self.adapter
            )
        except UserError as e:
            self.setup_errors.put(str(e))
            raise
        if llm.model.wte.weight.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            _leave_a_core_for_http()
        fast_decode_layout(llm.model)
        self.engine = Engine(llm.model, llm.tokenizer, self.max_batch_size)
        n = sum(p.numel() for p in llm.model.parameters())
        dtype = str(next(llm.model.parameters()).dtype).removeprefix("torch.")
        if self.quantize:
            dtype += f", {self.quantize} linear layers"
        lora = f" with the adapters of {self.adapter}" if self.adapter else ""
        print(
            f"llmcycle serve: {self.checkpoint_dir} loaded{lora} ({n / 1e6:.1f}M parameters, "
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
                events = []
                for consumer, uid, _, job in items:
                    key = (consumer, uid)
                    if job == CANCEL:
                        tokens = engine.cancel(key)
                        if tokens is not None:
                            print(
                                f"llmcycle serve: request {uid} cancelled (client went away) "
                                f"after {len(tokens)} tokens; its slot is free",
                                file=sys.stderr,
                                flush=True,
                            )
                        continue
                    try:
                        engine.submit(key, job["ids"], job["params"], stream=job["stream"])
                    except UserError as e:  # checked in the HTTP process already; kept safe
                        events.append((key, "error", {"status": 400, "message": str(e)}))
                if engine.busy():
                    events += engine.step()
                if events:
                    self._send(transport, events)
        except KeyboardInterrupt:
            return

    @staticmethod
    def _next_items(inbox: queue.Queue, engine: Any, lit_api: EngineAPI) -> Optional[list]:
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
# LitServe 0.2.19 internals: every use of them is here


def request_queue(server: ls.LitServer) -> Any:
    """The queue LitServe's own route for `API_PATH` puts requests on (the loop reads it)."""
    return server.litapi_request_queues[API_PATH]


def consumer_id(app: Any) -> int:
    """Which HTTP process this is: the loop answers each process on its own queue."""
    return getattr(app, "response_queue_id", None) or 0


def open_mailbox(server: ls.LitServer) -> tuple[asyncio.Event, deque]:
    """Where LitServe's response reader files the messages sent under `MAILBOX`: (the event it
    sets, the deque it appends `(events, status)` to)."""
    event, box = asyncio.Event(), deque()
    server.response_buffer[MAILBOX] = ResponseBufferItem(event=event, response_queue=box)
    return event, box


def drop_generic_route(app: Any) -> None:
    """Remove the generic POST route LitServe registered for the LitAPI (ours replace it)."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != API_PATH]
