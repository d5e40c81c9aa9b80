"""The llama.cpp side of `make check-gguf`, run by the Python of the llama-cpp-python
environment (it imports neither torch nor llmcycle).

    python benchmarks/gguf_llamacpp.py JOB.json OUT.json

JOB: {"models": [{"key", "path", "tokens", "logits_file", "prompt", "new_tokens", "texts",
"messages", "decode_tokens"}]}. OUT: per key (and in logits_file, as .npy) the logits of
`tokens` at every position, the greedy
continuation of `prompt`, the ids of each text, the conversation as the file's chat template
renders it (llama-cpp-python's Jinja2ChatFormatter, what its chat completion uses) and decode
tokens/s.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

F32 = 0  # GGML_TYPE_F32: the KV cache in float32 (llama.cpp's default f16 rounds it)


def run(model: dict) -> dict:
    llm = Llama(
        model_path=model["path"], n_ctx=256, n_batch=256, logits_all=True, n_threads=2,
        verbose=False, seed=0, type_k=F32, type_v=F32,
    )  # fmt: skip
    out: dict = {}
    llm.reset()
    llm.eval(model["tokens"])
    np.save(model["logits_file"], np.asarray(llm.scores[: len(model["tokens"])], np.float32))

    llm.reset()
    ids = list(model["prompt"])
    llm.eval(ids)
    greedy = []
    for _ in range(model["new_tokens"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    out["greedy"] = greedy

    out["ids"] = [
        llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in model["texts"]
    ]
    template = llm.metadata.get("tokenizer.chat_template")
    vocab = llm._model
    bos = vocab.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
    eos = vocab.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
    if template:
        formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        out["chat"] = [formatter(messages=m).prompt for m in model["messages"]]

    speeds = [0.0]
    for _ in range(3 if model["decode_tokens"] else 0):  # the best of 3: the machine is shared
        llm.reset()
        llm.eval(list(model["prompt"]))
        start = time.perf_counter()
        for _ in range(model["decode_tokens"]):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        speeds.append(model["decode_tokens"] / (time.perf_counter() - start))
    out["decode_tokens_per_s"] = max(speeds)  # 0: not timed
    return out


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    results = {m["key"]: run(m) for m in job["models"]}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
