"""Building and running the server: checks that need no model, the LitServer, signals."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

import litserve as ls

from lifecycle_cli.errors import UserError
from lifecycle_cli.serve.app import SHUTDOWN_GRACE_S, BearerAuth, Front
from lifecycle_cli.serve.requests import ModelInfo
from lifecycle_cli.serve.worker import EngineAPI

HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::": "::"}


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
    quantize: Optional[str] = None,
    adapter: Optional[Path | str] = None,
    banner: str = "",
) -> ls.LitServer:
    """A LitServer for a checkpoint folder: the checks that need no model happen here, the model
    loads in the inference worker when the server runs."""
    from lifecycle_cli.checkpoint import check_checkpoint_dir, load_config
    from lifecycle_cli.generate.options import check_quantize
    from lifecycle_cli.prompts import resolve_style, style_folder
    from lifecycle_cli.tokenizer import Tokenizer

    check_quantize(quantize)
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
        style=resolve_style(style_folder(folder, adapter), tokenizer, prompt_style),
        max_new_tokens_limit=max_new_tokens_limit,
    )  # fmt: skip
    api = EngineAPI(
        folder, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
        precision=precision, device=device, quantize=quantize, adapter=adapter, banner=banner,
    )  # fmt: skip
    middlewares = [(BearerAuth, {"api_key": api_key})] if api_key else []
    server = ls.LitServer(
        api, accelerator=_accelerator(device), devices=1, workers_per_device=1, timeout=False,
        middlewares=middlewares, model_metadata={"model": info.name, "context": info.context},
    )  # fmt: skip
    server.uvicorn_graceful_timeout = SHUTDOWN_GRACE_S
    _stop_monitor_first(server)
    Front(server, info).mount(server.app)
    server.setup_errors = api.setup_errors
    return server


def _stop_monitor_first(server: ls.LitServer) -> None:
    """LitServe's worker-monitor thread polls a manager-held shutdown event that a Ctrl+C or
    SIGTERM shutdown never sets: it went on polling while the shutdown stopped the workers and
    the manager, and logged their deaths and a "Connection reset by peer" traceback. Before the
    shutdown, hand it an event already set, which it reads without the manager."""
    shutdown = server._perform_graceful_shutdown

    def perform(*args: Any, **kwargs: Any) -> None:
        stopped = threading.Event()
        stopped.set()
        server._shutdown_event = stopped
        shutdown(*args, **kwargs)

    server._perform_graceful_shutdown = perform


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
