"""`llmcycle serve`: a LitServe endpoint for a checkpoint (LitGPT's /predict and the OpenAI API)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

API_KEY_ENV = "LLMCYCLE_API_KEY"


def serve(
    checkpoint_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_batch_size: int = 16,
    batch_timeout: float = 0.0,
    max_new_tokens_limit: int = 1024,
    prompt_style: str = "auto",
    precision: Optional[str] = None,
    device: str = "auto",
    quantize: Optional[str] = None,
    adapter: Optional[Path] = None,
) -> None:
    """Serve a model over HTTP until Ctrl+C or SIGTERM.

    Routes: `POST /predict` ({"prompt": ...} -> {"output": ...}, as `litgpt serve`),
    `POST /v1/chat/completions` and `POST /v1/completions` (OpenAI-compatible, `"stream": true`
    for server-sent events), `GET /v1/models`, `GET /health`. Requests that arrive together
    are generated together (continuous batching); each gets its own answer.

    Args:
        checkpoint_dir: The checkpoint folder (with its tokenizer).
        host: Where to listen: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface:
            anyone who can reach the machine can use the model; set an API key).
        port: TCP port.
        api_key: Require `Authorization: Bearer <api_key>` on every route but /health
            (default: the LLMCYCLE_API_KEY environment variable; unset: no key).
        max_batch_size: At most this many requests generate at once; more wait for a free slot.
            1 turns batching off.
        batch_timeout: Seconds an idle server waits for more requests before starting, so that
            requests arriving together start together (0: start at once).
        max_new_tokens_limit: The most new tokens one request may ask for; a larger
            max_tokens is refused (400). Also the default for chat requests that set none.
        prompt_style: How chat messages and /predict prompts are formatted. `auto`: the style
            saved with the checkpoint, else the tokenizer's chat template, else plain (the text
            as given). Or a name: chat_template, alpaca, chatml, llama3, llama2, mistral, phi3,
            gemma, qwen, plain. /v1/completions always uses the prompt as given.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on a GPU that supports
            it, else 32-true).
        device: auto (a GPU if there is one, else CPU), cpu, cuda, cuda:N or mps.
        quantize: int8 or int4: weight-only quantized linear layers and output head (int8
            per output channel, int4 per group of 32 inputs), for less memory and faster
            decoding; the checkpoint is unchanged. Default: the weights as stored.
        adapter: A LoRA run (`finetune`/`align --method lora` out_dir, its final/ or its
            lora.safetensors) to put on top of checkpoint_dir, its base, without merging; its
            recorded prompt style becomes the default.
    """
    from lifecycle_cli.errors import UserError
    from lifecycle_cli.serve import run_server

    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    elif not api_key.strip():
        raise UserError("--api_key is empty: give a key, or leave the flag out for no key")
    run_server(
        checkpoint_dir, host=host, port=port, api_key=api_key, max_batch_size=max_batch_size,
        batch_timeout=batch_timeout, max_new_tokens_limit=max_new_tokens_limit,
        prompt_style=prompt_style, precision=precision, device=device, quantize=quantize,
        adapter=adapter,
    )  # fmt: skip
